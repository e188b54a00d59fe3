"""Pass `gate`: a run-time gate on every additive branch of the switchable adapters.

After `factor`, a layer with additive adapters computes `base + branch_1 + branch_2 + ...`, one branch per
adapter (found by provenance, as the `stack` pass finds them). For each branch of a gated adapter this pass
registers a 0-dim buffer `<layer>.peftc_gate.<adapter>` (1.0 as compiled) and multiplies the branch by it:

- where the branch ends in a matmul with a weight-side operand, `linear(h, V) [* s]` (LoRA's B, a dense
  update D), the gate multiplies that operand: `linear(h, V * g) [* s]`, an `[out, r]` multiply rather than
  one over every token, and the `stack` and `rejoin` passes still see their patterns;
- otherwise the branch's output is multiplied: `branch * g`.

The gate is graph state, not graph code: switching an adapter on or off, or rescaling it (a hot-swapped
checkpoint's alpha), writes the buffer (`peftc.runtime`); the code never changes, so nothing retraces and a
`torch.compile`d module does not recompile. `found` receives, per layer, the adapters that got a gate; an
adapter that scales or rotates its layer (IA3, DoRA, OFT) adds no branch and gets none there.
"""
from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from peftc.manifest import Manifest
from peftc.rewrite.graph_tools import ADAPTER, RULE, TAG, input_dependent, set_path, static_val
from peftc.rewrite.stack_adapters import find_chains

aten = torch.ops.aten


def gate_path(layer: str, adapter: str) -> str:
    """Where the gate of `adapter` on `layer` lives on the graph module."""
    return f"{layer}.peftc_gate.{adapter}"


def _is(n: Any, target: Any) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target is target


def _weight_operand(gm: fx.GraphModule, branch: fx.Node, dep: set[fx.Node]) -> tuple[fx.Node, fx.Node] | None:
    """(linear node, its weight-side operand) for a branch `linear(h, V) [* number]`, else None."""
    n = branch
    if _is(n, aten.mul.Tensor) and isinstance(n.args[1], (int, float)) and not isinstance(n.args[1], bool):
        n = n.args[0]
    if not _is(n, aten.linear.default) or len(n.users) != 1:
        return None
    w = n.args[1]
    if not isinstance(w, fx.Node) or w in dep or static_val(gm, w) is None:
        return None
    return n, w


def _tag(node: fx.Node, like: fx.Node, layer: str, adapter: str) -> None:
    node.meta[TAG] = layer
    node.meta[ADAPTER] = (adapter,)
    node.meta[RULE] = "gate"
    if "nn_module_stack" in like.meta:
        node.meta["nn_module_stack"] = like.meta["nn_module_stack"]


def gate_adapters(gated: Collection[str] | None, manifest: Manifest, found: dict[str, set[str]]) -> Any:
    """The pass. `gated`: the adapters to gate (None or empty: the pass does nothing)."""
    def run(gm: fx.GraphModule) -> PassResult:
        if not gated:
            return PassResult(gm, False)
        dep = input_dependent(gm)
        g = gm.graph
        modified = False
        for layer, _head, links, _end in find_chains(gm):
            for adapter, branch in links:
                if adapter not in gated:
                    continue
                path = gate_path(layer, adapter)
                set_path(gm, path, torch.ones((), dtype=torch.float32))
                manifest.registered.add(path)
                manifest.pinned.add(path)     # graph state: never constant-folded
                found.setdefault(layer, set()).add(adapter)
                wo = _weight_operand(gm, branch, dep)
                if wo is not None:
                    lin, w = wo
                    with g.inserting_before(lin):
                        gate = g.get_attr(path)
                        gated_w = g.call_function(aten.mul.Tensor, (w, gate))
                    _tag(gated_w, lin, layer, adapter)
                    val = static_val(gm, w)
                    gated_w.meta["peftc_val"] = torch.empty(val.shape, dtype=val.dtype, device="meta")
                    lin.replace_input_with(w, gated_w)
                else:
                    link = next(iter(branch.users))
                    with g.inserting_after(branch):
                        gate = g.get_attr(path)
                    with g.inserting_after(gate):
                        out = g.call_function(aten.mul.Tensor, (branch, gate))
                    _tag(out, branch, layer, adapter)
                    if "val" in branch.meta:
                        out.meta["val"] = branch.meta["val"]
                    link.replace_input_with(branch, out)
                modified = True
        if modified:
            g.lint()
            gm.recompile()
        return PassResult(gm, modified)

    return run
