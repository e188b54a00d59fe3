"""The rule engine (passes/rules.peft + the factor pass): which rules fire where, op classes (one conv family),
rule order by priority and specificity, node provenance, and the "W' is rebuilt per forward" note."""
from __future__ import annotations

import pytest
import torch
from conftest import CUSTOM_MODELS, MODELS, example_inputs_for
from test_method_files import seqvol, seqvol_inputs

import peftc
from peftc.lang.methods import parse_library_file
from peftc.lang.rules import build_rule, ordered
from peftc.library import Library, library
from peftc.rewrite.graph_tools import ADAPTER, RULE, TAG


def _compile(spec: str, model_name: str, **kw):
    if model_name == "seqvol":
        return peftc.compile_model(spec, seqvol(), example_inputs=seqvol_inputs(batch=2, seed=3), **kw)
    if model_name in CUSTOM_MODELS:
        kw.setdefault("example_inputs", example_inputs_for(model_name))
    return peftc.compile_model(spec, MODELS[model_name](), **kw)


# (model, adapter source) -> rules that must have fired
EXPECTED = {
    "lora-linear": ("llama", 'lora(r = 2, alpha = 3) { targets q_proj }', {"split_sum", "pull_scalar", "low_rank"}),
    "lora-linear-bias": ("token-mlp", 'lora(r = 2, alpha = 4, lora_bias = true) { targets lin0 }',
                         {"split_sum", "pull_scalar", "low_rank"}),
    "lora-conv1d_hf": ("gpt2", 'lora(r = 2, alpha = 3) { targets c_attn }',
                       {"conv1d_as_linear", "split_sum", "pull_scalar", "low_rank"}),
    "lora-conv2d": ("convnet", 'lora(r = 2, alpha = 3) { targets conv1 }',
                    {"conv_split_sum", "conv_scalar", "conv_low_rank"}),
    "lora-conv1d-conv3d": ("seqvol", 'lora(r = 2, alpha = 3) { targets seq, vol }',
                           {"conv_split_sum", "conv_scalar", "conv_low_rank"}),
    "lora-embedding": ("token-mlp", 'lora(r = 2, alpha = 3) { targets emb }',
                       {"embed_split_sum", "embed_scalar", "embed_low_rank"}),
    "lora-alpha-eq-r": ("llama", 'lora(r = 2, alpha = 2) { targets q_proj }', {"split_sum", "mul_one", "low_rank"}),
    "ia3-ff": ("llama", 'ia3() { targets down_proj\n feedforward down_proj }', {"column_scale"}),
    "ia3-out": ("llama", 'ia3() { targets k_proj }', {"row_scale"}),
    "ia3-conv": ("convnet", 'ia3() { targets conv1, conv2\n feedforward conv2 }',
                 {"conv_scale", "conv_in_scale", "conv_bias"}),
    "ia3-conv1d_hf": ("gpt2", 'ia3() { targets c_attn, mlp.c_proj\n feedforward mlp.c_proj }',
                      {"conv1d_as_linear", "row_scale", "column_scale"}),
    "dora-conv1d_hf": ("gpt2", 'dora(r = 2) { targets c_attn }', {"conv1d_as_linear", "low_rank", "scale_outputs"}),
    "dora-linear": ("llama", 'dora(r = 2) { targets q_proj }', {"split_sum", "low_rank", "scale_outputs"}),
    "dora-conv2d": ("convnet", 'dora(r = 2) { targets conv1 }', {"conv_split_sum", "conv_low_rank", "conv_scale"}),
    "dora-embedding": ("token-mlp", 'dora(r = 2) { targets emb }', {"embed_split_sum", "embed_low_rank",
                                                                    "embed_col_scale"}),
    "oft-linear": ("llama", 'oft(block_size = 8, init = "random") { targets q_proj, down_proj }',
                   {"block_rotate_input", "transpose_pair"}),
    "oft-exact-share-bias": ("token-mlp", 'oft(block_size = 4, use_cayley_neumann = false, block_share = true) '
                                          "{ targets lin0, lin1 }", {"block_rotate_input"}),
    "oft-embedding": ("token-mlp", 'oft(block_size = 4) { targets emb }', {"embed_block_rotate"}),
    "boft-linear": ("llama", 'boft(block_size = 4, n_butterfly_factor = 3) { targets q_proj }',
                    {"butterfly_input", "scale_outputs"}),
    # rotations: HRA on the input (thin matmuls), RoAd on the output (elementwise), OSF a constant top part
    "hra-linear": ("llama", 'hra(r = 3, init = "random") { targets q_proj }',
                   {"low_rank", "split_diff", "identity_weight"}),
    "hra-gs-linear": ("token-mlp", 'hra(r = 2, apply_GS = true, init = "random") { targets lin0 }',
                      {"split_bias", "low_rank", "identity_weight"}),
    "hra-conv2d": ("convnet", 'hra(r = 2, init = "random") { targets conv1 }', {"conv_split_diff", "conv_low_rank"}),
    "road-linear": ("llama", 'road(variant = "road_4", group_size = 8) { targets q_proj }',
                    {"output_rotation_nobias"}),
    "road-linear-bias": ("token-mlp", 'road(group_size = 4) { targets lin0, lin1 }', {"output_rotation"}),
    "osf-linear": ("token-mlp", "osf() { targets lin0, lin1 }", {"split_sum", "low_rank", "row_scale"}),
}


# training graphs keep adapter dropout: its rules must fire too
TRAIN = {
    "lora-linear-dropout": ("llama", 'lora(r = 2, dropout = 0.1) { targets q_proj }', {"input_dropout", "low_rank"}),
    "lora-conv-dropout": ("convnet", 'lora(r = 2, dropout = 0.1) { targets conv1 }', {"conv_dropout",
                                                                                      "conv_low_rank"}),
    "dora-linear-dropout": ("llama", 'dora(r = 2, dropout = 0.1) { targets q_proj }', {"input_dropout",
                                                                                       "scale_outputs"}),
    "oft-linear-dropout": ("llama", 'oft(block_size = 8, module_dropout = 0.5) { targets q_proj }',
                           {"block_rotate_input"}),
    "boft-linear-dropout": ("token-mlp", 'boft(block_size = 4, n_butterfly_factor = 2, dropout = 0.5) '
                                         "{ targets lin0 }", {"butterfly_input", "scale_outputs"}),
}


@pytest.mark.parametrize("case", [*EXPECTED, *TRAIN])
def test_expected_rules_fire_and_nothing_stays_dense(case):
    model_name, source, expected = EXPECTED.get(case) or TRAIN[case]
    c = _compile(f"adapter a: {source}\n", model_name, train=case in TRAIN)
    assert expected <= set(c.rule_hits), (expected - set(c.rule_hits), c.rule_hits)
    assert sum(c.rule_hits.values()) == len(c.rule_log)
    assert c.dense_layers == []
    # provenance: every node a rule made names its rule and the adapter; every inserted node its layer
    made = [n for n in c.gm.graph.nodes if RULE in n.meta]
    assert {n.meta[RULE] for n in made} <= set(c.rule_hits) and made
    assert all(n.meta.get(ADAPTER) == ("a",) and TAG in n.meta for n in made)


def test_conv_rules_are_one_family_over_conv1d_2d_3d():
    lib = library()
    conv = [r for r in lib.rules if r.lhs.fn == "conv"]
    assert conv and not [r for r in lib.rules if r.lhs.fn in ("conv1d", "conv2d", "conv3d")]
    c = _compile('adapter a: lora(r = 2, alpha = 3) { targets seq, vol }\n', "seqvol")
    targets = {n.target for n in c.gm.graph.nodes if n.meta.get(RULE) == "conv_low_rank"}
    assert {torch.ops.aten.conv1d.default, torch.ops.aten.conv3d.default} <= targets


def test_live_layers_read_no_computed_full_size_weight_with_two_adapters():
    c = _compile('adapter a: lora(r = 2, alpha = 3) { targets q_proj, v_proj }\n'
                 'adapter b: dora(r = 2) { targets q_proj }\nadapter c: ia3() { targets v_proj }\n', "llama",
                 train=True)
    assert c.dense_layers == []
    adapters = {a for n in c.gm.graph.nodes for a in n.meta.get(ADAPTER, ())}
    assert adapters == {"a", "b", "c"}


def test_dense_note_fires_when_no_rule_factors(monkeypatch):
    """The detector itself: with no rules at all, every live LoRA layer rebuilds its weight; merged ones do not."""
    monkeypatch.setattr("peftc.pipeline.library", lambda: Library(library().methods, []))
    c = _compile('adapter a: lora(r = 2) { targets q_proj }\nadapter b: lora(r = 2) { targets v_proj\n merge }\n',
                 "llama")
    assert c.dense_layers == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert not c.rule_hits


def test_gpt2_lora_is_not_reported_dense():
    """GPT-2's Conv1D reads t(W): a computed weight, but no adapter's and no rebuild."""
    c = _compile('adapter a: lora(r = 2) { targets c_attn, c_proj, wte }\n', "gpt2")
    assert c.dense_layers == []
    assert c.rule_hits["conv1d_as_linear"] > 0


def test_dump_after_factor_lists_provenance():
    out: list[str] = []
    _compile('adapter a: lora(r = 2, alpha = 3) { targets q_proj }\n', "llama", dump_after="factor", dump=out.append)
    text = out[0]
    assert "graph():" in text and "# provenance" in text
    row = next(line for line in text.splitlines() if "low_rank" in line and line.startswith("# "))
    assert "model.layers.0.self_attn.q_proj" in row or "model.layers.1.self_attn.q_proj" in row
    assert " a " in row


def _rules(text: str):
    _, trees = parse_library_file(text, "r.peft")
    return [build_rule(t, "r.peft", i) for i, t in enumerate(trees)]


def test_rule_order_is_priority_then_specificity_then_declaration():
    rules = _rules("rule generic: linear(x, V - W) => linear(x, V) - linear(x, W)\n"
                   "rule later: linear(x, t(V) - W) => linear(x, V)\n"
                   "rule plain: linear(x, W) => linear(x, W)\n"
                   "rule urgent [prio 5]: linear(x, W) => linear(x, W)\n"
                   "rule last [prio -1]: linear(x, t(t(V)) - W) => linear(x, V)\n")
    assert [r.name for r in ordered(rules)] == ["urgent", "later", "generic", "plain", "last"]


def test_a_specific_rule_declared_last_still_fires(monkeypatch):
    """The first-match trap: a generic rule declared first must not shadow a more specific one after it."""
    extra = _rules("rule matmul_bt: linear(x, s * (B @ A)) => linear(linear(x, A), B) * s  where scalar(s)\n")
    lib = library()
    monkeypatch.setattr("peftc.pipeline.library", lambda: Library(lib.methods, [*lib.rules, *extra]))
    c = _compile('adapter a: lora(r = 2, alpha = 3) { targets q_proj }\n', "llama")
    assert c.rule_hits["matmul_bt"] == 2 and "pull_scalar" not in c.rule_hits
    assert c.dense_layers == []

