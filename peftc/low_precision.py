"""Half-precision models (bfloat16, float16): the dtype a compiled graph runs in, the onnxruntime check's
tolerance for it, and the one dtype onnxruntime's CPU provider cannot run (bfloat16).

Merging is the same at every dtype: the fold computes in float32 (float64 for float64 models) and casts once to
the weight's dtype. `--dtype` casts the model before tracing, so a bfloat16 checkpoint exported as float16 or
float32 is folded from its exact (widened) bfloat16 weights and rounded once.
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

from peftc.errors import PeftcError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
# onnxruntime vs torch, max abs diff: float16 kernels accumulate in another order (about 10 float16 ulps of a
# logit of magnitude ~1); float32 and float64: the usual 1e-4
ONNX_TOL = {torch.float16: 1e-2}
DEFAULT_ONNX_TOL = 1e-4


def graph_dtype(gm: nn.Module) -> torch.dtype:
    """The float dtype a compiled graph runs in (its dtype anchor, else its first float parameter)."""
    anchor = getattr(gm, "peftc_dtype", None)
    if isinstance(anchor, torch.Tensor):
        return anchor.dtype
    for p in gm.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def onnx_tol(gm: fx.GraphModule) -> float:
    return ONNX_TOL.get(graph_dtype(gm), DEFAULT_ONNX_TOL)


def check_runnable_in_onnxruntime(gm: fx.GraphModule) -> None:
    """A located error before any export work when onnxruntime's CPU provider cannot run the model's dtype."""
    if graph_dtype(gm) == torch.bfloat16:
        raise PeftcError("the model is bfloat16, and onnxruntime's CPU provider has no bfloat16 kernels for most "
                         "ops (Mul, MatMul, ...), so the export cannot be checked here: give --dtype float16 or "
                         "--dtype float32 to export in that dtype (adapters folded in float32 from the exact "
                         "bfloat16 weights, cast once), or --no-check to write the bfloat16 ONNX unchecked (for a "
                         "runtime with bfloat16 kernels)")


def cast_model(module: nn.Module, inputs: dict[str, torch.Tensor], dtype: torch.dtype, *, owned: bool
               ) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The model and its float example inputs in `dtype` (a caller's module is copied first, never changed)."""
    module = (module if owned else copy.deepcopy(module)).to(dtype)
    return module, {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
