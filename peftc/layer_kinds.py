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
    kernel: tuple[str, ...] = () # names of the kernel-size dims (convolutions)
    weight_name: str = "weight"  # the module's attribute holding the adapted weight
    bias_name: str = "bias"      # ... and its bias
    # child modules adapted together with this layer, whose weights the layer's own code reads (nn.MultiheadAttention
    # reads out_proj.weight itself): (child name, its checkpoint path relative to the layer, as peft nests it)
    parts: tuple[tuple[str, str], ...] = ()
    more: tuple[str, ...] = ()   # further dims a method sees (`experts` of a stacked parameter)
    fan_in_fan_out: bool | None = None  # peft's flag for this kind (None: the same as `transposed`)
    parameter: bool = False      # a bare nn.Parameter (peft's target_parameters), not a module
    groups_arg: int | None = None  # the op's `groups` argument index (grouped convolutions)

    @property
    def dim_names(self) -> tuple[str, ...]:
        """Every dim a method file sees at a layer of this kind."""
        # part: adapted as part of another layer
        return ("in", "out", "groups", "has_bias", *self.kernel, *self.more, "part")

    @property
    def peft_fan_in_fan_out(self) -> bool:
        return self.transposed if self.fan_in_fan_out is None else self.fan_in_fan_out


def _conv(name: str, cls: type[nn.Module], op: Any, kernel: tuple[str, ...]) -> LayerKind:
    """An nn.ConvNd kind: dims in/out/groups and one per kernel axis."""
    def dims(m: nn.Module) -> dict[str, Any]:
        return {"in": m.in_channels, "out": m.out_channels, "groups": m.groups, **dict(zip(kernel, m.kernel_size))}
    return LayerKind(name, lambda m: isinstance(m, cls), dims, op, 1, 2, kernel=kernel, groups_arg=6)


def _is_hf_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


KINDS: dict[str, LayerKind] = {k.name: k for k in [
    LayerKind("linear", lambda m: isinstance(m, nn.Linear),
              lambda m: {"in": m.in_features, "out": m.out_features},
              aten.linear.default, 1, 2, linear_like=True),
    LayerKind("conv1d_hf", _is_hf_conv1d, lambda m: {"in": m.weight.shape[0], "out": m.weight.shape[1]},
              aten.addmm.default, 2, 0, transposed=True, linear_like=True),
    _conv("conv1d", nn.Conv1d, aten.conv1d.default, ("k",)),
    _conv("conv2d", nn.Conv2d, aten.conv2d.default, ("kh", "kw")),
    _conv("conv3d", nn.Conv3d, aten.conv3d.default, ("kd", "kh", "kw")),
    LayerKind("embedding", lambda m: isinstance(m, nn.Embedding),
              lambda m: {"in": m.num_embeddings, "out": m.embedding_dim}, aten.embedding.default, 0, None),
    # A bare nn.Parameter (peft's `target_parameters`): 2-d (out, in), or 3-d stacked experts (experts, out, in)
    # as Mixtral / OLMoE / Qwen3-MoE keep them; `parameter_t` is a stack kept as (experts, in, out) (gpt-oss,
    # whose experts module says `is_transposed`). Whatever op reads it reads the adapted tensor instead.
    LayerKind("parameter", lambda m: False, lambda m: {}, None, 0, None, more=("experts",), parameter=True),
    LayerKind("parameter_t", lambda m: False, lambda m: {}, None, 0, None, transposed=True, more=("experts",),
              fan_in_fan_out=False, parameter=True),
]}


# layer kind -> the dimension names a method sees there (checked when the method library loads)
KIND_DIMS: dict[str, tuple[str, ...]] = {k.name: k.dim_names for k in KINDS.values()}


def _is_norm(m: nn.Module) -> bool:
    """A normalisation layer with a 1-D affine weight: nn.LayerNorm / RMSNorm / GroupNorm, or a model's own
    `...Norm` class (Llama's RMSNorm)."""
    w = getattr(m, "weight", None)
    named = type(m).__name__.endswith(("Norm", "LayerNorm"))
    return (isinstance(m, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)) or named) and isinstance(w, nn.Parameter) \
        and w.dim() == 1


def _is_mha(m: nn.Module) -> bool:
    return isinstance(m, nn.MultiheadAttention) and m._qkv_same_embed_dim and m.in_proj_weight is not None


KINDS.update({k.name: k for k in [   # appended: a norm's affine weight (and bias); an MHA's fused q/k/v projection
    LayerKind("norm", _is_norm, lambda m: {"in": m.weight.shape[0], "out": m.weight.shape[0]},
              aten.layer_norm.default, 2, 3),
    LayerKind("mha", _is_mha, lambda m: {"in": m.embed_dim, "out": 3 * m.embed_dim}, aten.linear.default, 1, 2,
              weight_name="in_proj_weight", bias_name="in_proj_bias", parts=(("out_proj", "base_layer.out_proj"),)),
]})
KIND_DIMS.update({k.name: k.dim_names for k in KINDS.values()})


def kind_of(module: nn.Module) -> LayerKind | None:
    """The first registered kind that recognises `module` (order matters: GPT-2's Conv1D before nn.Conv1d)."""
    for kind in KINDS.values():
        if kind.matches(module):
            return kind
    return None


def parameter_kind(param: torch.Tensor, owner: nn.Module) -> tuple[LayerKind, dict[str, Any]] | None:
    """The kind and dims of a bare parameter an adapter may target (peft's ParamWrapper takes 2-d and 3-d
    ones), or None: 2-d (out, in); 3-d (experts, out, in), or (experts, in, out) when its module says
    `is_transposed` (transformers' experts modules)."""
    if not param.is_floating_point() or param.dim() not in (2, 3):
        return None
    if param.dim() == 2:
        return KINDS["parameter"], {"in": param.shape[1], "out": param.shape[0], "experts": 1}
    experts, d1, d2 = param.shape
    if getattr(owner, "is_transposed", False):
        return KINDS["parameter_t"], {"in": d1, "out": d2, "experts": experts}
    return KINDS["parameter"], {"in": d2, "out": d1, "experts": experts}


def weight_readers() -> dict[Any, int]:
    """op -> index of the weight argument, for every registered kind's op (and matmul forms of linear)."""
    out = {k.op: k.weight_arg for k in KINDS.values() if k.op is not None}
    out.update({aten.mm.default: 1, aten.matmul.default: 1})
    return out
