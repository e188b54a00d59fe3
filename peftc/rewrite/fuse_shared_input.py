"""Pass `fuse`: adapters that read the same input run their first projection as one matmul.

After factoring, LoRA on q_proj, k_proj and v_proj computes linear(x, A_q), linear(x, A_k) and
linear(x, A_v) on the same x. This pass concatenates the A's and runs one linear(x, cat(A_q, A_k, A_v)),
then splits the result: one read of x and one GEMM instead of three. Only live adapter tensors (the
small down-projections peftc inserted) are fused, or weights peftc computes from them alone (the stacked
A of several adapters, pass `stack`); gradients flow through the concatenation.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from peftc.manifest import Manifest
from peftc.rewrite.graph_tools import TAG, get_path, hoist_before, static_val

aten = torch.ops.aten


def _live_weight(node: Any, gm: fx.GraphModule, manifest: Manifest) -> torch.Tensor | None:
    """The (meta) value of a 2-D weight that is a live adapter tensor, or computed by peftc from live adapter
    tensors alone (e.g. cat(A_1, A_2)); None otherwise."""
    if isinstance(node, fx.Node) and node.op == "get_attr" and node.target in manifest.live:
        t = get_path(gm, node.target)
        return t if t.dim() == 2 else None
    if (isinstance(node, fx.Node) and node.op == "call_function" and TAG in node.meta
            and node.all_input_nodes and all(_live_weight(a, gm, manifest) is not None for a in node.all_input_nodes)):
        v = static_val(gm, node)
        return v if v is not None and v.dim() == 2 else None
    return None


def fuse_shared_input(manifest: Manifest) -> Any:
    def run(gm: fx.GraphModule) -> PassResult:
        groups: dict[tuple[fx.Node, torch.dtype], list[fx.Node]] = {}
        for n in gm.graph.nodes:
            if (n.op == "call_function" and n.target is aten.linear.default and TAG in n.meta
                    and len(n.args) == 2 and not n.kwargs):
                w = _live_weight(n.args[1], gm, manifest)
                if w is not None and isinstance(n.args[0], fx.Node):
                    groups.setdefault((n.args[0], w.dtype), []).append(n)
        modified = False
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        for (x, _), linears in groups.items():
            if len(linears) < 2:
                continue
            linears.sort(key=order.get)
            first = linears[0]
            sizes = [_live_weight(ln.args[1], gm, manifest).shape[0] for ln in linears]
            g = gm.graph
            with g.inserting_before(first):
                weights = [g.get_attr(ln.args[1].target) if ln.args[1].op == "get_attr" else ln.args[1]
                           for ln in linears]
            for w in weights:
                if w.op != "get_attr":
                    hoist_before(w, first, order)
            with g.inserting_before(first):
                cat = g.call_function(aten.cat.default, (weights, 0))
                fused = g.call_function(aten.linear.default, (x, cat))
                split = g.call_function(aten.split_with_sizes.default, (fused, sizes, -1))
                parts = [g.call_function(operator.getitem, (split, i)) for i in range(len(linears))]
            for node in (*[w for w in weights if w.op == "get_attr"], cat, fused, split, *parts):
                node.meta[TAG] = first.meta[TAG]
                if "nn_module_stack" in first.meta:
                    node.meta["nn_module_stack"] = first.meta["nn_module_stack"]
            for ln, part in zip(linears, parts):
                ln.replace_all_uses_with(part)
                g.erase_node(ln)
            modified = True
        if modified:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)

    return run
