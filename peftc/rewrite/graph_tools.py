"""Small helpers the rewrite passes share: attribute paths on a GraphModule, emitting tagged nodes,
static (weight-side) shapes, and argument normalisation for pattern matching."""
from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from peftc.errors import PeftcError
from peftc.ops import TARGET_TO_OP, Op

TAG = "peftc"          # node.meta[TAG] = layer FQN, on every node peftc inserted
BASE = "peftc_base"    # node.meta[BASE] = FQN of the base parameter a weight/bias expression replaces
ADAPTER = "peftc_adapter"  # node.meta[ADAPTER] = names of the adapters a node computes (a tuple)
RULE = "peftc_rule"        # node.meta[RULE] = name of the factoring rule that created a node


def get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def has_path(root: nn.Module, path: str) -> bool:
    try:
        get_path(root, path)
        return True
    except AttributeError:
        return False


def set_path(root: nn.Module, path: str, value: Any) -> None:
    """Set a parameter, buffer or submodule at a dotted path, creating empty containers on the way."""
    *parents, leaf = path.split(".")
    mod = root
    for p in parents:
        if not hasattr(mod, p):
            mod.add_module(p, nn.Module())
        mod = getattr(mod, p)
    if isinstance(value, nn.Parameter):
        if leaf in mod._buffers:
            del mod._buffers[leaf]
        mod.register_parameter(leaf, value)
    elif isinstance(value, nn.Module):
        mod.add_module(leaf, value)
    else:
        if leaf in mod._parameters:
            del mod._parameters[leaf]
        mod.register_buffer(leaf, value)


def del_path(root: nn.Module, path: str) -> None:
    *parents, leaf = path.split(".")
    mod = get_path(root, ".".join(parents)) if parents else root
    for d in (mod._parameters, mod._buffers, mod._modules):
        d.pop(leaf, None)


def static_val(gm: fx.GraphModule, v: Any) -> Any:
    """A meta tensor with v's shape and dtype if v is weight-side (no dynamic dims), else None."""
    if not isinstance(v, fx.Node):
        return v
    if v.op == "get_attr":
        t = get_path(gm, v.target)
        return torch.empty(t.shape, dtype=t.dtype, device="meta") if isinstance(t, torch.Tensor) else None
    val = v.meta.get("peftc_val")
    return val


def _all_static(vals: list[Any]) -> bool:
    return all(not isinstance(v, fx.Node) for v in vals)


class GraphBuilder:
    """Evaluation backend that emits each tensor op as a node before `anchor`, tagged with `site`.

    Provenance: without a `rule`, every node is marked as computing `adapters`; with a `rule` (the factor
    pass), a node is marked with the rule and with the adapters its inputs compute (or `adapters` when
    none of them is an adapter's)."""

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node, site: str, meta_from: fx.Node | None = None,
                 adapters: tuple[str, ...] = (), rule: str | None = None) -> None:
        self.gm = gm
        self.anchor = anchor
        self.site = site
        self.meta_from = meta_from or anchor
        self.adapters = adapters
        self.rule = rule

    def _finish(self, node: fx.Node, args: list[Any]) -> fx.Node:
        node.meta[TAG] = self.site
        adapters = self.adapters
        if self.rule is not None:
            node.meta[RULE] = self.rule
            adapters = adapters_of(node.all_input_nodes) or adapters
        if adapters:
            node.meta[ADAPTER] = adapters
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in self.meta_from.meta:
                node.meta[key] = self.meta_from.meta[key]
        missing = []

        def val(a: Any) -> Any:
            v = static_val(self.gm, a)
            if v is None:
                missing.append(a)
            return v

        vals = fx.node.map_aggregate(list(args), lambda a: val(a) if isinstance(a, fx.Node) else a)
        if not missing and node.op == "call_function":
            try:
                node.meta["peftc_val"] = node.target(*vals)
            except Exception:  # noqa: BLE001 - shape inference is best effort
                pass
        return node

    def apply(self, op: Op, target: Any, args: list[Any]) -> fx.Node:
        if op.plan_only:
            raise PeftcError(f"'{op.name}' is computed once at compile time: use it in a `const` or an init, "
                             "not in a weight expression")
        g = self.gm.graph
        with g.inserting_before(self.anchor):
            if op.module_call:
                x, module = args
                node = g.call_module(module, (x,))
                return self._finish(node, [])
            node = g.call_function(target, tuple(args))
        return self._finish(node, list(args))

    def get_attr(self, path: str) -> fx.Node:
        with self.gm.graph.inserting_before(self.anchor):
            node = self.gm.graph.get_attr(path)
        node.meta[TAG] = self.site
        if self.adapters:
            node.meta[ADAPTER] = self.adapters
        return node


def adapters_of(nodes: list[fx.Node]) -> tuple[str, ...]:
    """The adapters (provenance meta) of some nodes, in first-seen order."""
    out: dict[str, None] = {}
    for n in nodes:
        out.update(dict.fromkeys(n.meta.get(ADAPTER, ())))
    return tuple(out)


def op_of(node: fx.Node) -> Op | None:
    if node.op == "call_function":
        return TARGET_TO_OP.get(node.target)
    return None


def normalized_args(node: fx.Node, op: Op) -> list[Any]:
    """Positional args padded with the op's defaults to its full arity (kwargs folded in by position)."""
    args = list(node.args)
    if op.arity and len(args) < op.arity:
        missing = op.arity - len(args)
        args += list(op.defaults[len(op.defaults) - missing:])
    return args


def constant_evaluator(gm: fx.GraphModule, leaf: Any = None, pass_through: Any = frozenset()) -> Any:
    """value(node): a memoised evaluation of input-independent graph nodes. A get_attr reads the stored tensor
    (detached, then through `leaf` if given); a call runs its target, except targets in `pass_through`, which
    return their first argument (casts the caller applies once, at the end)."""
    values: dict[fx.Node, Any] = {}

    def value(n: Any) -> Any:
        if isinstance(n, (list, tuple)):
            return type(n)(value(a) for a in n)
        if not isinstance(n, fx.Node):
            return n
        if n not in values:
            if n.op == "get_attr":
                t = get_path(gm, n.target)
                t = t.detach() if isinstance(t, torch.Tensor) else t
                values[n] = leaf(t) if leaf is not None and isinstance(t, torch.Tensor) else t
            elif n.target in pass_through:
                values[n] = value(n.args[0])
            else:
                values[n] = n.target(*value(list(n.args)), **{k: value(a) for k, a in n.kwargs.items()})
        return values[n]

    return value



def input_dependent(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes whose value depends on a graph input (the others are weight-side: computable without inputs)."""
    dep: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    return dep


def hoist_before(node: fx.Node, before: fx.Node, order: dict[fx.Node, float]) -> None:
    """Move a weight-side node (and the inputs it needs) before `before` if it comes after it; `order` is each
    node's position, kept up to date."""
    if order[node] < order[before]:
        return
    for a in node.all_input_nodes:
        hoist_before(a, before, order)
    before.prepend(node)
    order[node] = order[before] - 0.5


def log_rule(rule_log: list[str] | None, rule_hits: Any, rule: str, where: str) -> None:
    """Record one application of a rewrite (`rule @ where` in the log, a count per rule)."""
    if rule_log is not None:
        rule_log.append(f"{rule} @ {where}")
    if rule_hits is not None:
        rule_hits[rule] += 1
