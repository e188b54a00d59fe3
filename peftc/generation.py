"""A decoder with its key/value cache as plain tensors, for generation-ready exports (`peftc export --with-past`).

torch.export cannot take a transformers Cache object as an input, so the model is wrapped in a module whose
forward takes flat tensors: `input_ids`, `attention_mask` (past + new tokens), `position_ids` and, per layer,
`past_key_values_N_key` / `_value` (`[batch, kv_heads, past_sequence, head_dim]`). It rebuilds a DynamicCache
from them, calls the model with `use_cache=True` and returns `logits` and `present.N.key` / `.value` (past and
new tokens). The wrapper holds the model's own modules under their own names, so a spec's targets and peftc's
passes see the model unchanged. In ONNX the inputs take optimum's names (`past_key_values.N.key`, see
`onnx_name`): dots cannot name a Python keyword argument.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftc.errors import PeftcError
from peftc.models import LoadedModel
from peftc.trace import DynamicAxes

# named dynamic axes (onnxruntime-genai's and optimum's names)
BATCH, SEQUENCE, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
_PAST_NAME = re.compile(r"past_key_values_(\d+)_(key|value)")


@dataclass
class CacheLayout:
    """Per layer: (kv_heads, head_dim) of its key and value tensors, as the model's own cache holds them."""
    layers: list[tuple[int, int]]
    dtype: torch.dtype

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def past_names(n_layers: int) -> list[str]:
    """The graph's past inputs (Python identifiers), layer by layer, key before value."""
    return [f"past_key_values_{i}_{kv}" for i in range(n_layers) for kv in ("key", "value")]


def onnx_name(name: str) -> str:
    """A graph input's name in the ONNX model: `past_key_values_3_key` -> `past_key_values.3.key` (optimum)."""
    m = _PAST_NAME.fullmatch(name)
    return f"past_key_values.{m[1]}.{m[2]}" if m else name


def check_decoder(loaded: LoadedModel) -> None:
    """A Hugging Face model that generates text one token at a time, or a located reason why not."""
    module, config = loaded.module, loaded.config
    what = f"model {loaded.name!r} ({type(module).__name__})"
    if not loaded.is_hf or config is None:
        raise PeftcError(f"--with-past: {what} is not a Hugging Face model; a generation-ready export needs a "
                         "transformers decoder (LlamaForCausalLM, Qwen2ForCausalLM, ...)")
    can = getattr(module, "can_generate", None)
    if getattr(config, "is_encoder_decoder", False) or not (callable(can) and can()):
        raise PeftcError(f"--with-past: {what} is not a decoder-only language model (it cannot generate with a "
                         "key/value cache); export it without --with-past")


def cache_keyword(module: nn.Module) -> str:
    """The forward's name for the cache: `cache` (transformers >= 5.24) or `past_key_values` (before)."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def returned_cache(out: Any) -> Any:
    """The cache a forward returned (`cache` since transformers 5.24, `past_key_values` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def cache_layout(module: nn.Module) -> CacheLayout:
    """Run the model once on two tokens with a cache and read each layer's key/value shapes."""
    from transformers import DynamicCache
    ids = torch.zeros(1, 2, dtype=torch.long)
    try:
        with torch.no_grad():
            out = module(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                         **{cache_keyword(module): DynamicCache()}, return_dict=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise PeftcError(f"--with-past: {type(module).__name__} cannot run with a key/value cache: "
                         f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    cache = returned_cache(out)
    layers = getattr(cache, "layers", None)
    if not layers or not all(isinstance(getattr(l, "keys", None), torch.Tensor) for l in layers):
        raise PeftcError(f"--with-past: {type(module).__name__}'s cache ({type(cache).__name__}) is not one "
                         "key/value tensor pair per layer; only such decoders export with a cache")
    shapes = []
    for i, l in enumerate(layers):
        k, v = l.keys, l.values
        if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3] or k.shape[2] != 2:
            raise PeftcError(f"--with-past: {type(module).__name__} layer {i}: cache tensors of shapes "
                             f"{list(k.shape)} / {list(v.shape)}, not [batch, kv_heads, sequence, head_dim]")
        if k.shape[3] != v.shape[3]:
            raise PeftcError(f"--with-past: {type(module).__name__} layer {i}: keys and values differ in head size")
        shapes.append((int(k.shape[1]), int(k.shape[3])))
    return CacheLayout(shapes, layers[0].keys.dtype)


class WithPast(nn.Module):
    """The model's modules, parameters and buffers under their own names, with a forward over flat cache tensors
    (see the module doc). The model is not changed."""

    def __init__(self, model: nn.Module, n_layers: int) -> None:
        super().__init__()
        self._modules.update(model._modules)
        self._parameters.update(model._parameters)
        self._buffers.update(model._buffers)
        self._non_persistent_buffers_set |= model._non_persistent_buffers_set
        self.config = getattr(model, "config", None)
        names = ["input_ids", "attention_mask", "position_ids", *past_names(n_layers)]
        model_, keyword = model, cache_keyword(model)

        def forward(**kw: torch.Tensor) -> dict[str, torch.Tensor]:
            from transformers import DynamicCache
            pairs = [(kw[f"past_key_values_{i}_key"], kw[f"past_key_values_{i}_value"]) for i in range(n_layers)]
            out = model_(input_ids=kw["input_ids"], attention_mask=kw["attention_mask"],
                         position_ids=kw["position_ids"], **{keyword: DynamicCache(ddp_cache_data=pairs)},
                         use_cache=True, return_dict=True)
            result = {"logits": out.logits}
            for i, layer in enumerate(returned_cache(out).layers):
                result[f"present.{i}.key"] = layer.keys
                result[f"present.{i}.value"] = layer.values
            return result

        forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in names])
        self.__dict__["forward"] = forward


def generation_inputs(layout: CacheLayout, vocab: int, batch: int = 2, seq: int = 3, past: int = 5,
                      seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs of the wrapped model: `seq` new tokens after `past` cached ones (past = 0: the first step)."""
    g = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(0, max(vocab, 1), (batch, seq), generator=g),
              "attention_mask": torch.ones(batch, past + seq, dtype=torch.long),
              "position_ids": torch.arange(past, past + seq).expand(batch, seq).contiguous()}
    for i, (heads, dim) in enumerate(layout.layers):
        for kv in ("key", "value"):
            inputs[f"past_key_values_{i}_{kv}"] = torch.randn(batch, heads, past, dim, generator=g).to(layout.dtype)
    return inputs


def check_inputs(layout: CacheLayout, vocab: int) -> list[dict[str, torch.Tensor]]:
    """The inputs an export is checked on: a first step (empty past, 4 tokens, batch 2) and a later one (a
    filled past of 6, one token, batch 3)."""
    return [generation_inputs(layout, vocab, batch=2, seq=4, past=0, seed=1),
            generation_inputs(layout, vocab, batch=3, seq=1, past=6, seed=2)]


def onnx_renames(names: Any) -> dict[str, str]:
    """Graph input name -> ONNX input name, for the inputs whose names differ (the past key/value tensors)."""
    return {n: onnx_name(n) for n in names if onnx_name(n) != n}


def generation_axes(n_layers: int) -> DynamicAxes:
    names = {"input_ids": {0: BATCH, 1: SEQUENCE}, "position_ids": {0: BATCH, 1: SEQUENCE},
             "attention_mask": {0: BATCH, 1: TOTAL}}
    names.update({p: {0: BATCH, 2: PAST} for p in past_names(n_layers)})
    return DynamicAxes(names, auto=frozenset({TOTAL}))   # the mask's length is past + new: torch relates them


def with_past(loaded: LoadedModel) -> LoadedModel:
    """The loaded model wrapped for a generation-ready export (its example inputs and named axes with it)."""
    check_decoder(loaded)
    vocab = int(getattr(loaded.config, "vocab_size", 0) or 0)
    layout = cache_layout(loaded.module)
    wrapped = WithPast(loaded.module, layout.num_layers)
    wrapped.peftc_axes = generation_axes(layout.num_layers)
    wrapped.peftc_cache = layout
    return LoadedModel(wrapped, generation_inputs(layout, vocab), loaded.name, loaded.config, True, loaded.source)
