"""Property-based tests (hypothesis) of both languages: no input crashes peftc.

* Generated specs (every construct of the grammar, random spacing and comments) parse; `peftc fmt`'s canonical
  form parses to the same spec and formatting it again changes nothing.
* Mutated specs (generated ones and the examples, with random deletions, insertions, duplications and cuts)
  either parse or fail with a located PeftcError (file:line:col and a caret); those that parse go through the
  model-free checks (`check_spec`: methods, options, clauses, regexes, combinations) and the formatter with
  PeftcErrors only.
* Mutated method and rule files (passes/*.peft) either load and pass the library's checks or fail with a
  PeftcError that names the file and a line.

The sample size is `PEFTC_FUZZ_EXAMPLES` per property (default 150, derandomized, for CI; the nightly-sized run
sets it to 3000 or more, with random seeds: `PEFTC_FUZZ_EXAMPLES=3000 pytest tests/test_fuzz_languages.py`).
"""
from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftc.errors import PeftcError
from peftc.spec.format import format_spec, same_spec
from peftc.spec.parse import parse_spec

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = [p.read_text() for p in sorted((ROOT / "examples").glob("*.peft"))]
LIBRARY = {p.name: p.read_text() for p in sorted((ROOT / "passes").glob("*.peft"))}
N = int(os.environ.get("PEFTC_FUZZ_EXAMPLES", "150"))
NIGHTLY = "PEFTC_FUZZ_EXAMPLES" in os.environ
FUZZ = settings(max_examples=N, deadline=None, derandomize=not NIGHTLY, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])

# ---------------------------------------------------------------- generating specs
KEYWORDS = {"adapter", "active", "import", "combine", "targets", "exclude", "layers", "save", "weights", "merge",
            "at", "in", "true", "false", "parameters", "replicate"}
names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True).filter(lambda s: s not in KEYWORDS)
modnames = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_\-]{0,6}(\.[A-Za-z0-9_]{1,4}){0,2}", fullmatch=True).filter(
    lambda s: s not in KEYWORDS)
strings = st.text(alphabet=string.ascii_letters + string.digits + " ./_-\\\"'", max_size=12).map(
    lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"')
numbers = st.one_of(st.integers(-1000, 10 ** 6).map(str), st.floats(-1e6, 1e6, allow_nan=False).map(repr),
                    st.sampled_from(["1e-4", "-2.5E3", "0.0", "+3"]))
scalars = st.one_of(numbers, strings, st.sampled_from(["true", "false"]))
values = st.one_of(scalars, st.lists(scalars, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"))
regexes = st.sampled_from([r"/.*\.q_proj/", r"/model\.layers\.\d+\.(k|v)_proj/", r"/a\/b/", r"/[/"])
targets = st.one_of(modnames, strings, regexes, st.just("all-linear"))
blank = st.sampled_from([" ", "  ", "\t", " # note\n", "\n", "\n\n", "  # x y z\n    "])


def _join(draw, items: list[str], sep: str = ",") -> str:
    return sep.join(f"{item}{draw(st.sampled_from(['', ' ']))}" if i < len(items) - 1 else item
                    for i, item in enumerate(items))


@st.composite
def clauses(draw) -> str:
    kind = draw(st.sampled_from(["targets", "exclude", "layers", "save", "weights", "merge", "at", "opt_targets",
                                 "parameters", "replicate"]))
    if kind == "parameters":
        return "parameters " + ", ".join(draw(st.lists(modnames, min_size=1, max_size=2)))
    if kind == "replicate":
        spans = draw(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), min_size=1, max_size=3))
        return "replicate " + ", ".join(f"[{a}, {b}]" for a, b in spans)
    if kind in ("targets", "exclude"):
        return f"{kind} " + ", ".join(draw(st.lists(targets, min_size=1, max_size=3)))
    if kind == "layers":
        ints = ", ".join(map(str, draw(st.lists(st.integers(0, 40), min_size=1, max_size=3))))
        where = draw(st.one_of(st.just(""), st.lists(modnames, min_size=1, max_size=2).map(
            lambda xs: " in " + ", ".join(xs))))
        return f"layers {ints}{where}"
    if kind == "save":
        return "save " + ", ".join(draw(st.lists(modnames, min_size=1, max_size=2)))
    if kind == "weights":
        return f"weights {draw(strings)}"
    if kind == "merge":
        return "merge"
    if kind == "at":
        return f"{draw(names)} at {draw(st.one_of(modnames, strings, regexes))} = {draw(values)}"
    return f"{draw(names)} " + ", ".join(draw(st.lists(targets, min_size=1, max_size=2)))


@st.composite
def adapters(draw, declared: list[str]) -> str:
    name = draw(names.filter(lambda n: n not in declared))
    kind = draw(st.sampled_from(["method", "method", "import", "combine"]))
    if kind == "import":
        source = f"import {draw(strings)}"
    elif kind == "combine":
        pool = declared or [draw(names)]
        terms = [f"{draw(numbers)} * {n}" if draw(st.booleans()) else n
                 for n in draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3))]
        opts = [f"{k} = {draw(values)}" for k in draw(st.lists(names, max_size=2, unique=True))]
        source = f"combine({', '.join(terms + opts)})"
    else:
        method = draw(st.one_of(st.sampled_from(["lora", "dora", "ia3", "loha", "lokr", "vera"]), names))
        opts = [f"{k}{draw(blank)}={draw(blank)}{draw(values)}" for k in draw(st.lists(names, max_size=3, unique=True))]
        source = f"{method}({', '.join(opts)})"
    declared.append(name)
    if kind != "method" and draw(st.booleans()):
        return f"adapter {name}: {source}"
    body = draw(st.lists(clauses(), min_size=0 if kind != "method" else 1, max_size=5))
    sep = draw(blank)
    ends = st.sampled_from(["\n", " # c\n", "\n\n"])
    inner = "".join(f"{draw(blank)}{c}{draw(ends)}" for c in body)
    return f"adapter{draw(st.sampled_from([' ', '  ']))}{name}{draw(st.sampled_from([':', ' :', ': ']))}" \
           f"{draw(st.sampled_from([' ', '']))}{source}{sep}{{{draw(blank)}{inner}}}"


@st.composite
def specs(draw) -> str:
    declared: list[str] = []
    parts = [draw(adapters(declared)) for _ in range(draw(st.integers(0, 4)))]
    if declared and draw(st.booleans()):
        parts.append("active " + ", ".join(draw(st.lists(st.sampled_from(declared), min_size=1, max_size=3))))
    lead = draw(st.sampled_from(["", "# a spec\n", "\n\n# header\n\n"]))
    return lead + "".join(p + draw(st.sampled_from(["\n", "\n\n", "  # end of statement\n"])) for p in parts)


# ---------------------------------------------------------------- mutating text
SNIPPETS = ["{", "}", "(", ")", ",", "=", "*", ":", '"', "/", "#", "\n", " ", "\\", "adapter", "active", "import",
            "combine", "targets", "merge", "at", "in", "layers", "all-linear", "-1", "1e999", "0x10", "é", "\x00",
            "\u2028", "\r", "\t", "lora(", "r = ", "/(/", '"\\', "method", "param", "weight", "let", "rule", "=>",
            "when", "on", "[", "]", "@", "?", "..."]


@st.composite
def mutated(draw, base: st.SearchStrategy[str]) -> str:
    text = draw(base)
    for _ in range(draw(st.integers(1, 4))):
        n = len(text)
        i = draw(st.integers(0, n))
        j = draw(st.integers(i, min(n, i + 12)))
        how = draw(st.sampled_from(["delete", "insert", "replace", "duplicate", "cut"]))
        piece = draw(st.one_of(st.sampled_from(SNIPPETS), st.text(max_size=3)))
        if how == "delete":
            text = text[:i] + text[j:]
        elif how == "insert":
            text = text[:i] + piece + text[i:]
        elif how == "replace":
            text = text[:i] + piece + text[j:]
        elif how == "duplicate":
            text = text[:j] + text[i:j] + text[j:]
        else:
            text = text[:i]
    return text


def _located(e: PeftcError, file: str) -> None:
    message = str(e)
    assert e.file == file and e.line is not None and e.line >= 1, message
    assert message.startswith(f"{file}:{e.line}:"), message
    if e.column is not None:
        assert "^" in message, message       # the caret under the source line


# ---------------------------------------------------------------- properties
@FUZZ
@given(specs())
def test_generated_specs_parse_and_format_round_trips(text):
    parse_spec(text, "gen.peft")
    formatted = format_spec(text, "gen.peft")
    assert same_spec(text, formatted)
    assert format_spec(formatted) == formatted


@FUZZ
@given(mutated(st.one_of(specs(), st.sampled_from(EXAMPLES))))
def test_mutated_specs_fail_with_located_errors(text):
    from peftc.pipeline import check_spec
    try:
        spec = parse_spec(text, "fuzz.peft")
    except PeftcError as e:
        _located(e, "fuzz.peft")
        return
    try:
        check_spec(spec)
    except PeftcError as e:
        assert str(e).strip(), "an empty message"
    formatted = format_spec(text, "fuzz.peft")
    assert same_spec(text, formatted)


@FUZZ
@given(st.sampled_from(sorted(LIBRARY)).flatmap(lambda name: mutated(st.just(LIBRARY[name])).map(
    lambda text: (name, text))))
def test_mutated_method_files_fail_with_located_errors(case):
    from peftc.lang.check import check_library_text
    name, text = case
    try:
        check_library_text(text, name)
    except PeftcError as e:
        assert e.file == name and e.line is not None and e.line >= 1, str(e)


@pytest.mark.parametrize("text", EXAMPLES, ids=[p.stem for p in sorted((ROOT / "examples").glob("*.peft"))])
def test_examples_are_in_canonical_form(text):
    assert format_spec(text) == text


@pytest.mark.parametrize("text, at", [('adapter a: lora(x = "0\\x") { targets q }', (1, 21)),
                                      ('adapter a: import "\\N{nope}"', (1, 19))], ids=["truncated-escape", "bad-name"])
def test_found_by_fuzzing_invalid_string_escapes(text, at):
    """Strings that Python cannot decode were a traceback (found by the mutation test)."""
    with pytest.raises(PeftcError, match="invalid string") as e:
        parse_spec(text, "s.peft")
    assert (e.value.line, e.value.column) == at
    assert parse_spec('adapter a: lora(x = "a\x00b") { targets q }').adapters["a"].options["x"] == "a\x00b"


def test_found_by_fuzzing_method_file_strings():
    from peftc.lang.check import check_library_text
    text = LIBRARY["fourierft.peft"].replace('as "n_frequency"', 'as "n\\x"')
    with pytest.raises(PeftcError, match="invalid string") as e:
        check_library_text(text, "fourierft.peft")
    assert e.value.file == "fourierft.peft" and e.value.line and e.value.column
    check_library_text(LIBRARY["fourierft.peft"].replace('as "n_frequency"', 'as "\x00n_frequency"'), "f.peft")
