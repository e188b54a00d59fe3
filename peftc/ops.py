"""The op library: every name a method file or rule may call, implemented once.

Tensor ops map to ATen overloads where one exists (so rewritten graphs stay plain ATen and export to
.pt2 / ONNX unchanged); the few primitives ATen lacks are small Python functions here, which
torch.export traces through. Scalar helpers (sqrt, ...) and parameter initialisers are here too.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

aten = torch.ops.aten


# ---------------------------------------------------------------- primitives ATen lacks
def row_norm(v: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output row (over every dim but the first)."""
    return torch.linalg.vector_norm(v, 2, dim=tuple(range(1, v.dim())))


def conv_lowrank(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The kernel of conv(conv(x, a), b) with b 1x1: (out, r, 1, 1) x (r, in, kh, kw) -> (out, in, kh, kw)."""
    return (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:])


def col_norm(v: torch.Tensor) -> torch.Tensor:
    """L2 norm of each column of a 2-d weight (over the first dim): DoRA on an embedding table."""
    return torch.linalg.vector_norm(v, 2, dim=0)


def scale_rows(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scale output row/channel i of v by g[i] (g has one value per output; v is 2-d or a conv kernel)."""
    return g.reshape(-1, *([1] * (v.dim() - 1))) * v


def channels(v: torch.Tensor, trailing: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over `trailing` spatial dims: (C,) -> (C, 1, ..., 1)."""
    return v.reshape(-1, *([1] * trailing))


def vec(v: torch.Tensor) -> torch.Tensor:
    """Flatten to one dimension."""
    return v.reshape(-1)


def dropin(delta: torch.Tensor, module: str) -> torch.Tensor:
    """Marks the part of a weight whose input passes through the dropout submodule `module`.

    As a dense weight it is the identity; the rule `input_dropout` turns linear(x, dropin(D, m)) into
    linear(m(x), D). It only appears in graphs compiled for training with dropout > 0.
    """
    return delta


# ---------------------------------------------------------------- initialisers
@dataclass(frozen=True)
class Init:
    """How to fill a fresh parameter: kind and keyword arguments."""
    kind: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    def make(self, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
        kw = dict(self.kwargs)
        t = torch.empty(shape, dtype=torch.float32)
        if self.kind == "zeros":
            t.zero_()
        elif self.kind == "ones":
            t.fill_(1.0)
        elif self.kind == "normal":
            t.normal_(kw.get("mean", 0.0), kw.get("std", 1.0), generator=generator)
        elif self.kind == "kaiming_uniform":
            a = kw.get("a", math.sqrt(5))
            fan_in = t[0].numel() if t.dim() > 1 else t.numel()
            bound = math.sqrt(6.0 / ((1 + a * a) * max(fan_in, 1)))
            t.uniform_(-bound, bound, generator=generator)
        else:
            raise ValueError(f"unknown initialiser {self.kind}")
        return t.to(dtype)


def _init(kind: str) -> Callable[..., Init]:
    def make(**kwargs: Any) -> Init:
        return Init(kind, tuple(sorted(kwargs.items())))
    return make


# ---------------------------------------------------------------- the table
@dataclass(frozen=True)
class Op:
    """A tensor op usable in methods and rules."""
    name: str
    target: Any                       # fx call_function target (ATen overload or Python function)
    commutative: bool = False
    defaults: tuple[Any, ...] = ()    # trailing argument defaults, for normalising graph nodes
    arity: int = 0                    # full positional arity when defaults apply
    module_call: bool = False         # emitted as call_module (first arg names the submodule)


TENSOR_OPS: dict[str, Op] = {op.name: op for op in [
    Op("add", aten.add.Tensor, commutative=True),
    Op("sub", aten.sub.Tensor),
    Op("mul", aten.mul.Tensor, commutative=True),
    Op("div", aten.div.Tensor),
    Op("neg", aten.neg.default),
    Op("matmul", aten.mm.default),
    Op("matmul_nd", aten.matmul.default),
    Op("numpy_T", aten.numpy_T.default),
    Op("permute", aten.permute.default),
    Op("t", aten.t.default),
    Op("sqrt", aten.sqrt.default),
    Op("detach", aten.detach.default),
    Op("unsqueeze", aten.unsqueeze.default),
    Op("linear", aten.linear.default, defaults=(None,), arity=3),
    Op("addmm", aten.addmm.default),
    Op("conv1d", aten.conv1d.default, defaults=(None, [1], [0], [1], 1), arity=7),
    Op("conv2d", aten.conv2d.default, defaults=(None, [1, 1], [0, 0], [1, 1], 1), arity=7),
    Op("conv3d", aten.conv3d.default, defaults=(None, [1, 1, 1], [0, 0, 0], [1, 1, 1], 1), arity=7),
    Op("embedding", aten.embedding.default, defaults=(-1, False, False), arity=5),
    Op("row_norm", row_norm),
    Op("col_norm", col_norm),
    Op("scale_rows", scale_rows),
    Op("channels", channels),
    Op("conv_lowrank", conv_lowrank),
    Op("vec", vec),
    Op("dropin", dropin),
    Op("dropout", None, module_call=True),
]}

TARGET_TO_OP: dict[Any, Op] = {op.target: op for op in TENSOR_OPS.values() if op.target is not None}

# Functions on plain Python values (option arithmetic, conditions).
SCALAR_FUNCS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt,
    "min": min,
    "max": max,
    "abs": abs,
    "int": int,
    "float": float,
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    "neg": lambda a: -a,
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "not": lambda a: not a,
}

INITS: dict[str, Callable[..., Init]] = {k: _init(k) for k in ("zeros", "ones", "normal", "kaiming_uniform")}


def cast(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast an adapter tensor to the layer's dtype (the fold pass skips it and casts once at the end)."""
    return v.to(dtype)


TENSOR_OPS["cast"] = Op("cast", cast)
TARGET_TO_OP[cast] = TENSOR_OPS["cast"]
