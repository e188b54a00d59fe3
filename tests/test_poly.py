"""Poly (peft PolyConfig: Polytropon / Multi-Head Routing) against peft: a per-row `task_ids` input chooses each
row's mix of skills. The compiled graph takes `task_ids` (int64, [batch]) as one more input."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import CHANGED, TOL, inputs_for, llama, max_diff, randomize_, run_logits

import peftc
from peftc.errors import PeftcError

TASKS = torch.tensor([0, 2, 1, 2])


@pytest.fixture(scope="module", params=[1, 2], ids=["poly", "mhr"])
def poly(request, tmp_path_factory):
    """(peft model, peftc module compiled from its checkpoint, checkpoint dir) with n_splits 1 (Poly), 2 (MHR)."""
    from peft import PolyConfig, get_peft_model
    cfg = PolyConfig(r=4, n_tasks=3, n_skills=3, n_splits=request.param, init_weights=False,
                     target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    pm = get_peft_model(copy.deepcopy(llama()), cfg).eval()
    randomize_(pm, 1, scale=0.5)
    d = tmp_path_factory.mktemp("poly") / "adapter"
    pm.save_pretrained(str(d))
    return pm, peftc.compile(f'adapter default: import "{d}"', llama()), d


def _x() -> dict[str, torch.Tensor]:
    return {**inputs_for("llama", batch=len(TASKS), seq=11), "task_ids": TASKS}


def test_matches_peft(poly):
    pm, gm, _ = poly
    x = _x()
    want = run_logits(pm, x)
    assert max_diff(run_logits(gm, x), want) <= TOL
    base = run_logits(llama(), {k: v for k, v in x.items() if k != "task_ids"})
    assert max_diff(want, base) > CHANGED
    # rows 1 and 3 share a task, rows 0 and 1 do not: the choice is per row
    other = {**x, "task_ids": torch.tensor([1, 0, 1, 0])}
    assert max_diff(run_logits(gm, other)[1], run_logits(pm, other)[1]) <= TOL
    assert max_diff(run_logits(gm, other)[1], want[1]) > CHANGED


def test_save_roundtrip(poly, tmp_path):
    from peft import PeftModel
    pm, gm, _ = poly
    peftc.save_adapter(gm, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "POLY" and cfg["n_tasks"] == 3 and cfg["n_skills"] == 3
    again = PeftModel.from_pretrained(llama(), str(tmp_path / "p")).eval()
    assert max_diff(run_logits(again, _x()), run_logits(pm, _x())) <= TOL


def test_onnx_export(poly, tmp_path):
    from peftc.emit.onnx import export_onnx
    _, gm, _ = poly
    check = export_onnx(gm, tmp_path / "m.onnx", check_inputs=[_x()])
    assert check.max_abs_diff <= 1e-4 and "task_ids" in check.input_shapes


def test_fresh_spec_trains():
    """A spec's Poly compiles with fresh weights (B zero: the base model), its tensors trainable."""
    gm = peftc.compile("adapter p: poly(r = 2, n_tasks = 2, n_skills = 2) { targets q_proj }", llama(), train=True)
    x = {**inputs_for("llama", batch=2, seq=5), "task_ids": torch.tensor([0, 1])}
    out = gm(**x)["logits"]
    out.sum().backward()
    grads = [n for n, p in gm.named_parameters() if p.grad is not None]
    assert any("poly_lora_B" in n for n in grads)


def test_merge_refused():
    with pytest.raises(PeftcError, match="mixes its skills per row"):
        peftc.compile("adapter p: poly(r = 2) { targets q_proj }", llama(), merge=True)


def test_bad_splits():
    with pytest.raises(PeftcError, match="n_splits must divide"):
        peftc.compile("adapter p: poly(r = 2, n_splits = 3) { targets q_proj }", llama())


def test_fresh_spec_saves_what_peft_loads(tmp_path):
    """A spec's Poly (random B) saved by peftc: peft's PolyModel (called with task_ids) computes the same."""
    from peft import PeftModel
    gm = peftc.compile("adapter p: poly(r = 2, n_tasks = 3, n_skills = 2, n_splits = 2, init = false) "
                       "{ targets q_proj, up_proj }", llama())
    peftc.save_adapter(gm, tmp_path / "p")
    pm = PeftModel.from_pretrained(llama(), str(tmp_path / "p")).eval()
    with torch.no_grad():
        want = pm.base_model(**_x()).logits
    assert max_diff(run_logits(gm, _x()), want) <= TOL
    assert max_diff(want, run_logits(llama(), {k: v for k, v in _x().items() if k != "task_ids"})) > CHANGED


def test_with_adapter_ids():
    """Two extra inputs at once: `adapter_ids` picks each row's adapter, `task_ids` the Poly row's task."""
    two = ('adapter p: poly(r = 4, n_tasks = 3, n_skills = 2, init = false) { targets q_proj, down_proj }\n'
           'adapter b: lora(r = 2, init = "random") { targets q_proj, v_proj }\n')
    x = _x()
    plain = {k: v for k, v in x.items() if k != "task_ids"}
    rows = {0: run_logits(peftc.compile(two + "active p\n", llama()), x),
            1: run_logits(peftc.compile(two + "active b\n", llama()), plain), -1: run_logits(llama(), plain)}
    ids = torch.tensor([0, 1, -1, 0])
    got = run_logits(peftc.compile(two, llama(), adapter_ids=True), {**x, "adapter_ids": ids})
    assert max_diff(got, torch.stack([rows[int(i)][k] for k, i in enumerate(ids)])) <= TOL
