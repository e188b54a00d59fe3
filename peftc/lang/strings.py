"""String literals of both languages ("..." with Python's escapes), decoded safely: a literal that does not
decode (a truncated `\\x` escape, a NUL byte) is a located error, never a crash."""
from __future__ import annotations

import ast
from collections.abc import Iterable

from lark import Token, Tree

from peftc.errors import PeftcError


def string_value(text: str) -> str:
    """The value of a STRING token's text (raw NUL bytes and other control characters are taken as written)."""
    return ast.literal_eval(text.replace("\x00", "\\x00"))


def check_strings(tree: Tree, file: str, source: str) -> None:
    """Every STRING token of a parse tree decodes; else a PeftcError at the first one that does not."""
    tokens: Iterable[Token] = tree.scan_values(lambda v: isinstance(v, Token) and v.type == "STRING")
    for tok in tokens:
        try:
            string_value(str(tok))
        except (SyntaxError, ValueError) as e:
            reason = str(getattr(e, "msg", e)).replace("(unicode error) ", "")
            raise PeftcError(f"invalid string {str(tok)}: {reason}", file=file, line=tok.line, column=tok.column,
                             source=source) from None
