"""Spec text -> AdapterSpecs (syntax only; names and options are checked in spec.check)."""
from __future__ import annotations

import difflib
import re
from pathlib import Path

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from peftc.errors import PeftcError
from peftc.lang.strings import check_strings, string_value
from peftc.resources import grammar_text
from peftc.spec.model import AdapterSpec, Combination, PerPattern, Span, Spec, TargetRule

_parser: Lark | None = None

_TOKEN_WORDS = {
    "NAME": "a name", "MODNAME": "a module name", "STRING": "a string", "REGEX": "a /regex/",
    "INT": "an integer", "SIGNED_NUMBER": "a number", "LBRACE": "'{'", "RBRACE": "'}'", "LPAR": "'('",
    "RPAR": "')'", "COMMA": "','", "COLON": "':'", "EQUAL": "'='",
}


def spec_parser() -> Lark:
    global _parser
    if _parser is None:
        _parser = Lark(grammar_text("spec.lark"), parser="lalr", propagate_positions=True)
    return _parser


def _expected(e: UnexpectedInput) -> str:
    exp = sorted(getattr(e, "expected", None) or getattr(e, "allowed", None) or [])
    words = sorted({_TOKEN_WORDS.get(t, repr(t.lower().strip('"')) if t.isupper() else t) for t in exp})
    # closing brackets first: they are what an unfinished block or call usually lacks
    words.sort(key=lambda w: (w not in ("'}'", "')'"), w))
    if not words:
        return ""
    if len(words) > 8:
        words = words[:8] + ["..."]
    return "; expected " + ", ".join(words)


def _literal(tok: Token | Tree) -> object:
    if isinstance(tok, Tree):
        kind = tok.data
        if kind in ("true", "false"):
            return kind == "true"
        if kind == "list_value":
            return [_literal(c) for c in tok.children if c is not None]
        tok = tok.children[0]
        if kind == "number":
            text = str(tok)
            return float(text) if any(c in text for c in ".eE") else int(text)
        if kind == "string":
            return string_value(str(tok))
    return str(tok)


CLAUSE_KEYWORDS = ("targets", "exclude", "layers", "save", "weights", "merge", "parameters", "replicate")
_SCAN = re.compile(r'"(?:[^"\\\n]|\\.)*"|#[^\n]*|/(?:\\.|[^/\\\n])+/|[{}]|[A-Za-z_][A-Za-z0-9_\-]*|\S')


def _clause_typo(text: str, end: int) -> tuple[str, int, int, str] | None:
    """For a syntax error at line:column inside an adapter's block: the first clause there that starts with
    a misspelling of a clause keyword (a bare `mrege` is a syntax error, not a clause), as (word, line,
    column, hint)."""
    depth, block_start, prev = 0, -1, ""
    words: list[tuple[str, int]] = []   # clause-start words in the current block: (word, offset)
    for m in _SCAN.finditer(text, 0, max(end, 0)):
        tok = m.group()
        if tok.startswith("#"):
            continue
        if tok == "{":
            depth, block_start, words = depth + 1, m.start(), []
        elif tok == "}":
            depth = max(depth - 1, 0)
            words = []
        elif depth and (tok[0].isalpha() or tok[0] == "_") and prev in ("{", "}", "\n"):
            words.append((tok, m.start()))
        newline = "\n" in text[m.end(): (_next_start(text, m.end()))]
        prev = "\n" if newline and tok != "," else tok
    if block_start < 0 or not depth:
        return None
    for word, off in words:
        if word in CLAUSE_KEYWORDS:
            continue
        close = difflib.get_close_matches(word, CLAUSE_KEYWORDS, n=2, cutoff=0.7)
        if close:
            ln = text.count("\n", 0, off) + 1
            col = off - (text.rfind("\n", 0, off) + 1) + 1
            return word, ln, col, " or ".join(f"'{c}'" for c in close)
    return None


def _offset(e: UnexpectedInput, text: str) -> int:
    token = getattr(e, "token", None)
    if isinstance(e, UnexpectedEOF) or (token is not None and token.type == "$END") or not e.line or e.line < 0:
        return len(text)
    lines = text.splitlines(keepends=True)
    return sum(len(x) for x in lines[: e.line - 1]) + (e.column or 1) - 1


def _next_start(text: str, pos: int) -> int:
    """Offset of the next non-blank character (comments count as blank up to their line's end)."""
    m = re.compile(r"(?:\s|#[^\n]*)*").match(text, pos)
    return m.end() if m else pos


def parse_spec(text: str, file: str = "<spec>") -> Spec:
    """Parse spec text. Syntax errors raise PeftcError with file:line:col and a caret."""
    try:
        tree = spec_parser().parse(text)
    except UnexpectedInput as e:
        typo = _clause_typo(text, _offset(e, text))
        if typo is None:
            _syntax_error(e, text, file)
        word, ln, col, hint = typo
        raise PeftcError(f"syntax error: unknown clause '{word}' (did you mean {hint}?); clauses are "
                         f"{', '.join(CLAUSE_KEYWORDS)}, and `OPTION at NAME = VALUE`", file=file, line=ln,
                         column=col, source=text) from None
    check_strings(tree, file, text)
    return _build(tree, text, file)


def _syntax_error(e: UnexpectedInput, text: str, file: str) -> None:
    try:
        raise e
    except UnexpectedToken as e:
        if e.token.type == "$END":
            lines = text.splitlines() or [""]
            raise PeftcError(f"syntax error: unexpected end of file{_expected(e)}", file=file, line=len(lines),
                             column=len(lines[-1]) + 1, source=text) from None
        raise PeftcError(f"syntax error: unexpected {str(e.token)!r}{_expected(e)}", file=file, line=e.line,
                         column=e.column, source=text) from None
    except UnexpectedCharacters as e:
        raise PeftcError(f"syntax error: unexpected character {text[e.pos_in_stream]!r}{_expected(e)}",
                         file=file, line=e.line, column=e.column, source=text) from None
    except UnexpectedEOF as e:
        lines = text.splitlines() or [""]
        raise PeftcError(f"syntax error: unexpected end of file{_expected(e)}", file=file, line=len(lines),
                         column=len(lines[-1]) + 1, source=text) from None
    except UnexpectedInput as e:
        raise PeftcError("syntax error", file=file, line=e.line, column=e.column, source=text) from None


def _build(tree: Tree, text: str, file: str) -> Spec:
    def span(node: Tree | Token) -> Span:
        if isinstance(node, Token):
            return Span(file, node.line or 0, node.column or 0)
        return Span(file, getattr(node.meta, "line", 0), getattr(node.meta, "column", 0))

    def target(node: Tree) -> TargetRule:
        if node.data == "all_linear":
            return TargetRule("all-linear", "all-linear", span(node))
        tok = node.children[0]
        if node.data == "regex_target":
            return TargetRule("regex", str(tok)[1:-1].replace("\\/", "/"), span(tok))
        value = string_value(str(tok)) if tok.type == "STRING" else str(tok)
        return TargetRule("name", value, span(tok))

    spec = Spec(file, text, {})
    for st in tree.children:
        if st.data == "active":
            spec.active = [str(t) for t in st.children]
            spec.active_spans = {str(t): span(t) for t in st.children}
            continue
        name_tok, source, block = st.children
        name = str(name_tok)
        if name in spec.adapters:
            raise PeftcError(f"adapter '{name}' is declared twice", file=file, line=name_tok.line,
                             column=name_tok.column, source=text)
        ad = AdapterSpec(name, span(name_tok))
        if source.data == "import_source":
            ad.import_dir = string_value(str(source.children[0]))
            ad.option_spans["import"] = span(source.children[0])
        elif source.data == "combine_source":
            ad.combine = _combination(source, span, text, file)
            ad.option_spans["combine"] = span(source)
            for key in ad.combine.options:
                ad.option_spans[key] = ad.combine.options[key][1]
            ad.combine.options = {k: v for k, (v, _) in ad.combine.options.items()}
        else:
            ad.method = str(source.children[0])
            ad.option_spans["method"] = span(source.children[0])
            for opt in source.children[1:]:
                if opt is None:
                    continue
                key_tok, val = opt.children
                key = str(key_tok)
                if key in ad.options:
                    raise PeftcError(f"option '{key}' given twice", file=file, line=key_tok.line,
                                     column=key_tok.column, source=text)
                ad.options[key] = _literal(val)
                ad.option_spans[key] = span(key_tok)
        for cl in (block.children if block is not None else []):
            k = cl.data
            if k == "targets":
                ad.targets += [target(c) for c in cl.children]
            elif k == "exclude":
                ad.exclude += [target(c) for c in cl.children]
            elif k == "layers":
                ints = [int(str(c)) for c in cl.children if isinstance(c, Token) and c.type == "INT"]
                pats = [str(c) for c in cl.children if isinstance(c, Token) and c.type == "MODNAME"]
                ad.layers = (ad.layers or []) + ints
                ad.option_spans.setdefault("layers", span(cl))
                if pats:
                    ad.layers_pattern = pats
            elif k == "modules_to_save":
                ad.modules_to_save += [str(c) for c in cl.children]
            elif k == "weights":
                ad.weights = string_value(str(cl.children[0]))
                ad.option_spans["weights"] = span(cl.children[0])
            elif k == "merge":
                ad.merge = True
            elif k == "parameters":
                ad.parameters += [TargetRule("name", str(c), span(c)) for c in cl.children]
                ad.option_spans.setdefault("parameters", span(cl))
            elif k == "replicate":
                ad.replicate = (ad.replicate or []) + [(int(str(a)), int(str(b))) for a, b in
                                                       (c.children for c in cl.children)]
                ad.option_spans.setdefault("replicate", span(cl))
            elif k == "per_pattern":
                opt_tok, tgt, val = cl.children
                rule = target(tgt)
                if rule.kind == "all-linear":
                    raise PeftcError("'all-linear' cannot select a per-layer value", file=file,
                                     line=rule.span.line, column=rule.span.column, source=text)
                # rank_pattern semantics: the key matches a dot-suffix of the name, as a regex
                key = rule.value if rule.kind == "regex" else _escape_name(rule.value)
                ad.per_pattern.append(PerPattern(str(opt_tok), TargetRule("pattern", key, rule.span),
                                                 _literal(val), span(opt_tok)))
            elif k == "option_targets":
                opt_tok = cl.children[0]
                ad.option_targets.setdefault(str(opt_tok), []).extend(target(c) for c in cl.children[1:])
                ad.option_spans[str(opt_tok)] = span(opt_tok)
        spec.adapters[name] = ad
    return spec


def _combination(source: Tree, span, text: str, file: str) -> Combination:
    comb = Combination([])
    opts: dict[str, tuple[object, Span]] = {}
    for node in source.children:
        if node.data == "term":
            weight_tok, name_tok = node.children
            weight = 1.0 if weight_tok is None else float(str(weight_tok))
            comb.terms.append((weight, str(name_tok), span(name_tok)))
        else:
            key_tok, val = node.children
            if str(key_tok) in opts:
                raise PeftcError(f"option '{key_tok}' given twice", file=file, line=key_tok.line,
                                 column=key_tok.column, source=text)
            opts[str(key_tok)] = (_literal(val), span(key_tok))
    comb.options = opts  # type: ignore[assignment]  # (value, span) until the caller splits them
    return comb


def _escape_name(name: str) -> str:
    import re
    return re.escape(name)


def read_spec(path: str | Path) -> Spec:
    p = Path(path)
    if not p.exists():
        raise PeftcError(f"spec file not found: {p}")
    if p.is_dir():
        raise PeftcError(f"{p} is a directory, not a .peft spec file")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise PeftcError(f"cannot read spec file {p}: {e}") from None
    return parse_spec(text, str(p))
