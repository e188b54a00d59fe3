"""Rewrite rules (`rule NAME: LHS => RHS [where GUARD]` in passes/*.peft), as data for the factor pass."""
from __future__ import annotations

from dataclasses import dataclass

from lark import Tree

from peftc.errors import PeftcError
from peftc.lang.expr import Call, Expr, Name, names_in, to_expr


@dataclass(frozen=True)
class Rule:
    name: str
    lhs: Call
    rhs: Expr
    where: Expr | None
    file: str
    line: int


def build_rule(tree: Tree, file: str) -> Rule:
    ch = tree.children
    name = str(ch[0])
    lhs, rhs = to_expr(ch[1]), to_expr(ch[2])
    where = to_expr(ch[3]) if len(ch) > 3 and ch[3] is not None else None
    line = getattr(tree.meta, "line", 0)
    if not isinstance(lhs, Call):
        raise PeftcError(f"rule '{name}': the left side must be an op call", file=file, line=line)
    unbound = {n for n in names_in(rhs) if n not in names_in(lhs)}
    if isinstance(rhs, Name):
        unbound = {rhs.id} - names_in(lhs)
    if unbound:
        raise PeftcError(f"rule '{name}': right side uses unbound names {sorted(unbound)}", file=file, line=line)
    return Rule(name, lhs, rhs, where, file, line)
