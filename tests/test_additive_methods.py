"""The additive methods beyond LoRA (AdaLoRA, LoHa, LoKr, VeRA, DeLoRA, MiSS, ...) against the real peft.

For every case a real peft adapter is built with non-identity weights (noise on every trainable tensor), saved
by `save_pretrained`, and compiled by peftc through `import "<dir>"`:

* peftc unmerged == peft unmerged and peftc merged == peft `merge_and_unload()` (<= 1e-5, fp32);
* the adapter really changes the output (a no-op cannot pass);
* a fresh adapter of the same method written in a spec (non-identity init), saved by peftc, loads in peft with
  identical outputs, and its adapter_config.json holds only fields peft's config class knows.
"""
from __future__ import annotations

import dataclasses
import json

import peft
import pytest
import torch
from _differential import Case, Prepared, _compile, _inputs, _models, _tamper, prepare  # noqa: F401 - re-exported
from conftest import CHANGED, MODELS, TOL, compile_on, max_diff, peft_adapter, run_logits

import peftc

LLAMA_QV = ["q_proj", "v_proj", "down_proj"]
CASES = [
    # ---- AdaLoRA (Linear, GPT-2 Conv1D)
    Case("llama-adalora", "llama", lambda: peft.AdaLoraConfig(init_r=6, target_r=4, lora_alpha=12, total_step=10,
                                                              target_modules=LLAMA_QV),
         'adalora(init_r = 5, alpha = 10, total_step = 100, init = "random") { targets q_proj, v_proj }'),
    Case("gpt2-adalora", "gpt2", lambda: peft.AdaLoraConfig(init_r=4, total_step=10, target_modules=["c_attn", "c_fc"],
                                                            fan_in_fan_out=True)),
    # ---- LoHa (Linear, Conv1d, Conv2d; CP form with use_effective_conv2d)
    Case("llama-loha", "llama", lambda: peft.LoHaConfig(r=4, alpha=6, target_modules=LLAMA_QV,
                                                        rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3}),
         'loha(r = 3, alpha = 5, init = "random") { targets q_proj, down_proj }'),
    Case("convnet-loha", "convnet", lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=["conv1", "conv2", "fc1"]),
         'loha(r = 2, alpha = 3, init = "random") { targets conv1, fc1 }'),
    Case("convnet-loha-cp", "convnet", lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=["conv1", "conv2"],
                                                               use_effective_conv2d=True),
         'loha(r = 2, use_effective_conv2d = true, init = "random") { targets conv1, conv2 }'),
    Case("seqvol-loha", "seqvol", lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=["seq"])),
    Case("seqvol-loha-cp", "seqvol", lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=["seq"],
                                                             use_effective_conv2d=True)),
    # ---- LoKr (every factor layout)
    Case("llama-lokr", "llama", lambda: peft.LoKrConfig(r=4, alpha=6, target_modules=LLAMA_QV),
         'lokr(r = 2, alpha = 3, init = "random") { targets q_proj, down_proj }'),
    Case("llama-lokr-decompose", "llama", lambda: peft.LoKrConfig(r=2, alpha=6, target_modules=LLAMA_QV,
                                                                  decompose_both=True, decompose_factor=4),
         'lokr(r = 1, decompose_both = true, decompose_factor = 4, init = "random") { targets q_proj }'),
    Case("llama-lokr-full", "llama", lambda: peft.LoKrConfig(r=64, alpha=6, target_modules=["q_proj", "up_proj"])),
    Case("convnet-lokr", "convnet", lambda: peft.LoKrConfig(r=2, alpha=4, target_modules=["conv1", "conv2", "fc1"]),
         'lokr(r = 1, init = "random") { targets conv2, fc1 }'),
    Case("convnet-lokr-w2", "convnet", lambda: peft.LoKrConfig(r=16, alpha=4, target_modules=["conv1", "conv2"])),
    Case("convnet-lokr-cp", "convnet", lambda: peft.LoKrConfig(r=1, alpha=4, target_modules=["conv2"],
                                                               use_effective_conv2d=True)),
    Case("seqvol-lokr", "seqvol", lambda: peft.LoKrConfig(r=1, alpha=2, target_modules=["seq"])),
    Case("seqvol-lokr-w2", "seqvol", lambda: peft.LoKrConfig(r=16, alpha=2, target_modules=["seq"])),
    # (peft 0.21.2 itself crashes on LoKr with use_effective_conv2d on an nn.Conv1d: no oracle for it)
    # ---- VeRA (shared projections in the file, or regenerated from the key)
    Case("llama-vera", "llama", lambda: peft.VeraConfig(r=8, target_modules=LLAMA_QV),
         'vera(r = 4, projection_prng_key = 3, init = "random") { targets q_proj, down_proj }'),
    Case("llama-vera-noproj", "llama", lambda: peft.VeraConfig(r=8, target_modules=LLAMA_QV, save_projection=False,
                                                               projection_prng_key=11),
         'vera(r = 4, save_projection = false, init = "random") { targets q_proj, v_proj }'),
    Case("gpt2-vera", "gpt2", lambda: peft.VeraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    # ---- DeLoRA
    Case("llama-delora", "llama", lambda: peft.DeloraConfig(r=4, delora_lambda=5, target_modules=LLAMA_QV,
                                                            rank_pattern={"v_proj": 2}, lambda_pattern={"q_proj": 3}),
         'delora(r = 2, init = "random") { targets q_proj, down_proj }'),
    # ---- MiSS (balance, mini, bat; `in` not a multiple of r)
    Case("llama-miss", "llama", lambda: peft.MissConfig(r=8, target_modules=LLAMA_QV),
         'miss(r = 4, init = "random") { targets q_proj, down_proj }'),
    Case("llama-miss-ragged", "llama", lambda: peft.MissConfig(r=6, target_modules=["q_proj", "down_proj"])),
    Case("llama-miss-mini", "llama", lambda: peft.MissConfig(r=8, mini_r=4, init_weights="mini",
                                                             target_modules=LLAMA_QV)),
    Case("llama-miss-bat", "llama", lambda: peft.MissConfig(r=8, init_weights="bat", target_modules=LLAMA_QV)),
    # ---- FourierFT (frequencies regenerated from the seed), GPT-2 Conv1D too
    Case("llama-fourierft", "llama", lambda: peft.FourierFTConfig(n_frequency=40, scaling=20.0, target_modules=LLAMA_QV,
                                                                  n_frequency_pattern={"v_proj": 17}),
         'fourierft(n_frequency = 30, scaling = 10, random_loc_seed = 5) { targets q_proj, down_proj }'),
    Case("gpt2-fourierft", "gpt2", lambda: peft.FourierFTConfig(n_frequency=25, scaling=10.0, random_loc_seed=3,
                                                                target_modules=["c_attn", "c_fc"],
                                                                fan_in_fan_out=True)),
    # ---- WaveFT (seeded positions; wavelet families; without the IDWT; proportional budgets)
    Case("llama-waveft", "llama", lambda: peft.WaveFTConfig(n_frequency=40, scaling=5.0, target_modules=LLAMA_QV,
                                                            n_frequency_pattern={"v_proj": 17}, init_weights=False),
         'waveft(n_frequency = 30, wavelet_family = "db2", init = "random") { targets q_proj, down_proj }'),
    Case("llama-waveft-sym4", "llama", lambda: peft.WaveFTConfig(n_frequency=30, wavelet_family="sym4",
                                                                 target_modules=["q_proj", "up_proj"],
                                                                 init_weights=False)),
    Case("llama-waveft-coif2", "llama", lambda: peft.WaveFTConfig(n_frequency=30, wavelet_family="coif2",
                                                                  random_loc_seed=9, target_modules=["o_proj"],
                                                                  init_weights=False)),
    Case("llama-waveft-noidwt", "llama", lambda: peft.WaveFTConfig(n_frequency=30, use_idwt=False,
                                                                   target_modules=LLAMA_QV, init_weights=False)),
    Case("gpt2-waveft-proportional", "gpt2", lambda: peft.WaveFTConfig(n_frequency=20, proportional_parameters=True,
                                                                       target_modules=["c_attn", "c_fc"],
                                                                       fan_in_fan_out=True, init_weights=False)),
    # ---- C3A (fp32 block-circulant)
    Case("llama-c3a", "llama", lambda: peft.C3AConfig(block_size=16, target_modules=LLAMA_QV,
                                                      block_size_pattern={"down_proj": 32}),
         'c3a(block_size = 8, init = "gaussian") { targets q_proj, down_proj }'),
    # ---- VB-LoRA (shared vector bank; the top-k-only layout)
    Case("llama-vblora", "llama", lambda: peft.VBLoRAConfig(r=2, num_vectors=16, vector_length=16, topk=3,
                                                            target_modules=LLAMA_QV),
         'vblora(r = 2, num_vectors = 8, vector_length = 8, init_logits_std = 1) { targets q_proj, down_proj }'),
    Case("llama-vblora-topk", "llama", lambda: peft.VBLoRAConfig(r=2, num_vectors=16, vector_length=16, topk=2,
                                                                 save_only_topk_weights=True, target_modules=LLAMA_QV)),
    Case("gpt2-vblora", "gpt2", lambda: peft.VBLoRAConfig(r=2, num_vectors=8, vector_length=16, topk=2,
                                                          target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    # ---- RandLoRA (bases in the file, or regenerated from the key; in > out and in < out layers)
    Case("llama-randlora", "llama", lambda: peft.RandLoraConfig(r=8, randlora_alpha=16, target_modules=LLAMA_QV),
         'randlora(r = 16, randlora_alpha = 4, init = "random") { targets q_proj, down_proj }'),
    Case("llama-randlora-noproj", "llama", lambda: peft.RandLoraConfig(r=8, randlora_alpha=16, save_projection=False,
                                                                       projection_prng_key=5,
                                                                       target_modules=["up_proj", "down_proj"]),
         'randlora(r = 16, save_projection = false, init = "random") { targets up_proj, down_proj }'),
    Case("llama-randlora-sparse", "llama", lambda: peft.RandLoraConfig(r=8, sparse=True, save_projection=False,
                                                                       target_modules=["q_proj", "down_proj"])),
    Case("llama-randlora-very-sparse", "llama", lambda: peft.RandLoraConfig(r=8, very_sparse=True,
                                                                            projection_prng_key=2,
                                                                            target_modules=["up_proj"])),
    Case("gpt2-randlora", "gpt2", lambda: peft.RandLoraConfig(r=8, randlora_alpha=16, target_modules=["c_attn", "c_fc"],
                                                              fan_in_fan_out=True)),
    # ---- an encoder with a classification head (SEQ_CLS saves the head too)
    Case("bert-loha-seqcls", "bert-cls", lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=["query", "value"],
                                                                 task_type="SEQ_CLS")),
    Case("bert-vera-head", "bert-cls", lambda: peft.VeraConfig(r=8, target_modules=["query", "key"],
                                                               modules_to_save=["classifier"])),
    Case("bert-lokr-patterns", "bert-cls", lambda: peft.LoKrConfig(r=2, alpha=4, target_modules=["query", "dense"],
                                                                   rank_pattern={"dense": 8},
                                                                   alpha_pattern={"query": 3})),
    # ---- SHiRA (saved sparse indices)
    Case("llama-shira", "llama", lambda: peft.ShiraConfig(r=2, target_modules=LLAMA_QV, random_seed=4),
         'shira(r = 2, init = "random") { targets q_proj, down_proj }'),
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


FRESH = [c for c in CASES if c.fresh]


@pytest.mark.parametrize("case", FRESH, ids=[c.id for c in FRESH])
def test_fresh_adapter_saves_for_peft(case, tmp_path):
    spec = f"adapter default: {case.fresh}"
    gm = _compile(spec, case.model)
    x = _inputs(case.model)
    ours = run_logits(gm, x)
    assert max_diff(ours, run_logits(_models(case.model), x)) > CHANGED
    peftc.save_adapter(gm, tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())
    config_cls = type(case.config())
    known = {f.name for f in dataclasses.fields(config_cls)}
    assert set(cfg) <= known, sorted(set(cfg) - known)
    pm = peft.PeftModel.from_pretrained(_models(case.model), str(tmp_path / "ckpt")).eval()
    assert max_diff(run_logits(pm, x), ours) <= TOL


@pytest.mark.parametrize("case", FRESH, ids=[c.id for c in FRESH])
def test_trains_through_the_graph_and_loads_in_peft(case, tmp_path):
    """A few optimizer steps on the compiled graph move every trainable tensor; frozen ones (w_norm, SHiRA's
    indices, shared projections) stay; the trained adapter loads in peft with identical outputs."""
    gm = _compile(f"adapter default: {case.fresh}", case.model, train=True)
    trainable = {n: p.detach().clone() for n, p in gm.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in gm.named_parameters() if not p.requires_grad}
    assert trainable
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    x = _inputs(case.model)
    for _ in range(2):
        out = gm(**x)
        loss = (out if isinstance(out, torch.Tensor) else out[0] if isinstance(out, tuple) else
                out["logits"] if isinstance(out, dict) else out.logits).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = [n for n, p in gm.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert moved, "training changed no adapter tensor"
    for n, p in gm.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    gm.eval()
    ours = run_logits(gm, x)
    peftc.save_adapter(gm, tmp_path / "trained")
    pm = peft.PeftModel.from_pretrained(_models(case.model), str(tmp_path / "trained")).eval()
    assert max_diff(run_logits(pm, x), ours) <= TOL


ONNX_METHODS = {
    "adalora": 'adalora(init_r = 4, total_step = 10, init = "random")',
    "loha": 'loha(r = 2, init = "random")',
    "lokr": 'lokr(r = 2, init = "random")',
    "vera": 'vera(r = 4, init = "random")',
    "delora": 'delora(r = 2, init = "random")',
    "miss": 'miss(r = 4, init = "random")',
    "miss-bat": 'miss(r = 4, init = "bat")',
    "fourierft": "fourierft(n_frequency = 10, scaling = 20)",
    "c3a": 'c3a(block_size = 8, init = "gaussian")',
    "shira": 'shira(r = 2, init = "random")',
    "vblora": "vblora(r = 2, num_vectors = 8, vector_length = 8, init_logits_std = 1)",
    "randlora": "randlora(r = 4, randlora_alpha = 8)",
    "waveft": 'waveft(n_frequency = 20, wavelet_family = "db3", init = "random")',
}


@pytest.mark.slow
@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("method", sorted(ONNX_METHODS))
def test_onnx_export_checks_in_onnxruntime(method, merge, tmp_path):
    gm = _compile(f"adapter a: {ONNX_METHODS[method]} {{ targets lin0, lin1 }}", "token-mlp", merge=merge)
    x = _inputs("token-mlp")
    if method != "miss-bat":   # bat has no random init: it starts as the identity
        assert max_diff(run_logits(gm, x), run_logits(_models("token-mlp"), x)) > CHANGED
    result = peftc.export_onnx(gm, tmp_path / "m.onnx")
    assert result.max_abs_diff <= 1e-4


EXPECTED_RULES = {   # the cheap unmerged form of each method: the rules that must have fired
    "adalora": {"low_rank", "row_scale"},
    "vera": {"low_rank", "row_scale"},
    "delora": {"low_rank", "row_scale", "column_scale"},
    "lokr": {"kron_apply"},
    "miss": {"tiled_cols"},
    "vblora": {"low_rank"},
}


@pytest.mark.parametrize("method", sorted(EXPECTED_RULES))
def test_structured_unmerged_forms(method):
    from conftest import example_inputs_for

    from peftc.pipeline import compile_model
    c = compile_model(f"adapter a: {ONNX_METHODS[method]} {{ targets lin0, lin1 }}", MODELS["token-mlp"](),
                      example_inputs=example_inputs_for("token-mlp"))
    fired = {entry.split(" @ ")[0] for entry in c.rule_log}
    assert EXPECTED_RULES[method] <= fired, fired
    kron_or_scatter = {torch.ops.aten.kron.default}
    assert not [n for n in c.gm.graph.nodes if n.op == "call_function" and n.target in kron_or_scatter]


BAD = {
    "missing": (lambda sd, cfg: ({k: v for k, v in sd.items() if not k.endswith("q_proj.hada_w2_b")}, cfg),
                "missing tensor '.*q_proj.hada_w2_b'"),
    "extra": (lambda sd, cfg: ({**sd, "base_model.model.lm_head.hada_w1_a": torch.zeros(2, 2)}, cfg),
              "unexpected tensor 'base_model.model.lm_head.hada_w1_a'"),
    "misshapen": (lambda sd, cfg: ({k: (v[:, :1].contiguous() if k.endswith("layers.0.self_attn.q_proj.hada_w1_a")
                                        else v) for k, v in sd.items()}, cfg),
                  r"has shape \[64, 1\], expected \[64, 4\]"),
    "bad-option": (lambda sd, cfg: (sd, {**cfg, "r": "four"}), "r expects an integer"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_checkpoint_is_a_located_error(kind, tmp_path):
    _, _, d = peft_adapter("llama", peft.LoHaConfig(r=4, target_modules=["q_proj", "v_proj"]), tmp_path)
    edit, message = BAD[kind]
    bad = _tamper(d, tmp_path / "bad", edit)
    with pytest.raises(peftc.PeftcError, match=message):
        compile_on(f'adapter a: import "{bad}"', "llama")


@pytest.mark.parametrize("config, edit, message", [
    (lambda: peft.VBLoRAConfig(r=2, num_vectors=8, vector_length=16, target_modules=["q_proj"]),
     {"vector_length": 24}, "vector_length must divide"),
    (lambda: peft.ShiraConfig(r=2, target_modules=["q_proj"]), {"mask_type": "custom"}, "only mask_type"),
    (lambda: peft.C3AConfig(block_size=16, target_modules=["q_proj"]), {"block_size": 0}, "block_size must be"),
], ids=["vblora-vector-length", "shira-custom-mask", "c3a-block-size"])
def test_unsupported_options_are_refused(config, edit, message, tmp_path):
    _, _, d = peft_adapter("llama", config(), tmp_path)
    bad = _tamper(d, tmp_path / "bad", lambda sd, cfg: (sd, {**cfg, **edit}))
    with pytest.raises(peftc.PeftcError, match=message):
        compile_on(f'adapter a: import "{bad}"', "llama")


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_rank_and_module_dropout_only_while_training(method):
    """peft's LyCORIS dropouts: rank dropout zeroes output rows of the update (rescaled by the kept mean for
    LoHa, for LoKr with rank_dropout_scale); module dropout drops the whole update. Both only in training."""
    torch.manual_seed(0)
    x = _inputs("token-mlp")
    base = run_logits(_models("token-mlp"), x)
    spec = f'adapter a: {method}(r = 2, init = "random", rank_dropout = 0.5, rank_dropout_scale = true) ' \
        "{ targets lin0, lin1 }" if method == "lokr" else \
        f'adapter a: {method}(r = 2, init = "random", rank_dropout = 0.5) {{ targets lin0, lin1 }}'
    gm = _compile(spec, "token-mlp", train=True)
    gm.eval()
    full = run_logits(gm, x)
    assert torch.equal(run_logits(gm, x), full)
    gm.train()
    outs = [run_logits(gm, x) for _ in range(4)]
    assert all(max_diff(o, full) > CHANGED for o in outs)   # rows dropped and rescaled: never the full update
    gm = _compile(f'adapter a: {method}(r = 2, init = "random", module_dropout = 0.5) {{ targets lin0, lin1 }}',
                  "token-mlp", train=True)
    gm.eval()
    full = run_logits(gm, x)
    gm.train()
    kinds = set()
    for _ in range(24):   # each layer's update is kept or dropped whole
        o = run_logits(gm, x)
        kinds.add("full" if max_diff(o, full) < 1e-6 else "base" if max_diff(o, base) < 1e-6 else "mixed")
    assert {"full", "base"} <= kinds


def test_training_note_and_refusals():
    with pytest.raises(peftc.PeftcError, match="inference-only layout"):
        compile_on("adapter a: vblora(r = 2, num_vectors = 8, vector_length = 8, save_only_topk_weights = true) "
                   "{ targets q_proj }", "llama")
    from peftc.library import library
    assert "rank allocator" in library().method("adalora").training_note


def test_cli_says_what_training_leaves_out(tmp_path):
    import subprocess
    import sys
    spec = tmp_path / "ada.peft"
    spec.write_text("adapter a: adalora(init_r = 4, total_step = 10) { targets q_proj }\n")
    r = subprocess.run([sys.executable, "-m", "peftc.cli", "check", str(spec), "tiny-llama"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert "note: adapter 'a' (adalora): AdaLoRA's rank allocator" in r.stderr
    r = subprocess.run([sys.executable, "-m", "peftc.cli", "compile", str(spec), "tiny-llama", "--train", "-o",
                        str(tmp_path / "m.pt2")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "rank allocator" in r.stderr
    r = subprocess.run([sys.executable, "-m", "peftc.cli", "compile", str(spec), "tiny-llama", "-o",
                        str(tmp_path / "m2.pt2")], capture_output=True, text=True)
    assert "rank allocator" not in r.stderr


def test_fft_updates_reach_onnx_folded(tmp_path):
    """A live FourierFT adapter's inverse FFT is computed before export: no DFT runs in onnxruntime (its DFT
    drifts from torch's FFT as `scaling` grows), and the unmerged export matches torch at peft's default scaling."""
    import onnx
    gm = _compile("adapter a: fourierft(n_frequency = 50) { targets lin0, lin1 }", "token-mlp")
    result = peftc.export_onnx(gm, tmp_path / "m.onnx")
    assert result.max_abs_diff <= 1e-4
    ops = {n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node}
    assert "DFT" not in ops
    assert any(p.requires_grad for p in gm.parameters())   # the module itself is untouched: still trainable


def test_pruned_adalora_checkpoint(tmp_path):
    """A checkpoint whose rank_pattern pruned layers below init_r: per-layer ranks come from the tensors, the
    scale keeps init_r in its denominator (as peft's ranknum), and the reloaded peft model is the oracle."""
    base, pm, d = peft_adapter("llama", peft.AdaLoraConfig(init_r=6, target_r=4, lora_alpha=12, total_step=10,
                                                           target_modules=["q_proj", "v_proj"]), tmp_path)
    names = [n.removeprefix("base_model.model.").removesuffix(".lora_A.default")
             for n, _ in pm.named_parameters() if n.endswith("lora_A.default")]
    masks = {f"{n}.lora_E": [i < 2 + k % 3 for i in range(6)] for k, n in enumerate(names)}
    pm.peft_config["default"].rank_pattern = masks
    pruned = tmp_path / "pruned"
    pm.save_pretrained(str(pruned))
    from safetensors.torch import load_file
    ranks = sorted({t.shape[0] for k, t in load_file(pruned / "adapter_model.safetensors").items()
                    if k.endswith("lora_A")})
    assert ranks == [2, 3, 4]
    ref = peft.PeftModel.from_pretrained(MODELS["llama"](), str(pruned)).eval()
    x = _inputs("llama")
    want = run_logits(ref, x)
    assert max_diff(want, run_logits(base, x)) > CHANGED
    for merge in (False, True):
        gm = compile_on(f'adapter default: import "{pruned}"', "llama", merge=merge)
        assert max_diff(run_logits(gm, x), want) <= TOL
    gm = compile_on(f'adapter default: import "{pruned}"', "llama")
    peftc.save_adapter(gm, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(MODELS["llama"](), str(tmp_path / "again")).eval()
    assert max_diff(run_logits(again, x), want) <= TOL


def _undeclared_dense(method: str) -> bool:
    from peftc.library import library
    return library().method(method.split("-")[0]).dense_note is None


@pytest.mark.parametrize("method", sorted(m for m in ONNX_METHODS if _undeclared_dense(m)))
def test_no_dense_rebuild_unless_declared(method):
    """After factoring, no live layer reads a computed full-size weight, unless its method declares why
    (methods that declare it are left out here; `test_dense_updates_rejoin_the_base_matmul` covers them)."""
    from conftest import example_inputs_for

    from peftc.pipeline import compile_model
    c = compile_model(f"adapter a: {ONNX_METHODS[method]} {{ targets lin0, lin1 }}", MODELS["token-mlp"](),
                      example_inputs=example_inputs_for("token-mlp"))
    assert c.dense_layers == [], c.dense_layers


@pytest.mark.parametrize("method", ["loha", "fourierft", "c3a", "shira", "waveft", "miss-bat"])
def test_dense_updates_rejoin_the_base_matmul(method):
    """An update no rule can factor is added to W and the layer runs one matmul, as peft's forward does,
    not two (the pass `rejoin`); the result is unchanged."""
    from peftc.rewrite.graph_tools import RULE
    gm = _compile(f"adapter a: {ONNX_METHODS[method]} {{ targets lin0, lin1 }}", "token-mlp")
    linears = [n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert len(linears) == 2
    assert any(n.meta.get(RULE) == "rejoin_dense" for n in gm.graph.nodes)
    merged = _compile(f"adapter a: {ONNX_METHODS[method]} {{ targets lin0, lin1 }}", "token-mlp", merge=True)
    x = _inputs("token-mlp")
    assert max_diff(run_logits(gm, x), run_logits(merged, x)) <= TOL
