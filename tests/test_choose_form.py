"""Pass `choose` (peftc.rewrite.choose_form) and its run-time function (peftc.lowrank_form): a low-rank layer group
computed factored for few tokens and dense (W + BA) for many; both forms against real peft, in the GraphModule,
the .pt2 (a torch.cond) and onnxruntime (an If)."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import CHANGED, MODELS, TOL, inputs_for, lora, max_diff, randomize_, run_logits

import peftc
import peftc.lowrank_form as lf
from peftc.emit.onnx import run_onnx
from peftc.lowrank_form import lowrank_linears

peft = pytest.importorskip("peft")

TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           # BERT's layers have biases (not the pooler's dense: it reads one token per row, and stays factored)
           "bert-cls": ["query", "key", "value", "output.dense", "intermediate.dense"]}


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of each form."""
    calls = {"dense": 0, "factored": 0}
    dense, factored = lf._dense, lf._factored

    def counting(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(lf, "_dense", counting("dense", dense))
    monkeypatch.setattr(lf, "_factored", counting("factored", factored))
    return calls


def _group(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)   # noqa: E731
    x = r(2, 3, 8)
    ws, bs = [r(5, 8), r(7, 8)], [r(5), None]
    downs, ups = [r(2, 8), r(3, 8)], [r(5, 2), r(7, 3)]
    return x, ws, bs, downs, ups


def _reference(x, ws, bs, downs, ups):
    F = torch.nn.functional
    return [F.linear(x, w, b) + F.linear(F.linear(x, a), u) for w, b, a, u in zip(ws, bs, downs, ups)]


@pytest.mark.parametrize("threshold,form", [(1, "dense"), (6, "dense"), (7, "factored"), (10**9, "factored")])
def test_forms_agree(spy, threshold, form):
    x, ws, bs, downs, ups = _group()
    got = lowrank_linears(x, ws, bs, downs, ups, threshold)   # 6 tokens
    assert spy[form] == 1 and sum(spy.values()) == 1
    for g, w in zip(got, _reference(x, ws, bs, downs, ups)):
        assert g.shape == w.shape and max_diff(g, w) <= 1e-5


def test_gradients_take_the_factored_form(spy):
    x, ws, bs, downs, ups = _group()
    downs = [a.requires_grad_() for a in downs]
    got = lowrank_linears(x, ws, bs, downs, ups, 1)
    assert spy == {"dense": 0, "factored": 1}
    sum(y.square().sum() for y in got).backward()
    ours = [a.grad.clone() for a in downs]
    for a in downs:
        a.grad = None
    sum(y.square().sum() for y in _reference(x, ws, bs, downs, ups)).backward()
    for g, a in zip(ours, downs):
        assert max_diff(g, a.grad) <= 1e-4


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    out = {}
    for model, targets in TARGETS.items():
        pm = peft.get_peft_model(copy.deepcopy(MODELS[model]()), lora(target_modules=targets)).eval()
        randomize_(pm, seed=3)
        d = tmp_path_factory.mktemp(model)
        pm.save_pretrained(str(d))
        out[model] = (pm, f'adapter default: import "{d}"\n')
    return out


def _thresholds(gm) -> list[int]:
    return [n.args[5] for n in gm.graph.nodes if n.op == "call_function" and n.target is lowrank_linears]


def _few_and_many(model: str, gm) -> tuple[dict, dict]:
    """Inputs below every group's threshold and at or above every group's."""
    th = _thresholds(gm)
    few, many = inputs_for(model, batch=1, seq=2), inputs_for(model, batch=3, seq=19)
    assert th and 2 < min(th) and max(th) <= 3 * 19, th
    return few, many


@pytest.mark.parametrize("model", list(TARGETS))
def test_both_forms_match_peft(adapted, spy, model):
    pm, spec = adapted[model]
    gm = peftc.compile(spec, MODELS[model]())
    groups = len(_thresholds(gm))
    few, many = _few_and_many(model, gm)
    for x, form in ((few, "factored"), (many, "dense")):
        spy.update(dense=0, factored=0)
        want = run_logits(pm, x)
        assert max_diff(run_logits(gm, x), want) <= TOL
        assert spy[form] == groups and sum(spy.values()) == groups
        with torch.no_grad(), pm.disable_adapter():
            assert max_diff(run_logits(pm, x), want) > CHANGED   # the adapter matters here


def test_pt2_and_onnx_choose_at_run_time(adapted, tmp_path):
    pm, spec = adapted["llama"]
    gm = peftc.compile(spec, MODELS["llama"]())
    peftc.save_pt2(gm, tmp_path / "m.pt2")
    peftc.export_onnx(gm, tmp_path / "m.onnx")
    ep = torch.export.load(str(tmp_path / "m.pt2"))
    assert any(n.target is torch.ops.higher_order.cond for n in ep.graph.nodes)
    import onnx
    assert "If" in {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    for x in _few_and_many("llama", gm):
        want = run_logits(pm, x)
        assert max_diff(run_logits(ep.module(), x), want) <= TOL
        assert max_diff(torch.from_numpy(run_onnx(tmp_path / "m.onnx", x)[0]), want) <= 1e-4


def test_dump_after_choose(adapted):
    _, spec = adapted["llama"]
    out: list[str] = []
    peftc.compile_model(spec, MODELS["llama"](), dump_after="choose", dump=out.append)
    assert "lowrank_linears" in out[0] and "choose" in out[0]


def test_no_choice_with_dropout_in_training(tmp_path):
    """Adapter dropout: A reads dropout(x), not x, so the layer keeps its own form."""
    pm = peft.get_peft_model(MODELS["llama"](), lora(target_modules=["q_proj"], lora_dropout=0.1))
    pm.save_pretrained(str(tmp_path))
    gm = peftc.compile(f'adapter default: import "{tmp_path}"\n', MODELS["llama"](), train=True)
    assert not _thresholds(gm)
