"""The merged weight of one layer, as a pure function: (W, b, the layer's adapters) -> (W', b').

This is what the `fold` pass computes inside a traced graph, done eagerly on tensors: each adapter's
declared transform (`weight` / `bias` expressions of its SiteProgram, with its lets) is applied in
application order, in fp32 (fp64 for an fp64 weight), and the result is cast once to the weight's dtype.
`peftc merge` (a streaming merge of a sharded checkpoint, no tracing) and `peftc lower` (a truncated SVD of
W' - W) call it one layer at a time.

A plan built on a model skeleton (shapes, no real values) has real loaded and drawn adapter tensors, but any
tensor its method computes from the base weight (DoRA's fresh magnitude, a const read off W) was computed
from a stand-in there: `realize_site` recomputes exactly those with the real W.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from peftc.errors import PeftcError
from peftc.lang.evaluate import EAGER, evaluate
from peftc.lang.expr import names_in
from peftc.lang.methods import ParamDecl
from peftc.layer_kinds import KINDS
from peftc.plan import SiteAdapter, make_tensors

Shared = Mapping[str, Mapping[str, torch.Tensor]]   # adapter -> shared tensor name -> tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for every float dtype but fp64 (as `fold`)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_meta(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_meta


def weight_dependent(sa: SiteAdapter) -> set[str]:
    """The lets, consts and params of an adapter at a layer whose value reads the base weight (W, W0, b),
    directly or through another let."""
    deps = {"W", "W0", "b"}
    for kind, item in sa.program.steps:
        name, expr = (item.name, item.init) if kind == "param" else item
        if names_in(expr) & deps:
            deps.add(name)
    return deps - {"W", "W0", "b"}


def realize_site(sa: SiteAdapter, kind: str, weight: torch.Tensor, bias: torch.Tensor | None,
                 shared: Mapping[str, torch.Tensor], loaded: bool) -> SiteAdapter:
    """`sa` planned on a model skeleton (whose weights had no real values), with every tensor its method computes
    from the base weight recomputed from the real `weight` / `bias` (as stored): consts that read W, and params
    that read W in their init unless they were `loaded` from a checkpoint. Others are kept as planned."""
    deps = weight_dependent(sa)
    redo = {n for n in deps if n in sa.consts}
    redo |= {d.name for d in sa.program.params if d.name in deps and not (loaded and d.saved is not None)}
    if not redo:
        return sa
    dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype   # as planning
    w_lin = weight.t() if KINDS[kind].transposed else weight
    env: dict[str, Any] = {**sa.program.env, **shared, "W": w_lin.to(dtype),
                           "b": bias.to(dtype) if bias is not None else None}
    env["W0"] = env["W"]

    def load(decl: ParamDecl) -> torch.Tensor | None:
        return None if decl.name in redo else sa.tensors[decl.name]

    gen = torch.Generator().manual_seed(0)   # never drawn from: every drawn param is kept as planned
    tensors, consts = make_tensors(sa.program.steps, env, dtype, gen, load)
    consts = {n: (consts[n] if n in redo else t) for n, t in sa.consts.items()}
    return SiteAdapter(sa.adapter, sa.method, sa.program, tensors, sa.layer_options, sa.merge, sa.active, consts)


def fold_layer(weight: torch.Tensor, bias: torch.Tensor | None, kind: str, sites: Sequence[SiteAdapter],
               shared: Shared | None = None, dtype: torch.dtype | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W', b') of one layer in the compute dtype (`dtype`, default fp32 / fp64), not cast back.

    `weight` and `bias` are the layer's stored tensors (GPT-2 Conv1D: `(in, out)`); `sites` its adapters in
    application order (only active ones are applied); `shared` each adapter's adapter-level tensors."""
    cdt = dtype or compute_dtype(weight.dtype)
    transposed = KINDS[kind].transposed
    w = weight.to(cdt)
    w_cur: Any = w.t() if transposed else w
    b_cur: Any = bias.to(cdt) if bias is not None else None
    w_base = w_cur
    for sa in sites:
        if not sa.active:
            continue
        prog = sa.program
        env: dict[str, Any] = dict(prog.env)
        for name, t in [*sa.tensors.items(), *sa.consts.items(), *((shared or {}).get(sa.adapter, {}).items())]:
            if _is_meta(t):
                raise PeftcError(f"adapter '{sa.adapter}': tensor '{name}' has no value (planned on a model "
                                 "skeleton; call realize_site with the real weight first)")
            env[name] = t.to(cdt) if t.is_floating_point() else t
        env["W"], env["W0"], env["b"] = w_cur, w_base, b_cur
        for name, expr in prog.lets:
            if name not in prog.env:
                env[name] = evaluate(expr, env, EAGER)
        w_new = evaluate(prog.weight, env, EAGER) if prog.weight is not None else w_cur
        b_new = evaluate(prog.bias, env, EAGER) if prog.bias is not None else b_cur
        w_cur, b_cur = w_new, b_new
    w_out = w_cur.t() if transposed else w_cur
    return w_out, b_cur


def merged_layer(weight: torch.Tensor, bias: torch.Tensor | None, kind: str, sites: Sequence[SiteAdapter],
                 shared: Shared | None = None, layer: str = "?") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W', b') of one layer, folded in fp32 (fp64 for fp64) and cast once to the stored dtypes; a non-finite
    result is an error naming the layer (as `fold`)."""
    with torch.no_grad():
        w, b = fold_layer(weight, bias, kind, sites, shared)
        for t in (w, b):
            # the sum is a cheap test (NaN/Inf reach it); only an overflowing sum needs the elementwise one
            if t is not None and t.is_floating_point() and not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
                raise PeftcError(f"merging into layer '{layer}' gives non-finite values (NaN/Inf); "
                                 "the adapter weights are broken or overflow this dtype")
        w = w.to(weight.dtype).contiguous()
        if b is not None:
            b = b.to(bias.dtype if bias is not None else weight.dtype).contiguous()
    return w, b
