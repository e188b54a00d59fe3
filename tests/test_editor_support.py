"""Editor support for `.peft` files: the Pygments lexer (entry point `pygments.lexers: peft`) and the TextMate
grammar (editors/vscode), both run on every example and every method/rule file.

Both must know every keyword of both grammars (grammar/*.lark), give no error tokens, and scope comments,
strings, target regexes and keywords as such. The TextMate grammar is run by a small line tokenizer here
(its regexes use no Oniguruma-only syntax, so Python's `re` runs them as editors do).
"""
from __future__ import annotations

import json
import re
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from pygments.token import Comment, Error, Keyword, String

from peftc.highlight import CONSTANTS, METHOD_KEYWORDS, SPEC_KEYWORDS, TYPES, PeftLexer

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted((ROOT / "examples").glob("*.peft")) + sorted((ROOT / "passes").glob("*.peft"))
VSCODE = ROOT / "editors" / "vscode"
KNOWN = set(SPEC_KEYWORDS + METHOD_KEYWORDS + TYPES + CONSTANTS)


def grammar_keywords() -> set[str]:
    words = set()
    for g in ("spec.lark", "method.lark"):
        rules = re.sub(r"(?m)//.*$", "", (ROOT / "grammar" / g).read_text())   # comments aside
        words |= set(re.findall(r'"([a-z_][a-z_\-]*)"', rules))
    return words - {"all-linear"}


def test_both_highlighters_know_every_keyword():
    assert grammar_keywords() <= KNOWN, grammar_keywords() - KNOWN
    tm = json.loads((VSCODE / "syntaxes" / "peft.tmLanguage.json").read_text())["repository"]
    tm_words = set()
    for key in ("keyword", "type", "constant"):
        tm_words |= set(re.findall(r"[a-z_]+", tm[key]["match"].replace(r"\b", " ")))
    assert KNOWN <= tm_words, KNOWN - tm_words


def test_lexer_is_registered_for_pygments():
    found = {ep.name: ep.value for ep in entry_points(group="pygments.lexers")}
    assert found.get("peft") == "peftc.highlight:PeftLexer", "reinstall peftc (pip install -e .) to register it"
    from pygments.lexers import get_lexer_by_name, get_lexer_for_filename
    assert isinstance(get_lexer_by_name("peft"), PeftLexer)
    assert isinstance(get_lexer_for_filename("x.peft"), PeftLexer)


@pytest.mark.parametrize("path", FILES, ids=[f"{p.parent.name}/{p.name}" for p in FILES])
def test_pygments_lexer_on_examples_and_passes(path):
    text = path.read_text()
    tokens = list(PeftLexer().get_tokens(text))
    assert "".join(v for _, v in tokens) == text if text.endswith("\n") else text + "\n"
    assert not [v for t, v in tokens if t in Error], path
    comments = [v for t, v in tokens if t in Comment]
    assert len(comments) == len(re.findall(r"(?m)#.*$", _without_strings(text)))
    words = {v for t, v in tokens if t in Keyword}
    first = re.match(r"\s*(?:#.*\n\s*)*(\w+)", text).group(1)   # adapter / method / rule
    assert first in words
    if re.search(r"(?m)^\s*targets /model", text):
        assert any(t in String.Regex and v.startswith("/model") for t, v in tokens)


def _without_strings(text: str) -> str:
    return re.sub(r'"(?:[^"\\\n]|\\.)*"', '""', text)


# ---------------------------------------------------------------- a small TextMate tokenizer
def _rules(grammar: dict, patterns: list[dict]) -> list[dict]:
    out = []
    for p in patterns:
        out += _rules(grammar, [grammar["repository"][p["include"][1:]]]) if "include" in p else [p]
    return out


def tm_tokenize(grammar: dict, text: str) -> list[tuple[str, str]]:
    """(scope, text) pieces of each line; one level of begin/end rules, as the grammar uses."""
    top = _rules(grammar, grammar["patterns"])
    pieces: list[tuple[str, str]] = []
    inside: dict | None = None
    for line in text.splitlines():
        pos = 0
        while pos <= len(line):
            rules = _rules(grammar, inside["patterns"]) if inside else top
            best = None
            if inside:
                end = re.compile(inside["end"]).search(line, pos)
                best = (end.start(), -1, end, None) if end else None
            for i, rule in enumerate(rules):
                m = re.compile(rule.get("match") or rule["begin"]).search(line, pos)
                if m and m.end() > m.start() and (best is None or (m.start(), i) < best[:2]):
                    best = (m.start(), i, m, rule)
            if best is None:
                pieces.append(("", line[pos:]))
                break
            start, _, m, rule = best
            if start > pos:
                pieces.append(("", line[pos:start]))
            if rule is None:                       # the end of a begin/end rule
                inside = None
                pos = max(m.end(), start)
                if m.end() == m.start() and start == len(line):
                    break
                continue
            captures = rule.get("captures") or rule.get("beginCaptures")
            if captures:
                at = m.start()
                for k, c in sorted(captures.items(), key=lambda kc: int(kc[0])):
                    if m.start(int(k)) < 0:
                        continue
                    pieces += [("", line[at:m.start(int(k))]), (c["name"], m.group(int(k)))]
                    at = m.end(int(k))
                pieces.append(("", line[at:m.end()]))
            else:
                pieces.append((rule.get("name", ""), m.group()))
            if "begin" in rule:
                if rule["end"].startswith('"'):        # a string: to its closing quote or the line's end
                    close = re.compile(r'(?:[^"\\]|\\.)*("|$)').match(line, m.end())
                    pieces[-1] = (rule["name"], m.group() + close.group())
                    pos = close.end()
                    continue
                inside = rule
            pos = m.end()
        inside = None if inside and inside["end"].startswith("$") else inside
    return pieces


@pytest.fixture(scope="module")
def tm_grammar() -> dict:
    return json.loads((VSCODE / "syntaxes" / "peft.tmLanguage.json").read_text())


def test_vscode_extension_files_agree(tm_grammar):
    pkg = json.loads((VSCODE / "package.json").read_text())
    lang = pkg["contributes"]["languages"][0]
    gram = pkg["contributes"]["grammars"][0]
    assert lang["extensions"] == [".peft"] and gram["scopeName"] == tm_grammar["scopeName"]
    assert (VSCODE / gram["path"]).exists() and (VSCODE / lang["configuration"]).exists()
    for rule in _rules(tm_grammar, tm_grammar["patterns"]):
        re.compile(rule.get("match") or rule["begin"])


@pytest.mark.parametrize("path", FILES, ids=[f"{p.parent.name}/{p.name}" for p in FILES])
def test_textmate_grammar_on_examples_and_passes(path, tm_grammar):
    text = path.read_text()
    pieces = tm_tokenize(tm_grammar, text)
    assert "".join(v for _, v in pieces) == text.replace("\n", "")
    comments = [v for s, v in pieces if s.startswith("comment")]
    assert len(comments) == len(re.findall(r"(?m)#.*$", _without_strings(text)))
    unscoped = " ".join(v for s, v in pieces if not s)
    for word in KNOWN:
        assert not re.search(rf"(?<![\w\-.]){word}(?![\w\-])", unscoped), (word, path.name)
    scoped_words = {v for s, v in pieces if s.startswith("keyword.control")}
    first = re.match(r"\s*(?:#.*\n\s*)*(\w+)", text).group(1)
    assert first in scoped_words
    if re.search(r"(?m)^\s*targets /model", text):
        assert any(s == "string.regexp.peft" and v.startswith("/model") for s, v in pieces)


def test_textmate_grammar_is_generated_from_the_lexer_lists():
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_textmate", ROOT / "editors" / "make_textmate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert json.loads((VSCODE / "syntaxes" / "peft.tmLanguage.json").read_text()) == mod.grammar(), \
        "run python editors/make_textmate.py"
