"""Method files (passes/*.peft): parse them into MethodDefs and instantiate a method at one layer.

A method declares options (with the PEFT config key each one maps to), the layer kinds it supports,
and a body of statements: `let`, `param` (shape, init, checkpoint key), `weight` (the transform
W' = T(W, theta)), `bias`, `dropout`, `require`, and the conditionals `when` / `on KIND`.
Instantiating walks the body for one layer with the option values and the layer's dimensions, and
returns a SiteProgram: what to allocate and which expressions to emit.
"""
from __future__ import annotations

import ast as pyast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lark import Lark, Token, Tree
from lark.exceptions import LarkError, UnexpectedInput

from peftc.errors import PeftcError
from peftc.lang.expr import Const, Expr, names_in, to_expr
from peftc.resources import grammar_text

OPTION_TYPES = ("int", "float", "bool", "str", "targets")


class RequireFailed(PeftcError):
    """A method's `require` did not hold; `names` are the names its condition reads."""

    def __init__(self, message: str, names: set[str]) -> None:
        super().__init__(message)
        self.names = names


def spec_repr(value: Any) -> str:
    """A value as the spec language writes it (true/false, quoted strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


@dataclass
class OptionDecl:
    name: str
    type: str
    default: Any
    config_key: str | None
    values: dict[Any, Any] = field(default_factory=dict)  # config value -> option value
    pattern_key: str | None = None   # the PEFT config dict of per-layer values, e.g. "rank_pattern"


@dataclass
class Stmt:
    kind: str          # let | param | weight | bias | dropout | require | when | on
    args: tuple
    line: int = 0


@dataclass
class MethodDef:
    name: str
    options: dict[str, OptionDecl]
    peft_type: str | None
    fixed_config: dict[str, Any]
    kinds: list[str]
    body: list[Stmt]
    mergeable: Expr | None
    file: str


@dataclass
class ParamDecl:
    name: str
    shape: tuple[int, ...]
    init: Expr
    saved: str           # checkpoint key suffix, e.g. "lora_A.weight"


@dataclass
class SiteProgram:
    """A method instantiated at one layer."""
    lets: list[tuple[str, Expr]]
    params: list[ParamDecl]
    weight: Expr | None
    bias: Expr | None
    dropout: tuple[float, str] | None   # (p, submodule name stem such as "lora_dropout")
    env: dict[str, Any]                 # the Python values: options, dimensions, scalar lets
    mergeable: bool
    steps: list[tuple[str, Any]] = field(default_factory=list)  # lets and params in declaration order


# ---------------------------------------------------------------- parsing
_parser: Lark | None = None


def method_parser() -> Lark:
    global _parser
    if _parser is None:
        _parser = Lark(grammar_text("method.lark"), parser="lalr", propagate_positions=True)
    return _parser


def _string(tok: Token) -> str:
    return pyast.literal_eval(str(tok))


def _const(expr: Expr, file: str) -> Any:
    if isinstance(expr, Const):  # the usual case, without importing the evaluator (and torch)
        return expr.value
    from peftc.lang.evaluate import EvalError, evaluate
    try:
        return evaluate(expr, {})
    except EvalError as e:
        raise PeftcError(f"option default must be a constant: {e}", file=file, line=expr.line) from None


def _stmts(block: Tree, file: str) -> list[Stmt]:
    out = []
    for st in block.children:
        line = getattr(st.meta, "line", 0)
        ch = st.children
        k = st.data
        if k == "let":
            out.append(Stmt("let", (str(ch[0]), to_expr(ch[1])), line))
        elif k == "param":
            shape = tuple(to_expr(c) for c in ch[1].children if c is not None)
            out.append(Stmt("param", (str(ch[0]), shape, to_expr(ch[2]), _string(ch[3])), line))
        elif k in ("weight", "bias"):
            out.append(Stmt(k, (to_expr(ch[0]),), line))
        elif k == "dropout":
            out.append(Stmt("dropout", (to_expr(ch[0]), _string(ch[1])), line))
        elif k == "require":
            out.append(Stmt("require", (to_expr(ch[0]), _string(ch[1])), line))
        elif k == "when":
            other = _stmts(ch[2], file) if len(ch) > 2 and ch[2] is not None else []
            out.append(Stmt("when", (to_expr(ch[0]), _stmts(ch[1], file), other), line))
        elif k == "on_kind":
            kinds = [str(c) for c in ch[:-1]]
            out.append(Stmt("on", (kinds, _stmts(ch[-1], file)), line))
        else:
            raise PeftcError(f"unknown statement {k}", file=file, line=line)
    return out


def parse_library_file(text: str, file: str) -> tuple[list[MethodDef], list[Tree]]:
    """Parse one passes/*.peft file: its methods, and its rules (as raw trees for lang.rules)."""
    try:
        tree = method_parser().parse(text)
    except UnexpectedInput as e:
        raise PeftcError(f"syntax error: unexpected {str(getattr(e, 'token', '') or e.get_context(text)).strip()!r}",
                         file=file, line=e.line, column=e.column, source=text) from None
    except LarkError as e:
        raise PeftcError(f"syntax error: {e}", file=file) from None
    methods, rules = [], []
    for item in tree.children:
        if item.data == "rule":
            rules.append(item)
            continue
        ch = item.children
        name = str(ch[0])
        options: dict[str, OptionDecl] = {}
        i = 1
        while i < len(ch) and isinstance(ch[i], Tree) and ch[i].data == "option":
            o = ch[i].children
            values = {}
            if len(o) > 4 and o[4] is not None:
                for pair in o[4].children:
                    values[_const(to_expr(pair.children[0]), file)] = _const(to_expr(pair.children[1]), file)
            default = _const(to_expr(o[2]), file) if o[2] is not None else None
            pattern_key = _string(o[5]) if len(o) > 5 and o[5] is not None else None
            options[str(o[0])] = OptionDecl(str(o[0]), str(o[1]), default,
                                            _string(o[3]) if o[3] is not None else None, values, pattern_key)
            i += 1
        while i < len(ch) and ch[i] is None:
            i += 1
        peft_type, fixed, kinds, mergeable = None, {}, [], None
        for h in ch[i:-1]:
            if h is None:
                continue
            if h.data == "peft_type":
                peft_type = _string(h.children[0])
            elif h.data == "fixed_config":
                for e in h.children:
                    if e is not None:
                        fixed[_string(e.children[0])] = _const(to_expr(e.children[1]), file)
            elif h.data == "layer_kinds":
                kinds = [str(c) for c in h.children]
            elif h.data == "mergeable":
                mergeable = to_expr(h.children[0])
        methods.append(MethodDef(name, options, peft_type, fixed, kinds, _stmts(ch[-1], file), mergeable, file))
    return methods, rules


# ---------------------------------------------------------------- instantiation
def coerce_option(decl: OptionDecl, value: Any) -> Any:
    """Check/convert one option value; raises ValueError with a user-facing reason."""
    t = decl.type
    if t == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"expects an integer, got {spec_repr(value)}")
        return value
    if t == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expects a number, got {spec_repr(value)}")
        return float(value)
    if t == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"expects true or false, got {spec_repr(value)}")
        return value
    if t == "str":
        if isinstance(value, bool) and value in decl.values:
            return decl.values[value]
        if not isinstance(value, str):
            raise ValueError(f"expects a string, got {spec_repr(value)}")
        return value
    return value  # targets: handled by the planner


def instantiate(method: MethodDef, kind: str, options: dict[str, Any], dims: dict[str, Any]) -> SiteProgram:
    """Walk `method`'s body for one layer. Raises PeftcError for a failed `require`."""
    from peftc.lang.evaluate import EvalError, evaluate
    env: dict[str, Any] = {**dims, **options}
    prog = SiteProgram([], [], None, None, None, env, True)

    def walk(stmts: list[Stmt]) -> None:
        for st in stmts:
            try:
                _step(st)
            except EvalError as e:
                raise PeftcError(f"in method '{method.name}': {e}", file=method.file, line=st.line) from None

    def _step(st: Stmt) -> None:
        if st.kind == "let":
            name, expr = st.args
            prog.lets.append((name, expr))
            prog.steps.append(("let", (name, expr)))
            try:
                env[name] = evaluate(expr, env)
            except EvalError:
                pass  # needs tensors: evaluated at emission time
        elif st.kind == "param":
            name, shape, init, saved = st.args
            dims_ = tuple(int(evaluate(d, env)) for d in shape)
            prog.params.append(ParamDecl(name, dims_, init, saved))
            prog.steps.append(("param", prog.params[-1]))
        elif st.kind == "weight":
            prog.weight = st.args[0]
        elif st.kind == "bias":
            prog.bias = st.args[0]
        elif st.kind == "dropout":
            p = float(evaluate(st.args[0], env))
            if p > 0:
                prog.dropout = (p, st.args[1])
        elif st.kind == "require":
            if not evaluate(st.args[0], env):
                raise RequireFailed(f"{method.name}: {st.args[1]}", names_in(st.args[0]))
        elif st.kind == "when":
            cond, then, other = st.args
            walk(then if evaluate(cond, env) else other)
        elif st.kind == "on":
            kinds, body = st.args
            if kind in kinds:
                walk(body)

    walk(method.body)
    if method.mergeable is not None:
        prog.mergeable = bool(evaluate(method.mergeable, env))
    return prog


def load_methods(paths: list[Path]) -> tuple[dict[str, MethodDef], list[tuple[Tree, str]]]:
    methods: dict[str, MethodDef] = {}
    rules: list[tuple[Tree, str]] = []
    for p in sorted(paths):
        ms, rs = parse_library_file(p.read_text(), str(p))
        for m in ms:
            methods[m.name] = m
        rules.extend((r, str(p)) for r in rs)
    return methods, rules
