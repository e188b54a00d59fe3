"""Method files (passes/*.peft): parse them into MethodDefs and instantiate a method at one layer.

A method declares options (with the PEFT config key each one maps to), the layer kinds it supports,
and a body of statements: `let`, `param` (shape, init, checkpoint key), `weight` (the transform
W' = T(W, theta)), `bias`, `dropout`, `require`, and the conditionals `when` / `on KIND`.
Instantiating walks the body for one layer with the option values and the layer's dimensions, and
returns a SiteProgram: what to allocate and which expressions to emit.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lark import Lark, Token, Tree
from lark.exceptions import LarkError, UnexpectedInput

from peftc.errors import PeftcError, did_you_mean
from peftc.lang.expr import Call, Const, Expr, names_in, to_expr
from peftc.lang.strings import check_strings, string_value
from peftc.resources import grammar_text

OPTION_TYPES = ("int", "float", "bool", "str", "targets", "number", "list")
# names a method sees besides its options and the layer's dims: over all of the adapter's layers (max_in,
# max_out, the sum of in * out, their number), and whether it is compiled for training / from a checkpoint
ADAPTER_DIMS = ("max_in", "max_out", "total_in_out", "n_layers", "training", "loading")


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
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(spec_repr(v) for v in value) + "]"
    return repr(value)


@dataclass
class OptionDecl:
    name: str
    type: str
    default: Any
    config_key: str | None
    values: dict[Any, Any] = field(default_factory=dict)  # config value -> option value
    pattern_key: str | None = None   # the PEFT config dict of per-layer values, e.g. "rank_pattern"
    pattern_search: bool = False     # peft finds its keys anywhere in a layer name (re.search), not at the end


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
    training_note: str | None = None   # what `compile --train` does not do for this method (training-loop parts)
    config_fields: tuple[str, ...] = ()  # generic PEFT config keys (fan_in_fan_out, bias) its config class has
    dense_note: str | None = None      # why its unmerged form may rebuild a full-size update every forward
    training_if: Expr | None = None    # when the training note applies (None: always)
    bias_only: str | None = None       # peft's `bias` option: "none", "all" or this ("lora_only"); None: no option
    tied_follow: bool = False          # modules tied to a layer's weight (an output head) read the adapted weight
    default_targets: dict[str, tuple[str, ...]] = field(default_factory=dict)  # model_type or "*" -> targets
    config_omits: tuple[str, ...] = ()  # generic PEFT config keys its config class lacks (modules_to_save)
    # (method, option, key prefix): the method also runs on the layers this option names (a list: the input
    # embeddings; a dict: layer -> list), its list option taking the value, its tensors saved under <layer>.<prefix>.
    companions: tuple[tuple[str, str, str], ...] = ()
    # `mergeable COND else "why"` headers (all must hold; `mergeable` above is their conjunction)
    unmergeable: tuple[tuple[Expr, str | None], ...] = ()
    # `config { ... } if COND`: config entries written on save when COND holds for the adapter's options (they
    # take no part in recognising the method of a checkpoint)
    config_if: tuple[tuple[dict[str, Any], Expr], ...] = ()
    # `row_input "task_ids"`: a per-row int64 [batch] input that `input("task_ids")` reads; the compiled graph takes
    # it as one more input when the model has none of that name
    row_inputs: tuple[str, ...] = ()


@dataclass
class ParamDecl:
    name: str
    shape: tuple[int, ...]
    init: Expr
    saved: str | None            # checkpoint key suffix, e.g. "lora_A.weight"; None: never saved or loaded
    frozen: bool = False         # saved, but never trained (DeLoRA's w_norm, VeRA's projections)
    dtype: str | None = None     # the tensor's own dtype ("int64", "float32"); None: the adapter's float dtype
    optional: bool = False       # a checkpoint may lack it (then it is initialised)
    bound: dict[int, str] = field(default_factory=dict)  # dim index -> name bound from a loaded tensor
    shared: bool = False         # one tensor per adapter, shared by its layers (saved at base_model.<key>)
    each_layer: bool = False     # a shared tensor that the checkpoint also holds under every layer (a copy)


@dataclass
class ParamSyntax:
    """A `param` / `shared` statement before instantiation."""
    name: str
    shape: tuple[Any, ...]       # Exprs, or ("?", name) for a dim bound from the checkpoint
    init: Expr
    saved: str | None
    saved_if: Expr | None
    frozen: bool
    dtype: str | None
    optional: bool
    each_layer: bool = False


@dataclass
class SiteProgram:
    """A method instantiated at one layer."""
    lets: list[tuple[str, Expr]]
    params: list[ParamDecl]
    weight: Expr | None
    bias: Expr | None
    dropout: tuple[float, str] | None   # input dropout: (p, submodule name stem such as "lora_dropout")
    env: dict[str, Any]                 # the Python values: options, dimensions, scalar lets
    mergeable: bool
    steps: list[tuple[str, Any]] = field(default_factory=list)  # lets, consts and params in declaration order
    consts: list[tuple[str, Expr]] = field(default_factory=list)  # plan-time constant tensors (buffers)
    records: dict[tuple[str, str], Any] = field(default_factory=dict)  # (config key, key suffix) -> value
    weight_dropouts: list[tuple[float, str, str, bool]] = field(default_factory=list)  # (p, stem, over, rescale)
    shared: list[str] = field(default_factory=list)               # adapter-level tensors this layer reads
    tensor_dropouts: list[tuple[float, str, str, str]] = field(default_factory=list)  # (p, stem, over, let name)
    unmergeable_why: str | None = None   # the `else` of the first `mergeable` header that does not hold


# ---------------------------------------------------------------- parsing
_parser: Lark | None = None


def method_parser() -> Lark:
    global _parser
    if _parser is None:
        _parser = Lark(grammar_text("method.lark"), parser="lalr", propagate_positions=True)
    return _parser


def _string(tok: Token) -> str:
    return string_value(str(tok))


def _const(expr: Expr, file: str) -> Any:
    if isinstance(expr, Const):  # the usual case, without importing the evaluator (and torch)
        return expr.value
    if isinstance(expr, Call) and expr.fn == "neg" and isinstance(expr.args[0], Const):   # -1
        return -expr.args[0].value
    if isinstance(expr, Call) and expr.fn == "tuple" and all(isinstance(a, Const) for a in expr.args):
        return tuple(a.value for a in expr.args)
    from peftc.lang.evaluate import EvalError, evaluate
    try:
        return evaluate(expr, {})
    except EvalError as e:
        raise PeftcError(f"option default must be a constant: {e}", file=file, line=expr.line) from None


# inputs: nn.Dropout on the adapter's input; rows: each output row of the update dropped (LyCORIS rank
# dropout); adapter: the whole update dropped (module dropout); blocks (`over blocks of NAME`): int(p * blocks)
# blocks of the (.., blocks, n, n) let NAME replaced by the identity (OFT / BOFT's multiplicative dropout).
# Only in a graph compiled for training.
DROPOUT_KINDS = ("inputs", "rows", "adapter", "blocks")
_DTYPES = ("float32", "float64", "bfloat16", "float16", "int64", "int32", "int16", "uint8", "bool")


def _param_syntax(ch: list, file: str, line: int) -> ParamSyntax:
    name, shape_tree, init = str(ch[0]), ch[1], to_expr(ch[2])
    shape: list[Any] = []
    for d in shape_tree.children:
        if d is None:
            continue
        if isinstance(d, Tree) and d.data == "bound_dim":
            shape.append(("?", str(d.children[0])))
        else:
            shape.append(to_expr(d))
    saved, saved_if = None, None
    frozen, dtype, optional, each_layer = False, None, False, False
    for a in ch[3:]:
        if a is None:
            continue
        if a.data == "saved":
            saved = _string(a.children[0])
            saved_if = to_expr(a.children[1]) if len(a.children) > 1 and a.children[1] is not None else None
        elif a.data == "frozen":
            frozen = True
        elif a.data == "optional":
            optional = True
        elif a.data == "each_layer":
            each_layer = True
        elif a.data == "dtype":
            dtype = str(a.children[0])
            if dtype not in _DTYPES:
                raise PeftcError(f"param {name}: unknown dtype '{dtype}'{did_you_mean(dtype, _DTYPES)}; "
                                 f"dtypes: {', '.join(_DTYPES)}", file=file, line=line)
    return ParamSyntax(name, tuple(shape), init, saved, saved_if, frozen, dtype, optional, each_layer)


def _stmts(block: Tree, file: str) -> list[Stmt]:
    out = []
    for st in block.children:
        line = getattr(st.meta, "line", 0)
        ch = st.children
        k = st.data
        if k in ("let", "const"):
            out.append(Stmt(k, (str(ch[0]), to_expr(ch[1])), line))
        elif k == "record":
            cond = to_expr(ch[3]) if len(ch) > 3 and ch[3] is not None else None
            out.append(Stmt("record", (_string(ch[0]), _string(ch[1]), to_expr(ch[2]), cond), line))
        elif k == "let_tuple":
            out.append(Stmt("let_tuple", (tuple(str(c) for c in ch[:-1]), to_expr(ch[-1])), line))
        elif k in ("param", "shared"):
            out.append(Stmt(k, (_param_syntax(ch, file, line),), line))
        elif k in ("weight", "bias"):
            out.append(Stmt(k, (to_expr(ch[0]),), line))
        elif k == "dropout":
            over = str(ch[2]) if len(ch) > 2 and ch[2] is not None else "inputs"
            if over not in DROPOUT_KINDS:
                raise PeftcError(f"dropout over '{over}'{did_you_mean(over, DROPOUT_KINDS)}: dropout is over "
                                 f"{', '.join(DROPOUT_KINDS)}", file=file, line=line)
            of = str(ch[3]) if len(ch) > 3 and ch[3] is not None else None
            if (over == "blocks") != (of is not None):
                raise PeftcError("dropout over blocks needs `of NAME` (the let whose blocks it drops), and only it "
                                 "takes one", file=file, line=line)
            rescale = to_expr(ch[4]) if len(ch) > 4 and ch[4] is not None else None
            out.append(Stmt("dropout", (to_expr(ch[0]), _string(ch[1]), over, rescale, of), line))
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
    check_strings(tree, file, text)
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
                                            _string(o[3]) if o[3] is not None else None, values, pattern_key,
                                            len(o) > 6 and o[6] is not None)
            i += 1
        while i < len(ch) and ch[i] is None:
            i += 1
        peft_type, fixed, kinds, mergeable, note, fields, dense = None, {}, [], None, None, (), None
        training_if = None
        bias_only, tied, defaults, omits, companions = None, False, {}, (), []
        unmergeable: list[tuple[Expr, str | None]] = []
        config_if: list[tuple[dict[str, Any], Expr]] = []
        row_inputs: tuple[str, ...] = ()
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
                cond = to_expr(h.children[0])
                why = _string(h.children[1]) if len(h.children) > 1 and h.children[1] is not None else None
                unmergeable.append((cond, why))
                mergeable = cond if mergeable is None else Call("and", (mergeable, cond), line=cond.line,
                                                                  column=cond.column)
            elif h.data == "row_inputs":
                row_inputs = tuple(_string(c) for c in h.children)
            elif h.data == "config_if":
                entries = {_string(e.children[0]): _const(to_expr(e.children[1]), file)
                           for e in h.children[:-1] if e is not None}
                config_if.append((entries, to_expr(h.children[-1])))
            elif h.data == "training_note":
                note = _string(h.children[0])
                training_if = to_expr(h.children[1]) if len(h.children) > 1 and h.children[1] is not None else None
            elif h.data == "config_fields":
                fields = tuple(_string(c) for c in h.children)
            elif h.data == "dense_note":
                dense = _string(h.children[0])
            elif h.data == "bias_option":
                bias_only = _string(h.children[0])
                options.setdefault("bias", OptionDecl("bias", "str", "none", "bias"))
            elif h.data == "companion":
                companions.append((str(h.children[0]), str(h.children[1]), _string(h.children[2])))
            elif h.data == "config_omits":
                omits = tuple(_string(c) for c in h.children)
            elif h.data == "tied_follow":
                tied = True
            elif h.data == "default_targets":
                for e in h.children:
                    if e is not None:
                        v = _const(to_expr(e.children[1]), file)
                        defaults[_string(e.children[0])] = (v,) if isinstance(v, str) else tuple(v)
        methods.append(MethodDef(name, options, peft_type, fixed, kinds, _stmts(ch[-1], file), mergeable, file,
                                 note, fields, dense, training_if, bias_only, tied, defaults, omits,
                                 tuple(companions), tuple(unmergeable), tuple(config_if), row_inputs))
    return methods, rules


# ---------------------------------------------------------------- instantiation
def coerce_option(decl: OptionDecl, value: Any) -> Any:
    """Check/convert one option value; raises ValueError with a user-facing reason."""
    t = decl.type
    if value is None and decl.default is None:
        return None   # an option that may be unset (peft's None)
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
    if t == "number":   # an int or a float, kept as given (peft reads 1 and 1.0 differently for some options)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expects a number, got {spec_repr(value)}")
        return value
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
    if t == "list":
        def ints(v: Any) -> bool:
            return isinstance(v, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
        if isinstance(value, dict) and all(isinstance(k, str) and ints(v) for k, v in value.items()):
            return {k: tuple(v) for k, v in value.items()}   # peft's per-layer form: {"embed_tokens": [1, 2]}
        if not ints(value):
            raise ValueError(f"expects a list of integers such as [1, 2], got {spec_repr(value)}")
        return tuple(value)
    return value  # targets: handled by the planner


def _walk_statements(method: MethodDef, stmts: list[Stmt], step: Callable[[Stmt], None]) -> None:
    """Run `step` on each statement; an evaluation error becomes a PeftcError at the statement's line."""
    from peftc.lang.evaluate import EvalError
    for st in stmts:
        try:
            step(st)
        except EvalError as e:
            raise PeftcError(f"in method '{method.name}': {e}", file=method.file, line=st.line) from None


class NeedsTensors(Exception):
    """A `let` that reads a tensor (or a name bound only at emission): evaluated when the graph is built."""


_TENSOR_NAMES = {"W", "W0", "b"}


def _let_value(expr: Expr, env: dict[str, Any], deferred: set[str]) -> Any:
    """Evaluate a `let` now if it needs no tensors; raise NeedsTensors if it does; EvalError if it is wrong."""
    from peftc.lang.evaluate import evaluate
    from peftc.model_inputs import graph_only
    if names_in(expr) & (deferred | _TENSOR_NAMES) or graph_only(expr):
        raise NeedsTensors
    return evaluate(expr, env)


def _shape(ps: ParamSyntax, env: dict[str, Any], shape_of: Callable[[str], tuple[int, ...] | None] | None,
           key: str | None) -> tuple[tuple[int, ...], dict[int, str]]:
    """Evaluate a param's shape; a `?name` dim takes the loaded tensor's size (binding `name`) or name's value."""
    from peftc.lang.evaluate import EvalError, evaluate
    loaded = shape_of(key) if shape_of is not None and key is not None else None
    dims: list[int] = []
    bound: dict[int, str] = {}
    for i, d in enumerate(ps.shape):
        if isinstance(d, tuple):
            name = d[1]
            bound[i] = name
            if loaded is not None and len(loaded) == len(ps.shape):
                env[name] = int(loaded[i])
            elif name not in env:
                raise EvalError(f"dim '?{name}' has no value: '{name}' is unknown and no checkpoint gives it")
            dims.append(int(env[name]))
        else:
            dims.append(int(evaluate(d, env)))
    return tuple(dims), bound


def instantiate(method: MethodDef, kind: str, options: dict[str, Any], dims: dict[str, Any],
                shape_of: Callable[[str], tuple[int, ...] | None] | None = None) -> SiteProgram:
    """Walk `method`'s body for one layer. Raises PeftcError for a failed `require`.

    `shape_of(saved_key)` gives the shape of a tensor in the checkpoint being loaded (or None), so that
    `?name` dims (a pruned AdaLoRA rank, say) come from the file.
    """
    from peftc.lang.evaluate import EvalError, evaluate  # here, not at import: loading the library needs no torch
    env: dict[str, Any] = {**dims, **options}
    prog = SiteProgram([], [], None, None, None, env, True)
    deferred: set[str] = set()   # names known only once tensors exist (lets over tensors, params, consts)

    def walk(stmts: list[Stmt]) -> None:
        _walk_statements(method, stmts, _step)

    def _step(st: Stmt) -> None:
        if st.kind == "let":
            name, expr = st.args
            prog.lets.append((name, expr))
            prog.steps.append(("let", (name, expr)))
            try:
                env[name] = _let_value(expr, env, deferred)
                deferred.discard(name)
            except NeedsTensors:
                deferred.add(name)
                env.pop(name, None)
        elif st.kind == "let_tuple":
            names, expr = st.args
            value = evaluate(expr, env)
            if not isinstance(value, tuple) or len(value) != len(names):
                raise EvalError(f"let ({', '.join(names)}) = ... needs a tuple of {len(names)} values, got {value!r}")
            for n, v in zip(names, value):
                env[n] = v
                prog.lets.append((n, Const(v)))
                prog.steps.append(("let", (n, Const(v))))
        elif st.kind == "const":
            name, expr = st.args
            prog.consts.append((name, expr))
            prog.steps.append(("const", (name, expr)))
            deferred.add(name)
        elif st.kind in ("param", "shared"):
            ps: ParamSyntax = st.args[0]
            if st.kind == "shared":
                prog.shared.append(ps.name)
                deferred.add(ps.name)
                return
            saved = ps.saved if ps.saved_if is None or evaluate(ps.saved_if, env) else None
            shape, bound = _shape(ps, env, shape_of, saved)
            decl = ParamDecl(ps.name, shape, ps.init, saved, ps.frozen, ps.dtype, ps.optional, bound)
            prog.params.append(decl)
            prog.steps.append(("param", decl))
            for name in bound.values():   # a dim bound from the checkpoint overrides the let of that name
                prog.steps.append(("let", (name, Const(env[name]))))
            deferred.add(ps.name)
        elif st.kind == "record":
            key, suffix, expr, cond = st.args
            if cond is None or evaluate(cond, env):
                prog.records[(key, suffix)] = evaluate(expr, env)
        elif st.kind == "weight":
            prog.weight = st.args[0]
        elif st.kind == "bias":
            prog.bias = st.args[0]
        elif st.kind == "dropout":
            p = float(evaluate(st.args[0], env))
            _, stem, over, rescale, of = st.args
            if of is not None and (of not in {n for n, _ in prog.lets} or of in env):
                raise EvalError(f"dropout over blocks of '{of}': '{of}' must be a tensor `let` declared before it")
            if p > 0 and of is not None:
                prog.tensor_dropouts.append((p, stem, over, of))
            elif p > 0 and over == "inputs":
                prog.dropout = (p, stem)
            elif p > 0:
                prog.weight_dropouts.append((p, stem, over, bool(evaluate(rescale, env)) if rescale else False))
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
        if not prog.mergeable:
            prog.unmergeable_why = next((why for cond, why in method.unmergeable if not evaluate(cond, env)), None)
    return prog


def instantiate_shared(method: MethodDef, kinds: set[str], options: dict[str, Any],
                       dims: dict[str, Any]) -> tuple[list[ParamDecl], list[tuple[str, Any]], dict[str, Any]]:
    """The adapter-level tensors (`shared` statements) for an adapter whose layers are of `kinds`, with
    aggregate dims (`max_in`, `max_out`: the largest over its layers). Returns the declarations, the steps
    (lets and shared params, in declaration order) and the environment. Lets that need a layer are skipped."""
    from peftc.lang.evaluate import EvalError, evaluate
    env: dict[str, Any] = {**dims, **options}
    decls: list[ParamDecl] = []
    steps: list[tuple[str, Any]] = []

    def walk(stmts: list[Stmt]) -> None:
        _walk_statements(method, stmts, _step)

    def _step(st: Stmt) -> None:
        if st.kind == "let":
            name, expr = st.args
            if names_in(expr) <= set(env) | {n for n, _ in steps}:
                try:
                    env[name] = evaluate(expr, env)
                    steps.append(("let", (name, Const(env[name]))))
                except EvalError:
                    steps.append(("let", (name, expr)))
        elif st.kind == "let_tuple":
            names, expr = st.args
            if names_in(expr) <= set(env):
                for n, v in zip(names, evaluate(expr, env)):
                    env[n] = v
        elif st.kind == "shared":
            ps: ParamSyntax = st.args[0]
            saved = ps.saved if ps.saved_if is None or evaluate(ps.saved_if, env) else None
            shape, bound = _shape(ps, env, None, None)
            decl = ParamDecl(ps.name, shape, ps.init, saved, ps.frozen, ps.dtype, ps.optional, bound, shared=True,
                             each_layer=ps.each_layer)
            decls.append(decl)
            steps.append(("param", decl))
        elif st.kind == "when":
            cond, then, other = st.args
            if names_in(cond) <= set(env):
                walk(then if evaluate(cond, env) else other)
        elif st.kind == "on":
            ks, body = st.args
            if kinds & set(ks):
                walk(body)

    walk(method.body)
    return decls, steps, env


def load_methods(paths: list[Path]) -> tuple[dict[str, MethodDef], list[tuple[Tree, str]]]:
    methods: dict[str, MethodDef] = {}
    rules: list[tuple[Tree, str]] = []
    for p in sorted(paths):
        ms, rs = parse_library_file(p.read_text(), str(p))
        for m in ms:
            if m.name in methods:
                raise PeftcError(f"method '{m.name}' is declared twice (also in {methods[m.name].file})", file=str(p))
            methods[m.name] = m
        rules.extend((r, str(p)) for r in rs)
    return methods, rules
