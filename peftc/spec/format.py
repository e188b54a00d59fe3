"""`peftc fmt`: a spec's canonical text.

One statement per line, blocks indented by four spaces with one clause per line, `name = value` options
separated by `, `, one blank line between adapters. Values, strings, regexes and module names keep the text
they were written with; comments are kept where they were (on their own line before the statement or clause
they precede, or at the end of its line). Formatting parses the text first: a syntax error is the parser's
located error, and the formatted text parses to the same spec (`same_spec`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lark import Lark, Token, Tree

from peftc.resources import grammar_text
from peftc.spec.model import Span
from peftc.spec.parse import parse_spec

INDENT = "    "
_CONTINUED = "\0"   # an output row that continues the trailing comment above it


@dataclass
class _Comments:
    tokens: list[Token] = field(default_factory=list)
    next: int = 0
    last_trailing: tuple[int, int] = (0, 0)     # (line, column) of the last end-of-line comment placed

    def before(self, line: int) -> list[str]:
        """Comments that start on a line before `line` and are not yet placed."""
        out = []
        while self.next < len(self.tokens) and self.tokens[self.next].line < line:
            out.append(str(self.tokens[self.next]).rstrip())
            self.next += 1
        return out

    def trailing(self, line: int) -> str:
        """The comment at the end of `line`, if any (it is placed there)."""
        if self.next < len(self.tokens) and self.tokens[self.next].line == line:
            tok = self.tokens[self.next]
            self.next += 1
            self.last_trailing = (tok.line, tok.column)
            return "  " + str(tok).rstrip()
        return ""


_parser: Lark | None = None
_seen: list[Token] = []


def _comment_parser() -> Lark:
    global _parser
    if _parser is None:
        _parser = Lark(grammar_text("spec.lark"), parser="lalr", propagate_positions=True,
                       lexer_callbacks={"COMMENT": _seen.append})
    return _parser


def _text(node: Tree | Token | None) -> str:
    if node is None:
        return ""
    if isinstance(node, Token):
        return str(node)
    kind = node.data
    if kind in ("true", "false"):
        return kind
    if kind == "all_linear":
        return "all-linear"
    if kind in ("number", "string", "name_target", "regex_target"):
        return str(node.children[0])
    if kind == "list_value":
        return "[" + ", ".join(_text(c) for c in node.children if c is not None) + "]"
    if kind == "span":
        return f"[{node.children[0]}, {node.children[1]}]"
    if kind == "option":
        key, value = node.children
        return f"{key} = {_text(value)}"
    if kind == "term":
        weight, name = node.children
        return f"{weight} * {name}" if weight is not None else str(name)
    raise ValueError(f"unexpected node {kind}")   # pragma: no cover - the grammar has no other value nodes


def _source(node: Tree) -> str:
    if node.data == "import_source":
        return f"import {node.children[0]}"
    if node.data == "combine_source":
        return f"combine({', '.join(_text(c) for c in node.children)})"
    name, *opts = node.children
    return f"{name}({', '.join(_text(o) for o in opts if o is not None)})"


def _clause(node: Tree) -> str:
    kind = node.data
    items = [c for c in node.children if c is not None]
    if kind == "merge":
        return "merge"
    if kind in ("targets", "exclude"):
        return f"{kind} {', '.join(_text(c) for c in items)}"
    if kind == "modules_to_save":
        return f"save {', '.join(map(str, items))}"
    if kind == "parameters":
        return f"parameters {', '.join(map(str, items))}"
    if kind == "replicate":
        return f"replicate {', '.join(_text(c) for c in items)}"
    if kind == "weights":
        return f"weights {items[0]}"
    if kind == "layers":
        ints = [str(c) for c in items if c.type == "INT"]
        names = [str(c) for c in items if c.type == "MODNAME"]
        return f"layers {', '.join(ints)}" + (f" in {', '.join(names)}" if names else "")
    if kind == "per_pattern":
        opt, target, value = items
        return f"{opt} at {_text(target)} = {_text(value)}"
    if kind == "option_targets":
        opt, *targets = items
        return f"{opt} {', '.join(_text(t) for t in targets)}"
    raise ValueError(f"unexpected clause {kind}")   # pragma: no cover


def _line(node: Tree | Token) -> int:
    return node.line if isinstance(node, Token) else node.meta.line


def format_spec(text: str, file: str = "<spec>") -> str:
    """The canonical form of spec `text` (a syntax error raises the parser's located PeftcError)."""
    parse_spec(text, file)              # errors are reported exactly as everywhere else
    _seen.clear()
    tree = _comment_parser().parse(text)
    comments = _Comments(sorted(_seen, key=lambda t: (t.line, t.column)))
    source_lines = text.splitlines()
    out: list[list[str]] = []           # [code, trailing comment] per output line

    def blank_before(line: int) -> bool:
        return line >= 2 and not source_lines[line - 2].strip()

    def emit_leading(line: int, indent: str = "") -> None:
        while comments.next < len(comments.tokens) and comments.tokens[comments.next].line < line:
            tok = comments.tokens[comments.next]
            if comments.last_trailing == (tok.line - 1, tok.column) and out and out[-1][1]:
                out.append([_CONTINUED, comments.before(tok.line + 1)[0]])   # a trailing comment goes on
                comments.last_trailing = (tok.line, tok.column)
                continue
            if out and out[-1] != ["", ""] and blank_before(tok.line) and out[-1][0].strip() not in ("", "{"):
                out.append(["", ""])
            out.append([indent + comments.before(tok.line + 1)[0], ""])
        if out and out[-1] != ["", ""] and blank_before(line) and not out[-1][0].endswith("{"):
            out.append(["", ""])

    def trailing(line: int) -> str:
        return comments.trailing(line).strip()

    previous = None
    for st in tree.children:
        if previous == "adapter" or (previous and st.data == "adapter"):
            out.append(["", ""])
        emit_leading(_line(st))
        if st.data == "active":
            out.append([f"active {', '.join(map(str, st.children))}", trailing(st.meta.end_line)])
            previous = "active"
            continue
        name, source, block = st.children
        head = f"adapter {name}: {_source(source)}"
        clauses = list(block.children) if block is not None else []
        if block is None:
            out.append([head, trailing(st.meta.end_line)])
        elif not clauses and block.meta.line == block.meta.end_line:
            out.append([head + " {}", trailing(block.meta.end_line)])
        else:
            same_line = clauses and clauses[0].meta.line == block.meta.line   # `{targets ...` on one line
            out.append([head + " {", "" if same_line else trailing(block.meta.line)])
            for cl in clauses:
                emit_leading(cl.meta.line, INDENT)
                out.append([INDENT + _clause(cl), trailing(cl.meta.end_line)])
            emit_leading(block.meta.end_line, INDENT)
            out.append(["}", trailing(block.meta.end_line)])
        previous = "adapter"
    rest = comments.before(10 ** 9)
    if rest and out:
        out.append(["", ""])
    out += [[c, ""] for c in rest]
    while out and out[-1] == ["", ""]:
        out.pop()
    return "".join(line + "\n" for line in _aligned(out))


def _aligned(rows: list[list[str]]) -> list[str]:
    """Trailing comments of consecutive lines start in one column (two spaces after the longest code)."""
    lines: list[str] = []
    i = 0
    while i < len(rows):
        j = i
        while j < len(rows) and rows[j][1] and rows[j][0]:
            j += 1
        if j == i or rows[i][0] == _CONTINUED:
            code, comment = rows[i]
            lines.append(f"{code}  {comment}" if code and comment else code or comment)
            i += 1
            continue
        col = max(len(rows[k][0]) for k in range(i, j) if rows[k][0] != _CONTINUED) + 2
        lines += [("" if rows[k][0] == _CONTINUED else rows[k][0]).ljust(col) + rows[k][1] for k in range(i, j)]
        i = j
    return lines


def same_spec(a: str, b: str) -> bool:
    """Whether two spec texts say the same thing (positions and comments aside)."""
    return _meaning(a) == _meaning(b)


def _meaning(text: str) -> object:
    spec = parse_spec(text)

    def plain(obj: object) -> object:
        if isinstance(obj, Span):
            return None
        if hasattr(obj, "__dataclass_fields__"):
            return tuple((k, plain(getattr(obj, k))) for k in obj.__dataclass_fields__
                         if k not in ("span", "option_spans", "file", "source", "active_spans"))
        if isinstance(obj, dict):
            return tuple((k, plain(v)) for k, v in obj.items())
        if isinstance(obj, (list, tuple)):
            return tuple(plain(v) for v in obj)
        return obj

    return plain(spec)
