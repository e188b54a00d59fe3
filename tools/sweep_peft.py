"""Broad differential sweep of peftc against the real peft (a developer tool, not collected by pytest).

For each combination (method x model family x options) it builds a tiny model from a config, puts a real peft
adapter on it (non-identity init plus noise on every trainable tensor, as tests/conftest.py `randomize_`), saves
it with `save_pretrained`, compiles the checkpoint with peftc (`adapter default: import "<dir>"`) and compares,
in fp32, with max abs diff <= 1e-5 relative to the output's scale:

* unmerged: peftc == peft's forward;
* merged: peftc (merge=True) == peft's `merge_and_unload()` (or peft's unmerged forward, where peft's merge changes
  the function, e.g. an embedding tied to the head);
* save: `peftc save` writes the checkpoint again (planned, not traced), peft loads it, same outputs;
* merge-dir (Hugging Face models): `peftc merge` writes the merged model folder shard by shard, transformers loads
  it, same outputs as peft's `merge_and_unload()`;
* lower: `peftc lower` at full rank (exact), peft loads the LoRA, same outputs as the merge (a clear refusal, e.g.
  of norm layers, is noted, not failed);
* onnx (a subset): `peftc.export_onnx`, which checks onnxruntime against torch itself.

Each combination ends as one of: pass, diff (a wrong number), noise (off by more than 1e-5 but within 3x peft's own
merged-vs-unmerged difference: fp32 rounding of a large update, e.g. RandLoRA's default scaling 640 / r),
peft-quirk (peft's unmerged forward and its merge disagree, and peftc matches one of them with merged == unmerged;
where peft's unmerged forward crashes, its merge is the oracle for both),
peftc-error (with the message; an error that says the case is unsupported is fine), peftc-crash (a traceback: a
bug), peft-error (the oracle itself failed or is a no-op: nothing to compare).

    python tools/sweep_peft.py            # every combination (a few minutes on 2 cores)
    python tools/sweep_peft.py --quick    # a representative subset
    python tools/sweep_peft.py -k gemma   # combinations whose id contains "gemma"
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import peft  # noqa: E402
import torch  # noqa: E402
from conftest import MODELS, VOCAB, inputs_for, logits_of, randomize_  # noqa: E402
from peft import LoraConfig  # noqa: E402
from test_families import _DECODER, FAMILIES, Family, _causal, _peft_conv1d_compat, family_inputs  # noqa: E402
from test_method_files import seqvol, seqvol_inputs  # noqa: E402
from torch import nn  # noqa: E402

import peftc  # noqa: E402

torch.set_num_threads(2)
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
TOL = 1e-5
CHANGED = 1e-4


# ---------------------------------------------------------------- models the test files lack
class GroupedConvNet(nn.Module):
    """Grouped and depthwise Conv2d layers, then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.dw(torch.relu(self.conv1(x)))).flatten(1))


class OddConvNet(nn.Module):
    """Conv2d layers with what peft's conv adapters may drop: dilation, a reflect padding mode, a non-square kernel
    with a stride and no bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_d = nn.Conv2d(3, 8, 3, padding=2, dilation=2)
        self.conv_r = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.conv_s = nn.Conv2d(8, 8, (3, 1), stride=(2, 1), padding=(1, 0), bias=False)
        self.fc = nn.Linear(8 * 4 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv_r(torch.relu(self.conv_d(x))))
        return self.fc(torch.relu(self.conv_s(x)).flatten(1))


def oddconv() -> nn.Module:
    torch.manual_seed(0)
    return OddConvNet().eval()


def grouped() -> nn.Module:
    torch.manual_seed(0)
    return GroupedConvNet().eval()


EXTRA: dict[str, Family] = {
    "llama": Family(MODELS["llama"]),
    "gpt2": Family(MODELS["gpt2"]),
    "bert": Family(MODELS["bert-cls"], "seqcls"),
    # sliding window, soft-capping, embed_scale, tied head, pre/post feed-forward norms
    "gemma2": Family(_causal("Gemma2ForCausalLM", "Gemma2Config", num_key_value_heads=2, head_dim=16,
                             query_pre_attn_scalar=16, sliding_window=8, **_DECODER)),
    "llama-tied": Family(_causal("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=4, tie_word_embeddings=True,
                                 **_DECODER)),
}
CUSTOM = {"convnet": MODELS["convnet"], "token-mlp": MODELS["token-mlp"], "seqvol": seqvol, "grouped": grouped,
          "mha": MODELS["mha"], "olmoe": MODELS["olmoe"], "oddconv": oddconv}


def build(model: str) -> nn.Module:
    if model in CUSTOM:
        return CUSTOM[model]()
    return (EXTRA.get(model) or FAMILIES[model]).build()


def model_inputs(model: str, batch: int = 3, seq: int = 19, seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if model == "seqvol":
        return seqvol_inputs(batch=batch, seed=seed)
    if model == "oddconv":
        return {"x": torch.randn(batch, 3, 8, 8, generator=g)}
    if model == "grouped":
        return {"x": torch.randn(batch, 4, 8, 8, generator=g)}
    if model in CUSTOM:
        return inputs_for(model, batch=batch, seq=seq, seed=seed)
    if model in EXTRA:
        kind = EXTRA[model].kind
        ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)} if kind != "vision" else {}
    return family_inputs(model, batch=batch, seq=seq, seed=seed)


def example_inputs(model: str) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in model_inputs(model, batch=2, seq=16, seed=3).items()}


def run(m: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return logits_of(m(**x)).detach()


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return (a.double() - b.double()).abs().max().item()


def tol_for(ref: torch.Tensor) -> float:
    return TOL * max(1.0, ref.abs().max().item())


# ---------------------------------------------------------------- combinations
@dataclass
class Combo:
    id: str
    model: str
    # one config (adapter "default"), or several (name -> config): a mixed model with all of them active
    config: Callable[[], object] | Callable[[], dict[str, object]]
    onnx: bool = False
    quick: bool = False
    # "unmerged": peft's own merge changes the function (a tied embedding); "peft-merge": peft's unmerged forward is
    # not its merge's function (OFT on Conv2d), so both of peftc's forms are checked against peft's merge
    merged_ref: str = "merged"
    save: bool = True               # peftc save round trip
    prepare: Callable | None = None  # custom peft-side preparation: (base, tmpdir) -> (peft model, {name: dir})
    note: str = ""
    mixed: bool = True              # several adapters: a PeftMixedModel (False: a PeftModel, one method)
    lower: bool = True              # `peftc lower` round trip
    scale: float = 0.05             # noise on every trainable tensor (larger where products of small factors vanish)


def lora(**kw) -> LoraConfig:
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    kw.setdefault("init_lora_weights", False)
    return LoraConfig(**kw)


def ia3(**kw):
    return peft.IA3Config(init_ia3_weights=False, **kw)


def _converted(init: str, targets: list[str]):
    """PiSSA / OLoRA: the init changes the base weights; save with path_initial_model_for_weight_conversion so the
    checkpoint applies to the original base (a rank-2r LoRA)."""
    def prepare(base: nn.Module, tmp: Path):
        pm = peft.get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, init_lora_weights=init,
                                                                 target_modules=targets)).eval()
        pm.peft_config["default"].init_lora_weights = True
        pm.save_pretrained(str(tmp / "init"))
        pm.peft_config["default"].init_lora_weights = init
        randomize_(pm, 1)
        pm.save_pretrained(str(tmp / "adapter"), path_initial_model_for_weight_conversion=str(tmp / "init"))
        ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp / "adapter")).eval()
        return ref, {"default": tmp / "adapter"}
    return prepare


def _pruned_adalora(base: nn.Module, tmp: Path):
    """An AdaLoRA checkpoint as training's rank allocator leaves it: rank_pattern masks, pruned tensors."""
    pm = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10,
                                                                     target_modules=["q_proj", "v_proj"])).eval()
    randomize_(pm, 1)
    pm.peft_config["default"].rank_pattern = {"model.layers.0.self_attn.q_proj.lora_E": [True, False, True, False],
                                              "model.layers.1.self_attn.v_proj.lora_E": [False, False, True, False]}
    pm.save_pretrained(str(tmp / "adapter"))
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp / "adapter")).eval()
    return ref, {"default": tmp / "adapter"}


QV = ["q_proj", "v_proj"]
COMBOS: list[Combo] = [
    # ---- LoRA options on families the tests do not pair them with
    Combo("gemma-lora-embed-trainable-tokens", "gemma",
          lambda: lora(target_modules=["q_proj", "down_proj"], trainable_token_indices=[3, 7, 11]), quick=True,
          onnx=True),
    Combo("gemma2-lora-all-linear", "gemma2", lambda: lora(target_modules="all-linear"), onnx=True, quick=True),
    Combo("gemma2-trainable-tokens-tied", "gemma2", lambda: peft.TrainableTokensConfig(
        target_modules=["embed_tokens"], token_indices=[5, 9, 100]), merged_ref="unmerged"),
    Combo("llama-tied-trainable-tokens", "llama-tied", lambda: peft.TrainableTokensConfig(
        target_modules=["embed_tokens"], token_indices=[5, 9, 100]), merged_ref="unmerged"),
    Combo("qwen2-lora-trainable-tokens-dict", "qwen2", lambda: lora(
        target_modules=QV, trainable_token_indices={"embed_tokens": [4, 8]})),
    Combo("phi-lora-bias-all", "phi", lambda: lora(target_modules=["q_proj", "fc1"], bias="all"), quick=True),
    Combo("phi-lora-bias-lora_only", "phi", lambda: lora(target_modules=["q_proj", "fc1"], bias="lora_only")),
    Combo("gpt2-lora-bias-all", "gpt2", lambda: lora(target_modules=["c_attn"], bias="all", fan_in_fan_out=True)),
    Combo("bart-lora-layers-pattern", "bart", lambda: lora(target_modules=["q_proj", "fc1"], layers_to_transform=[1],
                                                           layers_pattern="layers")),
    Combo("t5-lora-rank-alpha-pattern", "t5", lambda: lora(target_modules=["q", "v", "wi", "wo"],
                                                           rank_pattern={"wi": 2, r"decoder\..*\.q": 6},
                                                           alpha_pattern={"wo": 3})),
    Combo("whisper-lora-rslora-dora-conv1d", "whisper", lambda: lora(target_modules=["conv1", "conv2", "q_proj"],
                                                                     use_dora=True, use_rslora=True)),
    Combo("seqvol-dora-conv1d-conv3d", "seqvol", lambda: lora(r=2, target_modules=["seq", "vol"], use_dora=True),
          quick=True, onnx=True),
    Combo("seqvol-lora-conv3d-bias", "seqvol", lambda: lora(r=2, target_modules=["seq", "vol"], lora_bias=True)),
    Combo("grouped-lora-conv-groups", "grouped", lambda: lora(r=8, target_modules=["conv1", "dw"]), quick=True,
          onnx=True),
    Combo("grouped-dora-conv-groups", "grouped", lambda: lora(r=4, target_modules=["conv1"], use_dora=True)),
    Combo("vit-lora-regex-exclude", "vit", lambda: lora(target_modules=r".*\.(q_proj|v_proj|fc\d)",
                                                        exclude_modules=r".*\.0\.mlp\.fc1"), onnx=True),
    Combo("opt-lora-fan_in_fan_out-false", "opt", lambda: lora(target_modules=["project_in", "project_out", "fc1"])),
    Combo("qwen2_moe-lora-target-parameters", "qwen2_moe", lambda: lora(target_modules=["q_proj"],
                                                                        target_parameters=["mlp.experts.gate_up_proj",
                                                                                           "mlp.experts.down_proj"]),
          onnx=True),
    Combo("olmoe-lora-target-parameters", "olmoe", lambda: lora(target_modules=[],
                                                                target_parameters=["mlp.experts.down_proj"])),
    Combo("mha-lora", "mha", lambda: lora(target_modules=["attn"]), onnx=True),
    Combo("llama-pissa-converted", "llama", None, prepare=_converted("pissa", ["q_proj", "v_proj"]), quick=True),
    Combo("gpt_neox-olora-converted", "gpt_neox", None, prepare=_converted("olora", ["query_key_value"])),
    Combo("llama-lora-rank-dropout-loha", "llama", lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=QV,
                                                                           rank_dropout=0.3, module_dropout=0.2)),
    # ---- the other methods on other families
    Combo("t5-adalora", "t5", lambda: peft.AdaLoraConfig(init_r=4, total_step=10, target_modules=["q", "v"])),
    Combo("qwen2-adalora-bias", "qwen2", lambda: peft.AdaLoraConfig(init_r=4, total_step=10, target_modules=QV),
          quick=True),
    Combo("vit-boft", "vit", lambda: peft.BOFTConfig(boft_block_size=8, target_modules=["q_proj", "v_proj"]),
          onnx=True),
    Combo("vit-boft-patch-conv2d", "vit", lambda: peft.BOFTConfig(boft_block_size=8, target_modules=["projection"])),
    Combo("bart-boft-dropout", "bart", lambda: peft.BOFTConfig(boft_block_size=16, boft_dropout=0.1,
                                                               target_modules=["q_proj", "fc2"])),
    Combo("mistral-c3a", "mistral", lambda: peft.C3AConfig(block_size=16, target_modules=QV)),
    Combo("phi-c3a-bias", "phi", lambda: peft.C3AConfig(block_size=16, target_modules=["q_proj", "dense"])),
    Combo("gpt_neox-delora", "gpt_neox", lambda: peft.DeloraConfig(r=4, target_modules=["query_key_value"])),
    Combo("qwen2-delora", "qwen2", lambda: peft.DeloraConfig(r=4, target_modules=QV), quick=True),
    Combo("bart-fourierft", "bart", lambda: peft.FourierFTConfig(n_frequency=30, target_modules=["q_proj", "fc1"])),
    Combo("vit-fourierft-head", "vit", lambda: peft.FourierFTConfig(n_frequency=30, target_modules=["q_proj"],
                                                                    modules_to_save=["classifier"])),
    Combo("phi-hra", "phi", lambda: peft.HRAConfig(r=4, target_modules=["q_proj", "fc2"], init_weights=False)),
    Combo("vit-hra-conv2d", "vit", lambda: peft.HRAConfig(r=4, target_modules=["projection", "q_proj"],
                                                          init_weights=False), quick=True, onnx=True),
    Combo("vit-hra-gs", "vit", lambda: peft.HRAConfig(r=4, apply_GS=True, target_modules=["q_proj"],
                                                      init_weights=False)),
    Combo("vit-ia3-conv-ff", "vit", lambda: ia3(target_modules=["projection", "q_proj", "fc2"],
                                                feedforward_modules=["projection", "fc2"]), quick=True),
    Combo("whisper-ia3-conv1d", "whisper", lambda: ia3(target_modules=["conv1", "conv2", "fc2"],
                                                       feedforward_modules=["conv2", "fc2"])),
    Combo("seqvol-ia3-conv3d-ff", "seqvol", lambda: ia3(target_modules=["seq", "vol"], feedforward_modules=["vol"])),
    Combo("gpt2-ia3-ff-conv1d", "gpt2", lambda: ia3(target_modules=["c_attn", "mlp.c_proj"],
                                                    feedforward_modules=["mlp.c_proj"]), onnx=True),
    Combo("gemma-ln_tuning", "gemma", lambda: peft.LNTuningConfig(target_modules=["input_layernorm", "norm"]),
          quick=True),
    Combo("t5-ln_tuning", "t5", lambda: peft.LNTuningConfig(target_modules=["layer_norm", "final_layer_norm"])),
    Combo("bert-ln_tuning", "bert", lambda: peft.LNTuningConfig(target_modules=["LayerNorm"])),
    Combo("gpt2-ln_tuning", "gpt2", lambda: peft.LNTuningConfig(target_modules=["ln_1", "ln_f"]), onnx=True),
    Combo("whisper-loha-conv1d", "whisper", lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=["conv1", "q_proj"])),
    Combo("vit-loha-patch-effective", "vit", lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=["projection"],
                                                                     use_effective_conv2d=True, init_weights=False),
          quick=True, scale=0.5),
    Combo("vit-lokr-patch-effective", "vit", lambda: peft.LoKrConfig(r=2, alpha=4, target_modules=["projection"],
                                                                     use_effective_conv2d=True, init_weights=False)),
    Combo("mistral-lokr-rank-dropout", "mistral", lambda: peft.LoKrConfig(r=4, alpha=8, target_modules=QV,
                                                                          rank_dropout=0.2, module_dropout=0.1,
                                                                          rank_dropout_scale=True)),
    Combo("t5-lokr", "t5", lambda: peft.LoKrConfig(r=2, alpha=4, target_modules=["q", "wo"])),
    # (peft refuses bat on shapes that are not multiples of r)
    Combo("qwen2-miss-bat", "qwen2", lambda: peft.MissConfig(r=8, init_weights="bat",
                                                             target_modules=["q_proj", "down_proj"]), quick=True),
    Combo("qwen2-miss-mini-ragged", "qwen2", lambda: peft.MissConfig(r=6, mini_r=3, init_weights="mini",
                                                                     target_modules=["q_proj", "down_proj"])),
    Combo("phi-miss-bias", "phi", lambda: peft.MissConfig(r=8, target_modules=["dense", "fc1"])),
    Combo("vit-oft-conv2d-exact", "vit", lambda: peft.OFTConfig(oft_block_size=8, use_cayley_neumann=False,
                                                                target_modules=["projection", "q_proj"]),
          merged_ref="peft-merge"),
    Combo("bart-oft-share-dropout", "bart", lambda: peft.OFTConfig(oft_block_size=16, block_share=True,
                                                                   module_dropout=0.1,
                                                                   target_modules=["q_proj", "fc1"]), quick=True),
    Combo("gemma-oft-embedding", "gemma", lambda: peft.OFTConfig(oft_block_size=8, target_modules=["embed_tokens"]),
          merged_ref="unmerged"),
    Combo("phi-oft-bias", "phi", lambda: peft.OFTConfig(oft_block_size=8, target_modules=["dense", "fc2"])),
    Combo("mistral-osf", "mistral", lambda: peft.OSFConfig(target_modules=QV, effective_rank=8)),
    Combo("phi-osf-bias", "phi", lambda: peft.OSFConfig(target_modules=["fc1"], effective_rank=8)),
    Combo("gpt2-randlora-conv1d", "gpt2", lambda: peft.RandLoraConfig(r=8, target_modules=["c_attn", "c_proj"],
                                                                      fan_in_fan_out=True), quick=True),
    Combo("vit-randlora", "vit", lambda: peft.RandLoraConfig(r=8, target_modules=["q_proj", "fc1"])),
    Combo("qwen2-road", "qwen2", lambda: peft.RoadConfig(variant="road_2", target_modules=QV, group_size=16,
                                                         init_weights=False), quick=True, onnx=True),
    Combo("t5-road-4", "t5", lambda: peft.RoadConfig(variant="road_4", target_modules=["q", "wo"], group_size=16,
                                                     init_weights=False)),
    Combo("opt-shira", "opt", lambda: peft.ShiraConfig(r=2, target_modules=["q_proj", "fc1"])),
    Combo("t5-vblora", "t5", lambda: peft.VBLoRAConfig(r=2, num_vectors=16, vector_length=16, topk=2,
                                                       target_modules=["q", "wi"])),
    Combo("phi-vblora-bias", "phi", lambda: peft.VBLoRAConfig(r=2, num_vectors=16, vector_length=16,
                                                              target_modules=["q_proj", "fc2"])),
    Combo("qwen2-vera", "qwen2", lambda: peft.VeraConfig(r=8, target_modules=QV), quick=True),
    Combo("bart-vera", "bart", lambda: peft.VeraConfig(r=8, target_modules=["q_proj", "fc1"])),
    Combo("gpt2-vera-bias-all", "gpt2", lambda: peft.VeraConfig(r=8, target_modules=["c_attn"], fan_in_fan_out=True,
                                                                bias="all")),
    Combo("phi-waveft", "phi", lambda: peft.WaveFTConfig(n_frequency=30, target_modules=["q_proj", "fc2"],
                                                         init_weights=False)),
    Combo("falcon-waveft", "falcon", lambda: peft.WaveFTConfig(n_frequency=30, target_modules=["query_key_value"],
                                                               init_weights=False)),
    # ---- convolutions with dilation, padding modes, strides, groups
    Combo("oddconv-lora", "oddconv", lambda: lora(r=2, target_modules=["conv_d", "conv_r", "conv_s"])),
    Combo("oddconv-dora", "oddconv", lambda: lora(r=2, target_modules=["conv_d", "conv_r", "conv_s"], use_dora=True),
          onnx=True),
    Combo("oddconv-loha", "oddconv", lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=["conv_d", "conv_r",
                                                                                            "conv_s"])),
    Combo("oddconv-lokr-effective", "oddconv", lambda: peft.LoKrConfig(r=2, alpha=4, use_effective_conv2d=True,
                                                                       target_modules=["conv_d", "conv_r", "conv_s"],
                                                                       init_weights=False)),
    Combo("oddconv-ia3", "oddconv", lambda: ia3(target_modules=["conv_d", "conv_r", "conv_s"],
                                                feedforward_modules=["conv_r"])),
    Combo("oddconv-oft", "oddconv", lambda: peft.OFTConfig(oft_block_size=9, target_modules=["conv_d", "conv_r"]),
          merged_ref="peft-merge"),
    Combo("oddconv-boft", "oddconv", lambda: peft.BOFTConfig(boft_block_size=9, target_modules=["conv_d", "conv_r",
                                                                                                "conv_s"])),
    Combo("oddconv-hra", "oddconv", lambda: peft.HRAConfig(r=2, target_modules=["conv_d", "conv_r"],
                                                           init_weights=False)),
    Combo("grouped-loha", "grouped", lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=["conv1", "dw"])),
    Combo("grouped-lokr", "grouped", lambda: peft.LoKrConfig(r=2, alpha=4, target_modules=["conv1", "dw"])),
    Combo("grouped-oft", "grouped", lambda: peft.OFTConfig(oft_block_size=2, target_modules=["conv1"])),
    Combo("grouped-hra", "grouped", lambda: peft.HRAConfig(r=2, target_modules=["conv1"], init_weights=False)),
    # ---- a 1-output Linear (qwen2_moe's shared_expert_gate), experts, tied heads, norms
    Combo("qwen2_moe-vera-gate", "qwen2_moe", lambda: peft.VeraConfig(r=4, target_modules=["shared_expert_gate",
                                                                                           "q_proj"])),
    Combo("qwen2_moe-oft-gate", "qwen2_moe", lambda: peft.OFTConfig(oft_block_size=8,
                                                                    target_modules=["shared_expert_gate"])),
    Combo("qwen2_moe-lokr-gate", "qwen2_moe", lambda: peft.LoKrConfig(r=2, alpha=4,
                                                                      target_modules=["shared_expert_gate"])),
    Combo("qwen2_moe-fourierft-gate", "qwen2_moe", lambda: peft.FourierFTConfig(
        n_frequency=16, target_modules=["shared_expert_gate", "o_proj"])),
    Combo("qwen2_moe-ia3-gate", "qwen2_moe", lambda: ia3(target_modules=["shared_expert_gate", "down_proj"],
                                                         feedforward_modules=["down_proj"])),
    Combo("gemma2-lora-lm_head-tied", "gemma2", lambda: lora(target_modules=["lm_head", "q_proj"]),
          merged_ref="unmerged"),
    Combo("gemma2-ln_tuning", "gemma2", lambda: peft.LNTuningConfig(target_modules=["pre_feedforward_layernorm",
                                                                                    "post_attention_layernorm"])),
    Combo("t5-trainable-tokens-shared", "t5", lambda: peft.TrainableTokensConfig(
        target_modules=["shared"], token_indices=[4, 9]), merged_ref="unmerged"),
    Combo("bart-ln_tuning", "bart", lambda: peft.LNTuningConfig(target_modules=["self_attn_layer_norm",
                                                                                "layernorm_embedding"])),
    Combo("whisper-lokr-conv1d", "whisper", lambda: peft.LoKrConfig(r=2, alpha=4, target_modules=["conv2", "fc1"])),
    Combo("gemma2-ia3", "gemma2", lambda: ia3(target_modules=["k_proj", "down_proj"],
                                              feedforward_modules=["down_proj"])),
    Combo("falcon-vera", "falcon", lambda: peft.VeraConfig(r=4, target_modules=["query_key_value", "dense_4h_to_h"])),
    Combo("bert-boft", "bert", lambda: peft.BOFTConfig(boft_block_size=4,
                                                       target_modules=["query", "intermediate.dense"]), scale=0.5),
    Combo("t5-oft", "t5", lambda: peft.OFTConfig(oft_block_size=16, target_modules=["q", "wo"])),
    Combo("gpt_neox-hra-gs", "gpt_neox", lambda: peft.HRAConfig(r=4, apply_GS=True, init_weights=False,
                                                                target_modules=["query_key_value", "dense"])),
    Combo("opt-miss-mini", "opt", lambda: peft.MissConfig(r=8, mini_r=4, init_weights="mini",
                                                          target_modules=["q_proj", "fc1", "project_in"])),
    Combo("mistral-shira-patterns", "mistral", lambda: peft.ShiraConfig(r=2, target_modules=QV + ["up_proj"])),
    Combo("gpt2-lora-dora-lm_head-tied", "gpt2", lambda: lora(target_modules=["lm_head", "c_attn"], use_dora=True),
          merged_ref="unmerged"),
    Combo("llama-mixed-loha-lokr-lora-same-layer", "llama", lambda: {
        "a": peft.LoHaConfig(r=2, alpha=4, target_modules=QV), "b": peft.LoKrConfig(r=2, alpha=4, target_modules=QV),
        "c": lora(target_modules=QV, use_dora=True)}),
    Combo("oddconv-mixed-lora-loha", "oddconv", lambda: {
        "a": lora(r=2, target_modules=["conv_d", "conv_s"]),
        "b": peft.LoHaConfig(r=2, alpha=4, target_modules=["conv_d", "conv_r"], use_effective_conv2d=True,
                             init_weights=False)}),
    # ---- GPT-2's Conv1D with the methods the tests pair only with nn.Linear
    Combo("gpt2-oft-conv1d", "gpt2", lambda: peft.OFTConfig(oft_block_size=8, target_modules=["c_attn", "c_fc"])),
    Combo("gpt2-boft-conv1d", "gpt2", lambda: peft.BOFTConfig(boft_block_size=8, target_modules=["c_attn"])),
    Combo("gpt2-hra-conv1d", "gpt2", lambda: peft.HRAConfig(r=4, target_modules=["c_attn"], init_weights=False)),
    Combo("gpt2-loha-conv1d", "gpt2", lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=["c_attn", "c_fc"])),
    Combo("gpt2-lokr-conv1d", "gpt2", lambda: peft.LoKrConfig(r=2, alpha=4, target_modules=["c_attn", "c_fc"])),
    Combo("gpt2-miss-conv1d", "gpt2", lambda: peft.MissConfig(r=8, target_modules=["c_attn", "c_fc"])),
    Combo("gpt2-delora-conv1d", "gpt2", lambda: peft.DeloraConfig(r=4, target_modules=["c_attn"])),
    Combo("gpt2-c3a-conv1d", "gpt2", lambda: peft.C3AConfig(block_size=16, target_modules=["c_attn"])),
    Combo("gpt2-road-conv1d", "gpt2", lambda: peft.RoadConfig(group_size=16, target_modules=["c_attn"],
                                                              init_weights=False)),
    Combo("gpt2-osf-conv1d", "gpt2", lambda: peft.OSFConfig(target_modules=["c_attn"], effective_rank=8), scale=0.5),
    Combo("gpt2-shira-conv1d", "gpt2", lambda: peft.ShiraConfig(r=2, target_modules=["c_attn", "c_fc"])),
    Combo("gpt2-ia3-all-linear", "gpt2", lambda: ia3(target_modules="all-linear", feedforward_modules=["c_proj"])),
    Combo("gpt2-trainable-tokens-tied", "gpt2", lambda: peft.TrainableTokensConfig(
        target_modules=["wte"], token_indices=[1, 2, 300]), merged_ref="unmerged"),
    Combo("gpt2-lora-layers-to-transform", "gpt2", lambda: lora(target_modules=["c_attn", "c_proj"],
                                                                 layers_to_transform=[1], fan_in_fan_out=True)),
    Combo("bert-lora-layers-to-transform", "bert", lambda: lora(target_modules=["query", "dense"],
                                                                 layers_to_transform=[0])),
    Combo("mistral-lora-modules_to_save-embed", "mistral", lambda: lora(target_modules=QV,
                                                                        modules_to_save=["embed_tokens"])),
    Combo("llama-adalora-pruned", "llama", None, prepare=_pruned_adalora),
    # ---- one method, several adapters active at once (a PeftModel)
    Combo("llama-two-ia3", "llama", lambda: {
        "a": ia3(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "b": ia3(target_modules=["q_proj", "v_proj"], feedforward_modules=[])}, mixed=False),
    Combo("llama-two-vera", "llama", lambda: {
        "a": peft.VeraConfig(r=8, target_modules=QV), "b": peft.VeraConfig(r=8, target_modules=["q_proj"])},
          mixed=False),
    Combo("llama-two-dora", "llama", lambda: {
        "a": lora(target_modules=QV, use_dora=True), "b": lora(target_modules=["q_proj"], use_dora=True)},
          mixed=False),
    Combo("llama-two-oft", "llama", lambda: {
        "a": peft.OFTConfig(oft_block_size=8, target_modules=QV),
        "b": peft.OFTConfig(oft_block_size=16, target_modules=["q_proj"])}, mixed=False, onnx=True),
    Combo("gpt2-two-fourierft", "gpt2", lambda: {
        "a": peft.FourierFTConfig(n_frequency=20, target_modules=["c_attn"], fan_in_fan_out=True),
        "b": peft.FourierFTConfig(n_frequency=30, random_loc_seed=3, target_modules=["c_attn", "c_fc"],
                                  fan_in_fan_out=True)}, mixed=False),
    Combo("llama-two-trainable-tokens", "llama", lambda: {
        "a": peft.TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=[3, 5]),
        "b": peft.TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=[5, 9])}, mixed=False),
    Combo("llama-two-shira", "llama", lambda: {
        "a": peft.ShiraConfig(r=2, target_modules=QV), "b": peft.ShiraConfig(r=2, target_modules=["q_proj"],
                                                                             random_seed=7)}, mixed=False),
    Combo("llama-two-road", "llama", lambda: {
        "a": peft.RoadConfig(group_size=16, target_modules=QV, init_weights=False),
        "b": peft.RoadConfig(group_size=16, variant="road_2", target_modules=["q_proj"], init_weights=False)},
          mixed=False),
    Combo("llama-two-miss", "llama", lambda: {
        "a": peft.MissConfig(r=8, target_modules=QV), "b": peft.MissConfig(r=4, target_modules=["q_proj"])},
          mixed=False),
    # ---- several adapters at once
    Combo("mistral-mixed-lora-loha", "mistral", lambda: {
        "a": lora(target_modules=QV), "b": peft.LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "o_proj"])},
          quick=True, onnx=True),
    Combo("gpt2-mixed-lora-lokr", "gpt2", lambda: {
        "a": lora(target_modules=["c_attn"], fan_in_fan_out=True),
        "b": peft.LoKrConfig(r=2, alpha=4, target_modules=["c_attn", "c_fc"])}),
    Combo("convnet-mixed-loha-lokr", "convnet", lambda: {
        "a": peft.LoHaConfig(r=2, alpha=4, target_modules=["conv1", "fc1"]),
        "b": peft.LoKrConfig(r=2, alpha=4, target_modules=["conv1", "conv2"])}),
    Combo("llama-mixed-lora-oft", "llama", lambda: {
        "a": lora(target_modules=QV), "b": peft.OFTConfig(oft_block_size=8, target_modules=["q_proj", "k_proj"])}),
    Combo("llama-mixed-adalora-lora", "llama", lambda: {
        "a": peft.AdaLoraConfig(init_r=4, total_step=10, target_modules=QV),
        "b": lora(target_modules=["q_proj", "up_proj"])}),
]


# ---------------------------------------------------------------- one combination
@dataclass
class Result:
    id: str
    status: str = "pass"
    detail: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _peft_side(c: Combo, base: nn.Module, tmp: Path):
    """(peft model in eval mode with every adapter active, {adapter name: checkpoint dir})."""
    if c.prepare is not None:
        return c.prepare(base, tmp)
    cfg = c.config()
    if isinstance(cfg, dict):
        # peft cannot save a PeftMixedModel: save each adapter from its own PeftModel, load them all mixed
        dirs = {}
        for i, (n, one) in enumerate(cfg.items()):
            pm = peft.get_peft_model(copy.deepcopy(base), one).eval()
            randomize_(pm, 1 + i, scale=c.scale)
            pm.save_pretrained(str(tmp / n))
            dirs[n] = tmp / n
        names = list(dirs)
        if c.mixed:
            pm = peft.PeftMixedModel.from_pretrained(copy.deepcopy(base), str(dirs[names[0]]), adapter_name=names[0])
        else:   # one method, several adapters: a PeftModel with all of them active
            pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[names[0]]), adapter_name=names[0])
        for n in names[1:]:
            pm.load_adapter(str(dirs[n]), adapter_name=n)
        if c.mixed:
            pm.set_adapter(names)
        else:
            pm.base_model.set_adapter(names)
        pm.eval()
        _peft_conv1d_compat(pm)
        return pm, dirs
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    _peft_conv1d_compat(pm)
    randomize_(pm, 1, scale=c.scale)
    pm.save_pretrained(str(tmp / "adapter"))
    return pm, {"default": tmp / "adapter"}


def _merged(pm: nn.Module) -> nn.Module:
    m = copy.deepcopy(pm)
    return m.merge_and_unload()


def save_like_cli(spec: str, model: nn.Module, out: Path) -> None:
    """What `peftc save SPEC MODEL -o OUT` does: plan the adapters and write them, without tracing."""
    from peftc.emit.checkpoint import save_plan
    from peftc.pipeline import check_spec
    from peftc.plan import build_plan
    from peftc.replicate import with_replication
    from peftc.spec.combinations import expand_combinations
    from peftc.spec.parse import parse_spec
    sp = expand_combinations(parse_spec(spec))
    check_spec(sp)
    save_plan(build_plan(sp, with_replication(sp, model)), out)


def load_in_peft(model: str, out: Path, names: list[str], mixed: bool) -> nn.Module:
    if len(names) == 1:
        m = peft.PeftModel.from_pretrained(build(model), str(out))
    else:
        cls = peft.PeftMixedModel if mixed else peft.PeftModel
        m = cls.from_pretrained(build(model), str(out / names[0]), adapter_name=names[0])
        for n in names[1:]:
            m.load_adapter(str(out / n), adapter_name=n)
        (m if mixed else m.base_model).set_adapter(names)
    m.eval()
    _peft_conv1d_compat(m)
    return m


def run_combo(c: Combo, tmp: Path) -> Result:
    r = Result(c.id)
    t0 = time.time()
    x = model_inputs(c.model)
    ex = example_inputs(c.model)
    floor = 0.0       # peft's own merged vs unmerged: the fp32 noise of this adapter
    try:
        base = build(c.model)
        pm, dirs = _peft_side(c, base, tmp)
        base_out = run(base, x)
        try:
            peft_out = run(pm, x)
        except Exception as e:  # noqa: BLE001
            # peft's unmerged forward crashes (e.g. LoRA on a dilated Conv2d); its merge may still be an oracle
            r.detail.append(f"peft forward failed ({type(e).__name__}: {str(e)[:80]}); checked against its merge")
            peft_out = None
        peft_ok = peft_out is not None
        merged_out = peft_out
        if c.merged_ref != "unmerged" or peft_out is None:
            try:
                merged_out = run(_merged(pm), x)
                floor = diff(merged_out, peft_out) if peft_out is not None else 0.0
            except Exception as e:  # noqa: BLE001
                if peft_out is None:
                    raise
                r.detail.append(f"peft merge failed ({type(e).__name__}: {str(e)[:100]}); merged vs peft unmerged")
        if peft_out is None:
            peft_out = merged_out
        # peft's unmerged forward is not the function of its own merge (OFT on Conv2d): the merge is the truth
        unmerged_ref = merged_out if c.merged_ref == "peft-merge" else peft_out
    except Exception as e:  # noqa: BLE001
        r.status, r.seconds = "peft-error", time.time() - t0
        r.detail.append(f"{type(e).__name__}: {str(e)[:300]}")
        return r
    if diff(peft_out, base_out) <= CHANGED:
        r.detail.append("peft adapter is a no-op (the case tests nothing)")
        r.status = "peft-error"
        return r
    spec = "\n".join(f'adapter {n}: import "{d}"' for n, d in dirs.items())
    bad: list[str] = []
    noisy: list[str] = []
    quirks: list[str] = []

    def check(what: str, out: torch.Tensor, ref: torch.Tensor) -> None:
        d = diff(out, ref)
        r.detail.append(f"{what} {d:.1e}")
        if d <= tol_for(ref):
            return
        if what == "unmerged" and diff(out, merged_out) <= tol_for(merged_out):
            quirks.append(f"peft's unmerged forward differs from its own merge by {floor:.2g}; peftc's unmerged "
                          f"equals peft's merge ({diff(out, merged_out):.1e})")
        elif what != "unmerged" and diff(out, peft_out) <= tol_for(peft_out):
            quirks.append(f"peft's merge differs from its own unmerged forward by {floor:.2g}; peftc's {what} "
                          f"equals peft's unmerged ({diff(out, peft_out):.1e})")
        elif d <= 3 * floor and floor <= 100 * tol_for(ref):
            noisy.append(f"{what} diff {d:.3g} (peft merged vs unmerged {floor:.2g})")
        else:
            bad.append(f"{what} diff {d:.3g} (peft merged vs unmerged {floor:.2g})")

    try:
        gm = peftc.compile(spec, build(c.model), example_inputs=ex)
        check("unmerged", run(gm, x), unmerged_ref)
        gmm = peftc.compile(spec, build(c.model), example_inputs=ex, merge=True)
        check("merged", run(gmm, x), merged_out)
        if c.save:
            out_dir = tmp / "resaved"
            save_like_cli(spec, build(c.model), out_dir)
            back = load_in_peft(c.model, out_dir, list(dirs), c.mixed)
            check("save", run(back if peft_ok else _merged(back), x), peft_out)
        if c.model not in CUSTOM:
            # `peftc merge`: the model folder with the adapters merged shard by shard, without tracing
            base_dir, out_dir = tmp / "base", tmp / "merged_dir"
            build(c.model).save_pretrained(str(base_dir))
            try:
                peftc.merge_model(spec, base_dir, out_dir)
            except peftc.PeftcError as e:
                r.detail.append(f"merge-dir refused: {str(e).splitlines()[0][:160]}")
            else:
                mm = type(build(c.model)).from_pretrained(str(out_dir)).eval()
                check("merge-dir", run(mm, x), merged_out)
        if c.lower:
            # `peftc lower` at full rank (capped per layer: exact), loaded in peft; a clear refusal is only noted
            try:
                peftc.lower_to_lora(spec, build(c.model), rank=1 << 20, output=tmp / "lowered", example_inputs=ex)
            except peftc.PeftcError as e:
                r.detail.append(f"lower refused: {str(e).splitlines()[0][:120]}")
            else:
                low = peft.PeftModel.from_pretrained(build(c.model), str(tmp / "lowered")).eval()
                _peft_conv1d_compat(low)
                try:
                    out_low = run(low, x)
                except Exception:  # noqa: BLE001 - peft's LoRA forward crashes on a dilated Conv2d: use its merge
                    try:
                        out_low = run(_merged(low), x)
                    except Exception as e:  # noqa: BLE001 - and cannot merge lora_bias into a bias-free layer
                        out_low = None
                        r.detail.append(f"lower: peft can neither run nor merge the LoRA ({str(e)[:80]})")
                if out_low is not None:
                    check("lower", out_low, merged_out)
        if c.onnx:
            chk = peftc.export_onnx(gm, tmp / "m.onnx", ex)
            r.detail.append(f"onnx {getattr(chk, 'max_abs_diff', chk)}")
            chk = peftc.export_onnx(gmm, tmp / "mm.onnx", ex)
            r.detail.append(f"onnx-merged {getattr(chk, 'max_abs_diff', chk)}")
    except peftc.PeftcError as e:
        r.status = "peftc-error"
        r.detail.append(str(e).splitlines()[0][:300])
    except Exception as e:  # noqa: BLE001
        r.status = "peftc-crash"
        tb = traceback.extract_tb(e.__traceback__)[-1]
        r.detail.append(f"{type(e).__name__}: {str(e)[:200]} at {Path(tb.filename).name}:{tb.lineno}")
    if r.status == "pass":
        r.status = "diff" if bad else "noise" if noisy else "peft-quirk" if quirks else "pass"
    r.detail[:0] = bad + noisy + quirks
    r.seconds = time.time() - t0
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the combinations marked quick")
    ap.add_argument("-k", default="", help="only combinations whose id contains this (or one of a,b,...)")
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX exports")
    args = ap.parse_args(argv)
    import warnings

    import transformers
    warnings.filterwarnings("ignore")
    transformers.utils.logging.disable_progress_bar()
    combos = [c for c in COMBOS if (c.quick or not args.quick) and any(k in c.id for k in args.k.split(","))]
    if args.no_onnx:
        for c in combos:
            c.onnx = False
    results = []
    t0 = time.time()
    for c in combos:
        with tempfile.TemporaryDirectory() as tmp:
            res = run_combo(c, Path(tmp))
        results.append(res)
        print(f"{res.status:12} {res.id:40} {res.seconds:5.1f}s  {'; '.join(res.detail)}", flush=True)
    counts: dict[str, int] = {}
    for res in results:
        counts[res.status] = counts.get(res.status, 0) + 1
    print(f"\n{len(results)} combinations in {time.time() - t0:.0f}s: "
          + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    ok = ("pass", "noise", "peft-quirk", "peftc-error", "peft-error")
    return 0 if all(res.status in ok for res in results) else 1


if __name__ == "__main__":
    sys.exit(main())
