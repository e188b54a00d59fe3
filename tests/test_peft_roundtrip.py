"""Checkpoint round trips between peft, peftc and transformers.

* peft -> peftc (`import`) -> `peftc.save_adapter` -> `PeftModel.from_pretrained`: identical outputs and tensors;
* a fresh peftc adapter, trained a few AdamW steps (train=True) -> `save_adapter` -> loads in peft
  (`PeftModel.from_pretrained`) and in transformers (`model.load_adapter`) with identical outputs.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import (
    CHANGED,
    MODELS,
    TOL,
    compile_on,
    inputs_for,
    logits_of,
    lora,
    max_diff,
    peft_adapter,
    randomize_,
    run_logits,
)
from peft import IA3Config, PeftModel
from safetensors.torch import load_file
from torch import nn

import peftc


def _tensors(d) -> dict[str, torch.Tensor]:
    return load_file(str(d / "adapter_model.safetensors"))


def _config(d) -> dict:
    return json.loads((d / "adapter_config.json").read_text())


def _load_peft(model_name: str, d, **kw) -> nn.Module:
    return PeftModel.from_pretrained(MODELS[model_name](), str(d), **kw).eval()


# ---------------------------------------------------------------- peft -> peftc -> peft
IMPORT_CASES = {
    "llama-lora-patterns": ("llama", lambda: lora(target_modules=["q_proj", "v_proj", "o_proj"], use_rslora=True,
                                                  rank_pattern={"q_proj": 8, "model.layers.1.self_attn.v_proj": 2},
                                                  alpha_pattern={"o_proj": 3})),
    "llama-layers": ("llama", lambda: lora(target_modules=["q_proj", "down_proj"], layers_to_transform=[1],
                                           layers_pattern="layers")),
    "gpt2-conv1d-lora_bias": ("gpt2", lambda: lora(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                                                   lora_bias=True)),
    "bert-seqcls": ("bert-cls", lambda: lora(target_modules=["query", "value"], task_type="SEQ_CLS")),
    "convnet-conv2d-mts": ("convnet", lambda: lora(r=2, lora_alpha=4, target_modules=["conv1", "conv2"],
                                                   modules_to_save=["fc2"])),
    "token-mlp-embedding": ("token-mlp", lambda: lora(target_modules=["emb", "lin0"])),
    "llama-dora": ("llama", lambda: lora(target_modules=["q_proj", "v_proj"], use_dora=True)),
    "gpt2-dora": ("gpt2", lambda: lora(target_modules=["c_attn"], use_dora=True, fan_in_fan_out=True)),
    "llama-ia3": ("llama", lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                             feedforward_modules=["down_proj"], init_ia3_weights=False)),
    "gpt2-ia3": ("gpt2", lambda: IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                                           fan_in_fan_out=True, init_ia3_weights=False)),
}


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_import_save_reload_in_peft(case, tmp_path):
    model_name, make_config = IMPORT_CASES[case]
    base, pm, src = peft_adapter(model_name, make_config(), tmp_path)
    x = inputs_for(model_name)
    ref = run_logits(pm, x)
    assert max_diff(ref, run_logits(base, x)) > CHANGED
    gm = compile_on(f'adapter default: import "{src}"', model_name)
    out = tmp_path / "resaved"
    written = peftc.save_adapter(gm, out)
    assert [str(p) for p in written] == [str(out)]
    # the same tensors under the same keys
    theirs, ours = _tensors(src), _tensors(out)
    assert set(ours) == set(theirs)
    for k, t in theirs.items():
        assert ours[k].shape == t.shape and ours[k].dtype == t.dtype, k
        assert torch.equal(ours[k], t), k
    # a config peft reads back to the same adapter
    c_src, c_out = _config(src), _config(out)
    # (layers_to_transform / layers_pattern need not survive: peftc writes the expanded module names)
    for key in ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "lora_bias", "fan_in_fan_out", "task_type"):
        if key in c_src and c_src[key] not in (None, False, []):
            assert c_out.get(key) == c_src[key], key
    # loads in peft, same outputs
    reloaded = _load_peft(model_name, out)
    assert max_diff(run_logits(reloaded, x), ref) <= TOL
    assert max_diff(run_logits(gm, x), ref) <= TOL


# ---------------------------------------------------------------- a fresh peftc adapter, trained
def _train(gm, x, steps: int = 3, lr: float = 1e-2) -> None:
    params = [p for p in gm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    with torch.no_grad():
        target = torch.randn(logits_of(gm(**x)).shape, generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        opt.zero_grad()
        loss = (logits_of(gm(**x)) - target).square().mean()
        loss.backward()
        opt.step()


FRESH_CASES = {
    # name: (model, spec body, adapter tensor names that must be trainable (suffixes), dropout module stems)
    "llama-lora-dropout": ("llama", "lora(r = 4, alpha = 8, dropout = 0.1) {\n targets q_proj, v_proj\n}",
                           ["lora_A.default.weight", "lora_B.default.weight"], ["lora_dropout.default"]),
    "gpt2-lora-conv1d": ("gpt2", "lora(r = 4, alpha = 16, rslora = true, dropout = 0.2) {\n targets c_attn, c_fc\n}",
                         ["lora_A.default.weight", "lora_B.default.weight"], ["lora_dropout.default"]),
    "bert-lora-save-classifier": ("bert-cls", "lora(r = 2, alpha = 4, lora_bias = true) {\n targets query, value\n"
                                  " save classifier\n}", ["lora_A.default.weight", "lora_B.default.weight",
                                                          "lora_B.default.bias",
                                                          "classifier.modules_to_save.default.weight"], []),
    "llama-dora": ("llama", "dora(r = 4, alpha = 8, dropout = 0.1) {\n targets q_proj, v_proj, down_proj\n}",
                   ["lora_A.default.weight", "lora_B.default.weight", "lora_magnitude_vector.default"],
                   ["lora_dropout.default"]),
    "llama-ia3": ("llama", "ia3() {\n targets k_proj, v_proj, down_proj\n feedforward down_proj\n}",
                  ["ia3_l.default"], []),
    "gpt2-ia3": ("gpt2", "ia3() {\n targets c_attn, mlp.c_proj\n feedforward mlp.c_proj\n}", ["ia3_l.default"], []),
}


@pytest.fixture(scope="module", params=list(FRESH_CASES))
def trained(request, tmp_path_factory):
    """A fresh peftc adapter compiled with train=True, trained 3 AdamW steps, saved with save_adapter."""
    name = request.param
    model_name, body, trainable, dropouts = FRESH_CASES[name]
    base = MODELS[model_name]()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    base_names = set(dict(base.named_parameters()))
    x = inputs_for(model_name)
    gm = compile_on(f"adapter default: {body}\n", model_name, base, train=True)
    info = {"name": name, "model": model_name, "x": x, "gm": gm, "base_out": run_logits(base, x),
            "base_state": base_state, "base_names": base_names, "trainable": trainable, "dropouts": dropouts}
    info["requires_grad"] = {n: p.requires_grad for n, p in gm.named_parameters()}
    info["before"] = {n: p.detach().clone() for n, p in gm.named_parameters()}
    assert gm.training
    _train(gm, x)
    info["train_outs"] = [logits_of(gm(**x)).detach() for _ in range(2)]
    gm.eval()
    info["eval_outs"] = [run_logits(gm, x) for _ in range(2)]
    d = tmp_path_factory.mktemp(name) / "adapter"
    peftc.save_adapter(gm, d)
    info["dir"] = d
    return info


def test_only_adapter_tensors_are_trainable(trained):
    rg = trained["requires_grad"]
    base = [n for n in rg if n in trained["base_names"]]
    adapter = [n for n in rg if n not in trained["base_names"]]
    assert base and adapter
    assert not any(rg[n] for n in base), [n for n in base if rg[n]]
    assert all(rg[n] for n in adapter), [n for n in adapter if not rg[n]]
    for suffix in trained["trainable"]:
        assert any(n.endswith(suffix) for n in adapter), (suffix, adapter)


def test_training_changes_only_the_adapter(trained):
    gm, before = trained["gm"], trained["before"]
    now = dict(gm.named_parameters())
    for n in trained["base_names"]:
        if n in now:
            assert torch.equal(now[n], before[n]), n
            assert torch.equal(now[n], trained["base_state"][n]), n
    changed = [n for n in now if n not in trained["base_names"] and not torch.equal(now[n], before[n])]
    assert changed
    # the caller's model is untouched too
    assert max_diff(trained["eval_outs"][0], trained["base_out"]) > CHANGED


def test_dropout_modules(trained):
    gm = trained["gm"]
    mods = dict(gm.named_modules())
    drops = {n: m for n, m in mods.items() if isinstance(m, nn.Dropout)}
    if not trained["dropouts"]:
        assert not drops
        assert torch.equal(trained["train_outs"][0], trained["train_outs"][1])
        return
    for stem in trained["dropouts"]:
        hits = [n for n in drops if n.endswith(stem)]
        assert hits, (stem, list(drops))
    # active while training (the outputs differ from call to call), a no-op after eval()
    assert max_diff(trained["train_outs"][0], trained["train_outs"][1]) > CHANGED
    assert torch.equal(trained["eval_outs"][0], trained["eval_outs"][1])


def test_trained_adapter_loads_in_peft(trained):
    pm = _load_peft(trained["model"], trained["dir"])
    assert max_diff(run_logits(pm, trained["x"]), trained["eval_outs"][0]) <= TOL
    # and the file holds exactly the trained values
    gm_params = dict(trained["gm"].named_parameters())
    saved = _tensors(trained["dir"])
    # peft's in-memory names; DoRA's magnitude is a module in peft ('...lora_magnitude_vector.default.weight')
    peft_params = {n.removeprefix("base_model.model.").removesuffix("lora_magnitude_vector.default.weight")
                   + ("" if "lora_magnitude_vector" not in n else "lora_magnitude_vector.default"): p
                   for n, p in pm.named_parameters()}
    for n, p in gm_params.items():
        if n in trained["base_names"]:
            continue
        assert n in peft_params, (n, sorted(peft_params)[:10])
        assert torch.equal(peft_params[n].detach(), p.detach()), n
    assert len(saved) == sum(1 for n in gm_params if n not in trained["base_names"])


def _transformers_with_adapter(model_name: str, d) -> nn.Module:
    model = MODELS[model_name]()
    model.load_adapter(str(d))
    return model.eval()


def test_trained_adapter_loads_in_transformers(trained, tmp_path):
    x = trained["x"]
    out = run_logits(_transformers_with_adapter(trained["model"], trained["dir"]), x)
    # what transformers makes of peft's own checkpoint of the same adapter (peft loads ours, saves it again)
    pm = _load_peft(trained["model"], trained["dir"])
    pm.save_pretrained(str(tmp_path / "peft"))
    assert max_diff(out, run_logits(_transformers_with_adapter(trained["model"], tmp_path / "peft"), x)) <= TOL
    if FRESH_CASES[trained["name"]][1].startswith("dora"):
        # transformers 5.x load_adapter does not load DoRA's lora_magnitude_vector (peft's own checkpoints
        # included: it keeps the freshly initialised magnitude), so only the comparison above applies
        return
    assert max_diff(out, trained["eval_outs"][0]) <= TOL


@pytest.mark.slow
def test_trained_adapter_reimports_in_peftc(trained):
    """save_adapter output is valid peftc input too: import it, merged and unmerged."""
    spec = f'adapter default: import "{trained["dir"]}"'
    for merge in (False, True):
        gm = compile_on(spec, trained["model"], merge=merge)
        assert max_diff(run_logits(gm, trained["x"]), trained["eval_outs"][0]) <= TOL


def test_saved_config_reflects_the_spec(trained):
    cfg = _config(trained["dir"])
    body = FRESH_CASES[trained["name"]][1]
    if body.startswith("ia3"):
        assert cfg["peft_type"] == "IA3"
        assert cfg["feedforward_modules"] and all(m.endswith(("down_proj", "mlp.c_proj"))
                                                  for m in cfg["feedforward_modules"])
        return
    assert cfg["peft_type"] == "LORA"
    assert cfg["use_dora"] == body.startswith("dora")
    assert cfg["fan_in_fan_out"] == (trained["model"] == "gpt2")
    if "dropout = " in body:
        assert cfg["lora_dropout"] == pytest.approx(float(body.split("dropout = ")[1].split(")")[0].split(",")[0]))


# ---------------------------------------------------------------- several adapters in one save
def test_two_fresh_adapters_save_to_subfolders(tmp_path):
    spec = ('adapter a: lora(r = 4, alpha = 8, init = "random") { targets q_proj, v_proj }\n'
            'adapter b: lora(r = 2, alpha = 2, init = "random") { targets v_proj, o_proj }\n')
    x = inputs_for("llama")
    gm = compile_on(spec, "llama")
    randomize_(gm, seed=4)
    ref = run_logits(gm, x)
    written = peftc.save_adapter(gm, tmp_path)
    assert sorted(p.name for p in written) == ["a", "b"]
    pm = PeftModel.from_pretrained(MODELS["llama"](), str(tmp_path / "a"), adapter_name="a")
    pm.load_adapter(str(tmp_path / "b"), adapter_name="b")
    pm.eval()
    pm.base_model.set_adapter(["a", "b"])
    assert max_diff(run_logits(pm, x), ref) <= TOL
    pm.base_model.set_adapter("a")
    assert max_diff(run_logits(pm, x), ref) > CHANGED


def test_default_adapter_saves_at_the_root(tmp_path):
    d, _ = _peft_default(tmp_path)
    gm = compile_on(f'adapter default: import "{d}"\nadapter extra: lora(r = 2) {{ targets q_proj }}\n', "llama")
    written = peftc.save_adapter(gm, tmp_path / "out")
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in written) == [".", "extra"]
    assert (tmp_path / "out" / "adapter_config.json").exists()
    assert (tmp_path / "out" / "extra" / "adapter_config.json").exists()


def _peft_default(tmp_path):
    _, pm, d = peft_adapter("llama", lora(target_modules=["v_proj"]), tmp_path)
    return d, pm


def test_merged_adapter_round_trip_keeps_its_tensors(tmp_path):
    """A merged adapter is saved with its (frozen) tensors: re-loading it in peft gives the merged function."""
    d, pm = _peft_default(tmp_path)
    x = inputs_for("llama")
    gm = compile_on(f'adapter default: import "{d}"', "llama", merge=True)
    peftc.save_adapter(gm, tmp_path / "out")
    theirs, ours = _tensors(d), _tensors(tmp_path / "out")
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert max_diff(run_logits(_load_peft("llama", tmp_path / "out"), x), run_logits(pm, x)) <= TOL


def test_modules_to_save_copy_is_independent_of_the_base(tmp_path):
    """Training a `save`d module changes only its copy; the base head stays as it was, in the graph and on disk."""
    x = inputs_for("convnet")
    base = MODELS["convnet"]()
    fc2 = base.fc2.weight.detach().clone()
    gm = compile_on('adapter default: lora(r = 2, alpha = 2) {\n targets fc1\n save fc2\n}', "convnet", base,
                    train=True)
    _train(gm, x)
    gm.eval()
    copy_w = gm.get_parameter("fc2.modules_to_save.default.weight")
    assert not torch.equal(copy_w, fc2)
    assert torch.equal(base.fc2.weight, fc2)
    peftc.save_adapter(gm, tmp_path)
    saved = _tensors(tmp_path)
    assert torch.equal(saved["base_model.model.fc2.weight"], copy_w.detach())
    pm = _load_peft("convnet", tmp_path)
    assert max_diff(run_logits(pm, x), run_logits(gm, x)) <= TOL
    pm2 = copy.deepcopy(pm).merge_and_unload()
    assert max_diff(run_logits(pm2, x), run_logits(gm, x)) <= TOL


# ---------------------------------------------------------------- `peftc save` without tracing
SAVE_CASES = {
    "multi": ('adapter style: lora(r = 8, alpha = 16, init = "random") { targets q_proj, v_proj\n merge }\n'
              'adapter task: lora(r = 4, alpha = 8, dropout = 0.1, rslora = true) {\n targets all-linear\n'
              ' exclude gate_proj\n r at down_proj = 8\n alpha at o_proj = 3 }\n'
              'adapter draft: ia3() { targets /model\\.layers\\.\\d+\\.self_attn\\.(k|v)_proj/\n'
              ' feedforward down_proj }\nactive style, task\n', "llama"),
    "import-merged": ('adapter default: import "{d}" { merge }\nadapter extra: dora(r = 2) { targets q_proj }\n',
                      "llama"),
    "gpt2-conv1d": ('adapter default: lora(r = 2, init = "gaussian", lora_bias = true) { targets c_attn, c_fc }',
                    "gpt2"),
    "modules-to-save": ('adapter default: lora(r = 2, alpha = 2) {\n targets fc1\n save fc2\n}', "convnet"),
}


@pytest.mark.parametrize("case", list(SAVE_CASES))
def test_save_from_the_plan_equals_save_from_the_graph(case, tmp_path):
    """`peftc save` writes the checkpoint from the plan, without tracing: byte for byte what `save_adapter`
    writes for the graph compiled from the same spec and model."""
    from peftc.emit.checkpoint import save_plan
    from peftc.plan import build_plan
    from peftc.spec.parse import parse_spec

    text, model_name = SAVE_CASES[case]
    if "{d}" in text:
        text = text.replace("{d}", str(_peft_default(tmp_path)[0]))
    model = MODELS[model_name]()
    gm = compile_on(text, model_name, model)
    traced = peftc.save_adapter(gm, tmp_path / "traced")
    planned = save_plan(build_plan(parse_spec(text), model), tmp_path / "planned",
                        base_model_name_or_path=gm.peftc.base_model_name_or_path)
    assert [p.relative_to(tmp_path / "planned") for p in planned] == \
        [p.relative_to(tmp_path / "traced") for p in traced]
    files = sorted(p.relative_to(tmp_path / "traced") for p in (tmp_path / "traced").rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(tmp_path / "planned")
                                     for p in (tmp_path / "planned").rglob("*") if p.is_file())
    for f in files:
        assert (tmp_path / "traced" / f).read_bytes() == (tmp_path / "planned" / f).read_bytes(), f
