"""Before an ONNX export: compute the input-independent parts of a graph that the ONNX converter cannot
express exactly (FFTs: onnxruntime's DFT drifts from torch's FFT as the update's scale grows) or at all (a
linear solve, such as the exact Cayley transform of OFT / BOFT), so that they
reach the ONNX file as initializers. Only nodes whose every input is a stored tensor or a constant fold;
anything that reads an input stays in the graph."""
from __future__ import annotations

from typing import Any

import torch
from torch import fx

from peftc.ops import NOT_EXPORTABLE, real_ifft2
from peftc.rewrite.graph_tools import constant_evaluator

# ops whose input-independent uses are computed before export: FFTs, and every op the library marks as having
# no ONNX conversion (ops.NOT_EXPORTABLE: a linear solve)
FOLD_BEFORE_EXPORT: frozenset[Any] = frozenset({real_ifft2, *NOT_EXPORTABLE})


def fold_for_export(gm: fx.GraphModule, targets: frozenset[Any] = FOLD_BEFORE_EXPORT) -> fx.GraphModule:
    """`gm` itself if nothing folds, else a copy (sharing gm's tensors) where each input-independent node with a
    target in `targets` is a stored tensor (`peftc_export_const_N`). The weight cache (pass `cache`) is inlined
    first: its computation is what the exporter sees."""
    from peftc.rewrite.cache_weights import inline_cache
    gm = inline_cache(gm)
    const: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr" or (n.op == "call_function" and all(a in const for a in n.all_input_nodes)):
            const.add(n)
    roots = [n for n in gm.graph.nodes if n in const and n.op == "call_function" and n.target in targets]
    if not roots:
        return gm
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen   # the model's own input and output structure (output names: `logits`)
    env: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        env[n] = graph.node_copy(n, lambda x: env[x])
    out = fx.GraphModule(gm, graph)
    value = constant_evaluator(gm)

    with torch.no_grad():
        for i, root in enumerate(roots):
            name = f"peftc_export_const_{i}"
            out.register_buffer(name, value(root).contiguous())
            new = env[root]
            with graph.inserting_before(new):
                node = graph.get_attr(name)
            node.meta.update(new.meta)
            new.replace_all_uses_with(node)
    graph.eliminate_dead_code()
    out.recompile()
    for attr in ("peftc", "peftc_inputs", "peftc_axes", "peftc_layer_kinds"):
        if hasattr(gm, attr):
            setattr(out, attr, getattr(gm, attr))
    return out
