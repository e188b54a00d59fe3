"""Reading a rewritten graph back: which layers still rebuild a full-size adapted weight on every forward,
and a listing of the graph with each peftc node's provenance (layer, adapters, rule) for `--dump-after`."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx

from peftc.layer_kinds import weight_readers
from peftc.rewrite.graph_tools import ADAPTER, RULE, TAG, get_path

aten = torch.ops.aten

# ops that read a weight, and the index of the weight argument
WEIGHT_READERS = weight_readers()


def _meta_value(gm: fx.GraphModule, n: fx.Node, memo: dict[fx.Node, Any]) -> Any:
    """n's value as a meta tensor (from node meta, or recomputed from its inputs), None if unknown."""
    if n in memo:
        return memo[n]
    memo[n] = None
    val = next((n.meta[k] for k in ("peftc_val", "val") if hasattr(n.meta.get(k), "shape")), None)
    if val is None and n.op == "get_attr":
        t = get_path(gm, n.target)
        val = torch.empty(t.shape, dtype=t.dtype, device="meta") if isinstance(t, torch.Tensor) else None
    elif val is None and n.op == "call_function":
        args = fx.node.map_arg(n.args, lambda a: _meta_value(gm, a, memo))
        try:
            val = n.target(*args, **n.kwargs)
        except Exception:  # noqa: BLE001 - best effort: an unknown size counts as full size
            val = None
    memo[n] = val
    return val


def dense_layers(gm: fx.GraphModule, weight_shapes: Mapping[str, tuple[int, ...]], live: set[str]) -> list[str]:
    """Layers whose op reads a weight computed from live adapter tensors that is as large as the layer's own
    weight: W' = T(W, theta) is rebuilt on every forward (correct, but no rule factored it). A computed
    weight that involves no live adapter tensor (t(W) of GPT-2's Conv1D) or is small (t(A)) is not one."""
    memo: dict[fx.Node, bool] = {}
    values: dict[fx.Node, Any] = {}

    def reads_live(n: fx.Node) -> bool:
        if n not in memo:
            memo[n] = False   # cycle guard (graphs are acyclic; cheap insurance)
            if n.op == "get_attr":
                memo[n] = n.target in live
            elif n.op == "call_function":
                memo[n] = any(reads_live(a) for a in n.all_input_nodes)
        return memo[n]

    out = set()
    for n in gm.graph.nodes:
        idx = WEIGHT_READERS.get(n.target) if n.op == "call_function" else None
        if idx is None or len(n.args) <= idx:
            continue
        w = n.args[idx]
        if not (isinstance(w, fx.Node) and w.op == "call_function" and TAG in w.meta) or not reads_live(w):
            continue
        full = weight_shapes.get(w.meta[TAG])
        val = _meta_value(gm, w, values)
        size = math.prod(val.shape) if hasattr(val, "shape") else None
        if full is not None and size is not None and size < math.prod(full):
            continue
        out.add(w.meta[TAG])
    return sorted(out)


def provenance(n: fx.Node) -> dict[str, Any]:
    """What peftc knows about where a node came from (empty for nodes of the traced model)."""
    out: dict[str, Any] = {}
    if TAG in n.meta:
        out["layer"] = n.meta[TAG]
    if n.meta.get(ADAPTER):
        out["adapter"] = ",".join(n.meta[ADAPTER])
    if n.meta.get(RULE):
        out["rule"] = n.meta[RULE]
    return out


def describe(gm: fx.GraphModule) -> str:
    """The graph as fx prints it, then one row per peftc node: node, op, layer, adapter(s), rule."""
    rows = []
    for n in gm.graph.nodes:
        p = provenance(n)
        if not p:
            continue
        op = n.op if n.op != "call_function" else getattr(n.target, "__name__", str(n.target))
        rows.append((n.name, op, p.get("layer", ""), p.get("adapter", "-"), p.get("rule", "-")))
    lines = [str(gm.graph)]
    if rows:
        head = ("node", "op", "layer", "adapter", "rule")
        width = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
        lines.append("# provenance of the nodes peftc inserted or rewrote")
        for r in [head, *rows]:
            lines.append("# " + "  ".join(str(c).ljust(w) for c, w in zip(r, width)).rstrip())
    return "\n".join(lines)
