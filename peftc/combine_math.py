"""The tensor math of `peftc combine`, as peft's merge_utils and add_weighted_adapter define it: pure
functions from task tensors (LoRA factors or their deltas) and weights to the combined factors."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from peftc.combine import TYPES, Options


# ---------------------------------------------------------------- task-tensor merging (peft's merge_utils)
def _prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return t
    k = int(density * t.numel())
    flat = torch.zeros(t.numel(), dtype=t.dtype)
    keep = torch.topk(t.abs().reshape(-1), k=k, largest=True).indices
    flat[keep] = 1
    return t * flat.reshape(t.shape)


def _prune_random(t: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, rescale the kept ones by 1/density."""
    if density >= 1:
        return t
    keep = torch.bernoulli(torch.full_like(t, density), generator=gen)
    return t * keep / density


def _majority_agrees(stacked: torch.Tensor, method: str) -> torch.Tensor:
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    majority = torch.where(votes >= 0, 1, -1)
    return sign == majority


def merge_tensors(tensors: Sequence[torch.Tensor], weights: Sequence[float], how: str, *,
                  density: float | None = None, majority_sign_method: str = "total",
                  gen: torch.Generator | None = None) -> torch.Tensor:
    """One merged tensor from same-shaped task tensors: weighted sum (linear), after magnitude pruning
    (magnitude_prune), random drop-and-rescale (dare_*), and a sign election (ties, dare_ties)."""
    if how in ("ties", "magnitude_prune"):
        tensors = [_prune_magnitude(t, density) for t in tensors]
    elif how in ("dare_linear", "dare_ties"):
        tensors = [_prune_random(t, density, gen) for t in tensors]
    stacked = torch.stack(list(tensors), dim=0)
    w = torch.tensor(list(weights)).view((-1,) + (1,) * (stacked.dim() - 1))
    weighted = stacked * w
    if how in ("ties", "dare_ties"):
        agree = _majority_agrees(stacked, majority_sign_method)
        return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)
    return weighted.sum(dim=0)


# ---------------------------------------------------------------- one layer
@dataclass
class LoraFactors:
    """One adapter's factors on one layer, in checkpoint layout, and its scaling there."""
    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self) -> torch.Tensor:
        """B @ A * scaling, in B/A orientation: (out, in) for linear layers, (out, in, *kernel) for convs."""
        a32, b32 = self.a.float(), self.b.float()
        d = b32.flatten(1) @ a32.flatten(1)
        return d.reshape((b32.shape[0],) + tuple(a32.shape[1:])) * self.scaling


def combine_layer(factors: Sequence[LoraFactors | None], opts: Options, new_rank: int,
                  gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the combined adapter on one layer; `None` marks an adapter that does not adapt it."""
    present = [(f, w) for f, w in zip(factors, opts.weights) if f is not None]
    how, svd = TYPES[opts.type]
    first = present[0][0]
    dtype = first.a.dtype
    if how == "cat":
        a = torch.zeros((new_rank,) + tuple(first.a.shape[1:]), dtype=dtype)
        b = torch.zeros((first.b.shape[0], new_rank) + tuple(first.b.shape[2:]), dtype=dtype)
        a_cat = torch.cat([f.a * w * f.scaling for f, w in present], dim=0)
        b_cat = torch.cat([f.b for f, _ in present], dim=1)
        a[: a_cat.shape[0]] = a_cat
        b[:, : b_cat.shape[1]] = b_cat
        return a, b
    kw = {"density": opts.density, "majority_sign_method": opts.majority_sign_method, "gen": gen}
    if svd:
        delta = merge_tensors([f.delta() for f, _ in present], [w for _, w in present], how, **kw)
        mat = delta.flatten(1)
        u, s, vh = torch.linalg.svd(mat, full_matrices=True)
        u = u[:, :new_rank] @ torch.diag(s[:new_rank])
        vh = vh[:new_rank, :]
        if opts.svd_clamp is not None:
            hi = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), opts.svd_clamp)
            u, vh = u.clamp(-hi, hi), vh.clamp(-hi, hi)
        a = vh.reshape((new_rank,) + tuple(first.a.shape[1:]))
        b = u.reshape((first.b.shape[0], new_rank) + tuple(first.b.shape[2:]))
        return a.to(dtype), b.to(dtype)
    # A and B merged separately; sqrt(|w * scaling|) on each side, the sign on A's
    wa, wb = [], []
    for f, w in present:
        ws = w * f.scaling
        wa.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))
        wb.append(math.sqrt(abs(ws)))
    a = merge_tensors([f.a for f, _ in present], wa, how, **kw)
    b = merge_tensors([f.b for f, _ in present], wb, how, **kw)
    return a.to(dtype), b.to(dtype)
