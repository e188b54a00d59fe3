"""bfloat16 and float16 models: merge, compile and export.

* Merged weights (`compile(merge=True)` and `peftc merge`) are at least as close to a float64 reference merge as
  peft's `merge_and_unload` (fold in float32, cast once), and correctly rounded almost everywhere;
* unmerged outputs equal peft's in the same dtype within a tolerance of a few of the dtype's epsilons;
* a .pt2 of a bfloat16 graph runs in bfloat16; a float16 ONNX runs in onnxruntime (CPU); a bfloat16 ONNX is
  refused with a message that names the ways out (`--dtype float16`, `--no-check`), and `dtype=` casts a bfloat16
  model to float16 before folding.
"""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import CHANGED, inputs_for, llama, lora, max_diff, peft_adapter, run_logits
from peft import LoHaConfig, PeftModel
from safetensors.torch import load_file

import peftc
from peftc import PeftcError
from peftc.cli import main

LOW = [torch.bfloat16, torch.float16]
DT_IDS = ["bf16", "fp16"]
TARGETS = ["q_proj", "v_proj"]
CONFIGS = {
    "lora": lambda: lora(target_modules=TARGETS),
    "dora": lambda: lora(use_dora=True, target_modules=TARGETS),
    "loha": lambda: LoHaConfig(r=4, alpha=8, target_modules=TARGETS, init_weights=False),
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """method -> (float32 base, peft checkpoint dir)."""
    out = {}
    for method, cfg in CONFIGS.items():
        base, _, d = peft_adapter("llama", cfg(), tmp_path_factory.mktemp(method))
        out[method] = (base, d)
    return out


def _adapted(state: dict) -> list[str]:
    return [k for k in state if k.endswith(tuple(f"{t}.weight" for t in TARGETS))]


def _fp64_merge(base, d) -> dict[str, torch.Tensor]:
    """peft's merge of the same checkpoint on a float64 copy of the (low-precision) base: the reference."""
    return PeftModel.from_pretrained(copy.deepcopy(base).double(), str(d)).merge_and_unload().state_dict()


def _compare(ours: dict, theirs: dict, ref: dict, base: dict, dtype: torch.dtype) -> None:
    keys = _adapted(ref)
    assert len(keys) == 2 * len(TARGETS)
    err_ours = [(ours[k].double() - ref[k]).abs() for k in keys]
    err_theirs = [(theirs[k].double() - ref[k]).abs() for k in keys]
    assert max(e.max() for e in err_ours) <= max(e.max() for e in err_theirs)
    assert sum(e.sum() for e in err_ours) <= sum(e.sum() for e in err_theirs)
    for k in keys:
        assert ours[k].dtype == dtype, k
        rounded = (ours[k] == ref[k].to(dtype)).double().mean().item()
        assert rounded >= 0.999, (k, rounded)       # one rounding of the exact value
    assert any(not torch.equal(ours[k], base[k]) for k in keys)   # the merge changed the weights


@pytest.mark.parametrize("dtype", LOW, ids=DT_IDS)
@pytest.mark.parametrize("method", list(CONFIGS))
def test_merged_weights_as_close_to_fp64_as_peft(adapters, method, dtype):
    base, d = adapters[method]
    low = copy.deepcopy(base).to(dtype)
    ref = _fp64_merge(low, d)
    theirs = PeftModel.from_pretrained(copy.deepcopy(low), str(d)).merge_and_unload().state_dict()
    ours = peftc.compile(f'adapter default: import "{d}"', copy.deepcopy(low), merge=True).state_dict()
    _compare(ours, theirs, ref, low.state_dict(), dtype)


def test_streaming_merge_of_a_bf16_directory_as_close_as_peft(adapters, tmp_path):
    base, d = adapters["dora"]
    low = copy.deepcopy(base).to(torch.bfloat16)
    low.save_pretrained(str(tmp_path / "model"))
    (tmp_path / "s.peft").write_text(f'adapter default: import "{d}"\n')
    assert main(["-q", "merge", str(tmp_path / "s.peft"), str(tmp_path / "model"), "-o", str(tmp_path / "out")]) == 0
    ours = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        ours.update(load_file(str(f)))
    ref = _fp64_merge(low, d)
    theirs = PeftModel.from_pretrained(copy.deepcopy(low), str(d)).merge_and_unload().state_dict()
    _compare(ours, theirs, ref, low.state_dict(), torch.bfloat16)


@pytest.mark.parametrize("dtype", LOW, ids=DT_IDS)
@pytest.mark.parametrize("method", list(CONFIGS))
def test_unmerged_outputs_match_peft_in_low_precision(adapters, method, dtype):
    base, d = adapters[method]
    low = copy.deepcopy(base).to(dtype)
    x = inputs_for("llama")
    theirs = run_logits(PeftModel.from_pretrained(copy.deepcopy(low), str(d)).eval(), x)
    ours = run_logits(peftc.compile(f'adapter default: import "{d}"', copy.deepcopy(low)), x)
    assert ours.dtype == theirs.dtype == dtype
    tol = 4 * torch.finfo(dtype).eps * max(1.0, theirs.abs().max().item())
    assert max_diff(ours, theirs) <= tol
    assert max_diff(ours, run_logits(low, x)) > CHANGED


@pytest.mark.slow
def test_bf16_pt2_runs_in_bf16(adapters, tmp_path):
    base, d = adapters["dora"]
    gm = peftc.compile(f'adapter default: import "{d}"', copy.deepcopy(base).to(torch.bfloat16))
    peftc.save_pt2(gm, tmp_path / "m.pt2")
    loaded = torch.export.load(str(tmp_path / "m.pt2")).module()
    x = inputs_for("llama", batch=2, seq=11)
    got = run_logits(loaded, x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, run_logits(gm, x))


def test_bf16_onnx_is_refused_with_the_ways_out(tmp_path):
    gm = peftc.compile('adapter a: lora(r = 2, init = "random") { targets q_proj }', llama().to(torch.bfloat16),
                       merge=True)
    with pytest.raises(PeftcError, match=r"bfloat16.*--dtype float16.*--no-check"):
        peftc.export_onnx(gm, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_bf16_model_exported_as_fp16_runs_in_onnxruntime(adapters, tmp_path):
    """dtype=float16 casts the bfloat16 model before tracing: the merge folds from the exact bfloat16 weights."""
    from peftc.pipeline import compile_model
    base, d = adapters["dora"]
    low = copy.deepcopy(base).to(torch.bfloat16)
    gm = compile_model(f'adapter default: import "{d}"', low, merge=True, dtype=torch.float16).gm
    assert next(low.parameters()).dtype == torch.bfloat16          # the caller's module is left as it was
    ours = gm.state_dict()
    ref = _fp64_merge(low, d)
    for k in _adapted(ref):
        assert ours[k].dtype == torch.float16
        assert (ours[k] == ref[k].to(torch.float16)).double().mean().item() >= 0.999, k
    result = peftc.export_onnx(gm, tmp_path / "m.onnx")
    assert result is not None and result.max_abs_diff <= 1e-2
