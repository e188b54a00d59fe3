"""Sites beyond one module's weight, against the real peft library:

* LoRA on bare nn.Parameters (peft's `target_parameters`): stacked MoE experts (OLMoE keeps them as
  (experts, out, in), gpt-oss transposed as (experts, in, out)) and a 2-d router weight;
* LoRA and DoRA on grouped convolutions, DoRA on Conv1d / Conv3d;
* `layer_replication` (decoder layers repeated, the copies sharing base weights, each with its own adapter).

For each: `import` of a peft checkpoint, merged and unmerged (== peft; where peft cannot merge, merged == peft
unmerged: merging keeps the function), ONNX merged and unmerged (onnxruntime == peft), a fresh spec saved by
peftc that peft loads to identical outputs, and located errors.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import MODELS, inputs_for, lora, max_diff, randomize_, run_logits
from peft import PeftModel, get_peft_model
from torch import nn

import peftc
from peftc.emit.onnx import run_onnx
from peftc.errors import PeftcError

TOL = 1e-5
CHANGED = 1e-4


def _peft_checkpoint(base: nn.Module, config, directory, seed: int = 1):
    pm = get_peft_model(copy.deepcopy(base), config).eval()
    randomize_(pm, seed)
    pm.save_pretrained(str(directory))
    return pm


def _onnx_vs(gm, ref: torch.Tensor, inputs: dict[str, torch.Tensor], path) -> float:
    """Export (peftc's own onnxruntime check runs), then onnxruntime on `inputs` against a reference."""
    assert peftc.export_onnx(gm, path) is not None
    return max_diff(torch.from_numpy(run_onnx(path, inputs)[0]), ref)


# ---------------------------------------------------------------- MoE: target_parameters
MOE = {
    # OLMoE: both expert stacks, the 2-d router weight, and an ordinary module target beside them
    "olmoe": dict(target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj",
                                                                "mlp.gate.weight"]),
    # gpt-oss: experts stored (experts, in, out), with biases; rank per parameter from rank_pattern
    "gpt-oss": dict(target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                    rank_pattern={"experts.down_proj": 3}),
}


@pytest.fixture(scope="session")
def moe_case(tmp_path_factory):
    """name -> (base model, peft model, checkpoint dir): built once per session."""
    made = {}

    def get(name: str):
        if name not in made:
            base = MODELS[name]()
            d = tmp_path_factory.mktemp(f"moe-{name}")
            made[name] = (base, _peft_checkpoint(base, lora(r=2, lora_alpha=4, **MOE[name]), d), d)
        return made[name]
    return get


@pytest.mark.parametrize("name", list(MOE))
def test_moe_import_matches_peft_merged_and_unmerged(name, moe_case):
    base, pm, d = moe_case(name)
    x = inputs_for(name)
    ref = run_logits(pm, x)
    assert max_diff(ref, run_logits(base, x)) > CHANGED
    before = base.get_experts_implementation()
    spec = f'adapter default: import "{d}"'
    c = peftc.compile_model(spec, base)
    assert max_diff(run_logits(c.gm, x), ref) <= TOL
    assert sum(1 for layer in c.plan.layers.values() if layer.kind.startswith("parameter")) >= 4
    merged_ref = run_logits(copy.deepcopy(pm).merge_and_unload(), x)
    assert max_diff(run_logits(peftc.compile(spec, base, merge=True), x), merged_ref) <= TOL
    assert base.get_experts_implementation() == before   # traced with batched_mm, the model's setting restored


def test_mixtral_all_linear_checkpoint_imports(tmp_path):
    """peft turns `all-linear` on a transformers-5 Mixtral into target_parameters (the fused expert stacks and the
    router), with rank and alpha doubled for gate_up_proj (w1 and w3 fused); such a checkpoint imports as saved."""
    import transformers as T
    from conftest import VOCAB
    torch.manual_seed(0)
    base = T.MixtralForCausalLM(T.MixtralConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=8,
                                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                                num_local_experts=4, num_experts_per_tok=2, use_cache=False)).eval()
    pm = _peft_checkpoint(base, lora(r=2, lora_alpha=4, target_modules="all-linear"), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "gate_up_proj" in cfg["target_parameters"] and cfg["rank_pattern"]
    x = inputs_for("llama")
    ref = run_logits(pm, x)
    spec = f'adapter default: import "{tmp_path}"'
    assert max_diff(run_logits(peftc.compile(spec, base), x), ref) <= TOL
    merged_ref = run_logits(copy.deepcopy(pm).merge_and_unload(), x)
    assert max_diff(run_logits(peftc.compile(spec, base, merge=True), x), merged_ref) <= TOL


def test_moe_onnx_merged_and_unmerged(moe_case, tmp_path):
    base, pm, d = moe_case("olmoe")
    x = inputs_for("olmoe")
    ref = run_logits(pm, x)
    for merge in (False, True):
        gm = peftc.compile(f'adapter default: import "{d}"', base, merge=merge)
        assert _onnx_vs(gm, ref, x, tmp_path / f"m{merge}.onnx") <= 1e-4


def test_moe_peftc_import_writes_a_spec_that_compiles(moe_case, tmp_path):
    from peftc.importer import import_spec
    base, pm, d = moe_case("olmoe")
    out = tmp_path / "moe.peft"
    imported = import_spec([str(d)], out)
    assert "target_parameters=" in imported.text
    x = inputs_for("olmoe")
    assert max_diff(run_logits(peftc.compile(str(out), base), x), run_logits(pm, x)) <= TOL


def test_moe_checkpoint_keys_and_config_as_peft(moe_case, tmp_path):
    """Several parameters of one module: peft nests one wrapper per parameter (the first declared innermost)."""
    base, pm, d = moe_case("olmoe")
    gm = peftc.compile(f'adapter default: import "{d}"', base)
    out = tmp_path / "out"
    peftc.save_adapter(gm, out)
    from safetensors.torch import load_file
    ours, theirs = load_file(str(out / "adapter_model.safetensors")), load_file(str(d / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(k for k in cfg["target_modules"] if k.endswith("q_proj"))
    assert len(cfg["target_parameters"]) == 6


@pytest.mark.parametrize("name", list(MOE))
def test_moe_fresh_spec_saved_loads_in_peft(name, tmp_path):
    base = MODELS[name]()
    x = inputs_for(name)
    spec = ('adapter default: lora(r = 2, alpha = 4, init = "random") {\n'
            "    parameters experts.gate_up_proj, experts.down_proj\n"
            "    r at experts.down_proj = 4\n}\n")
    gm = peftc.compile(spec, base)
    randomize_(gm, seed=3)
    ours = run_logits(gm, x)
    assert max_diff(ours, run_logits(base, x)) > CHANGED
    peftc.save_adapter(gm, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["target_modules"] == [] and len(cfg["target_parameters"]) == 4
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert max_diff(run_logits(pm, x), ours) <= TOL


@pytest.mark.parametrize("block, message", [
    ("parameters experts.up_proj", "parameters experts.up_proj match no parameter"),
    ("parameters q_proj.weight\n targets q_proj", "is both a target and the owner of a targeted parameter"),
    ("parameters input_layernorm.weight", "only 2-d and 3-d floating point parameters"),
])
def test_moe_bad_parameter_targets_are_located_errors(block, message):
    spec = f"adapter a: lora() {{\n {block}\n}}\n"
    with pytest.raises(PeftcError, match=message) as e:
        peftc.compile(spec, MODELS["olmoe"]())
    assert "<spec>:2:" in str(e.value)


@pytest.mark.parametrize("source, message", [
    ("lora(lora_bias = true)", "lora_bias is not supported on parameters"),
    ("lora(dropout = 0.1)", "dropout is not supported on parameters"),
    ("dora()", "dora does not support layer"),
])
def test_moe_unsupported_options_are_refused(source, message):
    with pytest.raises(PeftcError, match=message):
        peftc.compile(f"adapter a: {source} {{ parameters experts.down_proj }}", MODELS["olmoe"]())


# ---------------------------------------------------------------- grouped convolutions, DoRA on Conv1d/Conv3d
class GroupNet(nn.Module):
    """Convolutions of one dimensionality: ungrouped, grouped with a 3-wide kernel, grouped 1x1."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
        self.c0 = conv(4, 8, 3, padding=1)
        self.c1 = conv(8, 16, 3, padding=1, groups=2)
        self.c2 = conv(16, 16, 1, groups=4)
        self.c3 = conv(16, 6, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(torch.relu(self.c2(torch.relu(self.c1(torch.relu(self.c0(x))))))).flatten(1)


def groupnet(dim: int) -> nn.Module:
    torch.manual_seed(0)
    return GroupNet(dim).eval()


def group_inputs(dim: int, batch: int = 2, size: int = 7, seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, 4, *([size] * dim), generator=g)}


def _conv_compile(spec: str, dim: int, **kw):
    return peftc.compile(spec, groupnet(dim), example_inputs=group_inputs(dim, 3, 9, 3), **kw)


CONV_CASES = [(dim, dora) for dim in (1, 2, 3) for dora in (False, True)]


@pytest.mark.parametrize("dim, dora", CONV_CASES, ids=[f"conv{d}d-{'dora' if o else 'lora'}" for d, o in CONV_CASES])
def test_grouped_conv_matches_peft(dim, dora, tmp_path):
    base, x = groupnet(dim), group_inputs(dim)
    pm = _peft_checkpoint(base, lora(r=4, lora_alpha=8, target_modules=["c0", "c1", "c2", "c3"], use_dora=dora),
                          tmp_path)
    ref = run_logits(pm, x)
    assert max_diff(ref, run_logits(base, x)) > CHANGED
    spec = f'adapter default: import "{tmp_path}"'
    c = peftc.compile_model(spec, base, example_inputs=group_inputs(dim, 3, 9, 3))
    assert max_diff(run_logits(c.gm, x), ref) <= TOL
    assert c.rule_hits["conv_regroup"] == 2 and c.rule_hits["conv_grouped_low_rank"] == 2
    # peft cannot merge a grouped layer; peftc's merge widens it to an ungrouped kernel and keeps the function
    merged = _conv_compile(spec, dim, merge=True)
    assert max_diff(run_logits(merged, x), ref) <= TOL


def test_dora_conv1d_conv3d_merge_matches_peft(tmp_path):
    for dim in (1, 3):
        base, x = groupnet(dim), group_inputs(dim)
        pm = _peft_checkpoint(base, lora(r=2, lora_alpha=4, target_modules=["c0", "c3"], use_dora=True),
                              tmp_path / str(dim))
        spec = f'adapter default: import "{tmp_path / str(dim)}"'
        merged_ref = run_logits(copy.deepcopy(pm).merge_and_unload(), x)
        assert max_diff(run_logits(_conv_compile(spec, dim, merge=True), x), merged_ref) <= TOL


def test_grouped_conv_onnx_and_fresh_round_trip(tmp_path):
    dim, x = 2, group_inputs(2, size=9)   # a custom model's spatial size is fixed when it is traced (9)
    spec = 'adapter default: dora(r = 4, alpha = 8, init = "random") { targets c0, c1, c2 }'
    gm = _conv_compile(spec, dim)
    randomize_(gm, seed=4, scale=0.1)
    ours = run_logits(gm, x)
    peftc.save_adapter(gm, tmp_path / "ckpt")
    pm = PeftModel.from_pretrained(groupnet(dim), str(tmp_path / "ckpt")).eval()
    assert max_diff(run_logits(pm, x), ours) <= TOL
    assert _onnx_vs(gm, ours, x, tmp_path / "live.onnx") <= 1e-4
    merged = _conv_compile(f'adapter default: import "{tmp_path / "ckpt"}"', dim, merge=True)
    assert _onnx_vs(merged, ours, x, tmp_path / "merged.onnx") <= 1e-4


def test_grouped_conv_rank_must_divide_into_groups():
    with pytest.raises(PeftcError, match="needs r divisible by groups"):
        _conv_compile("adapter a: lora(r = 3) { targets c1 }", 2)


# ---------------------------------------------------------------- layer_replication
REPLICATE = [[0, 2], [1, 2]]   # layers [0, 1, 1]: the copy of layer 1 shares its weights


@pytest.fixture(scope="session")
def replicated(tmp_path_factory):
    """dora -> (peft model, checkpoint dir) on the tiny llama with replicated layers."""
    made = {}

    def get(dora: bool):
        if dora not in made:
            d = tmp_path_factory.mktemp(f"replicated-{dora}")
            cfg = lora(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=dora,
                       layer_replication=REPLICATE)
            made[dora] = (_peft_checkpoint(MODELS["llama"](), cfg, d), d)
        return made[dora]
    return get


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_layer_replication_import_matches_peft(dora, replicated):
    pm, d = replicated(dora)
    base, x = MODELS["llama"](), inputs_for("llama")
    ref = run_logits(pm, x)
    spec = f'adapter default: import "{d}"'
    c = peftc.compile_model(spec, base)
    assert len(c.plan.sites) == 9                     # 3 layers x 3 targets
    assert max_diff(run_logits(c.gm, x), ref) <= TOL
    # peft refuses to merge replicated layers; peftc folds each copy into a weight of its own
    assert max_diff(run_logits(peftc.compile(spec, base, merge=True), x), ref) <= TOL
    assert len(base.model.layers) == 2 and base.config.num_hidden_layers == 2   # the caller's model is unchanged


def test_layer_replication_onnx_merged_and_unmerged(replicated, tmp_path):
    pm, d = replicated(False)
    x = inputs_for("llama")
    ref = run_logits(pm, x)
    for merge in (False, True):
        gm = peftc.compile(f'adapter default: import "{d}"', MODELS["llama"](), merge=merge)
        assert _onnx_vs(gm, ref, x, tmp_path / f"m{merge}.onnx") <= 1e-4


def test_layer_replication_fresh_spec_saved_loads_in_peft(tmp_path):
    base, x = MODELS["llama"](), inputs_for("llama")
    spec = ('adapter default: lora(r = 2, alpha = 4, init = "random") {\n    targets q_proj, v_proj\n'
            "    replicate [0, 2], [1, 2]\n}\n")
    gm = peftc.compile(spec, base)
    randomize_(gm, seed=5)
    ours = run_logits(gm, x)
    peftc.save_adapter(gm, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["layer_replication"] == REPLICATE and len(cfg["target_modules"]) == 6
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert max_diff(run_logits(pm, x), ours) <= TOL


@pytest.mark.parametrize("spec, message", [
    ("adapter a: lora() { targets q_proj\n replicate [0, 3] }", "outside the model's 2 layers"),
    ("adapter a: lora() { targets q_proj\n replicate [0, 2] }\nadapter b: lora() { targets v_proj\n"
     " replicate [0, 2] }", "both replicate layers"),
    ("adapter a: ia3() { targets q_proj\n replicate [0, 2] }", "ia3 does not replicate layers"),
])
def test_layer_replication_errors(spec, message):
    with pytest.raises(PeftcError, match=message):
        peftc.compile(spec, MODELS["llama"]())
