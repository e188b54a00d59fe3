"""Pass `factor`: apply the algebraic rules of passes/*.peft to inserted (live) weight transforms, so
the unmerged graph computes e.g. linear(x, W) + s * linear(linear(x, A), B) instead of materialising
W + s * B @ A on every forward. Only nodes peftc inserted, or that read a node peftc inserted, are
rewritten; rules are tried in the library's order (priority, then specificity: see peftc.lang.rules) and
the first that matches wins; the pass repeats until no rule matches. Every node a rule creates records
the rule and its adapters (graph_tools.RULE / ADAPTER); `hits` counts how often each rule fired."""
from __future__ import annotations

from collections import Counter
from typing import Any

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from peftc.lang.evaluate import evaluate
from peftc.lang.rules import OP_CLASSES, Rule, class_key, specialize
from peftc.rewrite.graph_tools import ADAPTER, TAG, GraphBuilder, adapters_of
from peftc.rewrite.guards import guards
from peftc.rewrite.match import match

MAX_ROUNDS = 64


def factor(rules: list[Rule], log: list[str] | None = None, hits: Counter | None = None) -> Any:
    def run(gm: fx.GraphModule) -> PassResult:
        preds = guards(gm)
        specialized: dict[tuple[str, tuple], Any] = {}   # (rule, matched members of its op classes) -> RHS
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
                    adapters = node.meta.get(ADAPTER) or adapters_of(node.all_input_nodes)
                    builder = GraphBuilder(gm, node, site, meta_from=node, adapters=adapters, rule=rule.name)
                    members = tuple((c, binding[class_key(c)]) for c in OP_CLASSES if class_key(c) in binding)
                    rhs = rule.rhs
                    if members:
                        if (rule.name, members) not in specialized:
                            specialized[(rule.name, members)] = specialize(rule.rhs, dict(members))
                        rhs = specialized[(rule.name, members)]
                    new = evaluate(rhs, binding, builder, preds)
                    node.replace_all_uses_with(new)
                    if log is not None:
                        log.append(f"{rule.name} @ {site}")
                    if hits is not None:
                        hits[rule.name] += 1
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
