"""Model -> fx GraphModule with torch.export (strict=False), dynamic batch and sequence dimensions.

What is traced is the model as users call it, with two changes that make every output stand on its own:
the cache is off (`use_cache=False` where the model takes it, without touching its config), and the outputs
are plain: a Hugging Face `ModelOutput` becomes a dict of its tensors (`{"logits": ...}`), `None` and cache
objects are dropped, tuples stay tuples. A `.pt2` then loads with only torch imported.

Dynamic axes have names: `batch` (dim 0 of every input), `sequence` (the token axis of `input_ids`,
`attention_mask`, ..., one symbol for all of them) and `decoder_sequence` (the same for `decoder_*` inputs).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import fx, nn
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from peftc.errors import PeftcError
from peftc.experts import exportable_experts

# the HF forward keywords set at trace time (when the forward takes them): no cache, named outputs
TRACE_KWARGS = {"use_cache": False, "return_dict": True}


def plain_outputs(out: Any) -> Any:
    """Tensors, or dicts/tuples of them: ModelOutput (any Mapping) -> dict; None and non-tensor leaves dropped."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        items = ((str(k), plain_outputs(v)) for k, v in out.items())
        return {k: v for k, v in items if v is not None}
    if isinstance(out, (tuple, list)):
        kept = tuple(v for v in (plain_outputs(v) for v in out) if v is not None)
        return kept or None
    return None


class _Plain(nn.Module):
    """The model's modules, parameters and buffers under their own names (so the graph's paths are the model's),
    with a forward that calls the model without cache and returns plain outputs. The model is not changed."""

    def __init__(self, model: nn.Module, call_kwargs: dict[str, Any], input_names: list[str],
                 extra: tuple[str, ...] = ()) -> None:
        super().__init__()
        self._modules.update(model._modules)
        self._parameters.update(model._parameters)
        self._buffers.update(model._buffers)
        self._non_persistent_buffers_set |= model._non_persistent_buffers_set
        model_ = model

        def forward(**inputs: torch.Tensor) -> Any:
            inputs = {k: v for k, v in inputs.items() if k not in extra}   # graph inputs the model never sees
            out = plain_outputs(model_(**inputs, **call_kwargs))
            if out is None:
                raise PeftcError(f"{type(model_).__name__} returned no tensor")
            return out

        forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in input_names])
        self.__dict__["forward"] = forward


def base_forward(module: nn.Module, input_names: list[str]) -> Callable[..., Any]:
    """The model's own forward as the traced graph computes it (plain outputs, no cache): the base model's
    outputs, for comparing a graph whose adapters are off."""
    wrapped = _Plain(module, trace_kwargs(module), input_names)
    return lambda **inputs: wrapped(**inputs)


def trace_kwargs(module: nn.Module) -> dict[str, Any]:
    """The TRACE_KWARGS the module's forward takes by name."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {k: v for k, v in TRACE_KWARGS.items() if k in params}


def is_token_axis(t: torch.Tensor) -> bool:
    """Dim 1 of integer (B, S) inputs (ids, masks, positions) and of float (B, S, H) inputs (embeddings)."""
    return t.dim() == 2 and not t.dtype.is_floating_point or t.dim() == 3 and t.dtype.is_floating_point


def axis_names(inputs: dict[str, torch.Tensor]) -> dict[str, dict[int, str]]:
    """input -> {axis: name} for the axes that may be dynamic: batch, and the (decoder_)sequence axis."""
    names: dict[str, dict[int, str]] = {}
    for name, t in inputs.items():
        axes: dict[int, str] = {}
        if t.dim() >= 1:
            axes[0] = "batch"
        if is_token_axis(t):
            axes[1] = "decoder_sequence" if name.startswith("decoder_") else "sequence"
        names[name] = axes
    return names


@dataclass
class DynamicAxes:
    """The dynamic axes a trace found: input -> {axis: name}, and the largest size a name may take (the model's
    own limits, e.g. BERT's 128 positions)."""
    names: dict[str, dict[int, str]]
    max: dict[str, int] = field(default_factory=dict)
    auto: frozenset[str] = frozenset()   # names traced as Dim.AUTO (sizes the model ties to others: past + new)


def dynamic_shapes_for(inputs: dict[str, torch.Tensor], axes: DynamicAxes | None = None
                       ) -> dict[str, dict[int, Any]]:
    """torch.export dynamic_shapes: with `axes` (from a first trace), one named Dim per axis name, shared by all
    axes of that name; without, Dim.AUTO on every candidate axis (torch.export keeps the ones that are dynamic)."""
    if axes is None:
        return {n: {i: Dim.AUTO for i in a} for n, a in axis_names(inputs).items()}
    dims: dict[str, Any] = {}
    for name in sorted({a for ax in axes.names.values() for a in ax.values()}):
        dims[name] = Dim.AUTO if name in axes.auto else Dim(name, max=axes.max[name]) if name in axes.max else Dim(name)
    return {n: {i: dims[a] for i, a in axes.names.get(n, {}).items()} for n in inputs}


def dynamic_axes(ep: torch.export.ExportedProgram, inputs: dict[str, torch.Tensor]) -> DynamicAxes:
    """The candidate axes that the trace kept symbolic, their names and upper bounds."""
    candidates = axis_names(inputs)
    axes = DynamicAxes({})
    for node in ep.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" and node.name in inputs else None
        if not isinstance(val, torch.Tensor):
            continue
        axes.names[node.name] = {}
        for i, name in candidates[node.name].items():
            size = val.shape[i] if i < val.dim() else 0
            if is_concrete_int(size):     # a SymInt the trace specialized (a Conv1d's channels) is not dynamic
                continue
            axes.names[node.name][i] = name
            upper = ep.range_constraints.get(size.node.expr)
            upper = getattr(upper, "upper", None)
            if isinstance(upper, sympy.Integer):          # not int_oo
                axes.max[name] = min(int(upper), axes.max.get(name, int(upper)))
    return axes


def export_program(module: nn.Module, inputs: dict[str, torch.Tensor],
                   axes: DynamicAxes | None = None, extra: tuple[str, ...] = ()
                   ) -> torch.export.ExportedProgram:
    """`extra`: inputs that become graph inputs without being passed to the model (for the passes to use)."""
    wrapped = _Plain(module, trace_kwargs(module), list(inputs), extra)
    try:
        with exportable_experts(module):   # MoE experts as plain ATen ops (see peftc/experts.py)
            return torch.export.export(wrapped, (), kwargs=dict(inputs),
                                       dynamic_shapes=dynamic_shapes_for(inputs, axes), strict=False)
    except PeftcError:
        raise
    except Exception as e:  # noqa: BLE001 - torch.export raises many kinds
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PeftcError(f"torch.export could not trace the model with inputs "
                         f"{ {k: list(v.shape) for k, v in inputs.items()} }: {type(e).__name__}: {first}") from None


def trace(module: nn.Module, inputs: dict[str, torch.Tensor], extra: tuple[str, ...] = ()) -> fx.GraphModule:
    """The model as a plain (trainable) fx GraphModule over ATen ops, parameters as get_attr nodes.

    `gm.peftc_axes` records the dynamic axes and their names, for re-exporting (.pt2, ONNX). `extra` names
    inputs (in `inputs`) that the graph takes but the model does not (`adapter_ids`). A module that names its
    own dynamic axes (a `peftc_axes` attribute: generation.WithPast's cache axes) is traced with those."""
    named = getattr(module, "peftc_axes", None)
    ep = export_program(module, inputs, axes=named, extra=extra)
    unlifted = ep.module()
    gm = fx.GraphModule(unlifted, unlifted.graph)   # a plain GraphModule: .train()/.eval() work
    # Frozen parameters of our own that share storage with the model's: the caller's module keeps its
    # requires_grad flags, and nothing peftc does writes into its tensors.
    fresh: dict[int, nn.Parameter] = {}
    for mod in gm.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                if id(p) not in fresh:
                    fresh[id(p)] = nn.Parameter(p.detach(), requires_grad=False)
                mod._parameters[name] = fresh[id(p)]
    gm.peftc_axes = named if isinstance(named, DynamicAxes) else dynamic_axes(ep, inputs)
    return gm
