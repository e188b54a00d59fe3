"""Pass `factor`: apply the algebraic rules of passes/*.peft to inserted (live) weight transforms, so
the unmerged graph computes e.g. linear(x, W) + s * linear(linear(x, A), B) instead of materialising
W + s * B @ A on every forward. Only nodes peftc inserted, or that read a node peftc inserted, are
rewritten; the first matching rule wins; the pass repeats until no rule matches."""
from __future__ import annotations

from typing import Any

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from peftc.lang.evaluate import evaluate
from peftc.lang.rules import Rule
from peftc.rewrite.graph_tools import TAG, GraphBuilder
from peftc.rewrite.guards import guards
from peftc.rewrite.match import match

MAX_ROUNDS = 64


def factor(rules: list[Rule], log: list[str] | None = None) -> Any:
    def run(gm: fx.GraphModule) -> PassResult:
        preds = guards(gm)
        modified = False
        for _ in range(MAX_ROUNDS):
            changed = False
            for node in list(gm.graph.nodes):
                if node.op != "call_function" or not node.users:
                    continue
                site = node.meta.get(TAG) or next((a.meta[TAG] for a in node.all_input_nodes if TAG in a.meta), None)
                if site is None:
                    continue
                for rule in rules:
                    binding = _first(rule, node, preds)
                    if binding is None:
                        continue
                    builder = GraphBuilder(gm, node, site, meta_from=node)
                    new = evaluate(rule.rhs, binding, builder, preds)
                    node.replace_all_uses_with(new)
                    if log is not None:
                        log.append(f"{rule.name} @ {site}")
                    changed = True
                    break
            if not changed:
                break
            modified = True
            gm.graph.eliminate_dead_code()
        gm.recompile()
        return PassResult(gm, modified)

    return run


def _first(rule: Rule, node: fx.Node, preds: dict) -> dict | None:
    for b in match(rule.lhs, node, {}):
        if rule.where is None or evaluate(rule.where, b, funcs=preds):
            return b
    return None
