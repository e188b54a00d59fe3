"""The expression AST shared by method files and rewrite rules, built from lark parse trees.

Operators become calls of named ops (`a + b` is Call('add', [a, b])), so that evaluation, emission into
a graph and pattern matching all see one uniform shape.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lark import Token, Tree

from peftc.lang.strings import string_value


@dataclass(frozen=True)
class Expr:
    line: int = field(default=0, compare=False, kw_only=True)
    column: int = field(default=0, compare=False, kw_only=True)


@dataclass(frozen=True)
class Const(Expr):
    value: Any


@dataclass(frozen=True)
class Name(Expr):
    id: str


@dataclass(frozen=True)
class Rest(Expr):
    """`...` in a rule: the remaining arguments of a call."""


@dataclass(frozen=True)
class Call(Expr):
    fn: str
    args: tuple[Expr, ...] = ()
    kwargs: tuple[tuple[str, Expr], ...] = ()


_BINARY = {"add", "sub", "mul", "div", "floordiv", "mod", "pow", "matmul", "or_", "and_"}
_CMP = {"==": "eq", "!=": "ne", "<": "lt", "<=": "le", ">": "gt", ">=": "ge"}


def _pos(tree: Tree | Token) -> dict:
    if isinstance(tree, Token):
        return {"line": tree.line or 0, "column": tree.column or 0}
    meta = tree.meta
    return {"line": getattr(meta, "line", 0), "column": getattr(meta, "column", 0)}


def to_expr(node: Tree | Token | None) -> Expr | None:
    """Convert a lark subtree of the expression grammar into an Expr."""
    if node is None:
        return None
    if isinstance(node, Token):
        if node.type == "NAME":
            return Name(str(node), **_pos(node))
        if node.type == "STRING":
            return Const(string_value(str(node)), **_pos(node))
        raise ValueError(f"unexpected token {node!r}")
    kind = node.data
    pos = _pos(node)
    ch = node.children
    if kind == "number":
        text = str(ch[0])
        value: Any = float(text) if any(c in text for c in ".eE") else int(text)
        return Const(value, **pos)
    if kind == "string":
        return Const(string_value(str(ch[0])), **pos)
    if kind in ("true", "false", "none"):
        return Const({"true": True, "false": False, "none": None}[kind], **pos)
    if kind == "name":
        return Name(str(ch[0]), **pos)
    if kind == "rest":
        return Rest(**pos)
    if kind in _BINARY:
        return Call(kind.rstrip("_"), (to_expr(ch[0]), to_expr(ch[1])), **pos)
    if kind == "neg":
        return Call("neg", (to_expr(ch[0]),), **pos)
    if kind == "not_":
        return Call("not", (to_expr(ch[0]),), **pos)
    if kind == "compare":
        return Call(_CMP[str(ch[1])], (to_expr(ch[0]), to_expr(ch[2])), **pos)
    if kind == "cond":
        return Call("cond", tuple(to_expr(c) for c in ch), **pos)
    if kind == "subscript":
        return _subscript(to_expr(ch[0]), ch[1:], pos)
    if kind == "tuple":
        return Call("tuple", tuple(to_expr(c) for c in ch), **pos)
    if kind == "call":
        fn = str(ch[0])
        args: list[Expr] = []
        kwargs: list[tuple[str, Expr]] = []
        for a in ch[1:]:
            if a is None:
                continue
            if isinstance(a, Tree) and a.data == "kwarg":
                kwargs.append((str(a.children[0]), to_expr(a.children[1])))
            else:
                args.append(to_expr(a))
        return Call(fn, tuple(args), tuple(kwargs), **pos)
    raise ValueError(f"unexpected expression node {kind}")


def _subscript(base: Expr, indices: list[Tree], pos: dict) -> Expr:
    """`x[i, a:b, None, :]` as a chain of named ops, one per index, left to right: `select(x, dim, i)`,
    `slice(x, dim, start, end)`, `unsqueeze(x, dim)` (a full `:` only moves to the next dim)."""
    out, dim = base, 0
    for idx in indices:
        if idx.data == "new_axis":
            out = Call("unsqueeze", (out, Const(dim)), **pos)
            dim += 1
        elif idx.data == "slice":
            start, end = (to_expr(c) if c is not None else Const(None) for c in idx.children)
            if not (isinstance(start, Const) and start.value is None and isinstance(end, Const) and end.value is None):
                out = Call("slice", (out, Const(dim), start, end), **pos)
            dim += 1
        else:  # an integer index drops the dim
            out = Call("select", (out, Const(dim), to_expr(idx.children[0])), **pos)
    return out


def names_in(expr: Expr) -> set[str]:
    """Every Name referenced by an expression."""
    if isinstance(expr, Name):
        return {expr.id}
    if isinstance(expr, Call):
        out: set[str] = set()
        for a in expr.args:
            out |= names_in(a)
        for _, v in expr.kwargs:
            out |= names_in(v)
        return out
    return set()

