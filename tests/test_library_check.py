"""Load-time checks of passes/*.peft: a bad method or rule is an error at its file and line when the library
loads (unknown op, wrong arity, unbound name, unknown guard or layer kind), and a failing `let` fails loudly."""
from __future__ import annotations

import pytest

from peftc.errors import PeftcError
from peftc.lang.check import check_library_text
from peftc.lang.methods import instantiate, parse_library_file
from peftc.library import library

METHOD = """\
method m(r: int = 2, alpha: float = 4)
    layers linear, conv2d
    mergeable {mergeable}
{{
    let s = alpha / r
    on linear {{
        param A: [r, in] init {init} saved "a"
        param B: [out, r] init zeros() saved "b"
        weight {weight}
    }}
    on {on} {{
        param A: [r, in, kh, kw] init zeros() saved "a"
        param B: [out, r, 1, 1] init zeros() saved "b"
        weight W + s * conv_lowrank(B, A)
    }}
}}
"""
GOOD = {"mergeable": "has_bias or r > 1", "init": "normal(std = 1 / r)", "weight": "W + s * (B @ A)",
        "on": "conv2d"}


def method_text(**kw: str) -> str:
    return METHOD.format(**{**GOOD, **kw})


def test_the_shipped_library_and_the_template_pass():
    assert library().methods and library().rules
    methods, _ = check_library_text(method_text(), "m.peft")
    assert methods[0].name == "m"


BAD_METHODS = {
    "unknown op": (dict(weight="W + s * (B @ foo(A))"), 9, "unknown function 'foo'"),
    "typo op": (dict(weight="W + s * (B @ detatch(A))"), 9, "unknown function 'detatch' (did you mean 'detach'"),
    "arity": (dict(weight="W + s * t(B, A)"), 9, "'t' takes 1 argument(s), got 2"),
    "arity conv": (dict(weight="linear(W)"), 9, "'linear' takes 2 to 3 argument(s), got 1"),
    "unbound": (dict(weight="W + s * (B @ C)"), 9, "unknown name 'C'"),
    "dim of another kind": (dict(weight="W + kh * (B @ A)"), 9, "unknown name 'kh'"),
    "mergeable name": (dict(mergeable="has_bais"), 3, "unknown name 'has_bais' (did you mean 'has_bias'?)"),
    "init positional": (dict(init="normal(0.02)"), 7, "takes keyword arguments only"),
    "kwargs on a tensor op": (dict(weight="W + t(A, dim = 1)"), 9, "'t' takes no keyword arguments"),
    "on undeclared kind": (dict(on="conv3d"), 11, "'on conv3d': conv3d is not among the method's layer kinds"),
}


@pytest.mark.parametrize("case", list(BAD_METHODS))
def test_bad_method_is_an_error_at_its_line(case):
    kw, line, msg = BAD_METHODS[case]
    with pytest.raises(PeftcError) as e:
        check_library_text(method_text(**kw), "bad.peft")
    assert msg in str(e.value)
    assert e.value.file == "bad.peft" and e.value.line == line, (e.value.line, str(e.value))
    assert "method 'm'" in str(e.value)


def test_unknown_layer_kind():
    with pytest.raises(PeftcError, match=r"unknown layer kind 'linaer' \(did you mean 'linear'\?\)"):
        check_library_text(method_text().replace("layers linear,", "layers linaer,").replace("on linear", "on linaer"),
                           "bad.peft")


def test_error_shows_the_line_and_a_caret():
    with pytest.raises(PeftcError) as e:
        check_library_text(method_text(weight="W + s * (B @ foo(A))"), "bad.peft")
    text = str(e.value)
    assert text.startswith("bad.peft:9:")
    assert "weight W + s * (B @ foo(A))" in text and "^" in text


RULE_OK = "rule r: linear(x, W + D, b) => linear(x, W, b) + linear(x, D)  where adapted(D)\n"
BAD_RULES = {
    "unknown root op": ("rule r: lineaar(x, W) => x\n", "the left side must be a tensor op, not 'lineaar' "
                                                       "(did you mean 'linear'"),
    "unknown op inside": ("rule r: linear(x, foo(W)) => x\n", "unknown function 'foo'"),
    "lhs arity": ("rule r: t(V, W) => V\n", "'t' takes 1 argument(s), got 2"),
    "rhs arity": ("rule r: linear(x, W) => t(x, W)\n", "'t' takes 1 argument(s), got 2"),
    "unknown guard": ("rule r: linear(x, W) => x  where adaptd(W)\n", "unknown guard 'adaptd' (did you mean "
                                                                     "'adapted'?)"),
    "tensor op as guard": ("rule r: linear(x, W) => x  where row_norm(W)\n", "unknown guard 'row_norm'"),
    "guard arity": ("rule r: linear(x, W) => x  where adapted(W, x)\n", "'adapted' takes 1 argument(s), got 2"),
    "guard unbound": ("rule r: linear(x, W) => x  where adapted(V)\n", "unknown name 'V'"),
    "class not matched": ("rule r: linear(x, W) => conv(x, W)\n", "op class 'conv' on the right side must be "
                                                                 "matched on the left side"),
    "duplicate": (RULE_OK + RULE_OK, "rule 'r' is declared twice"),
}


@pytest.mark.parametrize("case", list(BAD_RULES))
def test_bad_rule_is_an_error_at_its_line(case):
    text, msg = BAD_RULES[case]
    text = "# rules\n\n" + text
    with pytest.raises(PeftcError) as e:
        check_library_text(text, "bad.peft")
    assert msg in str(e.value)
    assert e.value.line == (4 if case == "duplicate" else 3), str(e.value)


def test_good_rules_pass():
    _, rules = check_library_text(RULE_OK + "rule c: conv(x, s * D, none, ...) => conv(x, D, none, ...) * s"
                                            "  where scalar(s) and ungrouped(...)\n", "ok.peft")
    assert [r.name for r in rules] == ["r", "c"]


def test_failing_let_fails_loudly_but_tensor_lets_wait():
    text = method_text().replace("let s = alpha / r", "let s = alpha / r\n    let q = sqrt(0 - r)")
    (m,), _ = parse_library_file(text, "m.peft")
    dims = {"in": 4, "out": 3, "groups": 1, "has_bias": True}
    with pytest.raises(PeftcError) as e:
        instantiate(m, "linear", {"r": 2, "alpha": 4.0}, dims)
    assert e.value.line == 6 and "sqrt" in str(e.value)
    text = method_text().replace("let s = alpha / r", "let s = alpha / r\n    let V = W + s * t(W)\n"
                                                      "    let U = V * 2")
    (m,), _ = parse_library_file(text, "m.peft")
    prog = instantiate(m, "linear", {"r": 2, "alpha": 4.0}, dims)
    assert [n for n, _ in prog.lets] == ["s", "V", "U"] and "V" not in prog.env and prog.env["s"] == 2.0
