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


def expert_lowrank(b: torch.Tensor, a: torch.Tensor, experts: int) -> torch.Tensor:
    """Per-expert low-rank updates from peft's stacked factors, as (experts, out, in): a (r*E, in) holds expert
    e's rows at [e*r, (e+1)*r); b (out, r*E) holds expert e's columns interleaved, at j*E + e (peft's layout)."""
    a3 = a.reshape(experts, -1, a.shape[-1])                        # (E, r, in)
    b3 = b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)        # (E, out, r)
    return torch.bmm(b3, a3)


def ungroup(w: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv kernel (out, in/g, *k) as the ungrouped kernel (out, in, *k) that computes the same
    (block-diagonal over the groups, zeros elsewhere)."""
    out, in_g, *k = w.shape
    blocks = w.reshape(groups, out // groups, 1, in_g, *k)
    eye = torch.eye(groups, dtype=w.dtype, device=w.device).reshape(groups, 1, groups, 1, *([1] * len(k)))
    return (blocks * eye).reshape(out, groups * in_g, *k)


def grouped_lowrank(b: torch.Tensor, a: torch.Tensor, groups: int) -> torch.Tensor:
    """The ungrouped kernel of conv_g(conv(x, a), b) with b a grouped 1x1 conv: b (out, r/g, 1..) and a
    (r, in, *k) -> (out, in, *k); output o reads the r/g channels of a in its group."""
    out, r = b.shape[0], a.shape[0]
    d = torch.bmm(b.reshape(groups, out // groups, r // groups), a.reshape(groups, r // groups, -1))
    return d.reshape(out, *a.shape[1:])


def grouped_pointwise(y: torch.Tensor, b: torch.Tensor, groups: int) -> torch.Tensor:
    """A 1x1 (1, 1x1x1) convolution of y by b in `groups` groups."""
    conv = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d, 5: torch.nn.functional.conv3d}[b.dim()]
    return conv(y, b, None, 1, 0, 1, groups)


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


def reshape_as(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """v with the shape of `like` (a kernel built flat, reshaped to the base weight's shape)."""
    return v.reshape(like.shape)


def norm(v: torch.Tensor, dim: int) -> torch.Tensor:
    """L2 norm over one dim (kept as size 1, so it broadcasts back)."""
    return torch.linalg.vector_norm(v, 2, dim=dim, keepdim=True)


def real_ifft2(v: torch.Tensor) -> torch.Tensor:
    """Real part of the 2-d inverse FFT (normalised by 1/(rows*cols)), in fp32 at least."""
    return torch.fft.ifft2(v.float() if v.dtype in (torch.float16, torch.bfloat16) else v).real


def scatter2d(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A zero matrix shaped like `like` with values[i] at (rows[i], cols[i]) (later values win on repeats)."""
    out = torch.zeros(like.shape[-2:], dtype=values.dtype, device=values.device)
    return torch.index_put(out, (rows.long(), cols.long()), values)


def floordiv(a: torch.Tensor, b: Any) -> torch.Tensor:
    return torch.div(a, b, rounding_mode="floor")


def mod(a: torch.Tensor, b: Any) -> torch.Tensor:
    return torch.remainder(a, b)


def einsum(equation: str, *operands: torch.Tensor) -> torch.Tensor:
    return torch.einsum(equation, *operands)


def tile_cols(v: torch.Tensor, n: int) -> torch.Tensor:
    """v's columns repeated periodically to n columns: result[:, c] = v[:, c % v.shape[1]]."""
    reps = -(-int(n) // v.shape[1])
    return v.repeat(1, reps)[:, : int(n)]


def fold_cols(x: torch.Tensor, width: int) -> torch.Tensor:
    """The last dim of x cut into chunks of `width` (zero-padded) and summed: x @ tile_cols(I_width, n).T."""
    n = x.shape[-1]
    pad = (-n) % int(width)
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, int(width)).sum(dim=-2)


def kron_linear(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """linear(x, kron(a, b)) without forming the Kronecker product: view x as (.., a.cols, b.cols), then
    a @ X @ b.T, flattened back (two thin matmuls)."""
    lead = x.shape[:-1]
    xm = x.reshape(*lead, a.shape[1], b.shape[1])
    y = torch.matmul(torch.matmul(a, xm), b.t())
    return y.reshape(*lead, a.shape[0] * b.shape[0])


def block_circulant(k: torch.Tensor) -> torch.Tensor:
    """The (M*b, N*b) matrix whose (m, n) block is the circulant matrix with first row k[m, n]:
    out[m*b + j, n*b + t] = k[m, n, (t - j) mod b]. Built with a gather (no FFT), so it converts to ONNX."""
    m, n, b = k.shape
    ar = torch.arange(b, device=k.device)
    idx = torch.remainder(ar[None, :] - ar[:, None], b)                     # (j, t) -> (t - j) mod b
    blocks = torch.index_select(k, 2, idx.reshape(-1)).reshape(m, n, b, b)  # [m, n, j, t]
    return blocks.permute(0, 2, 1, 3).reshape(m * b, n * b)


def softmax(v: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.softmax(v, dim)


def _wavelet_filters(family: str) -> tuple[list[float], list[float]]:
    """Reconstruction low- and high-pass filters of a wavelet family, from PyWavelets."""
    try:
        import pywt
    except ImportError:
        raise ValueError("wavelet transforms need PyWavelets (pip install PyWavelets)") from None
    try:
        w = pywt.Wavelet(family)
    except ValueError:
        raise ValueError(f"unknown wavelet family {family!r}") from None
    return list(w.rec_lo), list(w.rec_hi)


def wavelet_pad(family: str) -> int:
    """How many rows (and columns) a one-level reconstruction loses at the borders: filter length - 2."""
    return len(_wavelet_filters(family)[0]) - 2


def idwt2(grid: torch.Tensor, family: str) -> torch.Tensor:
    """One-level inverse 2-d discrete wavelet transform of a coefficient grid laid out in quadrants
    [[approximation, horizontal], [vertical, diagonal]] (even sizes): a stride-2 transposed convolution with
    the outer products of the reconstruction filters, trimmed by (2L - 3) // 2 at each border (L: filter length)."""
    lo_l, hi_l = _wavelet_filters(family)
    lo = torch.tensor(lo_l, dtype=grid.dtype, device=grid.device)
    hi = torch.tensor(hi_l, dtype=grid.dtype, device=grid.device)
    filt = torch.stack([lo[:, None] * lo[None, :], hi[:, None] * lo[None, :], lo[:, None] * hi[None, :],
                        hi[:, None] * hi[None, :]])[:, None]
    h2, w2 = grid.shape[0] // 2, grid.shape[1] // 2
    quads = torch.stack([grid[:h2, :w2], grid[:h2, w2:], grid[h2:, :w2], grid[h2:, w2:]])[None]
    out = torch.nn.functional.conv_transpose2d(quads, filt, stride=2)[0, 0]
    p = (2 * len(lo_l) - 3) // 2
    return out[p: out.shape[0] - p, p: out.shape[1] - p] if p > 0 else out


def pad2(v: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """A matrix with zero rows/columns added around it."""
    return torch.nn.functional.pad(v, (int(left), int(right), int(top), int(bottom)))


def topk_values(v: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest values along the last dim, largest first."""
    return torch.topk(v, int(k), dim=-1).values


def topk_indices(v: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(v, int(k), dim=-1).indices


def to_float(v: torch.Tensor) -> torch.Tensor:
    """fp32 (for the parts peft computes in fp32 whatever the model's dtype)."""
    return v.float()


def dropin(delta: torch.Tensor, module: str) -> torch.Tensor:
    """Marks the part of a weight whose input passes through the dropout submodule `module`.

    As a dense weight it is the identity; the rule `input_dropout` turns linear(x, dropin(D, m)) into
    linear(m(x), D). It only appears in graphs compiled for training with dropout > 0.
    """
    return delta


def eye(n: int, like: torch.Tensor) -> torch.Tensor:
    """The n x n identity in `like`'s dtype and device."""
    return torch.eye(int(n), dtype=like.dtype, device=like.device)


def rotate_half(v: torch.Tensor, group: int, dim: int) -> torch.Tensor:
    """Along `dim`, in consecutive groups of `group` entries (halves a, b): [a, b] -> [-b, a] (RoPE's
    rotate_half, per group). On the rows of a weight (dim 0) it is the output-side permutation whose effect on
    linear(x, W) is rotate_half of the output's last dim."""
    d = dim % v.dim()
    g = v.unflatten(d, (-1, 2, int(group) // 2))
    a, b = g.select(d + 1, 0), g.select(d + 1, 1)
    return torch.stack((-b, a), dim=d + 1).flatten(d, d + 2)


def unitri_inverse(a: torch.Tensor) -> torch.Tensor:
    """The inverse of a unit triangular matrix a = I + N (N strictly triangular, so nilpotent: N^n = 0) as the
    finite series (I - N)(I + N^2)(I + N^4)...: about 2 log2(n) small matmuls, no solve (converts to ONNX)."""
    n = a.shape[-1]
    eye_n = torch.eye(n, dtype=a.dtype, device=a.device)
    nil = eye_n - a                     # -N
    out = eye_n + nil
    power, reach = nil, 2
    while reach < n:
        power = power @ power
        out = out @ (eye_n + power)
        reach *= 2
    return out


def orthonormalize(u: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt on the columns of u, left to right (each column made orthogonal to the ones before it, twice
    for stability, then unit length): the Q of u's QR with positive diagonal, in plain matmuls (converts to ONNX,
    unlike linalg.qr)."""
    cols = [u[:, 0] / u[:, 0].norm()]
    for i in range(1, u.shape[1]):
        q = torch.stack(cols, dim=1)
        c = u[:, i]
        c = c - q @ (q.t() @ c)
        c = c - q @ (q.t() @ c)
        cols.append(c / c.norm())
    return torch.stack(cols, dim=1)


_SVD_MEMO: list[Any] = []


def svd(v: torch.Tensor, part: str) -> torch.Tensor:
    """A factor ("U", "S" or "Vh") of the thin SVD of a matrix, computed in fp32 and returned in v's dtype
    (compile time only; the last matrix's SVD is kept, so its three parts cost one decomposition)."""
    if not (_SVD_MEMO and _SVD_MEMO[0] is v and _SVD_MEMO[1] == v._version):
        _SVD_MEMO[:] = [v, v._version, torch.linalg.svd(v.float(), full_matrices=False)]
    u, s, vh = _SVD_MEMO[2]
    return {"U": u, "S": s, "Vh": vh}[part].to(v.dtype)


# ---------------------------------------------------------------- initialisers
@dataclass(frozen=True)
class Init:
    """How to fill a fresh parameter: kind and keyword arguments."""
    kind: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    def make(self, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
        """A float32 tensor drawn as declared (from the `generator=` given in the declaration, which makes
        the draw reproducible, else from the compile's seeded generator), then cast to `dtype`."""
        kw = dict(self.kwargs)
        gen = kw.pop("generator", None) or generator
        rep = int(kw.pop("interleave", 1))   # draw 1/rep of the last dim, then repeat each column rep times
        if rep > 1:
            half = Init(self.kind, tuple(kw.items())).make((*shape[:-1], shape[-1] // rep), dtype, gen)
            return torch.repeat_interleave(half, rep, dim=-1)
        t = torch.empty(shape, dtype=DTYPES[kw.pop("dtype", "float32")])
        if self.kind == "zeros":
            t.zero_()
        elif self.kind == "ones":
            t.fill_(1.0)
        elif self.kind == "fill":
            t.fill_(kw.get("value", 0.0))
        elif self.kind == "normal":
            t.normal_(kw.get("mean", 0.0), kw.get("std", 1.0), generator=gen)
        elif self.kind == "uniform":
            t.uniform_(kw.get("low", 0.0), kw.get("high", 1.0), generator=gen)
        elif self.kind == "kaiming_uniform":
            torch.nn.init.kaiming_uniform_(t, a=kw.get("a", math.sqrt(5)), generator=gen)
        elif self.kind == "xavier_uniform":
            torch.nn.init.xavier_uniform_(t, gain=kw.get("gain", 1.0), generator=gen)
        else:
            raise ValueError(f"unknown initialiser {self.kind}")
        return t.to(dtype)


DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "uint8": torch.uint8, "bool": torch.bool}


def draw(init: Init, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor drawn now by `init` (in the dtype the init names; float32 by default)."""
    kw = dict(init.kwargs)
    return init.make(tuple(int(d) for d in shape), DTYPES[kw.get("dtype", "float32")], torch.Generator())


def draw_cat(init: Init, shape: tuple[int, ...], count: int, dim: int) -> torch.Tensor:
    """`count` tensors of `shape` drawn one after the other by `init` (each with its own fan), joined along
    `dim`: how peft draws some bases piece by piece from one generator."""
    return torch.cat([draw(init, shape) for _ in range(int(count))], dim=int(dim))


def ternary(u: torch.Tensor, t: float) -> torch.Tensor:
    """-1 where u < t, +1 where u > 1 - t, else 0 (uniform draws made into a sparse random projection)."""
    return (u > 1 - t).to(u.dtype) - (u < t).to(u.dtype)


def unit_std(v: torch.Tensor) -> torch.Tensor:
    """v divided by its standard deviation (in v's dtype)."""
    return v / v.std()


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
    plan_only: bool = False           # computed once at compile time (`const`), never emitted into a graph
    shape_args: tuple[int, ...] = ()  # positions read only for their shape, dtype and device (a `like` template)


# ---------------------------------------------------------------- plan-time functions (seeded draws)
def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed`: draws from it (in declaration order) reproduce peft's bit for bit."""
    return torch.Generator().manual_seed(int(seed))


def randperm(n: int, seed: int | torch.Generator) -> torch.Tensor:
    """torch.randperm(n) from a generator seeded with `seed` (or drawing from a given generator)."""
    if isinstance(seed, torch.Generator):
        gen = seed
    else:
        gen = torch.Generator() if seed is None else generator(seed)   # unseeded: torch's fixed default seed
    return torch.randperm(int(n), generator=gen)


def sort(v: torch.Tensor) -> torch.Tensor:
    return torch.sort(v).values


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
    Op("expert_lowrank", expert_lowrank),
    Op("ungroup", ungroup),
    Op("grouped_lowrank", grouped_lowrank),
    Op("grouped_pointwise", grouped_pointwise),
    Op("vec", vec),
    Op("dropin", dropin),
    Op("dropout", None, module_call=True),
    # indexing and shapes (subscripts `x[i, a:b, None]` become select / slice / unsqueeze)
    Op("select", aten.select.int),
    Op("slice", aten.slice.Tensor, defaults=(0, None, None, 1), arity=5),
    Op("reshape", aten.reshape.default),
    Op("reshape_as", reshape_as, shape_args=(1,)),
    Op("transpose", aten.transpose.int),
    Op("cat", aten.cat.default, defaults=(0,), arity=2),
    Op("stack", aten.stack.default, defaults=(0,), arity=2),
    Op("repeat", aten.repeat.default),
    Op("flatten", aten.flatten.using_ints, defaults=(0, -1), arity=3),
    # arithmetic beyond + - * /
    Op("floordiv", floordiv),
    Op("mod", mod),
    Op("pow", aten.pow.Tensor_Scalar),
    Op("clamp_min", aten.clamp_min.default),
    Op("sum", aten.sum.dim_IntList, defaults=(False,), arity=3),
    Op("norm", norm),
    Op("kron", aten.kron.default),
    Op("einsum", einsum),
    Op("tile_cols", tile_cols),
    Op("fold_cols", fold_cols),
    Op("kron_linear", kron_linear),
    Op("block_circulant", block_circulant),
    Op("idwt2", idwt2),
    Op("pad2", pad2),
    Op("scatter2d", scatter2d, shape_args=(3,)),
    Op("real_ifft2", real_ifft2),
    Op("topk_values", lambda v, k: torch.topk(v, k, dim=-1).values),
    Op("topk_indices", lambda v, k: torch.topk(v, k, dim=-1).indices),
    Op("to_long", lambda v: v.long()),
    Op("to_float", lambda v: v.float()),
    # compile-time only
    Op("generator", generator, plan_only=True),
    Op("randperm", randperm, plan_only=True),
    Op("sort", sort, plan_only=True),
    Op("draw", draw, plan_only=True),
    Op("draw_cat", draw_cat, plan_only=True),
    Op("unit_std", unit_std),
    Op("ternary", ternary),
    Op("softmax", softmax),
    # rotations and orthogonal factors (HRA, RoAd), plan-time decompositions (OSF)
    Op("eye", eye, shape_args=(1,)),
    Op("triu", aten.triu.default, defaults=(0,), arity=2),
    Op("cos", aten.cos.default),
    Op("sin", aten.sin.default),
    Op("repeat_interleave", aten.repeat_interleave.self_int),
    Op("rotate_half", rotate_half),
    Op("unitri_inverse", unitri_inverse),
    Op("orthonormalize", orthonormalize),
    Op("svd", svd, plan_only=True),
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
    "is_float": lambda v: isinstance(v, float),
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
    "floordiv": lambda a, b: a // b,
    "mod": lambda a, b: a % b,
    "pow": lambda a, b: a ** b,
    "ceil": math.ceil,
    "floor": math.floor,
    "gcd": math.gcd,
    "len": len,
    "select": lambda seq, dim, i: seq[i],
    "slice": lambda seq, dim, start=None, end=None, step=1: seq[start:end:step],
    "round": round,
    "divisor_pair": None,   # filled below
    "wavelet_pad": wavelet_pad,
}

def divisor_pair(n: int, limit: int = -1) -> tuple[int, int]:
    """Split n = m * k with m <= k as evenly as possible, m at most `limit` (-1: no limit); a `limit` that
    divides n is taken as m outright. This is the factorisation LyCORIS/peft use to shape Kronecker
    factors (peft's `factorization(dimension, factor)`)."""
    n, limit = int(n), int(limit)
    if limit > 0 and n % limit == 0:
        return limit, n // limit
    cap = n if limit == -1 else limit
    m, k = 1, n
    while m < k:
        nxt = m + 1
        while n % nxt:
            nxt += 1
        if nxt + n // nxt > m + k or nxt > cap:
            break
        m, k = nxt, n // nxt
    return (k, m) if m > k else (m, k)


SCALAR_FUNCS["divisor_pair"] = divisor_pair
SCALAR_FUNCS["wavelet_pad"] = wavelet_pad

INITS: dict[str, Callable[..., Init]] = {k: _init(k) for k in ("zeros", "ones", "fill", "normal", "uniform",
                                                                 "kaiming_uniform", "xavier_uniform")}


def cast(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast an adapter tensor to the layer's dtype (the fold pass skips it and casts once at the end)."""
    return v.to(dtype)


TENSOR_OPS["cast"] = Op("cast", cast)
TARGET_TO_OP[cast] = TENSOR_OPS["cast"]


# ---------------------------------------------------------------- orthogonal updates (peftc/ops_orthogonal.py)
# ops with no exact ONNX conversion (a linear solve): computed before export where their inputs are constants
NOT_EXPORTABLE: set[Any] = set()


def _orthogonal_ops() -> None:
    from peftc import ops_orthogonal as o
    for op in [Op("skew", o.skew), Op("cayley", o.cayley), Op("cayley_series", o.cayley_series),
               Op("block_diag", o.block_diag), Op("block_matmul", o.block_matmul),
               Op("butterfly_matmul", o.butterfly_matmul), Op("butterfly_perm", o.butterfly_perm, plan_only=True),
               Op("ball_project", o.ball_project), Op("reverse", o.reverse)]:
        TENSOR_OPS[op.name] = op
        if op.target is not None:
            TARGET_TO_OP[op.target] = op
    SCALAR_FUNCS["nearest_divisor"] = o.nearest_divisor
    NOT_EXPORTABLE.add(o.cayley)


_orthogonal_ops()
# ---------------------------------------------------------------- rows of a weight (trainable tokens)
def indices(values: Any) -> torch.Tensor:
    """A list of integers (an option such as token_indices) as an int64 index tensor, built at compile time."""
    return torch.tensor(list(values), dtype=torch.int64)


for _op in [Op("indices", indices, plan_only=True),
            Op("index_select", aten.index_select.default),   # index_select(W, 0, idx): rows of W
            Op("index_copy", aten.index_copy.default)]:      # index_copy(W, 0, idx, rows): W with rows replaced
    TENSOR_OPS[_op.name] = _op
    if _op.target is not None:
        TARGET_TO_OP[_op.target] = _op


def row_override(e: torch.Tensor, ids: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """embedding(W with rows `idx` replaced by `rows`, ids), from e = embedding(W, ids): an id in `idx` takes its
    new row (a one-hot matmul over the few replaced rows), never a copy of the whole table."""
    hit = ids.unsqueeze(-1) == idx
    return torch.where(hit.any(-1, keepdim=True), hit.to(rows.dtype) @ rows, e)


def col_override(y: torch.Tensor, idx: torch.Tensor, y_rows: torch.Tensor) -> torch.Tensor:
    """linear(x, W with rows `idx` replaced), from y = linear(x, W) and y_rows = linear(x, rows): output columns
    `idx` replaced (a tied output head reading the new token rows)."""
    return y.index_copy(y.dim() - 1, idx, y_rows)


for _op in [Op("row_override", row_override), Op("col_override", col_override)]:
    TENSOR_OPS[_op.name] = _op
    TARGET_TO_OP[_op.target] = _op
SCALAR_FUNCS["distinct"] = lambda seq: len(set(seq)) == len(seq)


# ---------------------------------------------------------------- per-token updates (a mask read from a model input)
def match_at(seq: torch.Tensor, tokens: Any) -> torch.Tensor:
    """[batch, seq] bool: True at position t of a row when the row's values t, t+1, ... equal `tokens` (a list of
    integers; a match must fit inside the row). Built from shifted comparisons (pad, slice, eq), so it exports."""
    toks = [int(v) for v in tokens]
    hit = torch.ones_like(seq, dtype=torch.bool)
    for k, tok in enumerate(toks):   # row[t + k] == tok, with -1 (never a token id) past the end
        shifted = torch.nn.functional.pad(seq, (0, k), value=-1)[..., k:] if k else seq
        hit = hit & (shifted == tok)
    return hit


def from_last(hit: torch.Tensor) -> torch.Tensor:
    """[batch, seq] bool: True from each row's last True of `hit` onward (the whole row False when it has none)."""
    pos = torch.cumsum(torch.ones_like(hit, dtype=torch.int64), dim=-1) - 1
    last = torch.amax(torch.where(hit, pos, -1), dim=-1, keepdim=True)
    return (pos >= last) & (last >= 0)


def per_token(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Marks an update that applies only at the tokens where `mask` ([batch, seq]) is True. It has no value as a
    weight (it depends on the tokens); the rule `token_mask` turns linear(x, per_token(D, m)) into
    mask_tokens(linear(x, D), m). A layer no rule factors this way is an error (peftc.token_masks)."""
    raise RuntimeError("per_token(D, mask) has no value as a weight: an update that depends on the tokens must be "
                       "factored (rule token_mask); this layer's op could not be")


def mask_tokens(y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """y (a layer's output, [batch, seq, ..., out] or flattened [batch * seq, out]) zeroed at the tokens where
    `mask` ([batch, seq]) is False."""
    m = mask.to(y.dtype)
    if y.dim() == m.dim() + 1:
        return y * m.unsqueeze(-1)
    return y * m.reshape(-1, 1)


for _op in [Op("match_at", match_at), Op("from_last", from_last), Op("per_token", per_token),
            Op("mask_tokens", mask_tokens)]:
    TENSOR_OPS[_op.name] = _op
    TARGET_TO_OP[_op.target] = _op
SCALAR_FUNCS["is_list"] = lambda v: isinstance(v, (list, tuple))


# ---------------------------------------------------------------- per-row updates (factors mixed per row of the batch)
def row_update(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Marks an update whose row-of-the-batch i is (a[i] @ b[i]) transposed, a: [batch, in, r], b: [batch, r, out]
    (factors mixed per row from a model input). It has no value as one weight; the rule `row_low_rank` turns
    linear(x, row_update(A, B)) into row_matmul(row_matmul(x, A), B)."""
    raise RuntimeError("row_update(A, B) has no value as a weight: a per-row update must be factored (rule "
                       "row_low_rank); this layer's op could not be")


def row_matmul(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Each row of the batch times its own matrix: x [batch, ..., n] @ v [batch, n, m] -> [batch, ..., m]."""
    if x.dim() == 2:   # [batch, n]: one token per row
        return torch.bmm(x.unsqueeze(1), v).squeeze(1)
    return torch.matmul(x, v.unsqueeze(1) if x.dim() == 4 else v)


for _op in [Op("row_update", row_update), Op("row_matmul", row_matmul), Op("sigmoid", torch.ops.aten.sigmoid.default)]:
    TENSOR_OPS[_op.name] = _op
    TARGET_TO_OP[_op.target] = _op
