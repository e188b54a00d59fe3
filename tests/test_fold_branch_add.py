"""Pass `addbmm` (peftc.rewrite.fold_branch_add): a per-row gathered low-rank branch is added into the layer's
output by its second batched matmul (baddbmm); the result is the one without the pass, and peft's."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import MODELS, TOL, inputs_for, lora, max_diff, randomize_, run_logits
from torch.fx.passes.infra.pass_base import PassResult

import peftc
import peftc.pipeline

peft = pytest.importorskip("peft")


def _targets(gm, target) -> int:
    return sum(n.op == "call_function" and n.target is target for n in gm.graph.nodes)


def test_per_row_branches_fold_into_baddbmm(tmp_path, monkeypatch):
    pm = None
    spec = ""
    for i, name in enumerate(("a", "b")):
        p = peft.get_peft_model(copy.deepcopy(MODELS["llama"]()), lora(target_modules=["q_proj", "down_proj"]))
        randomize_(p, seed=40 + i)
        p.save_pretrained(str(tmp_path / name))
        spec += f'adapter {name}: import "{tmp_path / name}"\n'
    pm = peft.PeftModel.from_pretrained(MODELS["llama"](), str(tmp_path / "a"), adapter_name="a").eval()
    pm.load_adapter(str(tmp_path / "b"), adapter_name="b")
    x = inputs_for("llama")
    ids = torch.tensor([1, -1, 0])
    gm = peftc.compile(spec, MODELS["llama"](), adapter_ids=True)
    assert _targets(gm, torch.ops.aten.baddbmm.default) == 2 * 2      # 2 blocks, q_proj and down_proj
    got = run_logits(gm, {**x, "adapter_ids": ids})
    monkeypatch.setattr(peftc.pipeline, "fold_branch_add", lambda *a: (lambda g: PassResult(g, False)))
    plain = peftc.compile(spec, MODELS["llama"](), adapter_ids=True)
    assert _targets(plain, torch.ops.aten.baddbmm.default) == 0
    assert max_diff(got, run_logits(plain, {**x, "adapter_ids": ids})) <= 1e-6
    with torch.no_grad():
        want = pm(**x, adapter_names=["b", "__base__", "a"]).logits
    assert max_diff(got, want) <= TOL
