"""Combinations written in a spec: `adapter mix: combine(0.7 * a, 0.3 * b, type = ...)`.

* peft's types (ties, svd, ...) on imported LoRA checkpoints give peft's `add_weighted_adapter` outputs, compiled
  unmerged and merged, and `peftc save` writes a checkpoint peft loads with the same outputs;
* `exact` (the default) is the weighted sum of the deltas of any additive adapters: a LoHa with a LoRA matches
  the base model plus peft's own delta weights, scaled; merged == unmerged; fresh terms start as their sources;
* sources are inactive unless `active` names them; bad combinations are located errors.
"""
from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
from conftest import CHANGED, MODELS, TOL, compile_on, inputs_for, lora, max_diff, peft_adapter, run_logits

import peftc
import peftc.cli
from peftc.errors import PeftcError
from peftc.spec.parse import parse_spec


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """Real peft adapters on the tiny llama: LoRAs 'a' and 'b' (rank 4, partly different layers), a LoHa, an IA3."""
    configs = {
        "a": (lora(target_modules=["q_proj", "v_proj"]), 1),
        "b": (lora(target_modules=["q_proj", "o_proj"], lora_alpha=16), 2),
        "loha": (peft.LoHaConfig(target_modules=["q_proj", "down_proj"], r=2, alpha=3, init_weights=False), 3),
        "ia3": (peft.IA3Config(target_modules=["k_proj"], feedforward_modules=[], init_ia3_weights=False), 4),
    }
    out = {}
    for name, (cfg, seed) in configs.items():
        torch.manual_seed(100 + seed)
        _, _, d = peft_adapter("llama", cfg, tmp_path_factory.mktemp(name), seed=seed)
        out[name] = d
    return out


@pytest.fixture(scope="module")
def base():
    return MODELS["llama"]()


@pytest.fixture(scope="module")
def x():
    return inputs_for("llama")


def _imports(dirs: dict[str, Path], *names: str) -> str:
    return "".join(f'adapter {n}: import "{dirs[n]}"\n' for n in names)


def _peft_delta_model(base, parts: list[tuple[float, Path]]):
    """The base model with sum_i w_i * (peft's delta weight of adapter i) added to its weights."""
    model = copy.deepcopy(base)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for w, d in parts:
            pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(d))
            for name, mod in pm.base_model.model.named_modules():
                if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "active_adapters", ()):
                    params[f"{name}.weight"] += w * mod.get_delta_weight("default")
    return model.eval()


@pytest.mark.parametrize("kind, kw", [("ties", {"density": 0.5}), ("svd", {}), ("linear", {}), ("cat", {})])
def test_peft_types_match_add_weighted_adapter(kind, kw, dirs, base, x, tmp_path):
    opts = "".join(f", {k} = {v}" for k, v in kw.items())
    spec = _imports(dirs, "a", "b") + f'adapter mix: combine(0.7 * a, -0.4 * b, type = "{kind}"{opts})\n'
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(dirs["a"]), adapter_name="a")
    pm.load_adapter(str(dirs["b"]), adapter_name="b")
    pm.add_weighted_adapter(["a", "b"], [0.7, -0.4], "mix", combination_type=kind, **kw)
    pm.set_adapter("mix")
    want = run_logits(pm.eval(), x)
    for merge in (False, True):
        got = run_logits(compile_on(spec, "llama", model=copy.deepcopy(base), merge=merge), x)
        assert max_diff(got, want) <= TOL, merge
    assert max_diff(want, run_logits(base, x)) > CHANGED
    # `peftc save` writes the combination as one checkpoint that peft loads (the sources are inactive: not saved)
    sp = tmp_path / "mix.peft"
    sp.write_text(spec)
    assert peftc.cli.main(["-q", "save", str(sp), "tiny-llama", "-o", str(tmp_path / "out")]) == 0
    saved = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "mix" in saved
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out" / "mix")).eval()
    assert max_diff(run_logits(loaded, x), want) <= TOL


def test_exact_sums_deltas_across_methods(dirs, base, x):
    spec = _imports(dirs, "a", "loha") + "adapter mix: combine(0.7 * a, 0.5 * loha)\n"
    want = run_logits(_peft_delta_model(base, [(0.7, dirs["a"]), (0.5, dirs["loha"])]), x)
    unmerged = compile_on(spec, "llama", model=copy.deepcopy(base))
    merged = compile_on(spec, "llama", model=copy.deepcopy(base), merge=True)
    assert max_diff(run_logits(unmerged, x), want) <= TOL
    assert max_diff(run_logits(merged, x), want) <= TOL
    assert max_diff(want, run_logits(base, x)) > CHANGED
    # and a weight of 1 on each is both adapters active (sources consumed by a combination are inactive)
    both = compile_on(_imports(dirs, "a", "loha") + "active a, loha\n", "llama", model=copy.deepcopy(base))
    ones = compile_on(_imports(dirs, "a", "loha") + "adapter mix: combine(a, loha)\n", "llama",
                      model=copy.deepcopy(base))
    assert max_diff(run_logits(both, x), run_logits(ones, x)) <= TOL


@pytest.mark.parametrize("config", [
    lambda: peft.FourierFTConfig(n_frequency=50, scaling=20.0, target_modules=["q_proj", "down_proj"]),
    lambda: peft.WaveFTConfig(n_frequency=40, target_modules=["q_proj"], init_weights=False),
    lambda: peft.ShiraConfig(r=2, target_modules=["q_proj", "down_proj"], init_weights=False),
], ids=["fourierft", "waveft", "shira"])
def test_exact_takes_deltas_built_in_the_weights_shape(config, dirs, base, x, tmp_path):
    """FourierFT, WaveFT and SHiRA scatter their values into a zero matrix shaped like W (`scatter2d(.., W)`):
    their delta reads W's shape, not its values, so they are additive and combine exactly."""
    _, _, d = peft_adapter("llama", config(), tmp_path, seed=6)
    spec = _imports(dirs, "a") + f'adapter f: import "{d}"\n' + "adapter mix: combine(0.7 * a, -0.5 * f)\n"
    want = run_logits(_peft_delta_model(base, [(0.7, dirs["a"]), (-0.5, d)]), x)
    for merge in (False, True):
        assert max_diff(run_logits(compile_on(spec, "llama", model=copy.deepcopy(base), merge=merge), x), want) <= TOL
    assert max_diff(want, run_logits(_peft_delta_model(base, [(0.7, dirs["a"])]), x)) > CHANGED


def test_exact_of_lora_checkpoints_is_cat(dirs, base, x, tmp_path):
    spec = _imports(dirs, "a", "b") + "adapter mix: combine(0.7 * a, -0.4 * b)\n"
    want = run_logits(_peft_delta_model(base, [(0.7, dirs["a"]), (-0.4, dirs["b"])]), x)
    assert max_diff(run_logits(compile_on(spec, "llama", model=copy.deepcopy(base)), x), want) <= TOL
    # the CLI's --type exact writes that same LoRA
    out = tmp_path / "exact"
    assert peftc.cli.main(["-q", "combine", str(dirs["a"]), str(dirs["b"]), "--weights", "0.7,-0.4", "--type",
                           "exact", "-o", str(out)]) == 0
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    assert max_diff(run_logits(loaded, x), want) <= TOL


def test_fresh_terms_start_as_their_sources_and_train(base, x):
    spec = """
adapter a: lora(r = 4, init = "random") { targets q_proj, v_proj }
adapter h: loha(r = 2, init = "random") { targets q_proj }
adapter mix: combine(0.25 * a, 2 * h)
"""
    from peftc.plan import build_plan
    plan = build_plan(parse_spec(spec), copy.deepcopy(base))
    assert {n for n, ap in plan.adapters.items() if ap.active} == {"mix[a]", "mix[h]"}
    for sas in plan.sites.values():
        by = {sa.adapter: sa for sa in sas}
        for src in ("a", "h"):
            if src in by:
                for k, t in by[src].tensors.items():
                    assert torch.equal(t, by[f"mix[{src}]"].tensors[k]), (src, k)
    gm = compile_on(spec, "llama", model=copy.deepcopy(base), train=True)
    trainable = [n for n, p in gm.named_parameters() if p.requires_grad]
    assert trainable and all("mix" in n or "lora" in n or "hada" in n for n in trainable)
    merged = compile_on(spec, "llama", model=copy.deepcopy(base), merge=True)
    gm.eval()
    assert max_diff(run_logits(gm, x), run_logits(merged, x)) <= TOL
    assert max_diff(run_logits(gm, x), run_logits(base, x)) > CHANGED


def test_save_of_an_exact_mix_names_what_it_cannot_save(dirs, base, tmp_path, capsys):
    text = _imports(dirs, "a", "loha") + "adapter mix: combine(0.7 * a, 0.5 * loha)\n"
    sp = tmp_path / "mix.peft"
    sp.write_text(text)
    assert peftc.cli.main(["save", str(sp), "tiny-llama", "-o", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "not saved" in err and "mix[loha]" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a", "loha"]   # the sources are
    gm = compile_on(text, "llama", model=copy.deepcopy(base))
    with pytest.raises(PeftcError, match=r"cannot save: adapter 'mix\[a\]' is a term of the exact combination"):
        peftc.save_adapter(gm, tmp_path / "out2", adapters=["mix[a]"])
    assert not (tmp_path / "out2").exists()


BAD = [  # id, spec text after the imports of 'a' and 'b', message, (line of the text, the token the caret is at)
    ("unknown source", "adapter mix: combine(0.5 * a, 0.5 * bb)\n", "unknown adapter 'bb'", (0, "bb")),
    ("unknown option", 'adapter mix: combine(a, b, denisty = 0.5)\n', "did you mean 'density'", (0, "denisty")),
    ("unknown type", 'adapter mix: combine(a, b, type = "tie")\n', "combine type 'tie' is unknown", (0, "type")),
    ("option unused by exact", "adapter mix: combine(a, b, density = 0.5)\n", "not used by combine type 'exact'",
     (0, "density")),
    ("fresh source for a peft type", 'adapter f: lora() { targets q_proj }\nadapter mix: combine(a, f, type = "svd")\n',
     "'f' must be an `import \"dir\"` adapter", (1, "f,")),
    ("block with targets", "adapter mix: combine(a, b) { targets q_proj }\n", "its block takes only `merge`",
     (0, "mix")),
    ("nested", "adapter m1: combine(a, b)\nadapter mix: combine(m1, a)\n", "is itself a combination", (1, "m1")),
    ("twice", "adapter f: lora() { targets q_proj }\nadapter g: combine(f, f)\n", "names 'f' twice", (1, "f)")),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_combinations_are_located(case, dirs, tmp_path, capsys):
    _, text, message, (line, token) = case
    sp = tmp_path / "bad.peft"
    sp.write_text(_imports(dirs, "a", "b") + text)
    assert peftc.cli.main(["check", str(sp), "tiny-llama"]) == 1
    err = capsys.readouterr().err
    where = f"bad.peft:{3 + line}:{text.splitlines()[line].index(token) + 1}:"
    assert message in err and where in err, err
    assert "Traceback" not in err


def test_exact_refuses_a_method_that_is_not_additive(dirs, base):
    spec = _imports(dirs, "a", "ia3") + "adapter mix: combine(0.5 * a, 0.5 * ia3)\n"
    with pytest.raises(PeftcError, match=r"combination 'mix' \(type exact\).*ia3.*otherwise than `W \+ delta`"):
        compile_on(spec, "llama", model=copy.deepcopy(base))


def test_cli_exact_across_methods_points_to_a_spec(dirs, tmp_path, capsys):
    assert peftc.cli.main(["combine", str(dirs["a"]), str(dirs["loha"]), "--weights", "1,1", "--type", "exact",
                           "-o", str(tmp_path / "x")]) == 1
    assert "a spec combines additive adapters of any methods" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_spec_syntax():
    sp = parse_spec('adapter a: lora() { targets q }\nadapter m: combine(0.5 * a, -2 * a, a, type = "cat")\n')
    comb = sp.adapters["m"].combine
    assert [(w, n) for w, n, _ in comb.terms] == [(0.5, "a"), (-2.0, "a"), (1.0, "a")]
    assert comb.options == {"type": "cat"} and sp.active_names() == ["m"]


@pytest.mark.parametrize("spec_line", ['combine(0.7 * a, -0.4 * b, type = "ties", density = 0.5)',
                                       "combine(0.7 * a, 0.5 * loha)"], ids=["ties", "exact"])
def test_combinations_export_to_onnx(spec_line, dirs, base, tmp_path):
    spec = _imports(dirs, "a", "b", "loha") + f"adapter mix: {spec_line}\n"
    gm = compile_on(spec, "llama", model=copy.deepcopy(base))
    result = peftc.export_onnx(gm, tmp_path / "m.onnx")   # checked in onnxruntime against torch
    assert result is not None and result.max_abs_diff <= 1e-4


def test_adapter_ids_refuse_an_exact_mix_of_terms(dirs, base):
    spec = _imports(dirs, "a", "loha") + "adapter mix: combine(0.7 * a, 0.5 * loha)\n"
    with pytest.raises(PeftcError, match="--adapter-ids: combination 'mix'"):
        compile_on(spec, "llama", model=copy.deepcopy(base), adapter_ids=True)
