"""Several adapters at once, against real peft: several active adapters (`set_adapter([...])`, LoRA with LoRA and
LoRA with LoHa), and a per-row adapter choice (`adapter_ids` vs peft's `adapter_names=`), each in the fx
GraphModule, the .pt2 and onnxruntime; the stacked form the `stack` pass builds; bad ids and refusals."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import CHANGED, MODELS, TOL, inputs_for, max_diff, randomize_, run_logits

import peftc
from peftc.emit.onnx import run_onnx
from peftc.errors import PeftcError
from peftc.lowrank_form import lowrank_linears
from peftc.trace import trace

peft = pytest.importorskip("peft")

ROWS = {"distinct": [-1, 0, 1], "repeated": [1, 1, 0]}   # ids for a batch of 3 (-1: the base model)


@dataclass
class Setup:
    model: str
    names: list[str]                      # adapters in declaration order
    configs: dict[str, object]
    dirs: dict[str, Path]
    mixed: bool = False                   # methods differ: peft's PeftMixedModel

    def spec(self) -> str:
        return "\n".join(f'adapter {n}: import "{self.dirs[n]}"' for n in self.names) + "\n"

    def peft_model(self):
        base = MODELS[self.model]()
        first, *rest = self.names
        if self.mixed:
            pm = peft.PeftMixedModel.from_pretrained(base, str(self.dirs[first]), adapter_name=first)
        else:
            pm = peft.PeftModel.from_pretrained(base, str(self.dirs[first]), adapter_name=first)
        for n in rest:
            pm.load_adapter(str(self.dirs[n]), adapter_name=n)
        return pm.eval()


SETUPS = {
    "llama": ("llama", {"a": lambda: peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                     target_modules=["q_proj", "v_proj", "down_proj"]),
                        "b": lambda: peft.LoraConfig(r=2, lora_alpha=6, init_lora_weights=False,
                                                     target_modules=["q_proj", "k_proj", "o_proj", "gate_proj"])}),
    "gpt2": ("gpt2", {"a": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                   fan_in_fan_out=True, init_lora_weights=False),
                      "b": lambda: peft.LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn", "c_proj"],
                                                   fan_in_fan_out=True, init_lora_weights=False)}),
    "bert-cls": ("bert-cls", {"a": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                           init_lora_weights=False),
                              "b": lambda: peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                           target_modules=["value", "dense", "classifier"])}),
    "llama-lora-loha": ("llama", {"a": lambda: peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                               target_modules=["q_proj", "v_proj", "up_proj"]),
                                  "h": lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "up_proj"],
                                                               init_weights=False)}),
}


def _setup(key: str, tmp: Path) -> Setup:
    model, makers = SETUPS[key]
    dirs, configs = {}, {}
    for i, (name, make) in enumerate(makers.items()):
        configs[name] = make()
        pm = peft.get_peft_model(copy.deepcopy(MODELS[model]()), configs[name]).eval()
        randomize_(pm, seed=10 + i)
        pm.save_pretrained(str(tmp / name))
        dirs[name] = tmp / name
    mixed = len({type(c) for c in configs.values()}) > 1
    return Setup(model, list(makers), configs, dirs, mixed)


class _Lazy(dict):
    """A session's shared objects, each built on first use by `make(key)`: a worker of `pytest -n` builds only
    those its tests read (the per-row exports are most of this file's time)."""

    def __init__(self, make) -> None:
        super().__init__()
        self.make = make

    def __missing__(self, key):
        self[key] = value = self.make(key)
        return value


@pytest.fixture(scope="session")
def setups(tmp_path_factory) -> dict[str, Setup]:
    return _Lazy(lambda k: _setup(k, tmp_path_factory.mktemp(k)))


@pytest.fixture(scope="session")
def peft_models(setups):
    return _Lazy(lambda k: setups[k].peft_model())


@pytest.fixture(scope="session")
def per_row(setups, tmp_path_factory):
    """key -> (GraphModule compiled with adapter_ids, .pt2 path, .onnx path)."""
    def make(key):
        s = setups[key]
        gm = peftc.compile(s.spec(), MODELS[s.model](), adapter_ids=True)
        d = tmp_path_factory.mktemp(f"{key}-ids")
        peftc.save_pt2(gm, d / "m.pt2")
        peftc.export_onnx(gm, d / "m.onnx")
        return gm, d / "m.pt2", d / "m.onnx"
    return _Lazy(make)


@pytest.fixture(scope="session")
def all_active(setups):
    """key -> the spec of every adapter (all active) compiled, once per session."""
    return _Lazy(lambda k: peftc.compile(setups[k].spec(), MODELS[setups[k].model]()))


@pytest.fixture(scope="session")
def per_row_pt2(per_row):
    """key -> the per-row .pt2 loaded back (torch.export.load), once per session."""
    return _Lazy(lambda k: torch.export.load(str(per_row[k][1])).module())


def _peft_rows(pm, setup: Setup, inputs: dict, ids: list[int]) -> torch.Tensor:
    """peft's answer for a per-row choice: `adapter_names=` where peft has it (LoRA), else row by row with one
    adapter active (the reference for methods peft cannot mix in a batch)."""
    names = ["__base__" if i < 0 else setup.names[i] for i in ids]
    if not setup.mixed:
        with torch.no_grad():
            return pm(**inputs, adapter_names=names).logits
    rows = []
    for b, name in enumerate(names):
        row = {k: v[b:b + 1] for k, v in inputs.items()}
        with torch.no_grad():
            if name == "__base__":
                with pm.disable_adapter():
                    rows.append(pm(**row).logits)
            else:
                pm.set_adapter(name)
                rows.append(pm(**row).logits)
    return torch.cat(rows)


@pytest.mark.parametrize("rows", sorted(ROWS))
@pytest.mark.parametrize("key", ["llama", "gpt2", "bert-cls", "llama-lora-loha"])
def test_per_row_choice_matches_peft(key, rows, setups, peft_models, per_row, per_row_pt2):
    s, pm = setups[key], peft_models[key]
    gm, _, onnx = per_row[key]
    inputs = inputs_for(s.model)
    ids = ROWS[rows]
    want = _peft_rows(pm, s, inputs, ids)
    feed = {**inputs, "adapter_ids": torch.tensor(ids)}
    assert max_diff(run_logits(gm, feed), want) <= TOL
    assert max_diff(run_logits(per_row_pt2[key], feed), want) <= TOL
    assert max_diff(torch.from_numpy(run_onnx(onnx, feed)[0]), want) <= 1e-4
    # each adapter moves its rows (so a graph that ignored adapter_ids could not pass)
    with torch.no_grad(), pm.disable_adapter():
        base = pm(**inputs).logits
    for b, i in enumerate(ids):
        if i >= 0:
            assert max_diff(want[b], base[b]) > CHANGED


def test_onnx_batch_is_dynamic(setups, per_row):
    s = setups["llama"]
    _, _, onnx = per_row["llama"]
    inputs = inputs_for(s.model, batch=5, seq=7, seed=2)
    ids = torch.tensor([1, -1, 0, 0, 1])
    gm = per_row["llama"][0]
    want = run_logits(gm, {**inputs, "adapter_ids": ids})
    got = torch.from_numpy(run_onnx(onnx, {**inputs, "adapter_ids": ids})[0])
    assert max_diff(got, want) <= 1e-4


@pytest.mark.parametrize("bad", [2, -2, 7])
def test_bad_id_is_an_error_in_torch_and_nan_in_onnx(bad, setups, per_row, per_row_pt2):
    s = setups["llama"]
    gm, _, onnx = per_row["llama"]
    inputs = inputs_for(s.model)
    feed = {**inputs, "adapter_ids": torch.tensor([0, bad, -1])}
    for module in (gm, per_row_pt2["llama"]):
        with pytest.raises(RuntimeError, match="adapter_ids: every id must be -1"):
            run_logits(module, feed)
    out = torch.from_numpy(run_onnx(onnx, feed)[0])
    assert out[1].isnan().all() and not out[0].isnan().any() and not out[2].isnan().any()


@pytest.mark.parametrize("key", ["llama", "gpt2", "bert-cls", "llama-lora-loha"])
def test_several_active_match_peft(key, setups, peft_models, all_active):
    s, pm = setups[key], peft_models[key]
    inputs = inputs_for(s.model)
    if s.mixed:
        pm.set_adapter(s.names)
    else:
        pm.base_model.set_adapter(s.names)
    with torch.no_grad():
        want = pm(**inputs).logits
    gm = all_active[key]
    assert max_diff(run_logits(gm, inputs), want) <= TOL
    for name in s.names:   # both adapters count
        if s.mixed:
            pm.set_adapter(name)
        else:
            pm.base_model.set_adapter(name)
        with torch.no_grad():
            assert max_diff(pm(**inputs).logits, want) > CHANGED


def test_several_active_in_pt2_and_onnx(setups, peft_models, all_active, tmp_path):
    s, pm = setups["llama-lora-loha"], peft_models["llama-lora-loha"]
    inputs = inputs_for(s.model)
    pm.set_adapter(s.names)
    with torch.no_grad():
        want = pm(**inputs).logits
    gm = all_active["llama-lora-loha"]
    peftc.save_pt2(gm, tmp_path / "m.pt2")
    peftc.export_onnx(gm, tmp_path / "m.onnx")
    assert max_diff(run_logits(torch.export.load(str(tmp_path / "m.pt2")).module(), inputs), want) <= TOL
    assert max_diff(torch.from_numpy(run_onnx(tmp_path / "m.onnx", inputs)[0]), want) <= 1e-4


def _linears(gm) -> int:
    return sum(n.op == "call_function" and n.target is torch.ops.aten.linear.default for n in gm.graph.nodes)


def test_stacked_form(setups):
    """Two LoRAs on one layer are one product (two matmuls, not four); then (pass `choose`) q/k/v and
    each other adapted layer run as one group call that shares x @ cat(A) in its factored form."""
    s = setups["llama"]
    after_stack: dict[str, int] = {}

    def observe(name: str, gm: torch.fx.GraphModule) -> None:
        if name == "stack":
            after_stack["q"] = sum(n.meta.get("peftc") == "model.layers.0.self_attn.q_proj" and n.op == "call_function"
                                   and n.target is torch.ops.aten.linear.default for n in gm.graph.nodes)
            after_stack["all"] = _linears(gm)

    c = peftc.compile_model(s.spec(), MODELS[s.model](), observe=observe)
    assert after_stack["q"] == 3   # the base matmul, x @ cat(A_a, A_b), h @ cat(s_a B_a, s_b B_b)
    assert c.rule_hits["low_rank"] > 0
    base = trace(MODELS[s.model](), inputs_for(s.model))
    assert after_stack["all"] - _linears(base) == 2 * 6 * 2   # 2 blocks, 6 adapted layers, an A and a B each
    groups = [n for n in c.gm.graph.nodes if n.op == "call_function" and n.target is lowrank_linears]
    # per block: q/k/v, o, gate, down; every adapted layer's matmuls are inside a group call
    assert sorted(len(n.args[1]) for n in groups) == sorted([3, 1, 1, 1] * 2)
    assert _linears(c.gm) == _linears(base) - 2 * 6


def test_dump_after_stack_shows_the_fused_graph(setups):
    s = setups["llama"]
    out: list[str] = []
    peftc.compile_model(s.spec(), MODELS[s.model](), adapter_ids=True, dump_after="stack", dump=out.append)
    assert "adapter_ids" in out[0] and " stack" in out[0] and "_assert_async" in out[0]


def test_per_row_refusals(setups, tmp_path):
    s = setups["llama"]
    with pytest.raises(PeftcError, match="merge"):
        peftc.compile(s.spec(), MODELS[s.model](), adapter_ids=True, merge=True)
    with pytest.raises(PeftcError, match="merge"):
        peftc.compile(s.spec().replace('"\n', '" { merge }\n', 1), MODELS[s.model](), adapter_ids=True)
    spec = s.spec() + 'adapter i: ia3() { targets v_proj }\n'
    with pytest.raises(PeftcError, match="adapter 'i' on layer .* cannot be chosen per row"):
        peftc.compile(spec, MODELS[s.model](), adapter_ids=True)


def test_inactive_adapters_are_selectable(setups):
    """`active` does not limit a per-row choice: ids index every declared adapter."""
    s = setups["llama"]
    gm = peftc.compile(s.spec() + f"active {s.names[0]}\n", MODELS[s.model](), adapter_ids=True)
    pm = setups["llama"].peft_model()
    inputs = inputs_for(s.model)
    want = _peft_rows(pm, s, inputs, [1, 1, -1])
    assert max_diff(run_logits(gm, {**inputs, "adapter_ids": torch.tensor([1, 1, -1])}), want) <= TOL


def test_per_row_choice_follows_the_module_dtype(setups, per_row):
    s = setups["llama"]
    gm = copy.deepcopy(per_row["llama"][0])
    feed = {**inputs_for(s.model), "adapter_ids": torch.tensor([-1, 0, 1])}
    want = run_logits(gm, feed)
    got = run_logits(gm.to(torch.bfloat16), feed)
    assert got.dtype == torch.bfloat16 and max_diff(got.float(), want) < 0.05
