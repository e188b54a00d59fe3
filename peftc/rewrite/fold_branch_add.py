"""Pass `addbmm`: a per-row low-rank branch (pass `stack` with `adapter_ids`: each row's gathered B, two batched
matmuls) is added into the layer's output by its second matmul, not by a separate pass over every token's output:

    total + reshape_as(bmm(h, Bg), total)   =>   reshape_as(baddbmm(reshape(total, [batch, tokens, -1]), h, Bg), total)

`h`: [batch, tokens, r], `Bg`: [batch, r, out]. Exact (the same sum, one rounding less or more).
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from peftc.rewrite.graph_tools import ADAPTER, RULE, TAG, log_rule

aten = torch.ops.aten


def _is(n: Any, target: Any) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target is target


def fold_branch_add(rule_log: list[str] | None = None, rule_hits: Counter | None = None) -> Any:
    """The pass. Each branch it folds is logged as the rule `addbmm` (in `rule_log` / `rule_hits`)."""
    def run(gm: fx.GraphModule) -> PassResult:
        g = gm.graph
        modified = False
        for add in list(g.nodes):
            if not (_is(add, aten.add.Tensor) and TAG in add.meta and len(add.args) == 2 and not add.kwargs):
                continue
            total, y = add.args
            if not (_is(y, aten.reshape_as.default) and len(y.users) == 1   # shaped as the layer's output
                    and _is(y.args[0], aten.bmm.default) and len(y.args[0].users) == 1
                    and isinstance(total, fx.Node)):
                continue
            h, bg = y.args[0].args
            with g.inserting_before(add):
                batch = g.call_function(aten.sym_size.int, (h, 0))
                tokens = g.call_function(aten.sym_size.int, (h, 1))
                t3 = g.call_function(aten.reshape.default, (total, [batch, tokens, -1]))
                z = g.call_function(aten.baddbmm.default, (t3, h, bg))
                new = g.call_function(aten.reshape_as.default, (z, total))
            for n in (batch, tokens, t3, z, new):
                n.meta.update({k: v for k, v in add.meta.items() if k in (TAG, ADAPTER, "nn_module_stack")})
                n.meta[RULE] = "addbmm"
            add.replace_all_uses_with(new)
            modified = True
            log_rule(rule_log, rule_hits, "addbmm", add.meta[TAG])
        if modified:
            g.eliminate_dead_code()
            g.lint()
            gm.recompile()
        return PassResult(gm, modified)

    return run
