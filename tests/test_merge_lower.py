"""`peftc merge` (streaming merge into a sharded model directory) and `peftc lower` (any mergeable adapter ->
a plain LoRA checkpoint), against peft and against peftc's own traced fold.

* merge: a tiny Llama saved in several shards (tied embeddings; and bf16) merged with a peft LoRA on the tied
  embedding: transformers' load of OUT_DIR gives peft's unmerged outputs; shards, index, dtypes and other files
  as they were; peftc's merged weights equal the `fold` pass's bit for bit; bad input is one located error,
  and an interrupted run leaves nothing behind;
* lower: peft loads the lowered checkpoint; the errors printed are the true ones (recomputed from peft's own
  delta weights of the original and of the lowered adapter); a LoRA of rank <= R lowers with ~zero error.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import peft
import pytest
import torch
from conftest import CHANGED, TOL, VOCAB, gpt2, inputs_for, logits_of, lora, max_diff, peft_adapter, randomize_

import peftc
from peftc.cli import main
from peftc.safetensors_stream import read_header


def _llama(tied: bool, dtype: torch.dtype = torch.float32):
    import transformers as T
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                        tie_word_embeddings=tied)
    return T.LlamaForCausalLM(cfg).to(dtype).eval()


def _save(model, d: Path) -> Path:
    model.save_pretrained(d, max_shard_size="60KB")
    (d / "tokenizer_config.json").write_text('{"model_max_length": 128}\n')
    return d


@pytest.fixture(scope="session")
def tied(tmp_path_factory):
    """A tied tiny Llama in several shards, and a peft LoRA on its tied embedding and q/v, with a trained copy of
    the (tied) head (modules_to_save), saved."""
    root = tmp_path_factory.mktemp("merge-tied")
    base = _llama(True)
    _save(base, root / "model")
    config = lora(target_modules=["embed_tokens", "q_proj", "v_proj"], modules_to_save=["lm_head"])
    pm = peft.get_peft_model(copy.deepcopy(base), config).eval()
    randomize_(pm, 1)
    pm.save_pretrained(root / "adapter")
    (root / "spec.peft").write_text('adapter a: import "adapter"\n')
    return root, base, pm


@pytest.fixture(scope="session")
def tied_merged(tied):
    root, _, _ = tied
    out = root / "out"
    assert main(["-q", "merge", str(root / "spec.peft"), str(root / "model"), "-o", str(out)]) == 0
    return out


def _ids():
    return inputs_for("llama")["input_ids"]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# ---------------------------------------------------------------- merge
def test_merge_sharded_tied_equals_peft_unmerged(tied, tied_merged, capsys):
    import transformers as T
    root, base, pm = tied
    src, out = root / "model", tied_merged
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert {p.name for p in out.iterdir()} == {p.name for p in src.iterdir()}    # tokenizer, generation config
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" in index["weight_map"]    # untied: the head keeps the unmerged embedding
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    merged = T.LlamaForCausalLM.from_pretrained(out).eval()
    ids = _ids()
    want = _logits(pm, ids)
    assert max_diff(_logits(merged, ids), want) <= TOL
    assert max_diff(_logits(base, ids), want) > CHANGED
    unmerged = peftc.compile(root / "spec.peft", copy.deepcopy(base))    # peftc's own unmerged graph
    with torch.no_grad():
        assert max_diff(unmerged(input_ids=ids)["logits"], _logits(merged, ids)) <= TOL


def test_merge_equals_fold_and_keeps_bf16(tmp_path):
    """bf16 model, two adapters (a fresh DoRA whose magnitude is computed from W, then a LoRA with a fresh copy of
    the head): every tensor keeps its dtype and shard; merged weights are the traced `fold` pass's, bit for bit."""
    import transformers as T
    base = _llama(False, torch.bfloat16)
    src = _save(base, tmp_path / "model")
    spec = tmp_path / "s.peft"
    spec.write_text('adapter d: dora(r = 2, init = "random") { targets q_proj, down_proj }\n'
                    'adapter l: lora(r = 4, alpha = 8, init = "random") { targets q_proj, v_proj\n save lm_head }\n')
    assert main(["-q", "merge", str(spec), str(src), "-o", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    for f in src.glob("*.safetensors"):
        a, b = read_header(f), read_header(out / f.name)
        assert {k: (i.dtype, i.shape) for k, i in a.tensors.items()} == \
               {k: (i.dtype, i.shape) for k, i in b.tensors.items()}
    gm = peftc.compile(spec, T.LlamaForCausalLM.from_pretrained(src).eval(), merge=True)
    merged = T.LlamaForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == torch.bfloat16
    sd = dict(gm.named_parameters())
    changed = 0
    for name, p in merged.named_parameters():
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, sd[name]), name
        changed += not torch.equal(p, base.get_parameter(name))
    assert changed == 6


def _merge_gives_peft(tmp_path: Path, base, pm, load, x: dict) -> torch.Tensor:
    """Randomize and save `pm`'s adapter, `peftc merge` the model folder saved at tmp_path/model, load the result
    with `load(dir)`, and check it gives `pm`'s outputs (which differ from `base`'s). Returns those outputs."""
    randomize_(pm, 1)
    pm.save_pretrained(tmp_path / "adapter")
    (tmp_path / "s.peft").write_text('adapter a: import "adapter"\n')
    assert main(["-q", "merge", str(tmp_path / "s.peft"), str(tmp_path / "model"), "-o", str(tmp_path / "out")]) == 0
    merged = load(tmp_path / "out").eval()
    want = peftc_logits(pm, x)
    assert max_diff(peftc_logits(merged, x), want) <= TOL and max_diff(peftc_logits(base, x), want) > CHANGED
    return want


@pytest.mark.parametrize("bias", [False, True], ids=["tied-wte", "lora-bias"])
def test_merge_and_lower_gpt2(tmp_path, bias):
    """GPT-2: Conv1D weights stored (in, out); a LoRA on the embedding `wte`, which the head reads too, or with
    lora_bias (the merged bias; lowered: lora_B.bias). Merged and lowered (rank 4: exact) both give peft's
    unmerged outputs."""
    import transformers as T
    from peft import PeftModel
    base = gpt2()
    base.save_pretrained(tmp_path / "model", max_shard_size="100KB")
    targets = ["c_attn", "c_fc"] + ([] if bias else ["wte"])
    pm = peft.get_peft_model(copy.deepcopy(base), lora(target_modules=targets, fan_in_fan_out=True,
                                                       lora_bias=bias)).eval()
    x = inputs_for("gpt2")
    want = _merge_gives_peft(tmp_path, base, pm, T.GPT2LMHeadModel.from_pretrained, x)
    assert main(["-q", "lower", str(tmp_path / "s.peft"), str(tmp_path / "model"), "--rank", "4",
                 "-o", str(tmp_path / "low")]) == 0
    cfg = json.loads((tmp_path / "low" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["lora_bias"] is bias
    lowered = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "low").eval()
    assert max_diff(peftc_logits(lowered, x), want) <= TOL


MERGE_GPT2_CASES = {
    # peft's bias = "all" / "lora_only": trained biases replace the model's (of adapted and other layers)
    "bias-all": lambda: lora(target_modules=["c_attn"], fan_in_fan_out=True, bias="all"),
    "bias-lora_only": lambda: lora(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, bias="lora_only"),
    # trainable tokens on wte, which the head reads too (peft ties the rows): merged, the group stays tied
    "tokens-tied-wte": lambda: peft.TrainableTokensConfig(target_modules=["wte"], token_indices=[1, 2, 300]),
    "lora-with-tokens": lambda: lora(target_modules=["c_attn"], fan_in_fan_out=True, trainable_token_indices=[3, 7]),
}


@pytest.mark.parametrize("case", list(MERGE_GPT2_CASES))
def test_merge_gpt2_trained_biases_and_tied_tokens(tmp_path, capsys, case):
    """`peftc merge` and `peftc lower` give peft's outputs where the adapter trains more than its layers: biases,
    tied token rows (which lowering refuses: the head reads them too)."""
    import transformers as T
    base = gpt2()
    base.save_pretrained(tmp_path / "model")
    pm = peft.get_peft_model(copy.deepcopy(base), MERGE_GPT2_CASES[case]()).eval()
    x = inputs_for("gpt2")
    want = _merge_gives_peft(tmp_path, base, pm, T.GPT2LMHeadModel.from_pretrained, x)
    # lowered: the trained biases go with the LoRA (same `bias` option); tied token rows cannot be a LoRA
    code = main(["-q", "lower", str(tmp_path / "s.peft"), str(tmp_path / "model"), "--rank", "8",
                 "-o", str(tmp_path / "low")])
    if case.startswith("bias"):
        assert code == 0
        assert json.loads((tmp_path / "low" / "adapter_config.json").read_text())["bias"] == case[5:]
        lowered = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "low").eval()
        assert max_diff(peftc_logits(lowered, x), want) <= TOL
    else:
        assert code == 1 and "lm_head shares its weight and reads the adapted rows too" in capsys.readouterr().err


def _corrupt_missing_shard(model: Path) -> str:
    next(iter(sorted(model.glob("model-*.safetensors")))).unlink()
    return "is missing from"


def _corrupt_index_key(model: Path) -> str:
    f = model / "model.safetensors.index.json"
    index = json.loads(f.read_text())
    shards = sorted(set(index["weight_map"].values()))
    key = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][key] = shards[-1]
    f.write_text(json.dumps(index))
    return "is listed in model.safetensors.index.json but is not in this shard"


@pytest.mark.parametrize("case", ["missing-shard", "index-key", "not-mergeable", "out-not-empty"])
def test_merge_bad_input(tied, tmp_path, capsys, case):
    root = tied[0]
    model = tmp_path / "model"
    shutil.copytree(root / "model", model)
    spec = tmp_path / "s.peft"
    spec.write_text(f'adapter a: import "{root / "adapter"}"\n')
    out = tmp_path / "out"
    if case == "missing-shard":
        want = _corrupt_missing_shard(model)
    elif case == "index-key":
        want = _corrupt_index_key(model)
    elif case == "not-mergeable":
        spec.write_text('adapter b: lora(lora_bias = true) { targets q_proj }\n')
        want = "s.peft:1:9: adapter 'b' cannot be merged into 'model.layers.0.self_attn.q_proj'"
    else:
        out.mkdir()
        (out / "x").write_text("keep")
        want = "exists and is not empty"
    assert main(["-q", "merge", str(spec), str(model), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert want in err and "Traceback" not in err and err.count("peftc: error") == 1, err
    assert not out.exists() or (case == "out-not-empty" and (out / "x").read_text() == "keep")
    assert not list(tmp_path.glob(".out.*"))


def test_merge_interrupted_leaves_nothing(tied, tmp_path, monkeypatch):
    from peftc import safetensors_stream
    from peftc.spec.parse import read_spec
    from peftc.stream_merge import merge_checkpoint
    root = tied[0]
    calls = []
    real = safetensors_stream.ShardWriter.copy

    def flaky(self, *a, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(safetensors_stream.ShardWriter, "copy", flaky)
    with pytest.raises(KeyboardInterrupt):
        merge_checkpoint(read_spec(root / "spec.peft"), root / "model", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- lower
def _delta(module) -> torch.Tensor:
    return module.get_delta_weight("default").detach().double()


def _layers(pm) -> dict:
    from peft.tuners.tuners_utils import BaseTunerLayer
    return {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if isinstance(m, BaseTunerLayer)}


def _table(out: str) -> dict[str, tuple[int, float]]:
    rows = {}
    for line in out.splitlines():
        m = re.match(r"^(\S+)\s+(\S+)\s+(\d+)\s+([0-9.e+-]+)$", line)
        if m:
            rows[m.group(1)] = (int(m.group(3)), float(m.group(4)))
    return rows


@pytest.mark.parametrize("rank", ["auto", "3"])
def test_lower_loha_reports_true_errors(tmp_path, capsys, rank):
    """LoHa (rank up to 16 per layer) lowered with a fixed rank, and with --rank auto: peft loads the result;
    each printed error is ‖Δ_loha - Δ_lora‖ / ‖Δ_loha‖ with both deltas from peft itself."""
    from peft import PeftModel
    base, pm, d = peft_adapter("llama", peft.LoHaConfig(r=4, alpha=6, target_modules=["q_proj", "down_proj"]),
                               tmp_path)
    (tmp_path / "s.peft").write_text('adapter h: import "adapter"\n')
    args = ["lower", str(tmp_path / "s.peft"), "tiny-llama", "--rank", rank, "-o", str(tmp_path / "low")]
    if rank == "auto":
        args += ["--max-error", "0.05"]
    assert main(args) == 0
    rows = _table(capsys.readouterr().out)
    lowered = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "low").eval()
    want, got = _layers(pm), _layers(lowered)
    assert set(rows) == set(want) == set(got) and len(rows) == 4
    for name, (r, err) in rows.items():
        dw, dl = _delta(want[name]), _delta(got[name])
        true = (torch.linalg.norm(dw - dl) / torch.linalg.norm(dw)).item()
        assert abs(true - err) <= 0.005 * true + 1e-7, (name, err, true)   # printed with 3 digits
        assert got[name].r["default"] == r
        if rank == "auto":
            s = torch.linalg.svdvals(dw)
            assert err <= 0.05 and (r == 1 or (s[r - 1:] ** 2).sum().sqrt() / s.norm() > 0.05)   # the smallest
        else:
            assert r == 3 and err > 1e-3   # LoHa r=4 has rank up to 16: rank 3 is lossy


def test_lower_lora_is_exact_and_sums_active(tmp_path, capsys):
    """Two active LoRAs (r=4 on q/v, r=2 on q) on Linear and Embedding lower to one LoRA of rank <= 6 with ~zero
    error, whose outputs are peft's with both adapters active."""
    from peft import PeftModel
    base, pm, d = peft_adapter("llama", lora(target_modules=["q_proj", "v_proj", "embed_tokens"]), tmp_path)
    pm2 = peft.get_peft_model(copy.deepcopy(base), lora(r=2, target_modules=["q_proj"])).eval()
    randomize_(pm2, 5)
    pm2.save_pretrained(tmp_path / "second")
    pm.load_adapter(tmp_path / "second", adapter_name="second")
    pm.base_model.set_adapter(["default", "second"])
    (tmp_path / "s.peft").write_text('adapter a: import "adapter"\nadapter b: import "second"\n')
    assert main(["lower", str(tmp_path / "s.peft"), "tiny-llama", "--rank", "6", "-o", str(tmp_path / "low")]) == 0
    rows = _table(capsys.readouterr().out)
    assert len(rows) == 5 and all(err < 1e-6 for _, err in rows.values())
    assert {r for r, _ in rows.values()} == {6}
    lowered = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "low").eval()
    ids = _ids()
    assert max_diff(_logits(lowered, ids), _logits(pm, ids)) <= TOL
    assert max_diff(_logits(base, ids), _logits(pm, ids)) > CHANGED


@pytest.mark.parametrize("model,config,rank", [
    ("gpt2", lambda: lora(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True), 4),
    ("convnet", lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=["conv1", "conv2", "fc1"]), 4),
])
def test_lower_conv1d_and_conv2d(tmp_path, model, config, rank):
    """GPT-2 Conv1D (fan_in_fan_out) with DoRA and Conv2d (LoRA's kernel-in-A layout) with LoHa, at a rank that
    holds the whole update: peft's outputs of the lowered LoRA equal the original adapter's."""
    from peft import PeftModel

    from peftc.lower import lower_plan, write_lowered
    from peftc.plan import build_plan
    base, pm, d = peft_adapter(model, config(), tmp_path)
    plan = build_plan(peftc.parse_spec(f'adapter a: import "{d}"\n'), base)
    low = lower_plan(plan, base, rank, None)
    if model == "gpt2":   # DoRA's update is full rank: rank 4 is lossy, rank min(in, out) exact
        assert all(l.error > 1e-3 for l in low.layers)
        low = lower_plan(plan, base, 10_000, None)
    assert all(l.error < 1e-5 for l in low.layers), [(l.name, l.error) for l in low.layers]
    write_lowered(low, tmp_path / "low", {n: l.kind for n, l in plan.layers.items()}, None)
    lowered = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "low").eval()
    inputs = inputs_for(model)
    with torch.no_grad():
        a = peftc_logits(lowered, inputs)
        b = peftc_logits(pm, inputs)
    assert max_diff(a, b) <= 1e-4 and max_diff(peftc_logits(base, inputs), b) > CHANGED


def test_lower_streams_a_model_directory(tied, tmp_path, capsys):
    """On a sharded model directory `lower` plans on the skeleton and reads one layer at a time: the imported
    LoRA (tied embedding, a copy of the head) lowers exactly, and a fresh DoRA (magnitude computed from W)
    lowers to the same factors as from the loaded model."""
    from peft import PeftModel

    from peftc.lower import lower_plan
    from peftc.plan import build_plan
    root, base, pm = tied
    assert main(["lower", str(root / "spec.peft"), str(root / "model"), "--rank", "4", "-o", str(tmp_path / "a")]) == 0
    assert all(err < 1e-6 for _, err in _table(capsys.readouterr().out).values())
    lowered = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    ids = _ids()
    assert max_diff(_logits(lowered, ids), _logits(pm, ids)) <= TOL
    spec = tmp_path / "d.peft"
    spec.write_text('adapter d: dora(r = 2, init = "random") { targets q_proj, embed_tokens }\n')
    assert main(["-q", "lower", str(spec), str(root / "model"), "--rank", "3", "-o", str(tmp_path / "b")]) == 0
    want = lower_plan(build_plan(peftc.parse_spec(spec.read_text()), base), base, 3, None)
    from safetensors.torch import load_file
    got = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    for layer in want.layers:
        for key, t in layer.tensors.items():
            assert torch.allclose(got[f"base_model.model.{layer.name}.{key}"], t, atol=1e-6), (layer.name, key)


def peftc_logits(model, inputs):
    with torch.no_grad():
        return logits_of(model(**inputs)).float()


def test_lower_bad_input(tmp_path, capsys):
    (tmp_path / "s.peft").write_text('adapter a: loha(r = 2, init = "random") { targets q_proj }\n')
    cases = [(["--rank", "auto"], "--rank auto needs --max-error"),
             (["--rank", "x"], "give a positive integer or 'auto'"),
             (["--rank", "1", "--max-error", "1e-9"], "is above --max-error")]
    for extra, want in cases:
        assert main(["-q", "lower", str(tmp_path / "s.peft"), "tiny-llama", *extra, "-o", str(tmp_path / "o")]) == 1
        err = capsys.readouterr().err
        assert want in err and "Traceback" not in err, err
        assert not (tmp_path / "o").exists()


def test_merged_layer_is_fold(tiny_llama):
    """The pure function equals the traced fold on every layer (several adapters, merged in order)."""
    from peftc.merged_weight import merged_layer
    from peftc.plan import build_plan
    spec = peftc.parse_spec('adapter a: loha(r = 2, init = "random") { targets q_proj, down_proj }\n'
                            'adapter b: dora(r = 2, init = "random") { targets q_proj, embed_tokens }\n')
    gm = peftc.compile(spec, copy.deepcopy(tiny_llama), merge=True)
    plan = build_plan(spec, tiny_llama)
    params = dict(gm.named_parameters())
    shared = {n: ap.shared for n, ap in plan.adapters.items()}
    for lname, sas in plan.sites.items():
        layer = plan.layers[lname]
        w, _ = merged_layer(tiny_llama.get_parameter(layer.weight), None, layer.kind, sas, shared, lname)
        assert torch.equal(w, params[layer.weight]), lname



def test_python_api_merge_and_lower(tied, tied_merged, tmp_path):
    """`peftc.merge_model` and `peftc.lower_to_lora` do what the commands do: the same merged shards, and a
    lowered checkpoint whose per-layer errors the return value reports (peft loads it)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    root, base, pm = tied
    out = tmp_path / "merged"
    done = peftc.merge_model(root / "spec.peft", root / "model", out)
    assert done.out == out and done.layers and done.untied
    for shard in tied_merged.glob("*.safetensors"):
        want, got = load_file(shard), load_file(out / shard.name)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    low = peftc.lower_to_lora('adapter a: import "' + str(root / "adapter") + '"', copy.deepcopy(base),
                              max_error=1e-5, output=tmp_path / "low")
    assert low.path == tmp_path / "low" and all(l.error <= 1e-5 and l.rank <= 4 for l in low.layers)
    assert {l.name.rsplit(".", 1)[-1] for l in low.layers} == {"embed_tokens", "q_proj", "v_proj"}
    lowered = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "low").eval()   # with the head's copy
    ids = _ids()
    assert max_diff(_logits(lowered, ids), _logits(pm, ids)) <= TOL
    with pytest.raises(peftc.PeftcError, match="rank, a max_error"):
        peftc.lower_to_lora('adapter a: import "' + str(root / "adapter") + '"', copy.deepcopy(base))


def test_merge_model_folder_whose_file_keys_transformers_renames(tmp_path):
    """transformers 5 stores some families under other keys than its modules' names and renames them as it loads
    (ViT: `vit.encoder.layer.0.attention.attention.query.weight` for the module `vit.layers.0.attention.q_proj`).
    `peftc merge` plans on the model's names, reads and writes the file's keys: transformers loads the merged
    folder and gives peft's outputs (a LoRA on q/v and a saved classifier)."""
    import transformers as T
    from safetensors import safe_open
    torch.manual_seed(0)
    cfg = T.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=48, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=96, num_labels=5)
    T.ViTForImageClassification(cfg).eval().save_pretrained(tmp_path / "model")
    keys = set(safe_open(str(tmp_path / "model" / "model.safetensors"), "pt").keys())
    assert not any(".q_proj." in k for k in keys), "the file keys are the model's names: this test tests nothing"
    base = T.ViTForImageClassification.from_pretrained(tmp_path / "model").eval()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                          modules_to_save=["classifier"])
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    x = {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))}
    _merge_gives_peft(tmp_path, base, pm, T.ViTForImageClassification.from_pretrained, x)
    assert set(safe_open(str(tmp_path / "out" / "model.safetensors"), "pt").keys()) == keys
