"""Load-time checks of passes/*.peft: every method and rule is checked when the library loads, so a typo is
an error at its file and line, not a late internal error or a rule that silently never matches.

Checked: each call names a known function (tensor ops, scalar functions and initialisers in peftc.ops,
op classes and guards for rules), with a valid number of arguments (read from the ATen schema or the
Python signature, so a new op needs no entry here); every name a method uses is bound (options, the layer
kind's dimensions, W / W0 / b, lets, params, ...), per layer kind; `on` names declared layer kinds; a
rule's left side uses only ops (else it could never match), its right side and guard only names the left
side binds.

Statements are walked generically: any Expr in a statement is checked, any nested list of statements is
walked, and a statement whose first argument is a name binds that name (`let x`, `param A`); `BINDS`
overrides this for a statement kind where it is wrong. So a new statement kind needs no change here.
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from peftc.errors import PeftcError, did_you_mean
from peftc.lang.expr import Call, Expr, Name, Rest
from peftc.lang.methods import ADAPTER_DIMS, MethodDef
from peftc.lang.rules import OP_CLASSES, Rule
from peftc.layer_kinds import KIND_DIMS
from peftc.ops import INITS, SCALAR_FUNCS, TENSOR_OPS
from peftc.rewrite.guards import GUARD_NAMES, guards

# names every method body sees besides its options and the layer's dimensions
TENSOR_NAMES = ("W", "W0", "b")
# evaluated specially by peftc.lang.evaluate: (min, max) arguments
SPECIAL_FORMS: dict[str, tuple[int, int | None]] = {"cond": (3, 3), "and": (2, 2), "or": (2, 2), "tuple": (1, None),
                                                     "input": (1, 1)}   # a model input (peftc.model_inputs)
# statement kind -> index of the argument holding the name it binds, or None if it binds nothing
# (default: the first argument, when it is a plain name, a tuple of names, or a dataclass with a `name`)
BINDS: dict[str, int | None] = {"record": None}

Arity = tuple[int, int | None]


# ---------------------------------------------------------------- arity
def _signature_arity(fn: Callable[..., Any]) -> Arity | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    lo, hi = 0, 0
    for p in sig.parameters.values():
        if p.kind == p.VAR_POSITIONAL:
            return lo, None
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            hi += 1
            lo += p.default is p.empty
    return lo, hi


def _target_arity(target: Any) -> Arity | None:
    schema = getattr(target, "_schema", None)
    if schema is not None:
        pos = [a for a in schema.arguments if not a.kwarg_only]
        return sum(not a.has_default_value() for a in pos), len(pos)
    return _signature_arity(target) if callable(target) else None


def _merge(a: Arity | None, b: Arity | None) -> Arity | None:
    if a is None or b is None:
        return a or b
    hi = None if a[1] is None or b[1] is None else max(a[1], b[1])
    return min(a[0], b[0]), hi


def tensor_op_arity(name: str) -> Arity | None:
    """(min, max) positional arguments of a tensor op or op class; None when unknown."""
    if name in OP_CLASSES:
        out: Arity | None = None
        for m in OP_CLASSES[name]:
            out = _merge(out, tensor_op_arity(m))
        return out
    op = TENSOR_OPS[name]
    if op.module_call:
        return 2, 2   # op(x, submodule name)
    return _target_arity(op.target)


def scalar_arity(name: str) -> Arity | None:
    return _signature_arity(SCALAR_FUNCS[name])


_GUARD_ARITY: dict[str, Arity | None] = {}


def guard_arity(name: str) -> Arity | None:
    if not _GUARD_ARITY:
        _GUARD_ARITY.update({k: _signature_arity(f) for k, f in guards(None).items()})  # type: ignore[arg-type]
    return _GUARD_ARITY.get(name)


# ---------------------------------------------------------------- expressions
_SOURCES: dict[str, str] = {}   # file -> text, for files checked from text (check_library_text)


class _Checker:
    def __init__(self, file: str, what: str) -> None:
        self.file = file
        self.what = what
        self.source = _SOURCES.get(file)
        if self.source is None:
            try:
                self.source = Path(file).read_text()
            except OSError:
                self.source = None

    def fail(self, msg: str, node: Expr | None = None, line: int = 0) -> PeftcError:
        line = (node.line if node is not None and node.line else 0) or line
        column = node.column if node is not None and node.line else None
        return PeftcError(f"{self.what}: {msg}", file=self.file, line=line or None, column=column,
                          source=self.source)

    def expr(self, e: Expr | None, funcs: dict[str, Callable[[str], Arity | None]], names: set[str] | None,
             line: int, kw_ok: set[str] = frozenset(), rest_ok: bool = False) -> None:
        """Check calls (known, arity) and, unless `names` is None, that every name is bound."""
        for sub in _walk(e):
            if isinstance(sub, Name) and names is not None and sub.id not in names:
                raise self.fail(f"unknown name '{sub.id}'{did_you_mean(sub.id, names)}", sub, line)
            if isinstance(sub, Rest) and not rest_ok:
                raise self.fail("'...' may only appear in a rule", sub, line)
            if not isinstance(sub, Call):
                continue
            if sub.fn not in funcs:
                raise self.fail(f"unknown function '{sub.fn}'{did_you_mean(sub.fn, funcs)}", sub, line)
            if sub.kwargs and sub.fn not in kw_ok:
                raise self.fail(f"'{sub.fn}' takes no keyword arguments", sub, line)
            if sub.fn in INITS and sub.args and sub.fn not in SCALAR_FUNCS:
                raise self.fail(f"initialiser '{sub.fn}' takes keyword arguments only, e.g. normal(std = 0.02)",
                                sub, line)
            rest = bool(sub.args) and isinstance(sub.args[-1], Rest)
            if any(isinstance(a, Rest) for a in sub.args[:-1]):
                raise self.fail("'...' may only stand as the last argument of a call", sub, line)
            n = len(sub.args) - rest
            arity = funcs[sub.fn](sub.fn)
            if arity is None:
                continue
            lo, hi = arity
            if (hi is not None and n > hi) or (not rest and n < lo):
                want = f"{lo}" if lo == hi else f"{lo} to {hi}" if hi is not None else f"at least {lo}"
                raise self.fail(f"'{sub.fn}' takes {want} argument(s), got {n}", sub, line)


def _walk(e: Any) -> Iterator[Expr]:
    """Every Expr node inside e (generic over Expr dataclasses, so new node types need no change)."""
    if isinstance(e, Expr):
        yield e
        for f in dataclasses.fields(e):
            if f.name not in ("line", "column"):
                yield from _walk(getattr(e, f.name))
    elif isinstance(e, (list, tuple)):
        for x in e:
            yield from _walk(x)


def method_functions() -> dict[str, Callable[[str], Arity | None]]:
    out: dict[str, Callable[[str], Arity | None]] = {}
    for k in INITS:
        out[k] = lambda _n: (0, 0)
    for k in SCALAR_FUNCS:
        out[k] = scalar_arity
    for k in TENSOR_OPS:
        out[k] = (lambda n: _merge(tensor_op_arity(n), scalar_arity(n))) if k in SCALAR_FUNCS else tensor_op_arity
    for k, a in SPECIAL_FORMS.items():
        out[k] = lambda _n, a=a: a
    return out


# ---------------------------------------------------------------- statements
def _parts(st: Any) -> tuple[str, list[Any], int]:
    """(kind, arguments, line) of a statement: a Stmt(kind, args, line) or a statement dataclass."""
    if hasattr(st, "kind") and hasattr(st, "args"):
        return st.kind, list(st.args), getattr(st, "line", 0)
    fields = [f.name for f in dataclasses.fields(st)]
    return (type(st).__name__.lower(), [getattr(st, f) for f in fields if f != "line"], getattr(st, "line", 0))


def _is_stmt(x: Any) -> bool:
    return (hasattr(x, "kind") and hasattr(x, "args")) or (dataclasses.is_dataclass(x) and not isinstance(x, Expr)
                                                           and not isinstance(x, type))


def _is_block(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(_is_stmt(s) for s in x)


def _bound_names(kind: str, args: list[Any]) -> set[str]:
    """The names a statement binds: a plain name, a tuple of names (`let (a, b) = ...`), or a declaration
    dataclass's `name` plus the dims its shape binds from a checkpoint (`?r`)."""
    idx = BINDS.get(kind, 0)
    if idx is None or idx >= len(args):
        return set()
    a = args[idx]
    if isinstance(a, str):
        return {a} if a.isidentifier() else set()
    if isinstance(a, tuple) and a and all(isinstance(x, str) for x in a):
        return set(a)
    if dataclasses.is_dataclass(a) and isinstance(getattr(a, "name", None), str):
        bound = {x[1] for x in getattr(a, "shape", ()) if isinstance(x, tuple) and len(x) == 2 and x[0] == "?"}
        return {a.name} | bound
    return set()


def _exprs_of(a: Any) -> Any:
    """The expressions inside a statement argument (a declaration dataclass's fields too)."""
    if dataclasses.is_dataclass(a) and not isinstance(a, Expr) and not isinstance(a, type):
        return [_exprs_of(getattr(a, f.name)) for f in dataclasses.fields(a)]
    if isinstance(a, (list, tuple)):
        return [_exprs_of(x) for x in a if not isinstance(x, str)]
    return a if isinstance(a, Expr) else None


def _visit(stmts: list[Any], kind: str, out: list[tuple[str, list[Any], int]]) -> None:
    """The statements that apply to layer kind `kind` (both branches of a `when`), flattened."""
    for st in stmts:
        k, args, line = _parts(st)
        out.append((k, args, line))
        if k == "on":
            kinds, body = args[0], args[1]
            if kind in kinds:
                _visit(body, kind, out)
            continue
        for a in args:
            if _is_block(a):
                _visit(a, kind, out)


def check_method(m: MethodDef) -> None:
    c = _Checker(m.file, f"method '{m.name}'")
    funcs = method_functions()
    line0 = next((_parts(s)[2] for s in m.body), 0)
    for k in m.kinds:
        if k not in KIND_DIMS:
            raise c.fail(f"unknown layer kind '{k}'{did_you_mean(k, KIND_DIMS)}; layer kinds: "
                         f"{', '.join(KIND_DIMS)}", line=line0)
    for o in m.options.values():
        if o.name in TENSOR_NAMES:
            raise c.fail(f"option '{o.name}' shadows the layer tensor of that name", line=line0)

    def check_on(stmts: list[Any]) -> None:
        for st in stmts:
            k, args, line = _parts(st)
            if k == "on":
                for kind in args[0]:
                    if kind not in m.kinds:
                        raise c.fail(f"'on {kind}': {kind} is not among the method's layer kinds "
                                     f"({', '.join(m.kinds)})", line=line)
            for a in args:
                if _is_block(a):
                    check_on(a)
    check_on(m.body)
    for kind in m.kinds or list(KIND_DIMS):
        flat: list[tuple[str, list[Any], int]] = []
        _visit(m.body, kind, flat)
        names = set(m.options) | set(KIND_DIMS.get(kind, ())) | set(TENSOR_NAMES) | set(ADAPTER_DIMS)
        for k, args, _ in flat:
            names |= _bound_names(k, args)
        for k, args, line in flat:
            if k == "on":
                continue
            for a in args:
                if not _is_block(a):
                    c.expr(_exprs_of(a), funcs, names, line, kw_ok=set(INITS))
        if m.mergeable is not None:
            c.expr(m.mergeable, funcs, names, m.mergeable.line)
        for _entries, cond in m.config_if:
            c.expr(cond, funcs, set(m.options), cond.line)


# ---------------------------------------------------------------- rules
def check_rule(r: Rule) -> None:
    c = _Checker(r.file, f"rule '{r.name}'")
    ops: dict[str, Callable[[str], Arity | None]] = {k: tensor_op_arity for k in [*TENSOR_OPS, *OP_CLASSES]}
    if r.lhs.fn not in ops:
        raise c.fail(f"the left side must be a tensor op, not '{r.lhs.fn}'{did_you_mean(r.lhs.fn, ops)}",
                     r.lhs, r.line)
    c.expr(r.lhs, ops, None, r.line, rest_ok=True)
    bound = {s.id for s in _walk(r.lhs) if isinstance(s, Name)}
    classes = {s.fn for s in _walk(r.lhs) if isinstance(s, Call) and s.fn in OP_CLASSES}
    rhs_funcs = {k: v for k, v in ops.items() if k not in OP_CLASSES or k in classes}
    rhs_funcs.update({k: guard_arity for k in GUARD_NAMES})
    for k in SCALAR_FUNCS:
        rhs_funcs.setdefault(k, scalar_arity)
    for s in _walk(r.rhs):
        if isinstance(s, Call) and s.fn in OP_CLASSES and s.fn not in classes:
            raise c.fail(f"op class '{s.fn}' on the right side must be matched on the left side", s, r.line)
    c.expr(r.rhs, rhs_funcs, bound, r.line, kw_ok=set(GUARD_NAMES), rest_ok=True)
    if r.where is not None:
        where_funcs: dict[str, Callable[[str], Arity | None]] = {k: guard_arity for k in GUARD_NAMES}
        for k in SCALAR_FUNCS:
            where_funcs.setdefault(k, scalar_arity)
        for k, a in SPECIAL_FORMS.items():
            where_funcs[k] = lambda _n, a=a: a
        for s in _walk(r.where):
            if isinstance(s, Call) and s.fn not in where_funcs and s.fn in TENSOR_OPS:
                raise c.fail(f"unknown guard '{s.fn}': a `where` clause calls guards from peftc/rewrite/guards.py "
                             f"({', '.join(sorted(GUARD_NAMES))}), not tensor ops", s, r.line)
            if isinstance(s, Call) and s.fn not in where_funcs:
                raise c.fail(f"unknown guard '{s.fn}'{did_you_mean(s.fn, GUARD_NAMES)}; guards: "
                             f"{', '.join(sorted(GUARD_NAMES))}", s, r.line)
        c.expr(r.where, where_funcs, bound, r.line, kw_ok=set(GUARD_NAMES), rest_ok=True)


def check_library(methods: Iterable[MethodDef], rules: Iterable[Rule]) -> None:
    """Check every method and rule; raises PeftcError at the first problem's file and line."""
    for m in methods:
        check_method(m)
    seen: dict[str, Rule] = {}
    for r in rules:
        if r.name in seen:
            first = seen[r.name]
            raise PeftcError(f"rule '{r.name}' is declared twice (first at {first.file}:{first.line})",
                             file=r.file, line=r.line)
        seen[r.name] = r
        check_rule(r)


def check_library_text(text: str, file: str) -> tuple[list[MethodDef], list[Rule]]:
    """Parse and check one library file's text (as the library does when it loads); returns its contents."""
    from peftc.lang.methods import parse_library_file
    from peftc.lang.rules import build_rule
    methods, trees = parse_library_file(text, file)
    _SOURCES[file] = text
    try:
        rules = [build_rule(t, file, i) for i, t in enumerate(trees)]
        check_library(methods, rules)
    finally:
        del _SOURCES[file]
    return methods, rules
