"""Adapter sites beyond "one module, one weight", against the real peft: LN tuning (norms, by peft's per-model
defaults), trainable tokens (tied output heads follow), peft's `bias` = all / <method>_only, LoRA on
nn.MultiheadAttention (in_proj_weight and out_proj), and a located error for a target peftc finds but cannot adapt.

Each case: a real peft adapter (noise on every trainable tensor) saved by `save_pretrained` and compiled by peftc
through `import "<dir>"`, unmerged and merged; a fresh adapter written in a spec, its tensors nudged as training
would, saved by peftc and loaded by peft with identical outputs; ONNX merged and unmerged checked in onnxruntime.
"""
from __future__ import annotations

import dataclasses
import json

import peft
import pytest
import torch
from _differential import Case, Prepared, _compile, _inputs, prepare
from _differential import _models as _model
from conftest import (
    CHANGED,
    TOL,
    compile_on,
    example_inputs_for,
    max_diff,
    peft_adapter,
    randomize_,
    run_logits,
)
from torch import nn

import peftc

CASES = [
    # ---- LN tuning: peft's default norms per model type (RMSNorm: weight only; LayerNorm: weight and bias)
    Case("llama-ln-tuning", "llama", lambda: peft.LNTuningConfig(), "ln_tuning()"),
    Case("gpt2-ln-tuning", "gpt2", lambda: peft.LNTuningConfig(), "ln_tuning()"),
    Case("llama-ln-tuning-any-module", "llama",
         lambda: peft.LNTuningConfig(target_modules=["norm", "lm_head", "embed_tokens", "v_proj"]),
         "ln_tuning() { targets norm, lm_head, embed_tokens, v_proj }"),
    Case("gpt2-ln-tuning-conv1d", "gpt2", lambda: peft.LNTuningConfig(target_modules=["ln_f", "c_fc"]),
         "ln_tuning() { targets c_fc, ln_1 }"),
    # ---- trainable tokens: standalone (the input embeddings by default); GPT-2's tied lm_head follows
    Case("llama-trainable-tokens", "llama", lambda: peft.TrainableTokensConfig(token_indices=[3, 5, 7]),
         "trainable_tokens(token_indices = [1, 5, 38, 300])"),
    Case("gpt2-trainable-tokens-tied", "gpt2", lambda: peft.TrainableTokensConfig(token_indices=[3, 5, 7]),
         'trainable_tokens(token_indices = [2, 8], init = "random") { targets wte }'),
    # ---- LoRA's trainable_token_indices: a list (the input embeddings) or per layer; a tied lm_head follows
    Case("llama-lora-tokens", "llama", lambda: peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False,
                                                               trainable_token_indices=[3, 5]),
         'lora(r = 2, init = "random", trainable_token_indices = [5, 38]) { targets q_proj, v_proj }'),
    Case("gpt2-lora-tokens-tied", "gpt2", lambda: peft.LoraConfig(r=4, target_modules=["c_attn"],
                                                                  init_lora_weights=False,
                                                                  trainable_token_indices={"wte": [3, 5]}),
         'lora(r = 2, init = "random", trainable_token_indices = [7]) { targets c_fc }'),
    # ---- bias = all / lora_only
    Case("gpt2-lora-bias-lora-only", "gpt2",
         lambda: peft.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], bias="lora_only", init_lora_weights=False),
         'lora(r = 4, init = "random", bias = "lora_only") { targets c_attn, c_proj }'),
    Case("gpt2-lora-bias-all", "gpt2",
         lambda: peft.LoraConfig(r=4, target_modules=["c_attn"], bias="all", init_lora_weights=False),
         'lora(r = 4, init = "random", bias = "all") { targets c_attn }'),
    Case("bert-lora-bias-all-head", "bert-cls",
         lambda: peft.LoraConfig(r=4, target_modules=["query", "value"], bias="all", init_lora_weights=False,
                                 modules_to_save=["classifier"])),
    Case("llama-vera-bias-all", "llama", lambda: peft.VeraConfig(r=8, target_modules=["q_proj"], bias="all")),
    # the rotations: the bias is trained beside the rotation (BOFT's bias stays unscaled)
    Case("mlp-oft-bias-only", "token-mlp", lambda: peft.OFTConfig(oft_block_size=4, target_modules=["lin0", "lin1"],
                                                                  bias="oft_only", init_weights=False),
         'oft(block_size = 4, init = "random", bias = "oft_only") { targets lin0, lin1 }'),
    Case("mlp-boft-bias-all", "token-mlp", lambda: peft.BOFTConfig(boft_block_size=4, target_modules=["lin0"],
                                                                   bias="all", init_weights=False)),
    Case("mlp-hra-bias-only", "token-mlp", lambda: peft.HRAConfig(r=2, target_modules=["lin0", "lin1"],
                                                                  bias="hra_only", init_weights=False)),
    # ---- LoRA on nn.MultiheadAttention: in_proj_weight and out_proj (with bias = lora_only too)
    Case("mha-lora", "mha", lambda: peft.LoraConfig(r=4, target_modules=["attn"], init_lora_weights=False),
         'lora(r = 4, alpha = 6, init = "random") { targets attn }'),
    Case("mha-lora-bias", "mha", lambda: peft.LoraConfig(r=2, target_modules=["attn", "head"], bias="lora_only",
                                                         init_lora_weights=False),
         'lora(r = 2, init = "random", bias = "lora_only") { targets attn, head }'),
    Case("mha-ln-tuning", "mha", lambda: peft.LNTuningConfig(target_modules=["norm"]),
         "ln_tuning() { targets norm }"),
]


@pytest.fixture(scope="module", params=CASES, ids=[c.id for c in CASES])
def prepared(request, tmp_path_factory) -> Prepared:
    return prepare(request.param, tmp_path_factory)


def test_adapter_changes_the_output(prepared):
    assert max_diff(prepared.peft_out, prepared.base_out) > CHANGED


def test_import_unmerged_matches_peft(prepared):
    gm = _compile(f'adapter default: import "{prepared.dir}"', prepared.case.model)
    assert max_diff(run_logits(gm, prepared.inputs), prepared.peft_out) <= TOL


def test_import_merged_matches_peft_merge(prepared):
    gm = _compile(f'adapter default: import "{prepared.dir}"', prepared.case.model, merge=True)
    assert max_diff(run_logits(gm, prepared.inputs), prepared.merged_out) <= TOL
    assert not [n for n, p in gm.named_parameters() if p.requires_grad]


def test_imported_adapter_saves_back_unchanged(prepared, tmp_path):
    """import -> save writes the keys peft wrote (the trained biases under peft's names, tied copies too)."""
    from safetensors.torch import load_file
    gm = _compile(f'adapter default: import "{prepared.dir}"', prepared.case.model)
    peftc.save_adapter(gm, tmp_path / "again")
    ours = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    theirs = load_file(f"{prepared.dir}/adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    cfg = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    if "bias" in cfg:
        assert cfg["bias"] == json.loads(open(f"{prepared.dir}/adapter_config.json").read()).get("bias")


FRESH = [c for c in CASES if c.fresh]


@pytest.mark.parametrize("case", FRESH, ids=[c.id for c in FRESH])
def test_fresh_adapter_saves_for_peft(case, tmp_path):
    gm = _compile(f"adapter default: {case.fresh}", case.model)
    x = _inputs(case.model)
    randomize_(gm, seed=3)   # as training would: every trainable tensor moves
    ours = run_logits(gm, x)
    assert max_diff(ours, run_logits(_model(case.model), x)) > CHANGED
    peftc.save_adapter(gm, tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())
    known = {f.name for f in dataclasses.fields(type(case.config()))}
    assert set(cfg) <= known, sorted(set(cfg) - known)
    pm = peft.PeftModel.from_pretrained(_model(case.model), str(tmp_path / "ckpt")).eval()
    assert max_diff(run_logits(pm, x), ours) <= TOL


@pytest.mark.parametrize("case", FRESH, ids=[c.id for c in FRESH])
def test_trains_through_the_graph(case):
    """Gradients reach every trainable tensor (the norm copies, the token rows, the biases); nothing else trains."""
    gm = _compile(f"adapter default: {case.fresh}", case.model, train=True)
    x = _inputs(case.model)
    out = gm(**x)
    logits = out if isinstance(out, torch.Tensor) else out["logits"] if isinstance(out, dict) else out[0]
    logits.float().pow(2).mean().backward()
    trainable = [(n, p) for n, p in gm.named_parameters() if p.requires_grad]
    assert trainable
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable), \
        [n for n, p in trainable if p.grad is None or p.grad.abs().sum() == 0]


ONNX = {
    "ln-tuning": ("llama", "ln_tuning()"),
    "trainable-tokens-tied": ("gpt2", 'trainable_tokens(token_indices = [2, 8], init = "random")'),
    "lora-bias-all": ("gpt2", 'lora(r = 2, init = "random", bias = "all") { targets c_attn }'),
    "lora-mha": ("mha", 'lora(r = 2, init = "random") { targets attn }'),
}


@pytest.mark.slow
@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("what", sorted(ONNX))
def test_onnx_export_checks_in_onnxruntime(what, merge, tmp_path):
    model, spec = ONNX[what]
    gm = _compile(f"adapter a: {spec}", model, merge=merge)
    if not merge:
        randomize_(gm, seed=5)
    result = peftc.export_onnx(gm, tmp_path / "m.onnx")
    assert result.max_abs_diff <= 1e-4


@pytest.mark.parametrize("model, spec, rules", [
    ("gpt2", 'trainable_tokens(token_indices = [5, 9], init = "random")', {"row_override_embed", "row_override_head"}),
    ("llama", 'lora(r = 2, init = "random", trainable_token_indices = [5]) { targets q_proj }',
     {"row_override_embed", "low_rank"}),
    ("mha", 'lora(r = 2, init = "random") { targets attn }', {"low_rank"}),
    ("llama", "ln_tuning()", set()),
], ids=["tokens-tied", "lora-tokens", "mha", "ln-tuning"])
def test_unmerged_forms_copy_no_full_size_weight(model, spec, rules):
    """Unmerged, the layers read their base weights and add (or override) only what the adapter touches: no
    embedding table is copied per forward, MHA's LoRA runs as thin matmuls, LN tuning reads its copy directly."""
    from peftc.pipeline import compile_model
    kw = {"example_inputs": example_inputs_for(model)} if model == "mha" else {}
    c = compile_model(f"adapter a: {spec}", _model(model), **kw)
    fired = {entry.split(" @ ")[0] for entry in c.rule_log}
    assert rules <= fired, fired
    assert c.dense_layers == []
    assert not [n for n in c.gm.graph.nodes if n.target is torch.ops.aten.index_copy.default]


def test_tied_output_head_reads_the_new_rows():
    """GPT-2's lm_head shares the embedding table: the logits of the trained tokens change too (as in peft)."""
    gm = _compile('adapter a: trainable_tokens(token_indices = [5], init = "random")', "gpt2")
    x = _inputs("gpt2")
    diff = (run_logits(gm, x) - run_logits(_model("gpt2"), x)).abs().amax(dim=(0, 1))
    assert diff[5] > CHANGED


# ---------------------------------------------------------------- located errors
def test_out_proj_inside_mha_is_a_located_error():
    with pytest.raises(peftc.PeftcError, match=r"<spec>:2:13: .*cannot adapt 'attn.out_proj'.*enclosing module 'attn' "
                                               r"\(MultiheadAttention\)"):
        _compile("adapter a: lora() {\n    targets out_proj\n}", "mha")


def test_layer_never_called_is_a_located_error():
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.spare = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    with pytest.raises(peftc.PeftcError, match=r"cannot adapt 'spare'.*never called"):
        peftc.compile("adapter a: lora() { targets spare }", Unused(), example_inputs={"x": torch.randn(2, 4)})


@pytest.mark.parametrize("spec, message", [
    ('lora(bias = "some") { targets q_proj }', r'bias must be "none", "all" or "lora_only"'),
    ("trainable_tokens(token_indices = [3, 999])", "token_indices must be rows of the embedding"),
    ("trainable_tokens()", "token_indices must list at least one token"),
    ('trainable_tokens(token_indices = [1, "a"])', "expects a list of integers"),
])
def test_bad_options_are_located_errors(spec, message):
    with pytest.raises(peftc.PeftcError, match=message):
        compile_on(f"adapter a: {spec}", "llama")


def test_ln_tuning_without_default_targets_for_the_model_type():
    with pytest.raises(peftc.PeftcError, match="no default targets for model type 'bert'"):
        compile_on("adapter a: ln_tuning()", "bert-cls")


def test_method_without_bias_option_refuses_a_bias_checkpoint(tmp_path):
    _, _, d = peft_adapter("llama", peft.LoHaConfig(r=2, target_modules=["q_proj"]), tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "bias": "all"}))
    with pytest.raises(peftc.PeftcError, match="bias = 'all' is not supported for loha"):
        compile_on(f'adapter a: import "{d}"', "llama")
