"""Training-only stochastic masks on a weight update, as submodules (so `.eval()` turns them off):
rank dropout (drop output rows of the update, optionally rescaled by the kept fraction) and module dropout
(drop the whole update), and block dropout (blocks of a rotation set to the identity). peft applies these to
LoHa / LoKr updates, and to BOFT's rotation blocks, while training."""
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


class BlockDropout(nn.Module):
    """A stack of square blocks (..., D, n, n): int(p * D) random blocks replaced by the identity (peft's
    multiplicative dropout for OFT / BOFT); with a level dim in front (L, D, n, n), in one random level only."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return blocks
        d, n = blocks.shape[-3], blocks.shape[-1]
        drop = torch.zeros(d, device=blocks.device)
        drop[torch.randperm(d, device=blocks.device)[:int(self.p * d)]] = 1
        mask = drop.reshape(d, 1, 1)
        if blocks.dim() == 4:
            level = torch.zeros(blocks.shape[0], 1, 1, 1, device=blocks.device)
            level[torch.randint(0, blocks.shape[0], ())] = 1
            mask = level * mask
        mask = mask.to(blocks.dtype)
        eye = torch.eye(n, dtype=blocks.dtype, device=blocks.device)
        return (1 - mask) * blocks + mask * eye


def weight_dropout(over: str, p: float, rescale: bool) -> nn.Module:
    if over == "blocks":
        return BlockDropout(p)
    return RowDropout(p, rescale) if over == "rows" else UpdateDropout(p)
