"""Optional inputs of a compiled module: what a Hugging Face model lets callers leave out (`attention_mask`, ...)
the compiled module fills in with the value the model assumes, so `gm(input_ids=ids)` works as it did on the
model. (A `.pt2` or ONNX model takes every input it was traced with.)"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

# inputs a Hugging Face model lets callers omit, and the value it then assumes: (input it is shaped like, fill)
OPTIONAL_INPUTS = {"attention_mask": ("input_ids", 1), "decoder_attention_mask": ("decoder_input_ids", 1),
                   "token_type_ids": ("input_ids", 0)}


def fill_optional_inputs(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Forward pre-hook of a compiled module: an omitted optional input (OPTIONAL_INPUTS) gets the value the
    model assumes without it (a mask of ones, token types of zeros), so `gm(input_ids=ids)` works as it did
    on the model. Inputs may come by position or by name."""
    example: dict[str, torch.Tensor] = getattr(module, "peftc_inputs", {})
    names = list(example)
    given = dict(zip(names, args), **kwargs)
    missing = [n for n in names if n not in given]
    for name in missing:
        like, fill = OPTIONAL_INPUTS.get(name, (None, 0))
        ref = given.get(like) if like else None
        if isinstance(ref, torch.Tensor) and ref.dim() == example[name].dim():
            given[name] = torch.full(ref.shape, fill, dtype=example[name].dtype, device=ref.device)
    if len(given) == len(args) + len(kwargs):
        return args, kwargs
    return (), given


def add_optional_inputs(gm: fx.GraphModule) -> None:
    """Let the compiled module be called without its optional inputs (see fill_optional_inputs); kept by
    copy.deepcopy, which drops forward hooks of a GraphModule otherwise."""
    gm.register_forward_pre_hook(fill_optional_inputs, with_kwargs=True)
    if add_optional_inputs not in getattr(gm, "_deepcopy_hooks", []):
        gm._register_deepcopy_hook(add_optional_inputs)
