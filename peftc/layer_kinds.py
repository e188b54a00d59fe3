"""The layer kinds an adapter can attach to, in one registry.

A kind says how a module is recognised, the dims a method file sees (`in`, `out`, kernel sizes, `groups`,
`has_bias`), the standard op that computes it with the argument slots of its weight and bias, and its weight's
orientation to nn.Linear's `(out, in)` (GPT-2's Conv1D stores the transpose). A new kind is one entry here.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

aten = torch.ops.aten


@dataclass(frozen=True)
class LayerKind:
    name: str
    matches: Callable[[nn.Module], bool]
    dims: Callable[[nn.Module], dict[str, Any]]
    op: Any                      # the ATen op that computes the layer in a traced graph
    weight_arg: int              # its weight's argument index
    bias_arg: int | None         # its bias's argument index (None: the op takes no bias)
    transposed: bool = False     # the stored weight is (in, out): methods see its transpose
    linear_like: bool = False    # counted by `all-linear`


def _conv_dims(names: tuple[str, ...]) -> Callable[[nn.Module], dict[str, Any]]:
    def dims(m: nn.Module) -> dict[str, Any]:
        return {"in": m.in_channels, "out": m.out_channels, "groups": m.groups, **dict(zip(names, m.kernel_size))}
    return dims


def _is_hf_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


KINDS: dict[str, LayerKind] = {k.name: k for k in [
    LayerKind("linear", lambda m: isinstance(m, nn.Linear),
              lambda m: {"in": m.in_features, "out": m.out_features},
              aten.linear.default, 1, 2, linear_like=True),
    LayerKind("conv1d_hf", _is_hf_conv1d, lambda m: {"in": m.weight.shape[0], "out": m.weight.shape[1]},
              aten.addmm.default, 2, 0, transposed=True, linear_like=True),
    LayerKind("conv1d", lambda m: isinstance(m, nn.Conv1d), _conv_dims(("k",)), aten.conv1d.default, 1, 2),
    LayerKind("conv2d", lambda m: isinstance(m, nn.Conv2d), _conv_dims(("kh", "kw")), aten.conv2d.default, 1, 2),
    LayerKind("conv3d", lambda m: isinstance(m, nn.Conv3d), _conv_dims(("kd", "kh", "kw")),
              aten.conv3d.default, 1, 2),
    LayerKind("embedding", lambda m: isinstance(m, nn.Embedding),
              lambda m: {"in": m.num_embeddings, "out": m.embedding_dim}, aten.embedding.default, 0, None),
]}


def kind_of(module: nn.Module) -> LayerKind | None:
    """The first registered kind that recognises `module` (order matters: GPT-2's Conv1D before nn.Conv1d)."""
    for kind in KINDS.values():
        if kind.matches(module):
            return kind
    return None


def weight_readers() -> dict[Any, int]:
    """op -> index of the weight argument, for every registered kind's op (and matmul forms of linear)."""
    out = {k.op: k.weight_arg for k in KINDS.values()}
    out.update({aten.mm.default: 1, aten.matmul.default: 1})
    return out
