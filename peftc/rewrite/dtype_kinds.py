"""Which float tensors of a traced graph follow the model's dtype, and which are fixed at float32.

A model traced in float32 holds `torch.float32` in many places: casts written `.to(x.dtype)` (the model's
dtype), casts written `.float()` (a float32 island on purpose: rotary angles, positions), masks made with
`torch.full(..., dtype=float32)`, ... After `gm.to(torch.bfloat16)` the first kind must become bfloat16 and the
second stay float32. This module tells them apart from the graph alone, and rewrites the graph so that it runs
at whatever dtype its parameters have:

* every float value gets a kind: MODEL (from parameters, float inputs, tensors created in the model's dtype) or
  FIXED (a float32 island: an integer cast to float, a buffer cast up with `.float()`, an op with an explicit
  `dtype=`);
* a float32 -> float32 cast of a MODEL value that a parameter or an input feeds is an identity (dropped); of a
  value made from buffers alone (rotary `inv_freq.float()`) it is an upcast (kept); of a FIXED value it is the
  way back to the model's dtype (its dtype becomes the run-time model dtype);
* creation ops (`full`, `zeros`, ...) in float32 create in the run-time model dtype (`arange` stays float32);
* an op that needs equal dtypes (linear, matmul, conv, attention, norms) fed both kinds casts its FIXED inputs
  to the model's dtype;
* device constants become the parameters' run-time device.

The run-time dtype and device are read from one parameter at the start of each forward (`getattr(p, "dtype")`),
so `gm.to(torch.bfloat16)`, `.double()` or `.to("cuda")` need no new graph, and a re-export bakes the current one.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx

aten = torch.ops.aten
MODEL, FIXED = "model", "fixed"

CASTS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default}
CREATE = {aten.full.default, aten.zeros.default, aten.ones.default, aten.empty.memory_format,
          aten.scalar_tensor.default,
          aten.new_full.default, aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default,
          aten.full_like.default, aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default,
          aten.rand.default, aten.randn.default}
FIXED_CREATE = {aten.arange.default, aten.arange.start, aten.arange.start_step, aten.linspace.default}
STRICT = {aten.linear.default, aten.matmul.default, aten.mm.default, aten.bmm.default, aten.addmm.default,
          aten.baddbmm.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
          aten.convolution.default, aten.scaled_dot_product_attention.default, aten.layer_norm.default,
          aten.group_norm.default, aten.batch_norm.default}


def _val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _float(n: Any) -> bool:
    v = _val(n)
    return isinstance(v, torch.Tensor) and v.dtype.is_floating_point


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: out.append(a) if _float(a) else None)
    return out


def _has_dtype_arg(node: fx.Node, dtype: torch.dtype) -> bool:
    return node.kwargs.get("dtype") is dtype or any(a is dtype for a in node.args)


def _replace_constants(node: fx.Node, old: Any, new: fx.Node) -> None:
    node.args = tuple(new if a is old or (isinstance(old, torch.device) and a == old) else a for a in node.args)
    node.kwargs = {k: new if v is old or (isinstance(old, torch.device) and v == old) else v
                   for k, v in node.kwargs.items()}


ANCHOR = "peftc_dtype"   # an empty buffer that `.to()` casts and moves with the parameters


def _anchor(gm: fx.GraphModule) -> fx.Node | None:
    """A get_attr of an empty buffer in the dtype and device of the model's first float parameter: it carries
    the model's run-time dtype and device without reading (and so adapting or densifying) any real weight."""
    first = next((p for p in gm.parameters() if p.is_floating_point()), None)
    if first is None:
        return None
    if not hasattr(gm, ANCHOR):
        gm.register_buffer(ANCHOR, torch.empty(0, dtype=first.dtype, device=first.device), persistent=False)
    body = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(body):
        return gm.graph.get_attr(ANCHOR)


def make_dtype_generic(gm: fx.GraphModule) -> bool:
    """Rewrite gm's graph in place (see the module docstring). Returns whether anything changed."""
    graph = gm.graph
    anchor = _anchor(gm)
    if anchor is None:
        return False
    trace_dtype, trace_device = getattr(gm, ANCHOR).dtype, getattr(gm, ANCHOR).device
    with graph.inserting_after(anchor):
        run_dtype = graph.call_function(getattr, (anchor, "dtype"))
    with graph.inserting_after(run_dtype):
        run_device = graph.call_function(getattr, (anchor, "device"))
    params = {n for n, _ in gm.named_parameters()}
    kind: dict[fx.Node, str] = {}
    anchored: dict[fx.Node, bool] = {}   # a parameter, a float input or a created tensor feeds it
    changed = False
    for node in list(graph.nodes):
        if node in (anchor, run_dtype, run_device) or node.op == "output":
            continue
        fargs = _tensor_args(node)
        anchored[node] = any(anchored.get(a, False) for a in fargs)
        if node.op == "placeholder":
            kind[node], anchored[node] = MODEL, True
            continue
        if node.op == "get_attr":
            kind[node], anchored[node] = MODEL, node.target in params
            continue
        if node.op != "call_function":
            continue
        out_float = _float(node)
        if node.target in CASTS:
            src = node.args[0]
            out_dtype = _val(node).dtype if _val(node) is not None else None
            src_dtype = _val(src).dtype if _val(src) is not None else None
            same_device = _val(node) is not None and _val(src) is not None and _val(node).device == _val(src).device
            if out_dtype is not None and out_dtype == src_dtype and same_device and (not out_float or (
                    kind.get(src) == MODEL and anchored.get(src) and src.op != "placeholder")):
                node.replace_all_uses_with(src)       # an identity at any dtype
                graph.erase_node(node)
                changed = True
                continue
            _replace_constants(node, trace_device, run_device)
            if not out_float:
                continue
            if out_dtype == trace_dtype and src_dtype == trace_dtype and (
                    kind.get(src) == FIXED or src.op == "placeholder"):
                _replace_constants(node, trace_dtype, run_dtype)      # back to the model's dtype
                kind[node], anchored[node] = MODEL, True
            else:
                kind[node] = FIXED                                    # int -> float, buffer.float(), fp16 -> fp32
            changed = True
            continue
        if node.target in CREATE or node.target in FIXED_CREATE:
            _replace_constants(node, trace_device, run_device)
            if node.target in CREATE and _has_dtype_arg(node, trace_dtype):
                _replace_constants(node, trace_dtype, run_dtype)
                kind[node], anchored[node] = MODEL, True
            elif out_float:   # float32 on purpose (arange, another dtype), or like its input (zeros_like, ...)
                like = [kind.get(a, MODEL) for a in fargs[:1]] if node.target in CREATE else []
                kind[node] = like[0] if like and not _has_dtype_arg(node, trace_dtype) else FIXED
            changed = True
            continue
        if not out_float:
            continue
        kinds = {kind.get(a, MODEL) for a in fargs}
        if node.target in STRICT and kinds == {MODEL, FIXED}:
            for a in fargs:
                if kind.get(a) == FIXED:
                    with graph.inserting_before(node):
                        cast = graph.call_function(aten.to.dtype, (a, run_dtype))
                    cast.meta["val"] = _val(a)
                    kind[cast], anchored[cast] = MODEL, True
                    node.replace_input_with(a, cast)
            changed = True
            kinds = {MODEL}
        fixed = _has_dtype_arg(node, trace_dtype) or not fargs or FIXED in kinds
        kind[node] = FIXED if fixed else MODEL
    for n in (run_device, run_dtype, anchor):
        if not n.users:
            graph.erase_node(n)
    if not anchor.users:
        delattr(gm, ANCHOR)
    return changed
