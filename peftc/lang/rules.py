"""Rewrite rules (`rule NAME [prio N]: LHS => RHS [where GUARD]` in passes/*.peft), as data for the factor pass.

A pattern may name an op class instead of one op (`conv` stands for conv1d, conv2d and conv3d): the rule
then matches any member, and the same class name on its right side emits the member it matched.

Rules are tried in a fixed order that does not depend on where a rule sits in its file: highest `prio`
first (default 0), then the more specific left side (more op nodes) first, then declaration order. So a
new, more specific rule is never shadowed by a generic one declared before it.
"""
from __future__ import annotations

from dataclasses import dataclass

from lark import Tree

from peftc.errors import PeftcError
from peftc.lang.expr import Call, Expr, Name, names_in, to_expr

# op class -> its member ops (names in peftc.ops.TENSOR_OPS)
OP_CLASSES: dict[str, tuple[str, ...]] = {
    "conv": ("conv1d", "conv2d", "conv3d"),
}


def class_key(cls: str) -> str:
    """The binding key under which a match records the member op an op class matched."""
    return f"@{cls}"


@dataclass(frozen=True)
class Rule:
    name: str
    lhs: Call
    rhs: Expr
    where: Expr | None
    file: str
    line: int
    priority: int = 0
    index: int = 0          # declaration order across the library

    @property
    def order(self) -> tuple[int, int, int]:
        return (-self.priority, -pattern_size(self.lhs), self.index)


def pattern_size(e: Expr) -> int:
    """Number of op nodes in a pattern (its specificity)."""
    if isinstance(e, Call):
        return 1 + sum(pattern_size(a) for a in e.args)
    return 0


def classes_in(e: Expr) -> set[str]:
    """The op classes a pattern names."""
    if not isinstance(e, Call):
        return set()
    out = {e.fn} if e.fn in OP_CLASSES else set()
    for a in e.args:
        out |= classes_in(a)
    return out


def specialize(e: Expr, members: dict[str, str]) -> Expr:
    """`e` with each op class call replaced by the member op the match bound (members: class -> op)."""
    if not isinstance(e, Call):
        return e
    return Call(members.get(e.fn, e.fn), tuple(specialize(a, members) for a in e.args),
                tuple((k, specialize(v, members)) for k, v in e.kwargs), line=e.line, column=e.column)


def build_rule(tree: Tree, file: str, index: int = 0) -> Rule:
    ch = list(tree.children)
    name = str(ch[0])
    prio = 0
    if isinstance(ch[1], Tree) and ch[1].data == "priority":
        prio = int(str(ch[1].children[0]))
    if ch[1] is None or (isinstance(ch[1], Tree) and ch[1].data == "priority"):
        ch.pop(1)
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
    return Rule(name, lhs, rhs, where, file, line, prio, index)


def ordered(rules: list[Rule]) -> list[Rule]:
    """Rules in the order the factor pass tries them (see the module docstring)."""
    return sorted(rules, key=lambda r: r.order)
