"""Pass `choose`: layers with a low-rank update pick, on every forward, the cheaper of two exact forms for the
number of tokens in it.

After `stack`, a layer with LoRA-like adapters computes `linear(x, W, b) + linear(linear(x, A), B)` (A: the
stacked [Σr, in] down-projections, B: the [out, Σr] up-projections with the scalings folded in). Its cost is
`tokens · Σr · (in + out)` on top of the base matmul, and the two thin matmuls run far below the speed of a
square one. The same layer is also `linear(x, W + B A, b)`: `in · out · Σr` for the weight, whatever the
token count, then one base-sized matmul. A prefill of a few hundred tokens is cheaper dense, a decoding step
of a few tokens factored. This pass replaces each such layer, and the sibling layers that read the same x
(q/k/v, gate/up: they share one `x @ Aᵀ` in the factored form), by one call of
`peftc.lowrank_form.lowrank_linears`, with the token count where the two costs meet as its threshold; the
factored form adds `h @ Bᵀ` into the base output in the same GEMM (`addmm`). The choice is made at run time
(a `torch.cond` in a `.pt2`, an `If` in ONNX), so one graph serves every shape.

Only peftc's own adds are rewritten, where every weight-side operand (W, b, A, B) is computed from stored
tensors alone (not from the graph's inputs) and nothing else reads the intermediate results. Layers with a
per-row adapter choice (a mask between the two matmuls) or adapter dropout (A reads another x) do not match.
"""
from __future__ import annotations

import math
import operator
from collections import Counter
from typing import Any

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from peftc.lowrank_form import lowrank_linears
from peftc.rewrite.graph_tools import ADAPTER, RULE, TAG, hoist_before, input_dependent, log_rule, static_val

aten = torch.ops.aten


def _linear(n: Any, users: int | None = 1) -> bool:
    return (isinstance(n, fx.Node) and n.op == "call_function" and n.target is aten.linear.default and not n.kwargs
            and (users is None or len(n.users) == users))


class _Member:
    """One layer of a group: `add` = linear(x, W, b) + linear(linear(x, A), B)."""

    def __init__(self, add: fx.Node, head: fx.Node, w: fx.Node, b: fx.Node | None, a: fx.Node, up: fx.Node,
                 shapes: tuple[int, int, int]) -> None:
        self.add, self.head, self.x, self.w, self.b, self.a, self.up = add, head, head.args[0], w, b, a, up
        self.out, self.inp, self.r = shapes


def _match(gm: fx.GraphModule, add: fx.Node, dep: set[fx.Node]) -> _Member | None:
    if not (add.op == "call_function" and add.target is aten.add.Tensor and TAG in add.meta
            and len(add.args) == 2 and not add.kwargs):
        return None
    for head, branch in (add.args, add.args[::-1]):
        if not (_linear(head) and _linear(branch) and len(branch.args) == 2 and _linear(branch.args[0])):
            continue
        inner = branch.args[0]
        x, w = head.args[0], head.args[1]
        b = head.args[2] if len(head.args) > 2 else None
        if len(inner.args) != 2 or inner.args[0] is not x or not isinstance(x, fx.Node):
            continue
        a, up = inner.args[1], branch.args[1]
        vals = [static_val(gm, t) for t in (w, a, up)]
        weight_side = [t for t in (w, b, a, up) if t is not None]
        if any(not isinstance(t, fx.Node) or t in dep for t in weight_side) or any(
                v is None or getattr(v, "dim", lambda: 0)() != 2 for v in vals):
            continue
        if b is not None and (static_val(gm, b) is None or static_val(gm, b).dim() != 1):
            continue
        (out, inp), (r, inp_a), (out_b, r_b) = (tuple(v.shape) for v in vals)
        dtypes = {v.dtype for v in vals}
        if inp_a != inp or out_b != out or r_b != r or len(dtypes) != 1 or not dtypes <= {torch.float32,
                                                                                          torch.float64}:
            continue
        return _Member(add, head, w, b, a, up, (out, inp, r))
    return None


def threshold(members: list[_Member]) -> int:
    """The token count from which the dense form costs no more multiply-adds than the factored one."""
    dense = sum(m.inp * m.out * m.r for m in members)
    factored = sum(m.r * (m.inp + m.out) for m in members)
    return max(1, math.ceil(dense / factored))


def choose_form(rule_log: list[str] | None = None, rule_hits: Counter | None = None) -> Any:
    """The pass. Each group it rewrites is logged as the rule `choose` (in `rule_log` / `rule_hits`)."""
    def run(gm: fx.GraphModule) -> PassResult:
        dep = input_dependent(gm)
        groups: dict[fx.Node, list[_Member]] = {}
        for n in gm.graph.nodes:
            m = _match(gm, n, dep)
            if m is not None:
                groups.setdefault(m.x, []).append(m)
        if not groups:
            return PassResult(gm, False)
        g = gm.graph
        for members in groups.values():
            order: dict[fx.Node, float] = {n: i for i, n in enumerate(g.nodes)}
            anchor = min((m.head for m in members), key=order.get)   # after x, before every member's users
            for m in members:
                for t in (m.w, m.b, m.a, m.up):
                    if t is not None:
                        hoist_before(t, anchor, order)
            layer = members[0].add.meta[TAG]
            adapters = tuple(dict.fromkeys(a for m in members for a in m.add.meta.get(ADAPTER) or ()))
            with g.inserting_before(anchor):
                down_all = None
                if len(members) > 1:   # the factored form's one x @ cat(A)ᵀ: weight-side, so `cache` can keep it
                    down_all = g.call_function(aten.cat.default, ([m.a for m in members], 0))
                    down_all.meta.update({TAG: layer, ADAPTER: adapters, RULE: "choose", "peftc_val": torch.empty(
                        (sum(m.r for m in members), members[0].inp), dtype=static_val(gm, members[0].a).dtype,
                        device="meta")})
                call = g.call_function(lowrank_linears, (
                    members[0].x, [m.w for m in members], [m.b for m in members], [m.a for m in members],
                    [m.up for m in members], threshold(members), down_all))
                parts = [g.call_function(operator.getitem, (call, i)) for i in range(len(members))]
            call.meta.update({TAG: layer, ADAPTER: adapters, RULE: "choose"})
            for m, part in zip(members, parts):
                part.meta.update({k: v for k, v in m.add.meta.items() if k in (TAG, ADAPTER, "val", "tensor_meta",
                                                                                "nn_module_stack")})
                part.meta[RULE] = "choose"
                m.add.replace_all_uses_with(part)
            if "nn_module_stack" in members[0].add.meta:
                call.meta["nn_module_stack"] = members[0].add.meta["nn_module_stack"]
            log_rule(rule_log, rule_hits, "choose", layer)
        g.eliminate_dead_code()
        g.lint()
        gm.recompile()
        return PassResult(gm, True)

    return run
