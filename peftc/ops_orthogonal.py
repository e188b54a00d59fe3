"""Ops for orthogonal (rotation) updates: skew-symmetric matrices from packed parameters, the Cayley transform
(exact, and its truncated Neumann series), block-diagonal and butterfly products applied without forming the
dense matrix, a norm-ball projection, and the plan-time butterfly permutations. Everything that runs in a
graph is written with gathers, reshapes and (batched) matmuls, so it converts to ONNX; the exact Cayley
transform is a linear solve, which does not (`peftc.emit.fold_for_export` computes it before export when its
inputs are constants)."""
from __future__ import annotations

import torch


def skew(v: torch.Tensor, n: int) -> torch.Tensor:
    """(..., n(n-1)/2) -> (..., n, n): the packed strict upper triangle (row-major) minus its transpose."""
    n = int(n)
    pos = [0] * (n * n)                            # slot 0 reads the zero prepended below
    k = 0
    for i in range(n):
        for j in range(i + 1, n):
            k += 1
            pos[i * n + j] = k
    padded = torch.cat([torch.zeros_like(v[..., :1]), v], dim=-1)
    upper = torch.index_select(padded, -1, torch.tensor(pos, device=v.device)).reshape(*v.shape[:-1], n, n)
    return upper - upper.transpose(-1, -2)


def _eye_like(s: torch.Tensor) -> torch.Tensor:
    return torch.eye(s.shape[-1], dtype=s.dtype, device=s.device).expand_as(s)


def cayley(s: torch.Tensor) -> torch.Tensor:
    """The exact Cayley transform of a batch of skew-symmetric matrices: (I - S)(I + S)^-1 (a linear solve)."""
    eye = _eye_like(s)
    return torch.linalg.solve(eye + s, eye - s, left=False)


def cayley_series(s: torch.Tensor, terms: int) -> torch.Tensor:
    """A truncated Neumann series of (I + S)(I - S)^-1 (note: the transpose of `cayley`'s limit), in the
    `terms` convention of peft's OFT: I + 2S + 2S^2 + ... + 2S^m + S^(m+1), m = max(2, terms - 2); terms = 2
    gives I + 2S and terms = 1 the identity. Matmuls only."""
    terms = int(terms)
    out = _eye_like(s)
    if terms < 2:
        return out + 0 * s
    out = out + 2 * s
    if terms == 2:
        return out
    power = s
    for _ in range(max(2, terms - 2) - 1):
        power = torch.matmul(power, s)
        out = out + 2 * power
    return out + torch.matmul(power, s)


def block_diag(m: torch.Tensor) -> torch.Tensor:
    """(nb, bs, bs) -> the (nb*bs, nb*bs) block-diagonal matrix with the given blocks."""
    nb, bs, _ = m.shape
    eye = torch.eye(nb, dtype=m.dtype, device=m.device)
    return torch.einsum("ij,iab->iajb", eye, m).reshape(nb * bs, nb * bs)


def block_matmul(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x @ block_diag(m) without forming it: the last dim of x cut into m.shape[0] blocks, each multiplied by
    its own (bs, bs) block (one batched matmul)."""
    nb, bs, _ = m.shape
    xb = x.reshape(*x.shape[:-1], nb, bs)
    return torch.einsum("...rk,rkc->...rc", xb, m).reshape(x.shape)


def _inverse(p: torch.Tensor) -> torch.Tensor:
    ar = torch.arange(p.shape[-1], device=p.device).expand_as(p)
    return torch.zeros_like(p).scatter(-1, p, ar)


def butterfly_matmul(x: torch.Tensor, q: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """x @ B_0 @ B_1 @ ... @ B_(L-1) with B_i = P_i block_diag(q[i]) P_i^T and P_i[k, perm[i, k]] = 1:
    per level a gather, a block product and a gather back (q: (L, nb, bs, bs), perm: (L, n) int)."""
    inv = _inverse(perm)
    for i in range(q.shape[0]):
        x = torch.index_select(x, -1, inv[i])          # x @ P_i
        x = block_matmul(x, q[i])
        x = torch.index_select(x, -1, perm[i])         # ... @ P_i^T
    return x


def butterfly_perm(n: int, blocks: int, block_size: int, levels: int) -> torch.Tensor:
    """(levels, n) permutations of a block butterfly (BOFT): for level i > 0 (only when levels > 1) each chunk
    of n * 2^i / blocks positions is cut into pieces of block_size / 2 and reordered even pieces first, then odd;
    level 0, and every level when levels == 1, is the identity."""
    n, blocks, block_size, levels = int(n), int(blocks), int(block_size), int(levels)
    out = []
    for i in range(levels):
        if levels == 1:
            out.append(torch.arange(n))
            continue
        chunk, piece = n * 2 ** i // blocks, block_size // 2
        pieces = chunk // piece
        order = [*range(0, pieces, 2), *range(1, pieces, 2)]
        within = torch.tensor([order[j // piece] * piece + j % piece for j in range(chunk)])
        out.append(torch.cat([within + s for s in range(0, n, chunk)]))
    return torch.stack(out)


def ball_project(m: torch.Tensor, radius: float) -> torch.Tensor:
    """Each matrix of a batch (..., a, b) scaled back onto the Frobenius ball of `radius` if it lies outside:
    m * radius / max(||m||, radius)."""
    nrm = torch.linalg.vector_norm(m, 2, dim=(-2, -1), keepdim=True)
    return m * (radius / torch.clamp_min(nrm, radius))


def nearest_divisor(n: int, k: int) -> int:
    """The divisor of n nearest to k (ties: the smaller); n itself when k >= n."""
    n, k = int(n), int(k)
    if k >= n:
        return n
    if k > 0 and n % k == 0:
        return k
    higher = k
    while higher <= n and n % higher:
        higher += 1
    lower = k
    while lower > 1 and n % lower:
        lower -= 1
    return lower if k - lower <= higher - k else higher


def reverse(v: torch.Tensor) -> torch.Tensor:
    """v with its first dim in reverse order."""
    return torch.flip(v, (0,))
