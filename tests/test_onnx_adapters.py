"""Switchable ONNX (`export --adapters-as-inputs`, `export-adapter`) against real peft: one onnxruntime session
switches between `.onnx_adapter` files and no adapter, each run compared with peft with that adapter active and
with the base model; a second checkpoint of another rank and alpha becomes a file for the same model; refusals.

Exports are few and shared (session fixtures): a one-LoRA model (Olive's input names) and a LoRA + LoHa model
(inputs per adapter; files active together add up, as peft's several active adapters)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import CHANGED, MODELS, inputs_for, randomize_

import peftc
from peftc.cli import main
from peftc.emit.onnx_adapters import adapter_session, read_model_adapters, run_with_adapters
from peftc.errors import PeftcError

peft = pytest.importorskip("peft")
TOL = 1e-4   # onnxruntime vs peft (the bound)

CONFIGS = {
    "a": lambda: peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                 target_modules=["q_proj", "v_proj", "down_proj"]),
    # the same targets, another rank and alpha: a file for the model exported from "a"
    "c": lambda: peft.LoraConfig(r=6, lora_alpha=3, init_lora_weights=False,
                                 target_modules=["q_proj", "v_proj", "down_proj"]),
    "h": lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "up_proj"], init_weights=False),
    "h2": lambda: peft.LoHaConfig(r=3, alpha=9, target_modules=["q_proj", "up_proj"], init_weights=False),
    "k": lambda: peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["k_proj"]),
}
# other additive methods, each on its own layers, all in one model (each file alone vs that method in peft)
METHODS = {
    "lokr": lambda: peft.LoKrConfig(r=2, alpha=6, target_modules=["k_proj"], decompose_both=True),
    "adalora": lambda: peft.AdaLoraConfig(init_r=6, target_r=4, lora_alpha=12, total_step=10,
                                          target_modules=["v_proj"]),
    "vera": lambda: peft.VeraConfig(r=8, target_modules=["o_proj"]),
    "miss": lambda: peft.MissConfig(r=8, target_modules=["gate_proj"]),
    "delora": lambda: peft.DeloraConfig(r=4, delora_lambda=5, target_modules=["up_proj"]),
}


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("ckpts")
    out = {}
    for i, (name, make) in enumerate(CONFIGS.items()):
        pm = peft.get_peft_model(copy.deepcopy(MODELS["llama"]()), make()).eval()
        randomize_(pm, seed=20 + i)
        pm.save_pretrained(str(tmp / name))
        out[name] = tmp / name
    return out


@pytest.fixture(scope="session")
def methods(tmp_path_factory):
    """(checkpoint dirs, export) of a model with one adapter per method of METHODS."""
    tmp = tmp_path_factory.mktemp("methods")
    dirs = {}
    for i, (name, make) in enumerate(METHODS.items()):
        pm = peft.get_peft_model(copy.deepcopy(MODELS["llama"]()), make()).eval()
        randomize_(pm, seed=40 + i)
        pm.save_pretrained(str(tmp / name))
        dirs[name] = tmp / name
    spec = "".join(f'adapter {n}: import "{d}"\n' for n, d in dirs.items())
    gm = peftc.compile(spec, MODELS["llama"](), adapters_as_inputs=True)
    return dirs, peftc.export_onnx(gm, tmp / "model.onnx", adapters_as_inputs=True)


@pytest.fixture(scope="session")
def single(ckpts, tmp_path_factory):
    """The model of one LoRA ("a") with adapter inputs, and its adapter file."""
    d = tmp_path_factory.mktemp("single")
    gm = peftc.compile(f'adapter a: import "{ckpts["a"]}"\n', MODELS["llama"](), adapters_as_inputs=True)
    done = peftc.export_onnx(gm, d / "model.onnx", adapters_as_inputs=True)
    return done


@pytest.fixture(scope="session")
def pair(ckpts, tmp_path_factory):
    """The model of a LoRA ("a") and a LoHa ("h"), each with its own inputs and file."""
    d = tmp_path_factory.mktemp("pair")
    spec = f'adapter a: import "{ckpts["a"]}"\nadapter h: import "{ckpts["h"]}"\nactive a\n'
    gm = peftc.compile(spec, MODELS["llama"](), adapters_as_inputs=True)
    return peftc.export_onnx(gm, d / "model.onnx", adapters_as_inputs=True)


def _peft(ckpts, names: list[str]):
    base = MODELS["llama"]()
    mixed = len({CONFIGS[n]().peft_type for n in names}) > 1
    cls = peft.PeftMixedModel if mixed else peft.PeftModel
    pm = cls.from_pretrained(base, str(ckpts[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(ckpts[n]), adapter_name=n)
    return pm.eval()


def _logits(pm, inputs, active: list[str] | None) -> np.ndarray:
    with torch.no_grad():
        if active is None:
            with pm.disable_adapter():
                return pm(**inputs).logits.numpy()
        pm.base_model.set_adapter(active if len(active) > 1 else active[0])
        return pm(**inputs).logits.numpy()


def _feeds(inputs) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in inputs.items()}


def test_one_session_switches_files_and_no_adapter(single, ckpts, tmp_path):
    """One session: no adapter, the spec's file, a second checkpoint's file (rank 6, alpha 3), no adapter again."""
    other = tmp_path / "c.onnx_adapter"
    info = peftc.export_adapter(ckpts["c"], single.model, other, model=MODELS["llama"]())
    assert info["diff"] is not None and info["diff"] < TOL and not info["missing"]
    pm = _peft(ckpts, ["a", "c"])
    inputs = inputs_for("llama", batch=2, seq=11)
    sess = adapter_session(single.model)
    base = _logits(pm, inputs, None)
    runs = [([], None), ([single.adapters["a"]], ["a"]), ([other], ["c"]), ([], None), ([single.adapters["a"]], ["a"])]
    for files, active in runs:
        got = run_with_adapters(sess, _feeds(inputs), files)[0]
        want = _logits(pm, inputs, active)
        assert np.abs(got - want).max() <= TOL, (files, active)
        if active is not None:
            assert np.abs(got - base).max() > CHANGED   # the adapter really acts
        else:
            assert np.abs(got - base).max() <= TOL


def test_olive_names_defaults_and_metadata(single):
    m = onnx.load(str(single.model), load_external_data=False)
    inits = {t.name: list(t.dims) for t in m.graph.initializer}
    names = [i.name for i in m.graph.input if i.name in inits]
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert "model.layers.1.mlp.down_proj.lora_B.weight" in names
    assert len(names) == 2 * 3 * 2                 # A and B on 3 targets in 2 layers
    assert inits["model.layers.0.self_attn.q_proj.lora_A.weight"] == [0, 64]    # rank 0: the base model
    assert inits["model.layers.0.self_attn.q_proj.lora_B.weight"] == [64, 0]
    info = read_model_adapters(single.model)
    assert info.adapters == {"a": "lora"}
    rec = {r["name"]: r for r in info.inputs}
    assert rec["model.layers.0.self_attn.q_proj.lora_A.weight"]["shape"] == [None, 64]
    assert rec["model.layers.0.self_attn.q_proj.lora_B.weight"]["scaled"]        # B holds s * B, as Olive's
    import onnxruntime as ort
    params = ort.AdapterFormat.read_adapter(str(single.adapters["a"])).get_parameters()
    assert set(params) == set(names)


def test_several_adapters_each_file_and_both(pair, ckpts):
    """LoRA + LoHa: each file alone, both at once (peft's set_adapter([a, h])), none, in one session."""
    pm = _peft(ckpts, ["a", "h"])
    inputs = inputs_for("llama", batch=3, seq=9)
    sess = adapter_session(pair.model)
    a, h = pair.adapters["a"], pair.adapters["h"]
    for files, active in [([a], ["a"]), ([h], ["h"]), ([a, h], ["a", "h"]), ([], None), ([h], ["h"])]:
        got = run_with_adapters(sess, _feeds(inputs), files)[0]
        assert np.abs(got - _logits(pm, inputs, active)).max() <= TOL, active
    assert any(".hada_w1_a.h" in n for n in pair.inputs) and any(".lora_A.a.weight" in n for n in pair.inputs)


def test_export_adapter_into_a_slot_of_several(pair, ckpts, tmp_path):
    out = tmp_path / "h2.onnx_adapter"
    with pytest.raises(PeftcError, match="inputs for 2 adapters .*--adapter NAME"):
        peftc.export_adapter(ckpts["c"], pair.model, out, model=MODELS["llama"]())
    info = peftc.export_adapter(ckpts["c"], pair.model, out, model=MODELS["llama"](), adapter="a")
    assert info["diff"] < TOL
    # LoHa's scale alpha / r is a constant of the graph: another alpha / r cannot fill the model's LoHa inputs
    with pytest.raises(PeftcError, match="options change the model's graph"):
        peftc.export_adapter(ckpts["h2"], pair.model, tmp_path / "x.onnx_adapter", model=MODELS["llama"](),
                             adapter="h")
    assert not (tmp_path / "x.onnx_adapter").exists()


def test_export_adapter_mismatches(single, ckpts, tmp_path):
    out = tmp_path / "x.onnx_adapter"
    with pytest.raises(PeftcError, match="a loha checkpoint, but the model's adapter 'a' is lora"):
        peftc.export_adapter(ckpts["h"], single.model, out, model=MODELS["llama"]())
    with pytest.raises(PeftcError, match=r"layer 'model\.layers\.0\.self_attn\.k_proj' has tensor 'lora_A\.weight', "
                                         r"but .* has no input 'model\.layers\.0\.self_attn\.k_proj\.lora_A\.weight'"):
        peftc.export_adapter(ckpts["k"], single.model, out, model=MODELS["llama"]())
    with pytest.raises(PeftcError, match="does not record which MODEL"):
        peftc.export_adapter(ckpts["c"], single.model, out)
    with pytest.raises(PeftcError, match="ending in .onnx_adapter"):
        peftc.export_adapter(ckpts["c"], single.model, tmp_path / "x.onnx", model=MODELS["llama"]())
    with pytest.raises(PeftcError, match="not a PEFT checkpoint directory"):
        peftc.export_adapter(tmp_path, single.model, out, model=MODELS["llama"]())
    # a checkpoint with a tensor missing: named, with the layer
    import shutil

    from safetensors.torch import load_file, save_file
    broken = tmp_path / "broken"
    shutil.copytree(ckpts["c"], broken)
    tensors = load_file(str(broken / "adapter_model.safetensors"))
    del tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    save_file(tensors, str(broken / "adapter_model.safetensors"))
    with pytest.raises(PeftcError, match=r"^\S*adapter_model.safetensors: missing tensor "
                                         r"'base_model.model.model.layers.1.mlp.down_proj.lora_B.weight'"):
        peftc.export_adapter(broken, single.model, out, model=MODELS["llama"]())
    assert not out.exists()


def test_export_adapter_checks_shapes(single, ckpts, tmp_path):
    """A fixed dim that differs (here the model's record says another input width) is an error naming the tensor."""
    m = onnx.load(str(single.model))
    meta = {p.key: p for p in m.metadata_props}
    recs = json.loads(meta["peftc.adapter_inputs"].value)
    for r in recs:
        if r["name"] == "model.layers.0.self_attn.q_proj.lora_A.weight":
            r["shape"] = [None, 65]
    meta["peftc.adapter_inputs"].value = json.dumps(recs)
    bent = tmp_path / "bent.onnx"
    onnx.save(m, str(bent))
    with pytest.raises(PeftcError, match=r"tensor 'lora_A.weight' of layer 'model.layers.0.self_attn.q_proj' has "
                                         r"shape \[6, 64\], but the model's input .* takes \[\?, 65\]"):
        peftc.export_adapter(ckpts["c"], bent, tmp_path / "x.onnx_adapter", model=MODELS["llama"]())


@pytest.mark.parametrize("spec, message", [
    ('adapter s: ia3() { targets q_proj }', r"adapter 's' \(ia3\) on .* cannot be switched at run time"),
    ('adapter d: dora(r = 2) { targets q_proj }', r"adapter 'd' \(dora\) on .* cannot be switched at run time"),
    ('adapter m: lora(r = 2) { targets q_proj\n merge }', "adapter 'm' is declared with `merge`"),
    ('adapter t: lora(r = 2) { targets q_proj\n save lm_head }', "adapter 't' has `save` modules"),
])
def test_refusals(spec, message):
    with pytest.raises(PeftcError, match=message):
        peftc.compile(spec + "\n", "tiny-llama", adapters_as_inputs=True)


def test_cli_refusals(tmp_path, capsys, single):
    plain = tmp_path / "plain.onnx"
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])), str(plain))
    assert main(["export-adapter", str(tmp_path), "--like", str(plain), "-o", str(tmp_path / "x.onnx_adapter")]) == 1
    assert "has no adapter inputs (export it with `peftc export SPEC MODEL --adapters-as-inputs`)" in \
        capsys.readouterr().err
    assert main(["export-adapter", str(tmp_path), "--like", str(single.model), "-o", str(tmp_path / "x.onnx")]) == 1
    assert "writes a .onnx_adapter file" in capsys.readouterr().err
    spec = tmp_path / "x.peft"
    spec.write_text("adapter a: lora() { targets q_proj }\n")
    assert main(["export", str(spec), "tiny-llama", "--adapters-as-inputs", "--adapter-ids", "-o",
                 str(tmp_path / "m.onnx")]) == 1
    assert "--adapters-as-inputs and --adapter-ids do not go together" in capsys.readouterr().err


def test_other_additive_methods_switch(methods):
    """LoKr, AdaLoRA, VeRA, MiSS, DeLoRA: each file alone, in one session, vs peft with that adapter; none vs base."""
    dirs, done = methods
    inputs = inputs_for("llama", batch=2, seq=7)
    sess = adapter_session(done.model)
    base = None
    for name, d in dirs.items():
        pm = peft.PeftModel.from_pretrained(MODELS["llama"](), str(d)).eval()
        with torch.no_grad():
            want = pm(**inputs).logits.numpy()
            if base is None:
                with pm.disable_adapter():
                    base = pm(**inputs).logits.numpy()
        got = run_with_adapters(sess, _feeds(inputs), [done.adapters[name]])[0]
        assert np.abs(got - want).max() <= TOL, name
        assert np.abs(got - base).max() > CHANGED, name
    got = run_with_adapters(sess, _feeds(inputs), [])[0]
    assert np.abs(got - base).max() <= TOL
    info = read_model_adapters(done.model)
    assert info.adapters == {n: n for n in METHODS}
    shapes = {r["name"]: r["shape"] for r in info.inputs}
    # AdaLoRA's rank is free (0 by default); VeRA's adapter-level projections keep their shape
    assert shapes["model.layers.0.self_attn.v_proj.lora_A.adalora"] == [None, 64]
    assert shapes["vera_A.vera"] == [8, 64]


@pytest.mark.parametrize("config", [
    lambda: peft.FourierFTConfig(n_frequency=50, scaling=20.0, target_modules=["q_proj", "v_proj"]),
    lambda: peft.ShiraConfig(r=2, target_modules=["q_proj"], init_weights=False),
], ids=["fourierft", "shira"])
def test_deltas_built_in_the_weights_shape_switch_too(config, tmp_path):
    """FourierFT and SHiRA scatter their values into a zero matrix shaped like W: additive, so they switch at run
    time (a gate) and in ONNX (a file, and none = the base model), each equal to peft."""
    from conftest import max_diff, peft_adapter, run_logits
    base, pm, d = peft_adapter("llama", config(), tmp_path, seed=3)
    x = inputs_for("llama")
    want, plain = run_logits(pm, x), run_logits(base, x)
    assert max_diff(want, plain) > CHANGED
    gm = peftc.compile(f'adapter f: import "{d}"', MODELS["llama"](), switchable=True)
    assert max_diff(run_logits(gm, x), want) <= 1e-5
    gm.disable_adapters()
    assert max_diff(run_logits(gm, x), plain) <= 1e-5
    gm = peftc.compile(f'adapter f: import "{d}"', MODELS["llama"](), adapters_as_inputs=True)
    done = peftc.export_onnx(gm, tmp_path / "m.onnx", adapters_as_inputs=True)
    sess = adapter_session(done.model)
    feeds = {k: v.numpy() for k, v in x.items()}
    assert np.abs(run_with_adapters(sess, feeds, [])[0] - plain.numpy()).max() <= 1e-4
    assert np.abs(run_with_adapters(sess, feeds, [done.adapters["f"]])[0] - want.numpy()).max() <= 1e-4
