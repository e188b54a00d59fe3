"""Run time of the `choose` pass: a group of linear layers that read the same input, each with a low-rank update,
computed in whichever of two exact forms costs less for the number of tokens in this forward.

    y_j = linear(x, W_j, b_j) + linear(linear(x, A_j), B_j)          A_j: [r_j, in], B_j: [out_j, r_j]

- factored (few tokens, e.g. decoding): one `x @ cat(A_j)ᵀ` for the group, then each `h_j @ B_jᵀ` is added into
  the base output by the same GEMM (`addmm`): no extra pass over the output. Cost ~ tokens · Σ r_j (in + out_j);
- dense (many tokens, e.g. a prefill): `W_j + B_j A_j` (one `addmm` over the weight), then one base-sized GEMM.
  Cost ~ Σ in · out_j · r_j, independent of the token count.

`threshold` (from the pass: where the two costs meet) picks the form: dense when tokens >= threshold. In eager
mode this is a Python `if` on the token count; when the token count is symbolic (torch.export with dynamic
shapes, hence `.pt2` and ONNX, or torch.compile with dynamic shapes) it is a `torch.cond`, which ONNX writes
as an `If`. With autograd recording gradients for A or B, eager mode always takes the factored form (the
dense one would need the full-size gradient of W + BA). Both forms give the same result up to fp rounding.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F


def _dense(x2: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
           downs: Sequence[torch.Tensor], ups: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(F.linear(x2, torch.addmm(w, b_up, a), bias) for w, bias, a, b_up in zip(weights, biases, downs, ups))


def _factored(x2: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
              downs: Sequence[torch.Tensor], ups: Sequence[torch.Tensor], down_all: torch.Tensor | None,
              in_place: bool) -> tuple[torch.Tensor, ...]:
    if down_all is None:
        down_all = downs[0] if len(downs) == 1 else torch.cat(list(downs), 0)
    h_all = torch.mm(x2, down_all.t())
    out, start = [], 0
    for w, bias, a, b_up in zip(weights, biases, downs, ups):
        h = h_all if len(downs) == 1 else h_all[:, start:start + a.shape[0]]
        start += a.shape[0]
        y = F.linear(x2, w, bias)
        out.append(y.addmm_(h, b_up.t()) if in_place else torch.addmm(y, h, b_up.t()))
    return tuple(out)


def _pick(x2: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
          downs: Sequence[torch.Tensor], ups: Sequence[torch.Tensor], threshold: int,
          down_all: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    tokens = x2.shape[0]
    # torch.export: a torch.cond; eager, a static trace, or torch.compile (which guards on the token count, and
    # whose inductor does not take this cond with dynamic shapes): the choice is made here
    traced = torch.compiler.is_exporting() or isinstance(tokens, torch.SymInt) and not torch.compiler.is_compiling()
    if not traced:
        grads = torch.is_grad_enabled() and any(t.requires_grad for t in (*downs, *ups))
        if tokens >= threshold and not grads:
            return _dense(x2, weights, biases, downs, ups)
        return _factored(x2, weights, biases, downs, ups, down_all, in_place=not grads)
    has_bias = [b is not None for b in biases]
    k, nb = len(weights), sum(has_bias)

    def unpack(ts: tuple[torch.Tensor, ...]) -> tuple:
        it = iter(ts[1 + k:1 + k + nb])
        rest = ts[1 + k + nb:]
        return ts[0], ts[1:1 + k], [next(it) if h else None for h in has_bias], rest[:k], rest[k:]

    def dense(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _dense(*unpack(ts))

    def factored(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _factored(*unpack(ts), None, in_place=False)

    operands = (x2, *weights, *(b for b in biases if b is not None), *downs, *ups)
    return tuple(torch.cond(tokens >= threshold, dense, factored, operands))


def lowrank_linears(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                    downs: Sequence[torch.Tensor], ups: Sequence[torch.Tensor], threshold: int,
                    down_all: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """(y_1, ..., y_k), y_j = linear(x, W_j, b_j) + linear(linear(x, A_j), B_j); see the module docstring.
    `down_all`: cat(A_1, ..., A_k) if the graph computes it (then the pass `cache` keeps it between forwards)."""
    x2 = x.reshape(-1, weights[0].shape[1])   # [tokens, in]: the choice and both forms work on rows
    ys = _pick(x2, weights, biases, downs, ups, threshold, down_all)
    return tuple(y.reshape(*x.shape[:-1], w.shape[0]) for y, w in zip(ys, weights))
