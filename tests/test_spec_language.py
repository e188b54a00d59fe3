"""The .peft spec language: what parses into which Spec dataclasses, and every bad-input message
(file:line:col, a caret under the culprit, did-you-mean suggestions) from the parser and the planner."""
from __future__ import annotations

import re

import pytest
import torch
from conftest import llama, peft_adapter

import peftc
from peftc import PeftcError, parse_spec, read_spec
from peftc.plan import build_plan
from peftc.spec.model import AdapterSpec, PerPattern, Span, Spec, TargetRule

FILE = "t.peft"


@pytest.fixture(scope="module")
def model():
    return llama()


# ---------------------------------------------------------------- helpers
def error_of(text: str, model=None, file: str = FILE) -> str:
    """str() of the PeftcError that parsing (and, given a model, planning) `text` raises."""
    with pytest.raises(PeftcError) as ei:
        spec = parse_spec(text, file)
        if model is not None:
            build_plan(spec, model)
    return str(ei.value)


def position(text: str, needle: str, nth: int = 0) -> tuple[int, int]:
    """1-based (line, column) of the nth occurrence of `needle` in `text`."""
    at = -1
    for _ in range(nth + 1):
        at = text.index(needle, at + 1)
    line = text.count("\n", 0, at) + 1
    col = at - (text.rfind("\n", 0, at) + 1) + 1
    return line, col


def assert_points_at(msg: str, text: str, line: int, col: int, file: str = FILE) -> None:
    """`file:line:col: ...` on the first line, then the source line and a caret under column `col`."""
    lines = msg.splitlines()
    assert lines[0].startswith(f"{file}:{line}:{col}: "), msg
    src = text.splitlines()[line - 1]
    assert lines[-2] == "    " + src, msg
    assert lines[-1] == "    " + " " * (col - 1) + "^", msg
    assert len(lines) == 3, f"one message, one source line, one caret:\n{msg}"


def assert_error_at(msg: str, text: str, needle: str, nth: int = 0, file: str = FILE) -> None:
    assert_points_at(msg, text, *position(text, needle, nth), file=file)


# ---------------------------------------------------------------- parsing
FULL = '''adapter default: import "/path/to/peft_checkpoint_dir"
adapter a: lora(r = 4, alpha = 8, rslora = true, dropout = 0.1) {
    targets q_proj, v_proj, /model\\.layers\\.1\\..*/, all-linear
    exclude lm_head
    layers 0, 1 in layers
    r at q_proj = 8
    save classifier
    weights "ckpt_dir"        # relative paths resolve against the spec file's folder
    merge
}
adapter c: ia3() { targets k_proj, v_proj, down_proj
                   feedforward down_proj }
active a, c
'''


def test_every_clause_parses_into_the_spec_dataclasses():
    spec = parse_spec(FULL, "f.peft")
    assert isinstance(spec, Spec)
    assert spec.file == "f.peft" and spec.source == FULL
    assert list(spec.adapters) == ["default", "a", "c"]
    assert spec.active == ["a", "c"]
    assert spec.active_names() == ["a", "c"]
    assert spec.active_spans["c"] == Span("f.peft", 13, 11)

    d = spec.adapters["default"]
    assert isinstance(d, AdapterSpec)
    assert d.import_dir == "/path/to/peft_checkpoint_dir" and d.method is None
    assert d.targets == [] and not d.merge
    assert d.span == Span("f.peft", 1, 9)

    a = spec.adapters["a"]
    assert a.method == "lora" and a.import_dir is None
    assert a.options == {"r": 4, "alpha": 8, "rslora": True, "dropout": 0.1}
    assert type(a.options["r"]) is int and type(a.options["dropout"]) is float
    assert a.option_spans["r"] == Span("f.peft", 2, 17)
    assert a.option_spans["method"] == Span("f.peft", 2, 12)
    assert [(t.kind, t.value) for t in a.targets] == [
        ("name", "q_proj"), ("name", "v_proj"), ("regex", r"model\.layers\.1\..*"), ("all-linear", "all-linear")]
    assert a.targets[0].span == Span("f.peft", 3, 13)
    assert [(t.kind, t.value) for t in a.exclude] == [("name", "lm_head")]
    assert a.layers == [0, 1] and a.layers_pattern == ["layers"]
    assert len(a.per_pattern) == 1
    pp = a.per_pattern[0]
    assert isinstance(pp, PerPattern) and pp.option == "r" and pp.value == 8
    assert pp.rule.kind == "pattern" and re.fullmatch(pp.rule.value, "q_proj")
    assert a.modules_to_save == ["classifier"]
    assert a.weights == "ckpt_dir"
    assert a.merge is True

    c = spec.adapters["c"]
    assert c.method == "ia3" and c.options == {}
    assert [t.value for t in c.targets] == ["k_proj", "v_proj", "down_proj"]
    assert list(c.option_targets) == ["feedforward"]
    assert c.option_targets["feedforward"] == [TargetRule("name", "down_proj", Span("f.peft", 12, 32))]
    assert not c.merge and c.weights is None and c.layers is None


def test_values_numbers_strings_and_booleans():
    spec = parse_spec('adapter a: lora(r = 8.0, alpha = -1.5e1, dropout = 0, rslora = false, init = "gau\\"ss") '
                      '{ targets q_proj }')
    opts = spec.adapters["a"].options
    assert opts["r"] == 8.0 and isinstance(opts["r"], float)
    assert opts["alpha"] == -15.0
    assert opts["dropout"] == 0 and type(opts["dropout"]) is int
    assert opts["rslora"] is False
    assert opts["init"] == 'gau"ss'


def test_targets_quoted_names_escaped_slash_and_comments():
    text = ('# a comment line\n'
            'adapter a: lora() {   # trailing comment\n'
            '  targets "model.layers.0.self_attn.q_proj", /a\\/b.*/, self_attn.v_proj\n'
            '  targets o_proj\n'
            '  exclude /.*layers\\.1\\..*/, k_proj\n'
            '  layers 3\n'
            '  layers 4, 5\n'
            '}\n')
    a = parse_spec(text).adapters["a"]
    assert [(t.kind, t.value) for t in a.targets] == [
        ("name", "model.layers.0.self_attn.q_proj"), ("regex", "a/b.*"), ("name", "self_attn.v_proj"),
        ("name", "o_proj")]
    assert [(t.kind, t.value) for t in a.exclude] == [("regex", r".*layers\.1\..*"), ("name", "k_proj")]
    assert a.layers == [3, 4, 5] and a.layers_pattern is None


def test_per_pattern_name_is_escaped_and_regex_kept():
    a = parse_spec('adapter a: lora() { targets q_proj\n r at self_attn.q_proj = 2\n alpha at /.*\\.1\\..*/ = 3.5 }'
                   ).adapters["a"]
    (r, alpha) = a.per_pattern
    assert (r.option, r.value, alpha.option, alpha.value) == ("r", 2, "alpha", 3.5)
    # a plain name is literal: its dot must not match any character
    assert re.fullmatch(r.rule.value, "self_attn.q_proj") and not re.fullmatch(r.rule.value, "self_attnXq_proj")
    assert alpha.rule.value == r".*\.1\..*"


def test_no_active_means_all_active_and_empty_spec():
    spec = parse_spec("adapter x: lora() { targets q_proj }\nadapter y: ia3() { targets v_proj }")
    assert spec.active is None and spec.active_names() == ["x", "y"]
    empty = parse_spec("# nothing here\n")
    assert empty.adapters == {} and empty.active_names() == []


def test_adapter_without_block_and_import_with_block():
    spec = parse_spec('adapter a: import "dir"\n'
                      'adapter b: import "other" { merge\n exclude lm_head }\n'
                      'adapter c: lora()')
    assert spec.adapters["a"].import_dir == "dir"
    b = spec.adapters["b"]
    assert b.import_dir == "other" and b.merge and [t.value for t in b.exclude] == ["lm_head"]
    assert spec.adapters["c"].method == "lora" and spec.adapters["c"].targets == []


def test_read_spec_keeps_the_path(tmp_path):
    p = tmp_path / "s.peft"
    p.write_text("adapter a: lora(r = 2) { targets q_proj }\n")
    spec = read_spec(p)
    assert spec.file == str(p) and spec.adapters["a"].span.file == str(p)


def test_read_spec_missing_file_and_directory(tmp_path):
    with pytest.raises(PeftcError, match="spec file not found"):
        read_spec(tmp_path / "nope.peft")
    with pytest.raises(PeftcError, match="directory"):
        read_spec(tmp_path)


# ---------------------------------------------------------------- syntax errors
@pytest.mark.parametrize("text, needle, expect", [
    ("adapter a: lora(r = 4 { targets q_proj }", "{", "unexpected '{'"),
    ("adapter a: lora(r = 4) { targets q_proj } $", "$", "unexpected character '$'"),
    ("adapter a lora() { targets q_proj }", "lora", "unexpected 'lora'"),
    ("adapter a: lora() {\n  targets q_proj\n  layers x\n}\n", "x\n", "unexpected 'x'"),
    ("adapter a: lora(r = ) { targets q_proj }", ")", "unexpected ')'"),
    ("adapter a: lora() { targets q_proj }\nactiv a\n", "activ", "unexpected"),
    ('adapter a: lora(init = "unterminated) { targets q_proj }', '"', "unexpected character"),
], ids=["missing-paren", "bad-char", "missing-colon", "third-line", "missing-value", "bad-keyword", "open-string"])
def test_syntax_error_points_at_the_token(text, needle, expect):
    msg = error_of(text)
    assert "syntax error" in msg and expect in msg, msg
    assert_error_at(msg, text, needle)


def test_syntax_error_lists_what_was_expected():
    msg = error_of("adapter a: lora(r = 4 { targets q_proj }")
    assert "expected" in msg and "')'" in msg, msg


def test_syntax_error_at_end_of_file():
    text = "adapter a: lora() {\n  targets q_proj\n"
    msg = error_of(text)
    first = msg.splitlines()[0]
    assert "syntax error" in first and "end of file" in first, msg
    m = re.match(rf"{re.escape(FILE)}:(\d+):(\d+): ", first)
    assert m, msg
    line, col = int(m.group(1)), int(m.group(2))
    assert_points_at(msg, text, line, col)
    assert (line, col) >= position(text, "q_proj"), "points at or after the last token"
    # an unclosed block: the one token that fixes it must be among those listed
    assert "'}'" in first, msg


def test_syntax_error_in_a_file_names_the_file(tmp_path):
    p = tmp_path / "broken.peft"
    text = "adapter a: lora(r = 4) {\n  targets q_proj,\n}\n"
    p.write_text(text)
    with pytest.raises(PeftcError) as ei:
        read_spec(p)
    assert_error_at(str(ei.value), text, "}", file=str(p))


def test_all_linear_cannot_take_a_per_layer_value():
    text = "adapter a: lora() { targets q_proj\n  r at all-linear = 4 }"
    msg = error_of(text)
    assert "all-linear" in msg and "per-layer" in msg, msg
    assert_error_at(msg, text, "all-linear")


# ---------------------------------------------------------------- duplicates
def test_duplicate_adapter():
    text = "adapter a: lora() { targets q_proj }\nadapter a: ia3() { targets v_proj }\n"
    msg = error_of(text)
    assert "adapter 'a' is declared twice" in msg, msg
    assert_error_at(msg, text, "a:", nth=1)


def test_duplicate_option():
    text = "adapter a: lora(r = 4, alpha = 8, r = 5) { targets q_proj }"
    msg = error_of(text)
    assert "option 'r' given twice" in msg, msg
    assert_error_at(msg, text, "r = 5")


# ---------------------------------------------------------------- methods and options
def test_unknown_method_did_you_mean(model):
    text = "adapter a: lroa(r = 4) { targets q_proj }"
    msg = error_of(text, model)
    assert "unknown method 'lroa'" in msg and "did you mean 'lora'" in msg, msg
    assert "known methods:" in msg and "ia3" in msg
    assert_error_at(msg, text, "lroa")


@pytest.mark.parametrize("typo, want", [("rnak", "r"), ("alpah", "alpha"), ("dropuot", "dropout"),
                                        ("rs_lora", "rslora")])
def test_unknown_option_did_you_mean(model, typo, want):
    text = f"adapter a: lora(r = 4, {typo} = 1) {{ targets q_proj }}"
    msg = error_of(text, model)
    assert f"unknown option '{typo}' for lora" in msg, msg
    assert f"did you mean '{want}'" in msg, msg
    assert_error_at(msg, text, typo)


def test_unknown_option_lists_the_options(model):
    text = "adapter a: lora(zzz = 1) { targets q_proj }"
    msg = error_of(text, model)
    assert "unknown option 'zzz'" in msg and "r, alpha, dropout" in msg, msg


def test_unknown_option_in_per_pattern(model):
    text = "adapter a: lora() { targets q_proj\n  alpah at q_proj = 3 }"
    msg = error_of(text, model)
    assert "unknown option 'alpah'" in msg and "did you mean 'alpha'" in msg, msg
    assert_error_at(msg, text, "alpah")


def test_unknown_target_list_clause(model):
    text = "adapter a: ia3() { targets down_proj\n  feedforwrd down_proj }"
    msg = error_of(text, model)
    assert "unknown clause 'feedforwrd' for ia3" in msg and "did you mean 'feedforward'" in msg, msg
    assert_error_at(msg, text, "feedforwrd")


def test_targets_option_is_not_a_value_option(model):
    text = "adapter a: ia3(feedforward = 1) { targets down_proj }"
    msg = error_of(text, model)
    assert "unknown option 'feedforward'" in msg, msg
    assert_error_at(msg, text, "feedforward")


@pytest.mark.parametrize("opt, value, expect", [
    ("r", '"x"', "option 'r' of lora expects an integer, got \"x\""),
    ("r", "2.5", "option 'r' of lora expects an integer"),
    ("r", "true", "option 'r' of lora expects an integer"),
    ("dropout", '"a"', "option 'dropout' of lora expects a number"),
    ("rslora", "1", "option 'rslora' of lora expects true or false"),
    ("init", "3", "option 'init' of lora expects a string"),
])
def test_wrong_option_type(model, opt, value, expect):
    text = f"adapter a: lora({opt} = {value}) {{ targets q_proj }}"
    msg = error_of(text, model)
    assert expect in msg, msg
    assert_error_at(msg, text, f"{opt} =")


def test_wrong_type_in_per_pattern(model):
    text = 'adapter a: lora() { targets q_proj\n  r at q_proj = "big" }'
    msg = error_of(text, model)
    assert "option 'r' of lora expects an integer" in msg, msg
    assert_error_at(msg, text, "r at")


@pytest.mark.parametrize("opts, expect", [
    ("r = 0", "r must be a positive integer"),
    ("r = -3", "r must be a positive integer"),
    ("dropout = 1.5", "dropout must be in [0, 1)"),
    ("dropout = -0.1", "dropout must be in [0, 1)"),
    ('init = "xavier"', "init must be"),
])
def test_option_out_of_range(model, opts, expect):
    text = f"adapter a: lora({opts}) {{ targets q_proj }}"
    msg = error_of(text, model)
    assert expect in msg, msg
    first = msg.splitlines()[0]
    assert re.match(rf"{re.escape(FILE)}:1:\d+: ", first), msg
    assert "adapter 'a'" in msg
    assert msg.splitlines()[-1].strip() == "^"


def test_per_pattern_value_out_of_range(model):
    msg = error_of("adapter a: lora(r = 4) { targets q_proj, v_proj\n  r at v_proj = 0 }", model)
    assert "r must be a positive integer" in msg and "v_proj" in msg, msg


# ---------------------------------------------------------------- active
def test_active_unknown_adapter(model):
    text = "adapter sql: lora() { targets q_proj }\nadapter chat: lora() { targets v_proj }\nactive sql, chta\n"
    msg = error_of(text, model)
    assert "'active' names unknown adapter 'chta'" in msg and "did you mean 'chat'" in msg, msg
    assert_error_at(msg, text, "chta")


def test_inactive_adapter_is_planned_but_inactive(model):
    spec = parse_spec("adapter x: lora() { targets q_proj }\nadapter y: lora() { targets v_proj }\nactive y")
    plan = build_plan(spec, model)
    assert plan.adapters["y"].active and not plan.adapters["x"].active


# ---------------------------------------------------------------- targets
def test_target_matching_nothing_lists_nearest_names(model):
    text = "adapter a: lora() {\n  targets q_prj\n}"
    msg = error_of(text, model)
    assert "adapter 'a'" in msg and "match no layer" in msg, msg
    assert "nearest module names" in msg and "q_proj" in msg, msg
    assert_error_at(msg, text, "q_prj")


def test_regex_matching_nothing_lists_module_names(model):
    text = "adapter a: lora() { targets /model\\.layerz\\.0\\.mlp\\.up_proj/ }"
    msg = error_of(text, model)
    assert "match no layer" in msg, msg
    assert "model.layers" in msg, msg
    assert_error_at(msg, text, "/model")


def test_exclude_removing_every_target(model):
    text = "adapter a: lora() { targets q_proj\n  exclude /.*q_proj/ }"
    msg = error_of(text, model)
    assert "match no layer" in msg, msg


def test_layers_filter_removing_every_target_blames_layers(model):
    """The targets are fine; `layers 7` on a 2-layer model is what selects nothing."""
    text = "adapter a: lora() { targets q_proj\n  layers 7 }"
    msg = error_of(text, model)
    assert "`layers 7` selects none of the 2 layers its targets match (layer indices 0-1)" in msg, msg
    assert "match no layer" not in msg, msg
    assert_error_at(msg, text, "layers")


@pytest.mark.parametrize("typo, want", [("tragets", "targets"), ("exlude", "exclude"), ("layres", "layers"),
                                        ("weigths", "weights"), ("svae", "save")])
def test_misspelled_clause_keyword_is_reported_at_the_typo(model, typo, want):
    """`tragets q_proj` parses as a method's target-list clause (ia3's `feedforward`): it must be reported as
    an unknown clause at the typo, before the "no targets" check would blame line 1."""
    text = f"adapter a: lora(r = 2) {{\n    {typo} q_proj\n}}\n"
    if typo != "tragets":
        text = text.replace("{\n", "{\n    targets q_proj\n")
    msg = error_of(text, model)
    assert f"unknown clause '{typo}' for lora (did you mean '{want}'?)" in msg, msg
    assert "no targets" not in msg, msg
    assert_error_at(msg, text, typo)


def test_misspelled_clause_in_an_import_block(tmp_path, model):
    text = f'adapter a: import "{tmp_path}" {{\n    mrege x\n}}\n'
    msg = error_of(text, model)
    assert "unknown clause 'mrege'" in msg and "did you mean 'merge'" in msg, msg
    assert_error_at(msg, text, "mrege")


@pytest.mark.parametrize("text", [
    "adapter a: lora() {\n    targets q_proj\n    mrege\n}\n",
    "adapter a: lora() {\n    mrege\n    targets q_proj\n}\n",
    "adapter a: lora() {\n    targets q_proj,\n        v_proj   # a list may go on\n    mrege\n}\n",
])
def test_bare_misspelled_merge_is_a_syntax_error_at_the_typo(text):
    msg = error_of(text)
    assert "syntax error: unknown clause 'mrege' (did you mean 'merge'?)" in msg, msg
    assert_error_at(msg, text, "mrege")


def test_syntax_error_without_a_clause_typo_is_unchanged():
    text = "adapter a: lora() {\n    targets q_proj\n    r at q_proj 4\n}\n"
    msg = error_of(text)
    assert "syntax error: unexpected '4'" in msg and "unknown clause" not in msg, msg


def test_per_layer_value_for_an_untargeted_layer_warns(model):
    """peft warns when a rank_pattern key matches no targeted module; so does peftc (once, at the key)."""
    text = "adapter a: lora(r = 4) {\n    targets q_proj\n    r at k_proj = 2\n    r at q_proj = 8\n}\n"
    with pytest.warns(peftc.PeftcWarning) as record:
        plan = build_plan(parse_spec(text, FILE), model)
    msgs = [str(w.message) for w in record if issubclass(w.category, peftc.PeftcWarning)]
    line, col = position(text, "r at k_proj")
    assert msgs == [f"{FILE}:{line}:{col}: adapter 'a': `r at k_proj = 2` matches none of its 2 targeted layers, "
                    "so it changes nothing"], msgs
    assert plan.warnings == msgs
    assert plan.sites["model.layers.0.self_attn.q_proj"][0].layer_options["r"] == 8


@pytest.mark.parametrize("clause, needle", [
    ("targets /model\\.(layers/", "/model"),
    ("targets q_proj\n  exclude /[a-/", "/[a-/"),
])
def test_invalid_regex(model, clause, needle):
    text = f"adapter a: lora() {{ {clause} }}"
    msg = error_of(text, model)
    assert "invalid regex" in msg, msg
    assert_error_at(msg, text, needle)


def test_invalid_per_pattern_regex(model):
    text = "adapter a: lora() { targets q_proj\n  r at /(/ = 2 }"
    msg = error_of(text, model)
    assert "invalid pattern" in msg, msg
    assert_error_at(msg, text, "/(/")


def test_no_targets(model):
    text = "adapter a: lora(r = 2) { merge }"
    msg = error_of(text, model)
    assert "adapter 'a' has no targets" in msg, msg
    assert_error_at(msg, text, "a:")


def test_unsupported_layer_kind(model):
    text = "adapter a: ia3() { targets embed_tokens }"
    msg = error_of(text, model)
    assert "ia3 does not support layer 'model.embed_tokens'" in msg and "Embedding" in msg, msg


def test_modules_to_save_matching_nothing(model):
    text = "adapter a: lora() { targets q_proj\n  save lm_haed }"
    msg = error_of(text, model)
    assert "modules_to_save 'lm_haed' matches no module" in msg and "did you mean 'lm_head'" in msg, msg


def test_not_mergeable_in_spec(model):
    text = "adapter a: lora(lora_bias = true) { targets q_proj\n  merge }"
    msg = error_of(text, model)
    assert "cannot be merged" in msg and "q_proj" in msg, msg
    # without merge the same adapter is fine
    build_plan(parse_spec(text.replace("merge", "")), model)


def test_weights_directory_not_found(model, tmp_path):
    p = tmp_path / "s.peft"
    text = 'adapter a: lora(r = 4) { targets q_proj\n  weights "missing_dir" }\n'
    p.write_text(text)
    with pytest.raises(PeftcError) as ei:
        build_plan(read_spec(p), model)
    msg = str(ei.value)
    assert "not found" in msg and str(tmp_path / "missing_dir") in msg, msg
    assert_error_at(msg, text, '"missing_dir"', file=str(p))


def test_import_directory_not_found(model, tmp_path):
    p = tmp_path / "s.peft"
    text = 'adapter a: import "nowhere"\n'
    p.write_text(text)
    with pytest.raises(PeftcError) as ei:
        build_plan(read_spec(p), model)
    msg = str(ei.value)
    assert "not found" in msg and "nowhere" in msg, msg
    assert_error_at(msg, text, '"nowhere"', file=str(p))


# ---------------------------------------------------------------- weights: paths and contents
@pytest.fixture(scope="module")
def lora_ckpt(tmp_path_factory):
    from peft import LoraConfig
    tmp = tmp_path_factory.mktemp("ckpt")
    _, pm, d = peft_adapter("llama", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False), tmp)
    return pm, d


def test_relative_weights_resolve_against_the_spec_folder(model, lora_ckpt, tmp_path, monkeypatch):
    pm, d = lora_ckpt
    specs = tmp_path / "specs"
    specs.mkdir()
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "ckpt"
    link.symlink_to(d, target_is_directory=True)
    p = specs / "w.peft"
    p.write_text('adapter a: lora(r = 4, alpha = 8) { targets q_proj, v_proj\n  weights "../ckpt" }\n')
    monkeypatch.chdir(tmp_path / "elsewhere")
    plan = build_plan(read_spec(p), model)
    assert plan.adapters["a"].source == "weights"
    site = plan.sites["model.layers.1.self_attn.v_proj"][0]
    ref = pm.base_model.model.model.layers[1].self_attn.v_proj
    assert torch.equal(site.tensors["A"], ref.lora_A["default"].weight)
    assert torch.equal(site.tensors["B"], ref.lora_B["default"].weight)


@pytest.mark.parametrize("opts, needle, expect", [
    ("r = 8", "r = 8", "r = 8 but its weights were saved with r = 4"),
    ("r = 4, alpha = 32", "alpha", "alpha = 32 but its weights were saved with lora_alpha = 8"),
    ("r = 4, rslora = true", "rslora", "rslora = true but its weights were saved with use_rslora = false"),
    ("r = 4, dropout = 0.1", "dropout", "dropout = 0.1 but its weights were saved with lora_dropout = 0.0"),
    ("r = 4, alpha = 16", "alpha", "write alpha = 8,"),
])
def test_weights_options_must_agree_with_the_checkpoint(model, lora_ckpt, opts, needle, expect):
    """Tensors loaded with `weights` were trained with the checkpoint's options: a spec option that differs
    would silently compute something else than peft does (alpha 32 vs 16: 0.37 off)."""
    _, d = lora_ckpt
    text = f'adapter a: lora({opts}) {{ targets q_proj, v_proj\n  weights "{d}" }}'
    msg = error_of(text, model)
    assert expect in msg and str(d / "adapter_config.json") in msg, msg
    assert_error_at(msg, text, needle)


def test_weights_default_option_disagreeing_with_the_checkpoint(model, tmp_path):
    from peft import LoraConfig
    _, _, d = peft_adapter("llama", LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"],
                                               init_lora_weights=False), tmp_path)
    text = f'adapter a: lora(r = 4) {{ targets q_proj\n  weights "{d}" }}'
    msg = error_of(text, model)
    assert "alpha is 8 (the default) but its weights were saved with lora_alpha = 16" in msg, msg
    assert_error_at(msg, text, f'"{d}"')
    plan = build_plan(parse_spec(text.replace("r = 4", "r = 4, alpha = 16"), FILE), model)
    assert plan.adapters["a"].options["alpha"] == 16


def test_weights_of_another_method(model, lora_ckpt):
    _, d = lora_ckpt
    text = f'adapter a: ia3() {{ targets q_proj, v_proj\n  weights "{d}" }}'
    msg = error_of(text, model)
    assert "adapter 'a' is ia3" in msg and "lora adapter" in msg, msg
    assert_error_at(msg, text, f'"{d}"')


def test_weights_for_fewer_targets_is_an_extra_tensor(model, lora_ckpt):
    _, d = lora_ckpt
    msg = error_of(f'adapter a: lora(r = 4) {{ targets q_proj\n  weights "{d}" }}', model)
    assert "unexpected tensor 'base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight'" in msg, msg


# ---------------------------------------------------------------- the API surfaces the same errors
def test_compile_raises_peftc_error_for_spec_text(model):
    with pytest.raises(PeftcError, match=r"<spec>:1:\d+: unknown option 'alpah'"):
        peftc.compile("adapter a: lora(alpah = 4) { targets q_proj }", model)


def test_compile_raises_for_a_spec_file_with_a_syntax_error(model, tmp_path):
    p = tmp_path / "bad.peft"
    text = "adapter a: lora(r = 4 { targets q_proj }\n"
    p.write_text(text)
    with pytest.raises(PeftcError) as ei:
        peftc.compile(str(p), model)
    assert_error_at(str(ei.value), text, "{", file=str(p))


def test_peftc_error_str_without_location():
    assert str(PeftcError("plain")) == "plain"
    assert str(PeftcError("m", file="f.peft")) == "f.peft: m"
    assert str(PeftcError("m", file="f.peft", line=2)) == "f.peft:2: m"
    e = PeftcError("m", file="f.peft", line=2, column=3, source="one\ntwo2\n")
    assert str(e) == "f.peft:2:3: m\n    two2\n      ^"
