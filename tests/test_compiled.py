"""torch.compile of peftc's unmerged GraphModule, and constants computed once at inference (DoRA's weight norm).

* Dynamo traces the GraphModule of every method family in one graph (no graph breaks), in eval and train mode and
  with a per-row adapter choice; one small inductor compile (fullgraph) equals peft.
* An inference compile (no `train=True`) stores DoRA's gradient-free norm ||W0 + s B A|| as a constant: the
  graph no longer builds a full-size weight, outputs and gradients equal peft's, and the constants follow
  in-place changes of the adapter tensors (automatically in eager runs, else by `refresh_frozen`). A training
  compile keeps the live form: trained a few steps beside peft, it stays equal.
"""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import CHANGED, TOL, compile_on, inputs_for, logits_of, lora, max_diff, peft_adapter, run_logits

import peftc
from peftc.ops import col_norm, row_norm

BODIES = {
    "lora": "lora(r = 4, alpha = 8)",
    "dora": "dora(r = 4, alpha = 8)",
    "loha": "loha(r = 4)",
    "lokr": "lokr(r = 4)",
    "oft": "oft(r = 0, block_size = 4)",
    "ia3": "ia3()",
    "vera": "vera(r = 4)",
    "fourierft": "fourierft(n_frequency = 10)",
}
TARGETS = "targets q_proj, v_proj, down_proj"


def _breaks(gm, **inputs) -> tuple[int, int, list]:
    torch._dynamo.reset()
    ex = torch._dynamo.explain(gm)(**inputs)
    return ex.graph_break_count, ex.graph_count, ex.break_reasons


@pytest.mark.parametrize("method", list(BODIES))
def test_unmerged_graph_has_no_graph_breaks(method):
    gm = compile_on(f"adapter a: {BODIES[method]} {{ {TARGETS} }}", "llama").eval()
    breaks, graphs, reasons = _breaks(gm, **inputs_for("llama"))
    assert (breaks, graphs) == (0, 1), reasons


def test_no_graph_breaks_in_training_and_with_adapter_ids():
    gm = compile_on(f"adapter a: dora(r = 4, dropout = 0.1) {{ {TARGETS} }}", "llama", train=True)
    assert gm.training
    breaks, graphs, reasons = _breaks(gm, **inputs_for("llama"))
    assert (breaks, graphs) == (0, 1), reasons
    gm = compile_on("adapter a: lora(r = 4) { targets q_proj }\nadapter b: loha(r = 4) { targets q_proj, v_proj }",
                    "llama", adapter_ids=True)
    breaks, graphs, reasons = _breaks(gm, **inputs_for("llama"), adapter_ids=torch.tensor([0, 1, -1]))
    assert (breaks, graphs) == (0, 1), reasons


# ---------------------------------------------------------------- DoRA at inference
DORA_TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def dora_peft(tmp_path_factory):
    base, pm, d = peft_adapter("llama", lora(use_dora=True, target_modules=DORA_TARGETS),
                               tmp_path_factory.mktemp("dora"))
    return base, pm, d


def _norms(gm) -> list:
    """The norm calls of the graph and of its submodules' graphs (pass `cache` moves weight-side work into one)."""
    return [n for m in gm.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes
            if n.op == "call_function" and n.target in (row_norm, col_norm)]


def test_inference_compile_stores_doras_norm(dora_peft):
    base, pm, d = dora_peft
    x = inputs_for("llama")
    gm = compile_on(f'adapter default: import "{d}"', "llama", copy.deepcopy(base))
    assert not _norms(gm)
    # the base weights are read by the layer's own matmul only (or pass `choose`'s call, which picks the factored
    # or the dense form by token count): no W + s B A is built for the norm per forward
    from peftc.lowrank_form import lowrank_linears
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target.endswith("_proj.weight") and "lora" not in n.target:
            assert {u.target for u in n.users} <= {torch.ops.aten.linear.default, lowrank_linears}, \
                (n.target, list(n.users))
    frozen = gm.peftc.frozen
    assert len(frozen) == len(DORA_TARGETS) * 2   # one per adapted layer (2 decoder layers)
    for path, fc in frozen.items():
        layer = fc.layer
        assert set(fc.adapters) == {f"{layer}.lora_A.default.weight", f"{layer}.lora_B.default.weight"}, path
        assert f"{layer}.weight" in fc.sources
        assert not getattr(gm, path).requires_grad
    assert max_diff(run_logits(gm, x), run_logits(pm, x)) <= TOL
    assert max_diff(run_logits(gm, x), run_logits(base, x)) > CHANGED


def test_frozen_norm_keeps_peft_gradients(dora_peft):
    base, pm, d = dora_peft
    pm = copy.deepcopy(pm)
    x = inputs_for("llama")
    gm = compile_on(f'adapter default: import "{d}"', "llama", copy.deepcopy(base))
    assert gm.peftc.frozen
    logits_of(pm(**x)).square().mean().backward()
    logits_of(gm(**x)).square().mean().backward()
    theirs = {n.removeprefix("base_model.model.").replace("lora_magnitude_vector.default.weight",
                                                           "lora_magnitude_vector.default"): p.grad
              for n, p in pm.named_parameters() if p.requires_grad}
    ours = {n: p.grad for n, p in gm.named_parameters() if p.requires_grad}
    assert set(ours) == set(theirs) and len(ours) == 3 * len(DORA_TARGETS) * 2
    for n, g in ours.items():
        assert max_diff(g, theirs[n]) <= 1e-6, n


def test_constants_follow_in_place_changes_of_adapter_tensors(dora_peft):
    """An in-place change (an optimizer step, load_state_dict) moves a version counter: the next eager forward
    recomputes what derives from it; a change that bypasses the counter (`.data`) needs refresh_frozen."""
    base, pm, d = dora_peft
    pm = copy.deepcopy(pm)
    x = inputs_for("llama")
    gm = copy.deepcopy(compile_on(f'adapter default: import "{d}"', "llama", copy.deepcopy(base)))  # hook kept
    layer = "model.layers.1.self_attn.v_proj"
    key = f"{layer}.lora_B.default.weight"
    theirs = pm.get_submodule(f"base_model.model.{layer}").lora_B["default"].weight
    with torch.no_grad():
        theirs.mul_(3.0)
        gm.get_parameter(key).mul_(3.0)
    assert max_diff(run_logits(gm, x), run_logits(pm, x)) <= TOL
    assert peftc.refresh_frozen(gm, stale_only=True) == []
    with torch.no_grad():
        theirs.mul_(0.5)
    gm.get_parameter(key).data.mul_(0.5)     # no version bump: stale until refreshed
    assert max_diff(run_logits(gm, x), run_logits(pm, x)) > CHANGED
    assert peftc.refresh_frozen(gm, ["model.layers.0.mlp.down_proj.lora_magnitude_vector.default"]) == []
    done = peftc.refresh_frozen(gm, [key])
    assert [gm.peftc.frozen[p].layer for p in done] == [layer]
    assert max_diff(run_logits(gm, x), run_logits(pm, x)) <= TOL
    assert len(peftc.refresh_frozen(gm)) == len(gm.peftc.frozen)
    with torch.no_grad():                    # a tensor replaced by another one (same version counter or not)
        theirs.mul_(2.0)
    owner = gm.get_submodule(key.rpartition(".")[0])
    owner.weight = torch.nn.Parameter(owner.weight.detach() * 2.0)
    assert max_diff(run_logits(gm, x), run_logits(pm, x)) <= TOL


def test_training_compile_keeps_live_norm_and_trains_like_peft(dora_peft):
    base, pm, d = dora_peft
    pm = copy.deepcopy(pm).train()
    x = inputs_for("llama")
    gm = compile_on(f'adapter default: import "{d}"', "llama", copy.deepcopy(base), train=True)
    assert not gm.peftc.frozen and len(_norms(gm)) == len(DORA_TARGETS) * 2
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (pm, gm)]
    for _ in range(3):
        for model, opt in zip((pm, gm), opts):
            opt.zero_grad()
            logits_of(model(**x)).square().mean().backward()
            opt.step()
    pm.eval()
    gm.eval()
    before = run_logits(compile_on(f'adapter default: import "{d}"', "llama", copy.deepcopy(base)), x)
    assert max_diff(run_logits(pm, x), before) > CHANGED          # training moved the norm's inputs
    assert max_diff(run_logits(gm, x), run_logits(pm, x)) <= TOL


def test_inductor_fullgraph_dora_equals_peft(tmp_path):
    """The one inductor compile (small model: inductor is slow on few cores)."""
    base, pm, d = peft_adapter("token-mlp", lora(use_dora=True, target_modules=["lin0", "lin1"]), tmp_path)
    x = inputs_for("token-mlp")
    gm = compile_on(f'adapter default: import "{d}"', "token-mlp", copy.deepcopy(base))
    assert gm.peftc.frozen
    torch._dynamo.reset()
    compiled = torch.compile(gm, fullgraph=True)
    with torch.no_grad():
        out = logits_of(compiled(**x))
    assert max_diff(out, run_logits(pm, x)) <= TOL
    assert max_diff(out, run_logits(base, x)) > CHANGED


def test_exported_program_keeps_the_stored_norm(dora_peft):
    """torch.export of an inference compile (what .pt2 and ONNX are made from) reads the stored constants: no
    norm is computed in the exported graph (the refresh hook does not run while exporting)."""
    from peftc.emit.pt2 import export_graph
    base, _, d = dora_peft
    gm = compile_on(f'adapter default: import "{d}"', "llama", copy.deepcopy(base))
    ep = export_graph(gm, gm.peftc_inputs)
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not [o for o in ops if "norm" in o and "layer" not in o], sorted(ops)
    assert all(any(path in k for k in ep.state_dict) or any(path in k for k in ep.constants)
               for path in gm.peftc.frozen)
