"""Mixture-of-experts models traced with an experts implementation made of plain ATen ops.

transformers lets a MoE model choose how its experts run (`experts_implementation`: `grouped_mm` by default, a
custom op that the ONNX exporter cannot convert and that a `.pt2` needs transformers to load; `batched_mm`, a
gather of each token's expert weights and one batched matmul; `eager`, a data-dependent loop). While peftc
traces a model that offers the choice, it switches to `batched_mm` and restores the model's own setting after,
so the graph exports to ONNX and loads with only torch. The numbers are the same (each is the same sum).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

EXPORTABLE = "batched_mm"


def _switchable(module: nn.Module) -> bool:
    """Does this model let its experts implementation be set (transformers' `set_experts_implementation`, on a
    class whose experts use the dispatching decorator)?"""
    can = getattr(type(module), "_can_set_experts_implementation", None)
    if not callable(getattr(module, "set_experts_implementation", None)) or not callable(can):
        return False
    try:
        return bool(can())
    except Exception:  # noqa: BLE001 - a heuristic that reads source code; unknown means no
        return False


@contextmanager
def exportable_experts(module: nn.Module) -> Iterator[Any]:
    """Within the block, a switchable MoE model runs its experts with `batched_mm`; its setting is restored after."""
    if not _switchable(module):
        yield None
        return
    try:
        before = module.get_experts_implementation()
        if set(before.values()) <= {EXPORTABLE}:
            yield None
            return
        module.set_experts_implementation(EXPORTABLE)
    except Exception:  # noqa: BLE001 - a model that refuses keeps its own implementation
        yield None
        return
    try:
        yield EXPORTABLE
    finally:
        module.set_experts_implementation(before)
