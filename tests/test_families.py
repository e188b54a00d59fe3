"""Acceptance tests across Hugging Face model families: real peft checkpoints, imported whole by peftc.

Each case builds a tiny model from a config (hidden <= 64, 2 layers, vocab 320, fixed seed), puts a real peft
adapter on it (non-identity init + random noise), saves it with `save_pretrained`, and compiles that checkpoint
with `adapter default: import "<dir>"`. Then, in fp32:

* peftc adapts exactly the layers peft adapted;
* peftc unmerged == peft unmerged, and peftc merged (merge=True) == peft `merge_and_unload()`, within
  1e-5 relative to the output's scale;
* the adapter really changes the output (so a no-op cannot pass).

Trace-time example inputs have another batch size and length than the test inputs, so the dynamic axes of the
exported graph are exercised. The families and options here are the ones tests/test_peft_differential.py does
not cover (it covers llama, gpt2, bert, and two custom models).
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import VOCAB, max_diff, randomize_, run_logits
from peft import IA3Config, LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

import peftc

TOL = 1e-5
CHANGED = 1e-4


# ---------------------------------------------------------------- tiny models, one per family
def _causal(cls: str, cfg: str, **kw) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers as T
        torch.manual_seed(0)
        return getattr(T, cls)(getattr(T, cfg)(vocab_size=VOCAB, use_cache=False, **kw)).eval()
    return build


_DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128)


def _vit() -> nn.Module:
    import transformers as T
    torch.manual_seed(0)
    return T.ViTForImageClassification(T.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=48,
                                                   num_hidden_layers=2, num_attention_heads=4,
                                                   intermediate_size=96, num_labels=5)).eval()


@dataclass(frozen=True)
class Family:
    build: Callable[[], nn.Module]
    kind: str = "causal"       # causal | seqcls | seq2seq | vision | speech


FAMILIES: dict[str, Family] = {
    "mistral": Family(_causal("MistralForCausalLM", "MistralConfig", num_key_value_heads=2,
                              tie_word_embeddings=False, **_DECODER)),
    # q/k/v projections carry biases
    "qwen2": Family(_causal("Qwen2ForCausalLM", "Qwen2Config", num_key_value_heads=2, tie_word_embeddings=False,
                            **_DECODER)),
    # embeddings scaled by sqrt(hidden), tied to the lm_head, multi-query attention
    "gemma": Family(_causal("GemmaForCausalLM", "GemmaConfig", num_key_value_heads=1, head_dim=16, **_DECODER)),
    # partial rotary, biases everywhere, `dense` / `fc1` / `fc2`
    "phi": Family(_causal("PhiForCausalLM", "PhiConfig", partial_rotary_factor=0.5, **_DECODER)),
    # fused query_key_value, untied embed_in / embed_out
    "gpt_neox": Family(_causal("GPTNeoXForCausalLM", "GPTNeoXConfig", rotary_pct=0.25, **_DECODER)),
    # learned positions, tied embeddings, `decoder.layers`; word_embed_proj_dim < hidden adds the bias-free
    # project_in / project_out Linears around the decoder
    "opt": Family(_causal("OPTForCausalLM", "OPTConfig", hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32)),
    # FalconLinear computes x @ W.T (no aten.linear), `transformer.h`, tied word_embeddings / lm_head
    "falcon": Family(_causal("FalconForCausalLM", "FalconConfig", hidden_size=64, num_hidden_layers=2,
                             num_attention_heads=4)),
    # the other Falcon layout: grouped KV heads, separate ln_attn / ln_mlp, and FalconLinear with a bias
    # (x @ W.T + b: IA3's output scaling must reach that bias too)
    "falcon_nda": Family(_causal("FalconForCausalLM", "FalconConfig", hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True, bias=True)),
    # MoE: fused experts (not nn.Linear), a shared expert MLP and a 1-output shared_expert_gate Linear
    "qwen2_moe": Family(_causal("Qwen2MoeForCausalLM", "Qwen2MoeConfig", num_key_value_heads=2,
                                moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
                                num_experts_per_tok=2, tie_word_embeddings=False, **_DECODER)),
    "mixtral": Family(_causal("MixtralForCausalLM", "MixtralConfig", num_key_value_heads=2, num_local_experts=4,
                              num_experts_per_tok=2, tie_word_embeddings=False, **_DECODER)),
    # classification head is a module (dense + out_proj), not a Linear
    "roberta": Family(_causal("RobertaForSequenceClassification", "RobertaConfig", hidden_size=48,
                              num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                              max_position_embeddings=130, num_labels=3), "seqcls"),
    "distilbert": Family(_causal("DistilBertForSequenceClassification", "DistilBertConfig", dim=48, n_layers=2,
                                 n_heads=4, hidden_dim=96, max_position_embeddings=128, num_labels=3), "seqcls"),
    "t5": Family(_causal("T5ForConditionalGeneration", "T5Config", d_model=64, d_kv=16, d_ff=128, num_layers=2,
                         num_heads=4, decoder_start_token_id=0), "seq2seq"),
    "bart": Family(_causal("BartForConditionalGeneration", "BartConfig", d_model=64, encoder_layers=2,
                           decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                           encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=128), "seq2seq"),
    # patch embedding is a Conv2d
    "vit": Family(_vit, "vision"),
    # encoder starts with two nn.Conv1d; input_features must be exactly 2 * max_source_positions long
    "whisper": Family(_causal("WhisperForConditionalGeneration", "WhisperConfig", d_model=64, encoder_layers=2,
                              decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                              encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
                              max_source_positions=32, max_target_positions=64, pad_token_id=0, bos_token_id=1,
                              eos_token_id=2, decoder_start_token_id=1), "speech"),
}


def family_inputs(name: str, batch: int = 3, seq: int = 19, seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    kind = FAMILIES[name].kind
    if kind == "vision":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    if kind == "speech":
        return {"input_features": torch.randn(batch, 16, 64, generator=g),
                "decoder_input_ids": torch.randint(3, VOCAB, (batch, seq // 2 + 1), generator=g)}
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "seq2seq":
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, seq // 2 + 1), generator=g)
    return out


def example_inputs(name: str) -> dict[str, torch.Tensor]:
    """Trace-time inputs: another batch size and length than the test inputs."""
    return {k: v.contiguous() for k, v in family_inputs(name, batch=2, seq=16, seed=3).items()}


def compile_family(spec: str, name: str, **kw):
    return peftc.compile(spec, FAMILIES[name].build(), example_inputs=example_inputs(name), **kw)


def tol_for(ref: torch.Tensor) -> float:
    """1e-5, relative to the output's scale where that exceeds 1."""
    return TOL * max(1.0, ref.abs().max().item())


# ---------------------------------------------------------------- peft side
def lora(**kw) -> LoraConfig:
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    kw.setdefault("init_lora_weights", False)
    return LoraConfig(**kw)


def ia3(**kw) -> IA3Config:
    return IA3Config(init_ia3_weights=False, **kw)


def with_attrs(make: Callable[[], object], **attrs) -> Callable[[], object]:
    """A config with attributes set after construction (bypassing peft's __post_init__ checks), as a checkpoint
    written by an older peft, or edited by hand, can hold them."""
    def build():
        cfg = make()
        for k, v in attrs.items():
            setattr(cfg, k, v)
        return cfg
    return build


def _peft_conv1d_compat(pm: nn.Module) -> None:
    """peft's LoRA wrapper of nn.Conv1d does not expose `stride`, which Whisper's encoder reads; give the wrapper
    the base layer's attributes so the peft oracle can run (the checkpoint itself is unaffected)."""
    for m in pm.modules():
        base = getattr(m, "base_layer", None)
        if isinstance(m, BaseTunerLayer) and isinstance(base, nn.Conv1d):
            for attr in ("stride", "padding", "dilation", "kernel_size"):
                if attr not in m.__dict__:
                    setattr(m, attr, getattr(base, attr))


def peft_adapted_layers(pm: nn.Module) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
            if isinstance(m, BaseTunerLayer) and n.startswith("base_model.model.")}


# ---------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    id: str
    family: str
    config: Callable[[], object]
    # what peftc's merged graph must equal: peft's merge_and_unload() ("merged"), or peft's unmerged forward where
    # peft's own merge changes the function (an embedding tied to the output head: merging rewrites the head too)
    merged_ref: str = "merged"
    # oracle sanity for the selection cases: layers peft must (not) have adapted, so the case tests what it says
    adapts: tuple[str, ...] = ()
    skips: tuple[str, ...] = ()


def _p(case: Case, slow: bool):
    return pytest.param(case, id=case.id, marks=[pytest.mark.slow] if slow else [])


SLOW_FAMILIES = {"t5", "bart", "whisper", "qwen2_moe", "mixtral"}

# LoRA on every linear layer, per family. Roberta as a SEQ_CLS task (peft then saves its classifier head whole);
# not DistilBERT: there peft's modules_to_save suffix match also hits `pre_classifier`, which all-linear has already
# wrapped, and get_peft_model raises (a peft limitation; DistilBERT's head is covered below)
ALL_LINEAR = [
    Case(f"{fam}-all-linear", fam,
         (lambda tt=("SEQ_CLS" if fam == "roberta" else None): lora(target_modules="all-linear", task_type=tt)))
    for fam in ["mistral", "qwen2", "gemma", "phi", "gpt_neox", "opt", "falcon", "falcon_nda", "roberta",
                "distilbert", "t5", "bart", "vit", "whisper", "qwen2_moe"]
]

DORA = [  # DoRA on the attention projections
    Case("qwen2-dora-attn", "qwen2", lambda: lora(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                  use_dora=True)),
    Case("falcon-dora-attn", "falcon", lambda: lora(target_modules=["query_key_value", "dense"], use_dora=True)),
    Case("bart-dora-attn", "bart", lambda: lora(target_modules=["q_proj", "v_proj", "out_proj"], use_dora=True)),
    # the patch embedding (Conv2d) too
    Case("vit-dora-attn-patch", "vit", lambda: lora(target_modules=["query", "value", "projection"],
                                                    use_dora=True)),
    # DoRA on Gemma's embedding: scaled by sqrt(hidden) after the lookup, and tied to the lm_head
    Case("gemma-dora-embed-scaled-tied", "gemma", lambda: lora(target_modules=["embed_tokens", "o_proj"],
                                                               use_dora=True), merged_ref="unmerged"),
    Case("t5-dora-attn", "t5", lambda: lora(target_modules=["q", "k", "v", "o"], use_dora=True)),
]

IA3 = [  # IA3 with feed-forward modules (scale the input) next to output-scaled ones
    Case("mistral-ia3", "mistral", lambda: ia3(target_modules=["k_proj", "v_proj", "down_proj"],
                                               feedforward_modules=["down_proj"])),
    # target_modules and feedforward_modules as regex strings (re.fullmatch on the full name)
    Case("gpt_neox-ia3-regex", "gpt_neox",
         lambda: ia3(target_modules=r".*\.(query_key_value|dense_4h_to_h|dense_h_to_4h)",
                     feedforward_modules=r"gpt_neox\.layers\.\d\.mlp\.dense_4h_to_h")),
    Case("t5-ia3", "t5", lambda: ia3(target_modules=["k", "v", "wo"], feedforward_modules=["wo"])),
    Case("distilbert-ia3", "distilbert", lambda: ia3(target_modules=["q_lin", "v_lin", "lin2"],
                                                     feedforward_modules=["lin2"])),
    Case("falcon_nda-ia3", "falcon_nda", lambda: ia3(target_modules=["query_key_value", "dense_4h_to_h"],
                                                     feedforward_modules=["dense_4h_to_h"])),
    Case("phi-ia3", "phi", lambda: ia3(target_modules=["k_proj", "fc1", "fc2"], feedforward_modules=["fc2"])),
]

EMBEDDING = [  # LoRA on the embedding layer (peft also saves the base embedding as `...base_layer.weight`)
    Case("mistral-lora-embed-lm_head", "mistral", lambda: lora(target_modules=["embed_tokens", "lm_head"])),
    Case("gemma-lora-embed-scaled-tied", "gemma", lambda: lora(target_modules=["embed_tokens", "q_proj"]),
         merged_ref="unmerged"),
    Case("opt-lora-embed-tied", "opt", lambda: lora(target_modules=["embed_tokens", "q_proj"]),
         merged_ref="unmerged"),
    # Phi's lm_head has a bias: peft saves the whole base layer, `lm_head.base_layer.weight` and `.bias`
    Case("phi-lora-lm_head-with-bias", "phi", lambda: lora(target_modules=["lm_head", "q_proj"])),
    Case("gpt_neox-lora-embed_in-embed_out", "gpt_neox", lambda: lora(target_modules=["embed_in", "embed_out"])),
    # Falcon's traced graph reads the tied matrix under the name lm_head.weight
    Case("falcon-lora-embed-tied", "falcon", lambda: lora(target_modules=["word_embeddings", "dense"]),
         merged_ref="unmerged"),
    Case("roberta-lora-embed", "roberta", lambda: lora(target_modules=["word_embeddings", "query"],
                                                       task_type="SEQ_CLS")),
]

# modules whose weight is tied to another module's (named_parameters() lists the shared tensor once)
TIED_ALIAS = [
    # BART: model.shared, encoder.embed_tokens and decoder.embed_tokens share one matrix
    Case("bart-lora-embed_tokens-tied-alias", "bart", lambda: lora(target_modules=["embed_tokens", "q_proj"]),
         merged_ref="unmerged"),
    Case("t5-lora-embed_tokens-tied-alias", "t5", lambda: lora(target_modules=["embed_tokens", "q"]),
         merged_ref="unmerged"),
    # Gemma's lm_head is tied to embed_tokens; peft adapts the output projection only
    Case("gemma-lora-lm_head-tied", "gemma", lambda: lora(target_modules=["lm_head", "q_proj"]),
         merged_ref="unmerged"),
]

CONV = [
    Case("vit-lora-patch-conv2d", "vit", lambda: lora(target_modules=["projection", "query", "classifier"])),
    Case("whisper-lora-conv1d", "whisper", lambda: lora(target_modules=["conv1", "conv2", "q_proj"])),
]

OPTIONS = [
    Case("phi-gaussian-init", "phi", lambda: lora(init_lora_weights="gaussian",
                                                  target_modules=["q_proj", "dense", "fc1"])),
    # lora_bias on layers that have a bias (so it merges)
    Case("phi-lora_bias", "phi", lambda: lora(target_modules=["dense", "fc1", "fc2"], lora_bias=True)),
    Case("opt-dropout", "opt", lambda: lora(lora_dropout=0.1, target_modules=["q_proj", "v_proj", "fc2"])),
    Case("roberta-dora-dropout", "roberta", lambda: lora(lora_dropout=0.1, use_dora=True,
                                                         target_modules=["query", "value"])),
    Case("qwen2-exclude-regex", "qwen2", lambda: lora(target_modules="all-linear",
                                                      exclude_modules=r".*\.layers\.0\.mlp\..*|.*\.k_proj"),
         adapts=("model.layers.1.mlp.up_proj", "model.layers.0.self_attn.q_proj"),
         skips=("model.layers.0.mlp.up_proj", "model.layers.1.self_attn.k_proj")),
    Case("falcon-layers_pattern-list", "falcon",
         lambda: lora(target_modules=["query_key_value", "dense_4h_to_h"], layers_to_transform=[1],
                      layers_pattern=["layers", "h"]),
         adapts=("transformer.h.1.self_attention.query_key_value",),
         skips=("transformer.h.0.self_attention.query_key_value",)),
    # T5 numbers its sub-layers too (block.N.layer.M): layers_pattern "layer" filters on M; an int index
    Case("t5-layers_pattern-sublayer", "t5",
         lambda: lora(target_modules=["q", "o", "wi", "wo"], layers_to_transform=1, layers_pattern="layer"),
         adapts=("encoder.block.0.layer.1.DenseReluDense.wi", "decoder.block.1.layer.1.EncDecAttention.q"),
         skips=("encoder.block.1.layer.0.SelfAttention.q", "decoder.block.0.layer.2.DenseReluDense.wo")),
    # peft refuses this at construction, but a saved config can hold it, and then peft ignores the layer filter
    # for a regex target_modules (the filter applies only to the name-suffix branch)
    Case("mistral-regex-with-layers_to_transform", "mistral",
         with_attrs(lambda: lora(target_modules=r".*\.self_attn\.(q|v)_proj"), layers_to_transform=[0]),
         adapts=("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj")),
    Case("qwen2-rank-alpha-pattern-regex", "qwen2",
         lambda: lora(target_modules="all-linear",
                      rank_pattern={r"layers\.1\.self_attn\.(q|k)_proj": 8, r"mlp\.\w+_proj": 2},
                      alpha_pattern={r"layers\.0\.\w+\.\w+_proj": 3, r"model\.layers\.1\.mlp\.down_proj": 20})),
    Case("gpt_neox-rslora-rank_pattern", "gpt_neox",
         lambda: lora(r=4, lora_alpha=12, use_rslora=True, target_modules="all-linear",
                      rank_pattern={r".*\.1\.attention\.\w+": 9, "dense_4h_to_h": 2},
                      alpha_pattern={"query_key_value": 5})),
    Case("roberta-modules_to_save-classifier", "roberta",
         lambda: lora(target_modules=["query", "value"], modules_to_save=["classifier"])),
    # without task_type=SEQ_CLS, peft's all-linear also takes the head's dense / out_proj Linears
    Case("roberta-all-linear-no-task", "roberta", lambda: lora(target_modules="all-linear")),
    # SEQ_CLS puts "classifier" in modules_to_save; peft matches modules_to_save names by plain suffix
    # (key.endswith(name)), so DistilBERT's `pre_classifier` is saved whole as well
    Case("distilbert-lora-seqcls", "distilbert", lambda: lora(target_modules=["q_lin", "v_lin"], task_type="SEQ_CLS")),
    Case("distilbert-all-linear-mts", "distilbert",
         lambda: lora(target_modules="all-linear", modules_to_save=["pre_classifier", "classifier"])),
    Case("mixtral-lora-attn", "mixtral", lambda: lora(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
]

CASES = [_p(c, c.family in SLOW_FAMILIES) for c in ALL_LINEAR + DORA + IA3 + EMBEDDING + TIED_ALIAS + CONV + OPTIONS]


# ---------------------------------------------------------------- the oracle, once per case
@dataclass
class Prepared:
    case: Case
    dir: str
    inputs: dict
    base_out: torch.Tensor
    peft_out: torch.Tensor
    merged_out: torch.Tensor
    adapted: set[str]


@pytest.fixture(scope="module")
def prepared(request, tmp_path_factory) -> Prepared:
    case: Case = request.param
    base = FAMILIES[case.family].build()
    pm = get_peft_model(copy.deepcopy(base), case.config()).eval()
    _peft_conv1d_compat(pm)
    randomize_(pm, seed=1)
    d = tmp_path_factory.mktemp(case.id) / "adapter"
    pm.save_pretrained(str(d))
    x = family_inputs(case.family)
    base_out, peft_out = run_logits(base, x), run_logits(pm, x)
    if case.merged_ref == "merged":
        merged_out = run_logits(copy.deepcopy(pm).merge_and_unload(), x)
    else:
        merged_out = peft_out
    return Prepared(case, str(d), x, base_out, peft_out, merged_out, peft_adapted_layers(pm))


def _spec(p: Prepared) -> str:
    return f'adapter default: import "{p.dir}"'


@pytest.mark.parametrize("prepared", CASES, indirect=True)
def test_unmerged_matches_peft(prepared):
    p = prepared
    assert max_diff(p.peft_out, p.base_out) > CHANGED, "the peft adapter is a no-op: the case tests nothing"
    assert set(p.case.adapts) <= p.adapted and not set(p.case.skips) & p.adapted, "oracle sanity"
    gm = compile_family(_spec(p), p.case.family)
    assert set(gm.peftc.adapters["default"].tensors) == p.adapted
    out = run_logits(gm, p.inputs)
    assert max_diff(out, p.peft_out) <= tol_for(p.peft_out)
    assert max_diff(out, p.base_out) > CHANGED


@pytest.mark.parametrize("prepared", CASES, indirect=True)
def test_merged_matches_peft(prepared):
    p = prepared
    gm = compile_family(_spec(p), p.case.family, merge=True)
    out = run_logits(gm, p.inputs)
    assert max_diff(out, p.merged_out) <= tol_for(p.merged_out)
    assert max_diff(out, p.base_out) > CHANGED
    assert not any(t.requires_grad for t in gm.parameters())


# ---------------------------------------------------------------- MoE experts: peft's all-linear targets parameters
def test_mixtral_all_linear_target_parameters_matches_peft(tmp_path):
    """peft's all-linear on Mixtral (fused experts, no nn.Linear in the MoE block) also writes `target_parameters`
    (LoRA on the expert and router tensors): peftc applies them (tests/test_param_targets.py has the rest)."""
    base = FAMILIES["mixtral"].build()
    pm = get_peft_model(copy.deepcopy(base), lora(target_modules="all-linear")).eval()
    assert pm.peft_config["default"].target_parameters
    randomize_(pm, 1)
    pm.save_pretrained(str(tmp_path / "ad"))
    gm = compile_family(f'adapter default: import "{tmp_path / "ad"}"', "mixtral")
    x = family_inputs("mixtral")
    assert max_diff(run_logits(gm, x), run_logits(pm, x)) <= TOL
