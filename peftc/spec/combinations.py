"""Expand `combine(...)` adapters of a spec into adapters the planner knows (spec -> spec, before planning).

    adapter mix: combine(0.7 * a, 0.3 * b, type = "ties", density = 0.5)

* peft's `add_weighted_adapter` types (`linear`, `cat`, `svd`, `ties`, ... ; see `peftc.combine.TYPES`) combine
  PEFT checkpoints: every source must be an `import "dir"` adapter of one method (LoRA, or IA3 with `linear`).
  The combination is computed once, here, by `peftc.combine` (the code behind `peftc combine`), and becomes an
  adapter imported from that in-memory checkpoint: it compiles, merges, exports and saves like any adapter.
* `exact` (the default) is the true weighted sum of the sources' deltas, `W' = W + sum_i w_i * delta_i`, for any
  additive adapters (methods whose weight transform is `W + delta` with a delta that does not read `W`): each
  term becomes a copy of its source whose delta is scaled by its weight (`AdapterSpec.delta_scale`), drawn with
  the source's seed, so fresh sources and their terms start equal. When every source is an imported plain LoRA
  checkpoint, `exact` is computed as `cat` (the same function, and a single LoRA that peft loads).

Sources that a combination consumes are inactive unless `active` names them (`Spec.active_names`).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

from peftc.errors import PeftcError, did_you_mean
from peftc.spec.model import AdapterSpec, Span, Spec

EXACT = "exact"
_OPTIONS = {"type": str, "density": float, "majority_sign_method": str, "svd_rank": int, "svd_clamp": float,
            "seed": int}


def _err(msg: str, span: Span | None, spec: Spec) -> PeftcError:
    if span is None:
        return PeftcError(msg)
    return PeftcError(msg, file=span.file or None, line=span.line or None, column=span.column or None,
                      source=spec.source if span.file == spec.file else None)


def term_name(combination: str, source: str) -> str:
    """The planned adapter that stands for one term of an `exact` combination."""
    return f"{combination}[{source}]"


def _check(ad: AdapterSpec, spec: Spec) -> dict[str, Any]:
    from peftc.combine import TYPES
    comb = ad.combine
    assert comb is not None
    for _, src, span in comb.terms:
        if src not in spec.adapters:
            raise _err(f"combination '{ad.name}': unknown adapter '{src}'{did_you_mean(src, spec.adapters)}; "
                       f"declared: {', '.join(n for n in spec.adapters if n != ad.name)}", span, spec)
        if src == ad.name:
            raise _err(f"combination '{ad.name}' names itself", span, spec)
        if spec.adapters[src].combine is not None:
            raise _err(f"combination '{ad.name}': '{src}' is itself a combination; combine its sources instead",
                       span, spec)
    opts: dict[str, Any] = {}
    for key, value in comb.options.items():
        want = _OPTIONS.get(key)
        if want is None:
            raise _err(f"unknown option '{key}' for combine{did_you_mean(key, list(_OPTIONS))}; options: "
                       f"{', '.join(_OPTIONS)}", ad.option_spans.get(key), spec)
        ok = isinstance(value, want) and not isinstance(value, bool) or (want is float and isinstance(value, int)
                                                                         and not isinstance(value, bool))
        if not ok:
            raise _err(f"option '{key}' of combine must be {want.__name__}, got {value!r}", ad.option_spans.get(key),
                       spec)
        opts[key] = want(value)
    kind = opts.setdefault("type", EXACT)
    if kind != EXACT and kind not in TYPES:
        raise _err(f"combine type {kind!r} is unknown; types: {EXACT}, {', '.join(TYPES)}",
                   ad.option_spans.get("type"), spec)
    if kind == EXACT:
        extra = [k for k in opts if k != "type"]
        if extra:
            raise _err(f"option '{extra[0]}' is not used by combine type 'exact'", ad.option_spans.get(extra[0]),
                       spec)
    clauses = [("targets", bool(ad.targets)), ("exclude", bool(ad.exclude)), ("layers", ad.layers is not None),
               ("save", bool(ad.modules_to_save)), ("weights", ad.weights is not None),
               ("OPTION at NAME", bool(ad.per_pattern)), (next(iter(ad.option_targets), ""), bool(ad.option_targets))]
    for clause, present in clauses:
        if present:
            raise _err(f"combination '{ad.name}' takes its layers from its sources: its block takes only `merge`, "
                       f"not `{clause}`", ad.span, spec)
    return opts


def _import_dir(src: AdapterSpec, spec: Spec) -> str | None:
    """The checkpoint directory of an `import "dir"` adapter (relative to the spec file), else None."""
    if src.import_dir is None or src.method is not None:
        return None
    return spec.resolve_path(src.import_dir)


def _plain_lora(directory: str) -> bool:
    from peftc.checkpoint import read_adapter_config
    from peftc.combine import _NOT_PLAIN
    try:
        cfg = read_adapter_config(directory)
    except PeftcError:
        return False
    if cfg.get("peft_type") != "LORA" or cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
        return False
    return all(cfg.get(k, d) in (d, [], {}, False, None) for k, d in _NOT_PLAIN.items())


def _from_checkpoints(ad: AdapterSpec, opts: dict[str, Any], dirs: list[str], spec: Spec) -> AdapterSpec:
    from peftc.combine import Options, combine_checkpoints
    comb = ad.combine
    assert comb is not None
    kind = "cat" if opts["type"] == EXACT else opts["type"]
    options = Options(type=kind, weights=[w for w, _, _ in comb.terms], density=opts.get("density"),
                      majority_sign_method=opts.get("majority_sign_method", "total"), svd_rank=opts.get("svd_rank"),
                      svd_clamp=opts.get("svd_clamp"), seed=opts.get("seed", 0))
    try:
        done = combine_checkpoints(dirs, options)
    except PeftcError as e:
        raise _err(f"combination '{ad.name}': {e}", ad.option_spans.get("combine", ad.span), spec) from None
    label = f"combination '{ad.name}' ({ad.span.file}:{ad.span.line})"
    out = AdapterSpec(ad.name, ad.span, import_dir=label, merge=ad.merge, option_spans=dict(ad.option_spans))
    out.option_spans["import"] = ad.option_spans.get("combine", ad.span)
    out.preloaded = (done.config, done.tensors, label)
    return out


def expand_combinations(spec: Spec) -> Spec:
    """`spec` with every combination replaced by plannable adapters (the same spec when there is none)."""
    if not any(ad.combine is not None for ad in spec.adapters.values()):
        return spec
    order = {name: i for i, name in enumerate(spec.adapters)}
    active = spec.active_names()
    adapters: dict[str, AdapterSpec] = {}
    new_active: list[str] = []
    spans = dict(spec.active_spans)
    renamed: dict[str, list[str]] = {}
    for name, ad in spec.adapters.items():
        if ad.combine is None:
            adapters[name] = dataclasses.replace(ad, seed_index=order[name])
            continue
        opts = _check(ad, spec)
        dirs = [_import_dir(spec.adapters[src], spec) for _, src, _ in ad.combine.terms]
        peft_type = opts["type"] != EXACT
        if peft_type and None in dirs:
            _, src, span = ad.combine.terms[dirs.index(None)]
            raise _err(f"combination '{ad.name}': type {opts['type']!r} combines PEFT checkpoints as peft's "
                       f"add_weighted_adapter does, so '{src}' must be an `import \"dir\"` adapter (type 'exact' "
                       "combines any additive adapters)", span, spec)
        if peft_type or (None not in dirs and all(_plain_lora(d) for d in dirs)):   # type: ignore[arg-type]
            adapters[name] = dataclasses.replace(_from_checkpoints(ad, opts, dirs, spec),  # type: ignore[arg-type]
                                                 seed_index=order[name])
            renamed[name] = [name]
            continue
        names = []
        for weight, src, span in ad.combine.terms:
            term = copy.deepcopy(spec.adapters[src])
            term.name = term_name(name, src)
            if term.name in adapters:
                raise _err(f"combination '{name}' names '{src}' twice; give it one weight", span, spec)
            term.merge = ad.merge
            term.delta_scale = weight
            term.seed_index = order[src]
            term.extra_config = {**term.extra_config, "__combination": (name, span)}
            adapters[term.name] = term
            names.append(term.name)
        renamed[name] = names
    for a in active:
        for n in renamed.get(a, [a]):
            new_active.append(n)
            if a in spans:
                spans[n] = spans[a]
    return Spec(spec.file, spec.source, adapters, new_active, spans)


def value_names_in(expr: Any) -> set[str]:
    """The names whose values an expression reads: every name, except those an op reads only for their shape,
    dtype and device (`scatter2d(v, rows, cols, W)` builds a zero matrix shaped like W: a delta of that form
    does not depend on W's values)."""
    from peftc.lang.expr import Call, Name
    from peftc.ops import TENSOR_OPS
    if isinstance(expr, Name):
        return {expr.id}
    if not isinstance(expr, Call):
        return set()
    op = TENSOR_OPS.get(expr.fn)
    skip = op.shape_args if op is not None else ()
    out: set[str] = set()
    for i, a in enumerate(expr.args):
        if i not in skip:
            out |= value_names_in(a)
    for _, v in expr.kwargs:
        out |= value_names_in(v)
    return out


def scale_delta(prog: Any, scale: float) -> Any:
    """A method's program at one layer with its delta scaled: `weight W + D` becomes `W + scale * D` (and
    `bias b + E` becomes `b + scale * E`). ValueError (saying why) when a transform is not of that form or its
    delta reads the base weight: then the method is not additive and no weighted sum of deltas exists."""
    from peftc.lang.expr import Call, Const, Name
    base_reads = {"W", "W0", "b"}          # the base tensors, and every let or constant computed from them
    for kind, item in prog.steps:
        if kind in ("let", "const") and value_names_in(item[1]) & base_reads:
            base_reads.add(item[0])

    def scaled(expr: Any, base: str, what: str) -> Any:
        if expr is None:
            return None
        if isinstance(expr, Call) and expr.fn == "add" and len(expr.args) == 2:
            for i, arg in enumerate(expr.args):
                other = expr.args[1 - i]
                if isinstance(arg, Name) and arg.id == base and not value_names_in(other) & base_reads:
                    return Call("add", (arg, Call("mul", (Const(scale), other))))
        raise ValueError(f"transforms its {what} otherwise than `{base} + delta` (with a delta that does not "
                         f"read {base})")

    return dataclasses.replace(prog, weight=scaled(prog.weight, "W", "weight"), bias=scaled(prog.bias, "b", "bias"))
