"""Matching rule patterns (Exprs) against fx nodes. A pattern name binds any term; a name seen twice must
bind the same term; commutative ops try both argument orders; `...` binds the remaining arguments; an op
class (`conv`) matches any of its member ops and records which one under `class_key(cls)`."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import fx

from peftc.lang.expr import Call, Const, Expr, Name, Rest
from peftc.lang.rules import OP_CLASSES, class_key
from peftc.ops import TENSOR_OPS
from peftc.rewrite.graph_tools import normalized_args, op_of


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return a is b
    return type(a) is type(b) and a == b


def match(pat: Expr, v: Any, bound: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Yield every binding (extending `bound`) under which `pat` matches the term `v`."""
    if isinstance(pat, Name):
        if pat.id in bound:
            if _same(bound[pat.id], v):
                yield bound
            return
        yield {**bound, pat.id: v}
        return
    if isinstance(pat, Const):
        if not isinstance(v, fx.Node) and _same(pat.value, v) or (pat.value is None and v is None):
            yield bound
        return
    if not isinstance(pat, Call) or not isinstance(v, fx.Node):
        return
    if pat.fn in OP_CLASSES:  # an op class: any member op; one class name binds one member per match
        op = op_of(v)
        key = class_key(pat.fn)
        if op is None or op.name not in OP_CLASSES[pat.fn] or bound.get(key, op.name) != op.name or v.kwargs:
            return
        bound = {**bound, key: op.name}
    else:
        op = TENSOR_OPS.get(pat.fn)
        if op is None or op_of(v) is not op or v.kwargs:
            return
    args = normalized_args(v, op)
    pargs = list(pat.args)
    rest = bool(pargs) and isinstance(pargs[-1], Rest)
    if rest:
        pargs = pargs[:-1]
        if len(args) < len(pargs):
            return
    else:
        if len(pargs) > len(args):
            return
        tail = args[len(pargs):]
        defaults = list(op.defaults[len(op.defaults) - len(tail):]) if tail else []
        if len(tail) > len(op.defaults) or not all(_same(a, d) for a, d in zip(tail, defaults)):
            return
    orders = [args[:len(pargs)]]
    if op.commutative and len(pargs) == 2:
        orders.append([args[1], args[0]])
    for order in orders:
        for b in _match_all(pargs, order, bound):
            yield {**b, "...": args[len(pargs):]} if rest else b


def _match_all(pats: list[Expr], vals: list[Any], bound: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if not pats:
        yield bound
        return
    for b in match(pats[0], vals[0], bound):
        yield from _match_all(pats[1:], vals[1:], b)
