"""docs/language.md, the reference of both languages: every example runs, and every keyword of both grammars
appears in an example.

* ```peft spec``` blocks parse, are in canonical form (`peftc fmt`), pass the model-free checks and plan on the
  tiny llama; ```peft spec-parse``` blocks (they import checkpoints the docs do not ship) parse and are in
  canonical form;
* ```peft method``` blocks (methods and rules) load and pass the library's load-time checks.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import llama

from peftc.lang.check import check_library_text
from peftc.spec.format import format_spec
from peftc.spec.parse import parse_spec

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "language.md").read_text()
BLOCKS = [(m.group(1), m.group(2)) for m in re.finditer(r"```peft ([\w-]+)\n(.*?)```", DOC, re.S)]


def _ids(kind: str) -> list[str]:
    return [f"{kind}-{i}" for i, (k, _) in enumerate(BLOCKS) if k == kind]


@pytest.mark.parametrize("text", [t for k, t in BLOCKS if k == "spec"], ids=_ids("spec"))
def test_spec_examples_plan(text):
    from peftc.pipeline import check_spec
    from peftc.plan import build_plan
    spec = parse_spec(text, "language.md")
    assert format_spec(text) == text
    check_spec(spec)
    plan = build_plan(spec, llama())
    assert plan.adapters and plan.sites


@pytest.mark.parametrize("text", [t for k, t in BLOCKS if k == "spec-parse"], ids=_ids("spec-parse"))
def test_spec_examples_parse(text):
    assert parse_spec(text, "language.md").adapters
    assert format_spec(text) == text


@pytest.mark.parametrize("text", [t for k, t in BLOCKS if k == "method"], ids=_ids("method"))
def test_method_and_rule_examples_load(text):
    methods, rules = check_library_text(text, "language.md")
    assert methods or rules


def test_every_keyword_has_an_example():
    code = "\n".join(t for _, t in BLOCKS)
    for grammar in ("spec.lark", "method.lark"):
        rules = re.sub(r"(?m)//.*$", "", (ROOT / "grammar" / grammar).read_text())
        for word in set(re.findall(r'"([A-Za-z_][\w\-]*)"', rules)):
            assert re.search(rf"(?<![\w\-]){re.escape(word)}(?![\w\-])", code), (grammar, word)
    assert {k for k, _ in BLOCKS} == {"spec", "spec-parse", "method"}
