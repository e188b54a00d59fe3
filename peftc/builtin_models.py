"""Built-in tiny models (random weights from a fixed seed, no network), usable wherever MODEL is asked."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

DEFAULT_MODEL = "tiny-llama"


def _seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return build().eval()
    return make


def _llama(hidden: int, layers: int, heads: int, inter: int, vocab: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers as T
        cfg = T.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                            num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512,
                            use_cache=False, tie_word_embeddings=False)
        return T.LlamaForCausalLM(cfg)
    return build


def _gpt2() -> nn.Module:
    import transformers as T
    return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=320, n_positions=128, n_embd=48, n_layer=2, n_head=4,
                                          use_cache=False, bos_token_id=0, eos_token_id=0))


def _bert() -> nn.Module:
    import transformers as T
    return T.BertForSequenceClassification(T.BertConfig(vocab_size=320, hidden_size=48, num_hidden_layers=2,
                                                        num_attention_heads=4, intermediate_size=96,
                                                        max_position_embeddings=128, num_labels=3))


def _vit() -> nn.Module:
    import transformers as T
    return T.ViTForImageClassification(T.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=48,
                                                   num_hidden_layers=2, num_attention_heads=4,
                                                   intermediate_size=96, num_labels=5))


BUILTINS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "tiny-llama": (_seeded(_llama(64, 2, 4, 128, 320)), "Llama-style decoder, hidden 64, 2 layers, vocab 320"),
    "small-llama": (_seeded(_llama(512, 4, 8, 1376, 8000)), "Llama-style decoder, hidden 512, 4 layers (benchmarks)"),
    "tiny-gpt2": (_seeded(_gpt2), "GPT-2 (Conv1D layers), hidden 48, 2 layers"),
    "tiny-bert": (_seeded(_bert), "BERT encoder with a 3-class classification head"),
    "tiny-vit": (_seeded(_vit), "ViT image classifier, 32x32 images, 5 classes"),
}
