"""`peftc combine` against peft's `add_weighted_adapter`: real peft LoRA / IA3 adapters on the tiny llama
(linear layers, an embedding), GPT-2 (Conv1D) and a conv net (Conv2d), combined both ways; the delta weights
and the logits of peft loading peftc's checkpoint must match peft's own combined adapter. Bad input is a
located error, exit 1, and nothing written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CHANGED, MODELS, TOL, inputs_for, lora, max_diff, randomize_, run_logits
from safetensors.torch import load_file

import peftc.cli

WEIGHTS = [0.7, -0.4]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ads(tmp_path_factory) -> dict[str, Path]:
    """Real peft adapters: 'a' and 'b' share rank 4 (different alphas, partly different layers), 'c' (and 'c2')
    have rank 8, a rank_pattern / alpha_pattern and rsLoRA, 'p1' / 'p2' a rank_pattern; 'regex' targets by
    regex; 'emb_*' adapt the embedding, 'q_*' only q_proj, 'conv_*' the conv net, 'gpt2_*' GPT-2's Conv1D layers;
    'ia3_a', 'ia3_b' are IA3; 'loha' is not LoRA."""
    from peft import IA3Config, LoHaConfig
    configs = {
        "a": (lora(target_modules=["q_proj", "v_proj"]), 1),
        "b": (lora(target_modules=["q_proj", "o_proj"], lora_alpha=16), 2),
        "c": (lora(target_modules=["q_proj", "up_proj"], r=8, rank_pattern={"layers.1.self_attn.q_proj": 2},
                   alpha_pattern={"up_proj": 4}, use_rslora=True), 3),
        "c2": (lora(target_modules=["q_proj", "up_proj"], r=8, rank_pattern={"layers.1.self_attn.q_proj": 2},
                    alpha_pattern={"up_proj": 4}, use_rslora=True), 16),
        "p1": (lora(target_modules=["q_proj", "v_proj"], rank_pattern={"layers.0.self_attn.v_proj": 2}), 17),
        "p2": (lora(target_modules=["q_proj", "v_proj"], rank_pattern={"layers.0.self_attn.v_proj": 2},
                    lora_alpha=5), 18),
        "regex": (lora(target_modules=r".*\.k_proj"), 4),
        "ia3_a": (IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                            init_ia3_weights=False), 5),
        "ia3_b": (IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"],
                            init_ia3_weights=False), 6),
        "loha": (LoHaConfig(target_modules=["q_proj"], r=4, init_weights=False), 7),
        "emb_a": (lora(target_modules=["embed_tokens", "v_proj"]), 8),
        "emb_b": (lora(target_modules=["embed_tokens", "v_proj"], r=2), 9),
        "q_a": (lora(target_modules=["q_proj"]), 12),
        "q_b": (lora(target_modules=["q_proj"], lora_alpha=32), 13),
        "conv_a": (lora(target_modules=["conv1", "conv2", "fc1"]), 14),
        "conv_b": (lora(target_modules=["conv2", "fc1"], r=2, lora_alpha=3), 15),
        "gpt2_a": (lora(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True), 10),
        "gpt2_b": (lora(target_modules=["c_attn"], r=6, fan_in_fan_out=True), 11),
    }
    return {name: _adapter(cfg, tmp_path_factory.mktemp(name), seed, _model_of(name))
            for name, (cfg, seed) in configs.items()}


def _adapter(config, tmp: Path, seed: int, model: str = "llama") -> Path:
    """conftest's peft_adapter, but with the initial adapter weights drawn from `seed` too: adapters made
    with one init differ only by small noise and agree in sign almost everywhere (ties would not be tested)."""
    from peft import get_peft_model
    base = MODELS[model]()
    torch.manual_seed(100 + seed)
    pm = get_peft_model(base, config).eval()
    randomize_(pm, seed)
    pm.save_pretrained(str(tmp / "adapter"))
    return tmp / "adapter"


@pytest.fixture(scope="module")
def x() -> dict[str, torch.Tensor]:
    return inputs_for("llama")


def _model_of(d: Path | str) -> str:
    name = Path(d).parent.name if Path(d).name == "adapter" else str(d)
    return "gpt2" if name.startswith("gpt2") else "convnet" if name.startswith("conv_") else "llama"


def _peft_combined(dirs: list[Path], weights: list[float], **kw):
    """peft's own combination: every adapter loaded into one PeftModel, then add_weighted_adapter."""
    from peft import PeftModel
    pm = PeftModel.from_pretrained(MODELS[_model_of(dirs[0])](), str(dirs[0]), adapter_name="ad0")
    for i, d in enumerate(dirs[1:], 1):
        pm.load_adapter(str(d), adapter_name=f"ad{i}")
    pm.add_weighted_adapter([f"ad{i}" for i in range(len(dirs))], weights, "mix", **kw)
    pm.set_adapter("mix")
    return pm.eval()


def _peft_load(d: Path, model: str = "llama"):
    from peft import PeftModel
    return PeftModel.from_pretrained(MODELS[model](), str(d)).eval()


def _deltas(pm, adapter: str) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer
    with torch.no_grad():
        return {n: m.get_delta_weight(adapter) for n, m in pm.named_modules()
                if isinstance(m, LoraLayer) and (adapter in m.lora_A or adapter in m.lora_embedding_A)}


def _combine(dirs: list[Path], out: Path, *opts: str) -> int:
    return peftc.cli.main(["-q", "combine", *map(str, dirs), *opts, "-o", str(out)])


def _weights(ws: list[float]) -> str:
    return ",".join(map(str, ws))


CASES = [  # id, adapters, peft kwargs
    ("linear", "a,b", {"combination_type": "linear"}),
    ("cat", "a,b,c", {"combination_type": "cat"}),
    ("svd", "a,b,c", {"combination_type": "svd"}),
    ("svd-rslora-first", "c,a", {"combination_type": "svd"}),
    ("svd-rank-clamp", "a,c", {"combination_type": "svd", "svd_rank": 3, "svd_clamp": 0.9}),
    ("ties", "a,b", {"combination_type": "ties", "density": 0.5}),
    ("ties-frequency", "a,b", {"combination_type": "ties", "density": 0.3, "majority_sign_method": "frequency"}),
    ("ties_svd", "a,b,c", {"combination_type": "ties_svd", "density": 0.5}),
    ("magnitude_prune", "a,b", {"combination_type": "magnitude_prune", "density": 0.4}),
    ("magnitude_prune_svd", "b,c", {"combination_type": "magnitude_prune_svd", "density": 0.6, "svd_rank": 5}),
    ("dare-density-1", "a,b", {"combination_type": "dare_ties", "density": 1.0}),
    ("linear-rank-pattern", "p1,p2", {"combination_type": "linear"}),
    ("linear-rank-pattern-rslora", "c,c2", {"combination_type": "linear"}),
    ("ties-rank-pattern-rslora", "c,c2", {"combination_type": "ties", "density": 0.5}),
    ("regex-targets-cat", "regex,regex", {"combination_type": "cat"}),
    ("embedding-linear", "emb_a,emb_a", {"combination_type": "linear"}),
    ("embedding-cat", "emb_a,emb_b", {"combination_type": "cat"}),
    ("embedding-svd-clamp", "emb_a,emb_b", {"combination_type": "svd", "svd_clamp": 0.8}),
    ("embedding-ties_svd", "emb_a,emb_b", {"combination_type": "ties_svd", "density": 0.5}),
    ("conv1d-svd-clamp", "gpt2_a,gpt2_b", {"combination_type": "svd", "svd_clamp": 0.95}),
    ("conv1d-cat", "gpt2_a,gpt2_b", {"combination_type": "cat"}),
    ("conv2d-linear", "conv_a,conv_a", {"combination_type": "linear"}),
    ("conv2d-cat", "conv_a,conv_b", {"combination_type": "cat"}),
    ("conv2d-svd", "conv_a,conv_b", {"combination_type": "svd", "svd_rank": 3}),
    ("conv2d-ties_svd", "conv_a,conv_b", {"combination_type": "ties_svd", "density": 0.5}),
    ("conv1d-magnitude_prune_svd", "gpt2_a,gpt2_b", {"combination_type": "magnitude_prune_svd", "density": 0.4}),
]
_FLAGS = {"combination_type": "--type", "density": "--density", "majority_sign_method": "--majority-sign-method",
          "svd_rank": "--svd-rank", "svd_clamp": "--svd-clamp"}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_combination_matches_peft(case, ads, tmp_path):
    _, names, kw = case
    dirs = [ads[n] for n in names.split(",")]
    x = inputs_for(_model_of(dirs[0]))
    weights = [0.7, -0.4, 1.3][: len(dirs)]
    flags = [s for k, v in kw.items() for s in (_FLAGS[k], str(v))]
    assert _combine(dirs, tmp_path / "mix", "--weights", _weights(weights), *flags) == 0
    ours = _peft_load(tmp_path / "mix", _model_of(dirs[0]))
    theirs = _peft_combined(dirs, weights, **kw)
    d_ours, d_theirs = _deltas(ours, "default"), _deltas(theirs, "mix")
    assert d_ours.keys() == d_theirs.keys() and d_ours
    for layer in d_ours:
        assert max_diff(d_ours[layer], d_theirs[layer]) <= TOL, layer
    y_ours, y_theirs = run_logits(ours, x), run_logits(theirs, x)
    assert max_diff(y_ours, y_theirs) <= TOL
    theirs.base_model.disable_adapter_layers()
    assert max_diff(y_ours, run_logits(theirs, x)) > CHANGED  # the combination does something
    cfg = json.loads((tmp_path / "mix" / "adapter_config.json").read_text())
    assert cfg["r"] == theirs.peft_config["mix"].r and cfg["lora_alpha"] == theirs.peft_config["mix"].lora_alpha


def test_ia3_linear_matches_peft(ads, x, tmp_path):
    dirs = [ads["ia3_a"], ads["ia3_b"]]
    assert _combine(dirs, tmp_path / "mix", "--weights", _weights(WEIGHTS), "--type", "linear") == 0
    ours = _peft_load(tmp_path / "mix")
    theirs = _peft_combined(dirs, WEIGHTS)
    assert max_diff(run_logits(ours, x), run_logits(theirs, x)) <= TOL
    with ours.disable_adapter():
        assert max_diff(run_logits(ours, x), run_logits(theirs, x)) > CHANGED
    cfg = json.loads((tmp_path / "mix" / "adapter_config.json").read_text())
    assert sorted(cfg["feedforward_modules"]) == ["down_proj"]
    assert sorted(cfg["target_modules"]) == ["down_proj", "k_proj", "v_proj"]


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "adapter_model.safetensors"))


@pytest.mark.parametrize("type_", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_is_seeded(type_, ads, tmp_path):
    dirs = [ads["a"], ads["b"]]
    runs = {}
    for name, seed in (("one", "3"), ("again", "3"), ("other", "4")):
        assert _combine(dirs, tmp_path / name, "--weights", "0.5,0.5", "--type", type_, "--density", "0.5",
                        "--seed", seed) == 0
        runs[name] = _tensors(tmp_path / name)
    assert runs["one"].keys() == runs["again"].keys()
    assert all(torch.equal(runs["one"][k], runs["again"][k]) for k in runs["one"])
    assert any(not torch.equal(runs["one"][k], runs["other"][k]) for k in runs["one"])


@pytest.mark.parametrize("type_", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_matches_peft_given_the_same_draws(type_, ads, monkeypatch, tmp_path):
    """peft draws DARE's masks from torch's global generator in its module order; peftc from a generator
    seeded by --seed in layer-name order. On adapters of one layer per block the two orders agree, so peft
    made to draw from the same seeded generator must give peftc's checkpoint exactly."""
    import peft.utils.merge_utils as mu
    gen = torch.Generator().manual_seed(5)

    def random_pruning(tensor, density, rescale):
        kept = tensor * torch.bernoulli(torch.full_like(tensor, density), generator=gen)
        return kept / density if rescale else kept

    monkeypatch.setattr(mu, "random_pruning", random_pruning)
    dirs, weights = [ads["q_a"], ads["q_b"]], [0.6, -0.9]
    assert _combine(dirs, tmp_path / "mix", "--weights", _weights(weights), "--type", type_, "--density", "0.4",
                    "--seed", "5") == 0
    ours = _peft_load(tmp_path / "mix")
    theirs = _peft_combined(dirs, weights, combination_type=type_, density=0.4)
    d_ours, d_theirs = _deltas(ours, "default"), _deltas(theirs, "mix")
    assert list(d_ours) == list(d_theirs) and len(d_ours) == 2
    for layer in d_ours:
        assert max_diff(d_ours[layer], d_theirs[layer]) <= TOL, layer
    x = inputs_for("llama")
    assert max_diff(run_logits(ours, x), run_logits(theirs, x)) <= TOL


def test_dare_keeps_the_density_fraction_and_rescales(ads, tmp_path):
    """With the second weight 0, dare_linear's A is sqrt(w * scaling) * mask * A / density."""
    density = 0.3
    assert _combine([ads["a"], ads["b"]], tmp_path / "mix", "--weights", "1,0", "--type", "dare_linear",
                    "--density", str(density)) == 0
    got, src = _tensors(tmp_path / "mix"), _tensors(ads["a"])
    scale = (8 / 4) ** 0.5
    kept = total = 0
    for k, a in src.items():
        if "lora_A" not in k:
            continue
        g = got[k]
        mask = g != 0
        kept, total = kept + int(mask.sum()), total + g.numel()
        assert torch.allclose(g[mask], a[mask] * scale / density, atol=1e-6)
    assert abs(kept / total - density) < 0.03


def test_combined_checkpoint_config_is_peft_loadable(ads, tmp_path):
    from peft import LoraConfig
    assert _combine([ads["a"], ads["c"]], tmp_path / "mix", "--weights", "1,1", "--type", "cat") == 0
    cfg = json.loads((tmp_path / "mix" / "adapter_config.json").read_text())
    known = set(LoraConfig.__dataclass_fields__) | {"peft_type"}
    assert set(cfg) <= known
    assert cfg["r"] == 12 and cfg["alpha_pattern"] == {} and cfg["rank_pattern"] == {}
    assert sorted(cfg["target_modules"]) == ["q_proj", "up_proj", "v_proj"]


# ---------------------------------------------------------------- bad input
def _fails(capsys, code: int, out: Path, *expect: str) -> None:
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err and err.startswith("peftc: error: ")
    for e in expect:
        assert e in err, err
    assert not out.exists()


def test_linear_needs_equal_ranks(ads, tmp_path, capsys):
    code = _combine([ads["a"], ads["c"]], tmp_path / "o", "--weights", "1,1", "--type", "linear")
    _fails(capsys, code, tmp_path / "o", "same rank", str(ads["c"] / "adapter_config.json"), "r = 8")


def test_peft_refuses_linear_with_different_ranks_too(ads):
    with pytest.raises(ValueError, match="same r"):
        _peft_combined([ads["a"], ads["c"]], [1, 1], combination_type="linear")


def test_mixed_target_module_types(ads, tmp_path, capsys):
    code = _combine([ads["a"], ads["regex"]], tmp_path / "o", "--weights", "1,1", "--type", "cat")
    _fails(capsys, code, tmp_path / "o", "target_modules", "regex")


def test_non_lora_checkpoint(ads, tmp_path, capsys):
    code = _combine([ads["loha"], ads["loha"]], tmp_path / "o", "--weights", "1,1", "--type", "linear")
    _fails(capsys, code, tmp_path / "o", str(ads["loha"] / "adapter_config.json"), "LOHA")


def test_mixed_methods(ads, tmp_path, capsys):
    code = _combine([ads["a"], ads["ia3_a"]], tmp_path / "o", "--weights", "1,1", "--type", "linear")
    _fails(capsys, code, tmp_path / "o", "different methods", "IA3", "LORA")


def test_ia3_has_only_linear(ads, tmp_path, capsys):
    code = _combine([ads["ia3_a"], ads["ia3_b"]], tmp_path / "o", "--weights", "1,1", "--type", "svd")
    _fails(capsys, code, tmp_path / "o", "not a combination type for IA3")


def test_layer_shape_mismatch_names_the_tensor(ads, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((ads["a"] / "adapter_config.json").read_text())
    t = _tensors(ads["a"])
    key = next(k for k in t if k.endswith("q_proj.lora_A.weight"))
    t[key] = torch.zeros(4, 32)
    from safetensors.torch import save_file
    save_file(t, str(bad / "adapter_model.safetensors"))
    code = _combine([ads["b"], bad], tmp_path / "o", "--weights", "1,1", "--type", "cat")
    _fails(capsys, code, tmp_path / "o", str(bad / "adapter_model.safetensors"), key.split(".lora_A")[0][17:])


def test_foreign_tensor_is_named(ads, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((ads["a"] / "adapter_config.json").read_text())
    t = _tensors(ads["a"])
    t["base_model.model.lm_head.weight"] = torch.zeros(2, 2)
    from safetensors.torch import save_file
    save_file(t, str(bad / "adapter_model.safetensors"))
    code = _combine([ads["a"], bad], tmp_path / "o", "--weights", "1,1", "--type", "linear")
    _fails(capsys, code, tmp_path / "o", "base_model.model.lm_head.weight")


@pytest.mark.parametrize("opts, expect", [
    (["--weights", "1", "--type", "linear"], "1 value(s) for 2 adapter(s)"),
    (["--weights", "1,x", "--type", "linear"], "comma-separated numbers"),
    (["--weights", "1,nan", "--type", "linear"], "finite"),
    (["--weights", "1,1", "--type", "liner"], "did you mean 'linear'"),
    (["--weights", "1,1", "--type", "ties"], "needs --density"),
    (["--weights", "1,1", "--type", "ties", "--density", "1.5"], "(0, 1]"),
    (["--weights", "1,1", "--type", "linear", "--density", "0.5"], "--density is not used"),
    (["--weights", "1,1", "--type", "cat", "--svd-rank", "2"], "only used by the *svd types"),
    (["--weights", "1,1", "--type", "svd", "--seed", "2"], "--seed is only used by the dare_* types"),
    (["--weights", "1,1", "--type", "linear", "--majority-sign-method", "frequency"], "not used by --type linear"),
    (["--weights", "1,1", "--type", "svd", "--svd-rank", "100"], "larger than layer"),
])
def test_bad_options(opts, expect, ads, tmp_path, capsys):
    code = _combine([ads["a"], ads["b"]], tmp_path / "o", *opts)
    _fails(capsys, code, tmp_path / "o", expect)


@pytest.mark.parametrize("key, value, expect", [
    ("use_dora", True, "use_dora = True"),
    ("modules_to_save", ["lm_head"], "modules_to_save"),
    ("bias", "all", "bias = 'all'"),
    ("target_modules", None, "target_modules"),
])
def test_unsupported_configs_are_named(key, value, expect, ads, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((ads["a"] / "adapter_config.json").read_text())
    cfg[key] = value
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    (bad / "adapter_model.safetensors").write_bytes((ads["a"] / "adapter_model.safetensors").read_bytes())
    code = _combine([ads["a"], bad], tmp_path / "o", "--weights", "1,1", "--type", "cat")
    _fails(capsys, code, tmp_path / "o", expect, str(bad / "adapter_config.json"))


def test_one_adapter_is_linear_as_in_peft(ads, x, tmp_path, capsys):
    assert peftc.cli.main(["combine", str(ads["c"]), "--weights=-0.5", "--type", "svd", "-o", str(tmp_path / "o")]) == 0
    assert "note: one adapter: combined with type 'linear'" in capsys.readouterr().err
    theirs = _peft_combined([ads["c"]], [-0.5], combination_type="svd")
    assert max_diff(run_logits(_peft_load(tmp_path / "o"), x), run_logits(theirs, x)) <= TOL


def test_output_is_not_an_input(ads, tmp_path, capsys):
    code = _combine([ads["a"], ads["b"]], ads["b"], "--weights", "1,1", "--type", "linear")
    err = capsys.readouterr().err
    assert code == 1 and "one of the input checkpoints" in err


def test_output_checked_before_work(ads, tmp_path, capsys):
    code = _combine([ads["a"], ads["b"]], tmp_path / "o.safetensors", "--weights", "1,1", "--type", "linear")
    _fails(capsys, code, tmp_path / "o.safetensors", "writes a PEFT checkpoint directory")


def test_inputs_unchanged_and_result_printed(ads, tmp_path, capsys):
    before = {p: p.read_bytes() for d in (ads["a"], ads["b"]) for p in d.iterdir()}
    assert _combine([ads["a"], ads["b"]], tmp_path / "o", "--weights", "1,1", "--type", "svd") == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {tmp_path / 'o'}: 2 adapters combined (svd) on 6 layers, rank 4")
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]



def test_saved_embedding_layers_must_agree(ads, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((ads["emb_b"] / "adapter_config.json").read_text())
    t = _tensors(ads["emb_b"])
    key = next(k for k in t if k.endswith("base_layer.weight"))
    t[key] = t[key] + 1
    from safetensors.torch import save_file
    save_file(t, str(bad / "adapter_model.safetensors"))
    code = _combine([ads["emb_a"], bad], tmp_path / "o", "--weights", "1,1", "--type", "cat")
    _fails(capsys, code, tmp_path / "o", str(bad / "adapter_model.safetensors"), key, "differs")
