"""Regenerate editors/vscode/syntaxes/peft.tmLanguage.json from the keyword lists of peftc.highlight, so the
Pygments lexer and the TextMate grammar know the same words (tests/test_editor_support.py checks both).

    python editors/make_textmate.py
"""
from __future__ import annotations

import json
from pathlib import Path

from peftc.highlight import CONSTANTS, METHOD_KEYWORDS, SPEC_KEYWORDS, TYPES

REGEX = r"/(?:\\.|[^/\\])+/"
OUT = Path(__file__).resolve().parent / "vscode" / "syntaxes" / "peft.tmLanguage.json"


def grammar() -> dict:
    def words(ws: tuple[str, ...]) -> str:
        return r"\b(?:" + "|".join(sorted(ws, key=lambda w: (-len(w), w))) + r")\b"

    return {
        "$schema": "https://raw.githubusercontent.com/martinring/tmlanguage/master/tmlanguage.json",
        "name": "peft", "scopeName": "source.peft", "fileTypes": ["peft"],
        "patterns": [{"include": f"#{k}"} for k in ("comment", "string", "target-list", "pattern-regex", "method-name",
                                                    "constant", "type", "keyword", "function", "number", "operator",
                                                    "punctuation")],
        "repository": {
            "comment": {"name": "comment.line.number-sign.peft", "match": "#.*$"},
            "string": {"name": "string.quoted.double.peft", "begin": "\"", "end": "\"|$",
                       "patterns": [{"name": "constant.character.escape.peft", "match": "\\\\."}]},
            "target-list": {
                "begin": r"\b(targets|exclude)\b(?![ \t]*[=,)])", "end": r"$|(?=[}=])",
                "beginCaptures": {"1": {"name": "keyword.control.peft"}},
                "patterns": [{"include": "#comment"}, {"include": "#string"},
                             {"name": "string.regexp.peft", "match": REGEX},
                             {"name": "constant.language.peft", "match": r"\ball-linear\b"},
                             {"name": "entity.name.tag.peft", "match": r"[A-Za-z0-9_][\w\-]*(?:\.[\w\-]+)*"},
                             {"name": "punctuation.separator.peft", "match": ","}]},
            "pattern-regex": {"match": r"(\bat\b)([ \t]+)(" + REGEX + ")",
                              "captures": {"1": {"name": "keyword.control.peft"},
                                           "3": {"name": "string.regexp.peft"}}},
            "method-name": {"match": r"\b(method)([ \t]+)([A-Za-z_]\w*)",
                            "captures": {"1": {"name": "keyword.control.peft"},
                                         "3": {"name": "entity.name.type.peft"}}},
            "constant": {"name": "constant.language.peft", "match": words(CONSTANTS) + r"|\ball-linear\b"},
            "type": {"name": "storage.type.peft", "match": words(TYPES)},
            "keyword": {"name": "keyword.control.peft", "match": words(SPEC_KEYWORDS + METHOD_KEYWORDS)},
            "function": {"name": "entity.name.function.peft", "match": r"\b[A-Za-z_]\w*(?=\s*\()"},
            "number": {"name": "constant.numeric.peft",
                       "match": r"(?<![\w.])[+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?"},
            "operator": {"name": "keyword.operator.peft", "match": r"=>|==|!=|<=|>=|\*\*|//|\.\.\.|[-+*/%@<>=?:!]"},
            "punctuation": {"name": "punctuation.peft", "match": r"[{}()\[\],.]"},
        },
    }


if __name__ == "__main__":
    OUT.write_text(json.dumps(grammar(), indent=2) + "\n")
    print(f"wrote {OUT}")
