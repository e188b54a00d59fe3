"""Shared fixtures: tiny models built from configs (fixed seeds, no network), peft helpers, inputs."""
from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")
torch.set_num_threads(2)

VOCAB = 320
TOL = 1e-5        # fp32 max abs diff allowed against peft
CHANGED = 1e-4    # an adapter must move the output at least this much (so a no-op cannot pass)


def lora(**kw):
    """A peft LoraConfig with non-identity init (r=4, alpha=8 unless given)."""
    from peft import LoraConfig
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    return LoraConfig(init_lora_weights=False, **kw)


# ---------------------------------------------------------------- models
def llama() -> nn.Module:
    import transformers as T
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                            max_position_embeddings=128, use_cache=False,
                                            tie_word_embeddings=False)).eval()


def gpt2() -> nn.Module:
    import transformers as T
    torch.manual_seed(0)
    return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=48, n_layer=2, n_head=4,
                                          use_cache=False, bos_token_id=0, eos_token_id=0)).eval()


def bert_cls() -> nn.Module:
    import transformers as T
    torch.manual_seed(0)
    return T.BertForSequenceClassification(T.BertConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2,
                                                        num_attention_heads=4, intermediate_size=96,
                                                        max_position_embeddings=128, num_labels=3)).eval()


class ConvNet(nn.Module):
    """A custom (non-HF) model: embedding, conv2d and linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class TokenMLP(nn.Module):
    """A custom model over token ids: embedding -> linear -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.lin0 = nn.Linear(16, 32)
        self.lin1 = nn.Linear(32, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(self.emb(ids))))


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return ConvNet().eval()


def token_mlp() -> nn.Module:
    torch.manual_seed(0)
    return TokenMLP().eval()


class MhaNet(nn.Module):
    """A custom model with an nn.MultiheadAttention (packed q/k/v) between an embedding and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        a, _ = self.attn(h, h, h)
        return self.head(self.norm(a + h))


def mha_net() -> nn.Module:
    torch.manual_seed(0)
    return MhaNet().eval()


def olmoe() -> nn.Module:
    """A tiny OLMoE: experts stacked as 3-d nn.Parameters (experts, out, in)."""
    import transformers as T
    torch.manual_seed(0)
    return T.OlmoeForCausalLM(T.OlmoeConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=8, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=2, num_experts=4,
                                            num_experts_per_tok=2, use_cache=False, eos_token_id=0,
                                            pad_token_id=1)).eval()


def gpt_oss() -> nn.Module:
    """A tiny gpt-oss: experts stacked transposed (experts, in, out), with biases."""
    import transformers as T
    torch.manual_seed(0)
    return T.GptOssForCausalLM(T.GptOssConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=8,
                                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                              head_dim=8, num_local_experts=4, num_experts_per_tok=2, use_cache=False,
                                              layer_types=["full_attention"] * 2)).eval()


MODELS = {"llama": llama, "gpt2": gpt2, "bert-cls": bert_cls, "convnet": convnet, "token-mlp": token_mlp,
          "mha": mha_net, "olmoe": olmoe, "gpt-oss": gpt_oss}


def inputs_for(name: str, batch: int = 3, seq: int = 19, seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if name == "convnet":
        return {"x": torch.randn(batch, 3, 8, 8, generator=g)}
    if name in ("token-mlp", "mha"):
        return {"ids": torch.randint(0, 50, (batch, seq), generator=g)}
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def example_inputs_for(name: str) -> dict[str, torch.Tensor]:
    """Trace-time inputs (a different shape from the test inputs, so dynamic axes are exercised)."""
    return inputs_for(name, batch=2, seq=16, seed=3)


def logits_of(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return out["logits"] if "logits" in out else next(iter(out.values()))
    if isinstance(out, (tuple, list)):
        return logits_of(out[0])
    raise TypeError(type(out))


def randomize_(model: nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Give every trainable tensor (peft leaves exactly the adapter ones trainable) non-trivial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)


def peft_adapter(model_name: str, config, tmp_path, seed: int = 1, base=None):
    """Build a real peft adapter on a fresh base model (MODELS[model_name], or `base`), randomize it, save it.
    Returns (base, peft_model, dir)."""
    from peft import get_peft_model
    base = MODELS[model_name]() if base is None else base
    pm = get_peft_model(copy.deepcopy(base), config).eval()
    randomize_(pm, seed)
    d = tmp_path / "adapter"
    pm.save_pretrained(str(d))
    return base, pm, d


@pytest.fixture
def tiny_llama():
    return llama()


# ---------------------------------------------------------------- differential-testing helpers
CUSTOM_MODELS = ("convnet", "token-mlp", "mha")


def compile_on(spec: str, model_name: str, model: nn.Module | None = None, **kwargs):
    """peftc.compile on a (fresh, unless given) test model; custom models get example_inputs_for(name)."""
    import peftc
    if model is None:
        model = MODELS[model_name]()
    if model_name in CUSTOM_MODELS:
        kwargs.setdefault("example_inputs", example_inputs_for(model_name))
    return peftc.compile(spec, model, **kwargs)


def run_logits(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward without grad; the main output tensor, detached."""
    with torch.no_grad():
        return logits_of(model(**inputs)).detach()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()
