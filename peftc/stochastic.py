"""Training-only stochastic masks on a weight update, as submodules (so `.eval()` turns them off):
rank dropout (drop output rows of the update, optionally rescaled by the kept fraction) and module dropout
(drop the whole update). peft applies these to LoHa / LoKr updates while training."""
from __future__ import annotations

import torch
from torch import nn


class RowDropout(nn.Module):
    """Zero each output row of the update with probability p; with `rescale`, divide by the mean kept."""

    def __init__(self, p: float, rescale: bool) -> None:
        super().__init__()
        self.p, self.rescale = p, rescale

    def forward(self, delta: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return delta
        keep = (torch.rand(delta.shape[0], device=delta.device) > self.p).to(delta.dtype)
        if self.rescale:
            keep = keep / keep.mean()
        return delta * keep.reshape(-1, *([1] * (delta.dim() - 1)))


class UpdateDropout(nn.Module):
    """Drop the whole update with probability p (no rescaling, as peft's module_dropout)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, delta: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return delta
        return delta * (torch.rand((), device=delta.device) > self.p).to(delta.dtype)


def weight_dropout(over: str, p: float, rescale: bool) -> nn.Module:
    return RowDropout(p, rescale) if over == "rows" else UpdateDropout(p)
