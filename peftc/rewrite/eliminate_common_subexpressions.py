"""Pass `cse`: merge inserted nodes that compute the same thing (same op, same inputs).

Factoring several adapters on one layer (e.g. two DoRA adapters, each of which reads linear(x, W))
produces duplicates; this keeps one. Only pure ops that peftc inserted are considered.
"""
from __future__ import annotations

from typing import Any

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from peftc.rewrite.graph_tools import TAG


def _key(v: Any) -> Any:
    if isinstance(v, fx.Node):
        return ("node", id(v))
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, tuple(_key(a) for a in v))
    if isinstance(v, dict):
        return ("dict", tuple(sorted((k, _key(a)) for k, a in v.items())))
    return ("const", type(v).__name__, repr(v))


def eliminate_common_subexpressions() -> Any:
    def run(gm: fx.GraphModule) -> PassResult:
        seen: dict[Any, fx.Node] = {}
        modified = False
        for node in list(gm.graph.nodes):
            if TAG not in node.meta or node.op not in ("call_function", "get_attr"):
                continue
            key = (node.op, node.target, _key(node.args), _key(node.kwargs))
            if key in seen:
                node.replace_all_uses_with(seen[key])
                gm.graph.erase_node(node)
                modified = True
            else:
                seen[key] = node
        if modified:
            gm.recompile()
        return PassResult(gm, modified)

    return run
