"""Locates the data that ships with peftc: grammar/ (lark grammars) and passes/ (method files, rules).

In a wheel they live inside the package as peftc/_data/{grammar,passes}; in a source checkout (editable
install) they are the top-level grammar/ and passes/ folders beside the package.
"""
from __future__ import annotations

from functools import cache
from pathlib import Path

_PKG = Path(__file__).resolve().parent


@cache
def data_dir(name: str) -> Path:
    """The folder `grammar` or `passes`, wherever this installation keeps it."""
    for candidate in (_PKG / "_data" / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"peftc is missing its {name}/ folder (looked in {_PKG / '_data'} and {_PKG.parent})")


def grammar_text(name: str) -> str:
    return (data_dir("grammar") / name).read_text()
