"""The method files (passes/lora.peft, dora.peft, ia3.peft), one layer kind at a time.

* factored (unmerged) form == folded (merged) form, with the same non-identity weights (<= 1e-5, fp32);
* the factored LoRA / IA3 forms never materialise a dense weight update;
* every layer kind a method declares is exercised here (a new kind without a test fails the coverage check);
* the kinds our shared test models lack (nn.Conv1d, nn.Conv3d) are checked against peft too;
* bf16: peftc's merged weights are at least as close to an fp64 merge as peft's merge_and_unload().
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import MODELS, compile_on, inputs_for, max_diff, randomize_, run_logits
from peft import IA3Config, LoraConfig, get_peft_model
from safetensors.torch import load_file
from torch import nn

import peftc
from peftc.library import library

TOL = 1e-5
CHANGED = 1e-4
aten = torch.ops.aten


class SeqVolNet(nn.Module):
    """nn.Conv1d over a sequence and nn.Conv3d over a volume (kinds the shared models lack)."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Conv1d(4, 6, 3, padding=1)
        self.vol = nn.Conv3d(2, 3, (3, 3, 3), stride=(1, 2, 1), padding=1)
        self.head = nn.Linear(6 + 3, 5)

    def forward(self, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.seq(s)).mean(dim=2)
        b = torch.relu(self.vol(v)).flatten(2).mean(dim=2)
        return self.head(torch.cat([a, b], dim=1))


def seqvol() -> nn.Module:
    torch.manual_seed(0)
    return SeqVolNet().eval()


def seqvol_inputs(batch: int = 3, seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"s": torch.randn(batch, 4, 10, generator=g), "v": torch.randn(batch, 2, 4, 6, 4, generator=g)}


def _compile(spec: str, model_name: str, **kw):
    if model_name == "seqvol":
        return peftc.compile(spec, seqvol(), example_inputs=seqvol_inputs(batch=2, seed=3), **kw)
    return compile_on(spec, model_name, **kw)


def _inputs(model_name: str) -> dict[str, torch.Tensor]:
    return seqvol_inputs() if model_name == "seqvol" else inputs_for(model_name)


def _base(model_name: str) -> nn.Module:
    return seqvol() if model_name == "seqvol" else MODELS[model_name]()


# (method, layer kind, variant) -> (model, adapter source with its block; init = "random" everywhere)
SITES = {
    ("lora", "linear", "bias"): ("token-mlp", 'lora(r = 3, alpha = 5, init = "random") { targets lin0, lin1 }'),
    ("lora", "linear", "nobias-rslora"): ("llama", 'lora(r = 4, alpha = 8, rslora = true, init = "random") '
                                                   "{ targets q_proj, down_proj }"),
    ("lora", "linear", "lora_bias"): ("token-mlp", 'lora(r = 2, alpha = 3, lora_bias = true, init = "random") '
                                                   "{ targets lin0, lin1 }"),
    ("lora", "linear", "gaussian"): ("token-mlp", 'lora(r = 2, init = "gaussian") { targets lin0 }'),
    ("lora", "conv1d_hf", "lora_bias"): ("gpt2", 'lora(r = 2, alpha = 4, lora_bias = true, init = "random") '
                                                 "{ targets c_attn, c_fc }"),
    ("lora", "conv1d", "lora_bias"): ("seqvol", 'lora(r = 2, alpha = 4, lora_bias = true, init = "random") '
                                                "{ targets seq }"),
    ("lora", "conv2d", "lora_bias"): ("convnet", 'lora(r = 2, alpha = 4, lora_bias = true, init = "random") '
                                                 "{ targets conv1, conv2 }"),
    ("lora", "conv3d", "plain"): ("seqvol", 'lora(r = 2, alpha = 4, init = "random") { targets vol }'),
    ("lora", "embedding", "plain"): ("token-mlp", 'lora(r = 4, alpha = 8, init = "random") { targets emb }'),
    ("lora", "mha", "plain"): ("mha", 'lora(r = 2, alpha = 4, init = "random") { targets attn }'),
    ("dora", "linear", "bias"): ("token-mlp", 'dora(r = 2, alpha = 4, init = "random") { targets lin0, lin1 }'),
    ("dora", "linear", "rslora"): ("llama", 'dora(r = 4, alpha = 8, rslora = true, init = "random") '
                                            "{ targets q_proj, up_proj }"),
    ("dora", "conv1d_hf", "plain"): ("gpt2", 'dora(r = 2, alpha = 4, init = "random") { targets c_attn }'),
    ("dora", "conv2d", "plain"): ("convnet", 'dora(r = 2, alpha = 4, init = "random") { targets conv1, conv2 }'),
    ("dora", "embedding", "plain"): ("token-mlp", 'dora(r = 2, alpha = 4, init = "random") { targets emb }'),
    ("ia3", "linear", "ff-and-not"): ("token-mlp", 'ia3(init = "random") { targets lin0, lin1\n feedforward lin1 }'),
    ("ia3", "linear", "nobias"): ("llama", 'ia3(init = "random") { targets k_proj, down_proj\n'
                                           " feedforward down_proj }"),
    ("ia3", "conv1d_hf", "ff-and-not"): ("gpt2", 'ia3(init = "random") { targets c_attn, mlp.c_proj\n'
                                                 " feedforward mlp.c_proj }"),
    ("ia3", "conv1d", "ff"): ("seqvol", 'ia3(init = "random") { targets seq\n feedforward seq }'),
    ("ia3", "conv2d", "ff-and-not"): ("convnet", 'ia3(init = "random") { targets conv1, conv2\n feedforward conv2 }'),
    ("ia3", "conv3d", "not-ff"): ("seqvol", 'ia3(init = "random") { targets vol }'),
    ("lora", "parameter", "experts"): ("olmoe", 'lora(r = 2, alpha = 4, init = "random") '
                                                "{ parameters experts.gate_up_proj, experts.down_proj }"),
    ("lora", "parameter_t", "experts"): ("gpt-oss", 'lora(r = 2, alpha = 4, init = "random") '
                                                    "{ parameters experts.down_proj }"),
    ("dora", "conv1d", "plain"): ("seqvol", 'dora(r = 2, alpha = 4, init = "random") { targets seq }'),
    ("dora", "conv3d", "plain"): ("seqvol", 'dora(r = 2, alpha = 4, init = "random") { targets vol }'),
}
IDS = ["-".join(k) for k in SITES]


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_every_declared_layer_kind_is_covered(method):
    declared = set(library().method(method).kinds)
    covered = {kind for (m, kind, _) in SITES if m == method}
    assert declared <= covered, f"{method}: no test for layer kinds {sorted(declared - covered)}"


@pytest.mark.parametrize("key", list(SITES), ids=IDS)
def test_factored_and_folded_forms_agree(key, tmp_path):
    method, _, _ = key
    model_name, source = SITES[key]
    x = _inputs(model_name)
    gm = _compile(f"adapter default: {source}\n", model_name)
    live = {n: p for n, p in gm.named_parameters() if p.requires_grad}
    assert live, "an unmerged adapter has trainable tensors"
    randomize_(gm, seed=2, scale=0.1)       # away from the init (DoRA: magnitude != ||W + s B A||)
    factored = run_logits(gm, x)
    base_out = run_logits(_base(model_name), x)
    assert max_diff(factored, base_out) > CHANGED
    d = tmp_path / "ckpt"
    peftc.save_adapter(gm, d)
    saved = load_file(str(d / "adapter_model.safetensors"))
    assert len(saved) == len(live)
    block = source[source.index("{") + 1: source.rindex("}")]
    head = source[: source.index("{")]
    spec = f'adapter default: {head} {{ {block}\n weights "{d}"\n merge }}\n'
    folded_gm = _compile(spec, model_name)
    assert not any(p.requires_grad for p in folded_gm.parameters())
    assert max_diff(run_logits(folded_gm, x), factored) <= TOL


def _adapter_nodes(gm) -> set:
    """get_attr nodes reading a trainable (adapter) tensor."""
    live = {n for n, p in gm.named_parameters() if p.requires_grad}
    return {n for n in gm.graph.nodes if n.op == "get_attr" and n.target in live}


DENSE_OPS = {aten.mm.default, aten.matmul.default, aten.bmm.default, aten.outer.default, aten.addmm.default}


LOW_RANK = [k for k in SITES if k[0] in ("lora", "ia3") and not k[1].startswith("parameter")]   # a bare
# parameter's readers are whatever its module computes: its update is rebuilt per forward (as peft does)


@pytest.mark.parametrize("key", LOW_RANK, ids=["-".join(k) for k in LOW_RANK])
def test_factored_form_is_low_rank(key):
    """An unmerged LoRA / IA3 graph computes linear(x, W) + s * linear(linear(x, A), B) (or a scaling of x / y):
    no dense weight-sized product of adapter tensors, and no second copy of any base weight."""
    model_name, source = SITES[key]
    gm = _compile(f"adapter default: {source}\n", model_name)
    adapter = _adapter_nodes(gm)
    assert adapter
    # nodes computed from adapter tensors alone (no activations): must stay small
    derived = set(adapter)
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.all_input_nodes and all(a in derived for a in n.all_input_nodes):
            derived.add(n)
    dense = [n for n in derived if n.op == "call_function" and n.target in DENSE_OPS]
    assert not dense, [str(n.format_node()) for n in dense]
    # no extra weight-sized tensors: everything the graph holds is the base model plus the adapter tensors
    base_numel = sum(p.numel() for p in _base(model_name).parameters())
    adapter_numel = sum(p.numel() for p in gm.parameters() if p.requires_grad)
    extra = {n: t for n, t in gm.named_buffers() if n.split(".")[-1].startswith("peftc")}
    held = sum(t.numel() for t in gm.parameters()) + sum(t.numel() for t in extra.values())
    assert held <= base_numel + adapter_numel, {n: tuple(t.shape) for n, t in extra.items()}


# ---------------------------------------------------------------- Conv1d / Conv3d against peft
@pytest.mark.parametrize("targets", [["seq"], ["vol"], ["seq", "vol", "head"]], ids=["conv1d", "conv3d", "all"])
@pytest.mark.parametrize("lora_bias", [False, True], ids=["plain", "lora_bias"])
def test_conv1d_conv3d_lora_matches_peft(targets, lora_bias, tmp_path):
    x = _inputs("seqvol")
    base = seqvol()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=6, target_modules=targets,
                                                        lora_bias=lora_bias, init_lora_weights=False)).eval()
    randomize_(pm, seed=5)
    pm.save_pretrained(str(tmp_path))
    ref = run_logits(pm, x)
    assert max_diff(ref, run_logits(base, x)) > CHANGED
    spec = f'adapter default: import "{tmp_path}"'
    assert max_diff(run_logits(_compile(spec, "seqvol"), x), ref) <= TOL
    merged = run_logits(copy.deepcopy(pm).merge_and_unload(), x)
    assert max_diff(run_logits(_compile(spec, "seqvol", merge=True), x), merged) <= TOL


@pytest.mark.parametrize("ff", [[], ["conv2"], ["conv1", "conv2"]], ids=["out", "ff-one", "ff-all"])
def test_ia3_conv2d_matches_peft(ff, tmp_path):
    x = inputs_for("convnet")
    base = MODELS["convnet"]()
    cfg = IA3Config(target_modules=["conv1", "conv2", "fc1"], feedforward_modules=ff, init_ia3_weights=False)
    pm = get_peft_model(copy.deepcopy(base), cfg).eval()
    randomize_(pm, seed=4)
    pm.save_pretrained(str(tmp_path))
    ref = run_logits(pm, x)
    assert max_diff(ref, run_logits(base, x)) > CHANGED
    spec = f'adapter default: import "{tmp_path}"'
    assert max_diff(run_logits(_compile(spec, "convnet"), x), ref) <= TOL
    merged = run_logits(copy.deepcopy(pm).merge_and_unload(), x)
    assert max_diff(run_logits(_compile(spec, "convnet", merge=True), x), merged) <= TOL


# ---------------------------------------------------------------- bf16 merges
def _fp64_merge(method: str, cfg, key: str, W: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The merged weight in fp64 from the checkpoint tensors (formulas of method-math.md), nn.Linear layout."""
    W = W.double()
    if method == "ia3":
        l = t[f"{key}.ia3_l"].double()
        return W * l if l.shape[0] == 1 else l * W
    A, B = t[f"{key}.lora_A.weight"].double(), t[f"{key}.lora_B.weight"].double()
    s = cfg.lora_alpha / (math.sqrt(cfg.r) if cfg.use_rslora else cfg.r)
    V = W + s * (B @ A)
    if method == "lora":
        return V
    m = t[f"{key}.lora_magnitude_vector"].double()
    return (m / V.norm(dim=1))[:, None] * V


BF16_CASES = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                               init_lora_weights=False),
    "lora-rslora": lambda: LoraConfig(r=8, lora_alpha=3, use_rslora=True, target_modules=["k_proj", "up_proj"],
                                      init_lora_weights=False),
    "dora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True,
                               init_lora_weights=False),
    "ia3": lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                             init_ia3_weights=False),
}


@pytest.mark.parametrize("case", list(BF16_CASES))
def test_bf16_merge_is_at_least_as_accurate_as_peft(case, tmp_path):
    method = case.split("-")[0]
    cfg = BF16_CASES[case]()
    base = MODELS["llama"]().to(torch.bfloat16)
    pm = get_peft_model(copy.deepcopy(base), cfg).eval()
    randomize_(pm, seed=8, scale=0.05)
    pm.save_pretrained(str(tmp_path))
    tensors = {k.removeprefix("base_model.model."): v for k, v in
               load_file(str(tmp_path / "adapter_model.safetensors")).items()}
    layers = sorted({k.rsplit(".lora_", 1)[0].rsplit(".ia3_l", 1)[0] for k in tensors})
    assert layers
    peft_merged = dict(copy.deepcopy(pm).merge_and_unload().named_parameters())
    gm = compile_on(f'adapter default: import "{tmp_path}"', "llama", copy.deepcopy(base), merge=True)
    base_params = dict(base.named_parameters())
    total_ours = total_peft = 0.0
    for layer in layers:
        name = f"{layer}.weight"
        ours = gm.get_parameter(name)
        assert ours.dtype == torch.bfloat16, name
        assert not torch.equal(ours, base_params[name]), name
        ref = _fp64_merge(method, cfg, layer, base_params[name].detach(), tensors)
        err_ours = (ours.double() - ref).abs()
        err_peft = (peft_merged[name].double() - ref).abs()
        assert err_ours.max() <= err_peft.max(), (name, err_ours.max().item(), err_peft.max().item())
        total_ours += err_ours.sum().item()
        total_peft += err_peft.sum().item()
    assert total_ours <= total_peft
    # and the merged model still computes what the adapter does (bf16 tolerance)
    x = inputs_for("llama")
    ref_out = run_logits(pm, x).float()
    assert max_diff(run_logits(gm, x).float(), ref_out) <= 0.05 * ref_out.abs().max().item()
