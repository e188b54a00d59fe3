"""`peftc lower`: turn any mergeable adapter (or several, summed) into a plain LoRA checkpoint.

For every targeted layer the merged weight W' of the spec's active adapters (`merged_weight.fold_layer`, in
fp64) gives the exact update Δ = W' - W; a truncated SVD Δ ≈ U_r S_r V_rᵀ gives LoRA factors
B = U_r √S_r and A = √S_r V_rᵀ with alpha = r (scale 1). The rank is fixed (`--rank R`, capped at the layer's
smaller dimension) or, with `--rank auto --max-error E`, the smallest one whose relative Frobenius error
‖Δ - B A‖ / ‖Δ‖ is at most E; ranks and alphas that differ from the most common one go into `rank_pattern` /
`alpha_pattern`. The error reported for each layer is measured on the factors as saved (fp32), not
predicted from the singular values. A changed bias becomes LoRA's `lora_B.bias` (`lora_bias = true`); biases
an adapter trains (peft's `bias = "all"` / `"<method>_only"`) are carried over with the same `bias` option.
Trainable tokens on a table tied to the head (the head reads the new rows too) cannot be a LoRA: an error.

Orientation per layer kind, as peft's LoRA layers keep them: Linear `Δ = B A` (A: [r, in], B: [out, r]);
GPT-2 Conv1D stores the transpose (fan_in_fan_out); Embedding `Δ = (B A)ᵀ` with A: [r, num_embeddings],
B: [dim, r] (`lora_embedding_A` / `_B`); ConvNd: A carries the kernel ([r, in, *k]), B is 1x1 ([out, r, 1...]),
so Δ reshaped to (out, in·k) = B A.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftc.errors import PeftcError
from peftc.manifest import AdapterRecord, Manifest
from peftc.merged_weight import fold_layer, realize_site
from peftc.plan import Plan
from peftc.spec.model import Spec

LOWERABLE = ("linear", "conv1d_hf", "conv1d", "conv2d", "conv3d", "embedding")


@dataclass
class LoweredLayer:
    name: str
    kind: str
    rank: int
    error: float               # ‖Δ - B A‖_F / ‖Δ‖_F with the saved factors (0 when Δ = 0)
    full_rank: int             # min(out, in): the rank an exact factorisation may need
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)   # saved key -> tensor
    bias: torch.Tensor | None = None


@dataclass
class Lowered:
    layers: list[LoweredLayer]
    record: AdapterRecord
    lora_bias: bool
    plan: Plan | None = None       # what was lowered (set by lower_to_lora)
    path: Path | None = None       # the checkpoint written, if any


def _as_matrix(delta: torch.Tensor, kind: str) -> torch.Tensor:
    """The update in LoRA's B @ A orientation."""
    if kind in ("conv1d_hf", "embedding"):
        return delta.t()
    if kind.startswith("conv"):
        return delta.reshape(delta.shape[0], -1)
    return delta


def _factors(kind: str, shape: tuple[int, ...], b: torch.Tensor, a: torch.Tensor) -> dict[str, torch.Tensor]:
    """LoRA's saved tensors for factors B [m, r], A [r, n] of the matrix form."""
    r = a.shape[0]
    if kind == "embedding":
        return {"lora_embedding_A": a, "lora_embedding_B": b}
    if kind.startswith("conv") and kind != "conv1d_hf":
        ones = (1,) * (len(shape) - 2)
        return {"lora_A.weight": a.reshape(r, *shape[1:]), "lora_B.weight": b.reshape(shape[0], r, *ones)}
    return {"lora_A.weight": a, "lora_B.weight": b}


def _rank_for(s: torch.Tensor, rank: int | None, max_error: float | None) -> int:
    """The fixed rank (capped at len(s)), or the smallest one whose tail energy meets `max_error`."""
    if rank is not None:
        return max(1, min(rank, len(s)))
    total = float((s ** 2).sum())
    if total == 0.0:
        return 1
    tail = torch.flip(torch.cumsum(torch.flip(s ** 2, [0]), 0), [0]).tolist() + [0.0]   # tail[r] = Σ_{i>=r} s_i²
    for r in range(1, len(s) + 1):
        if math.sqrt(max(tail[r], 0.0) / total) <= max_error:
            return r
    return len(s)


def lower_layer(name: str, kind: str, weight: torch.Tensor, bias: torch.Tensor | None, sites: list[Any],
                shared: dict[str, Any], rank: int | None, max_error: float | None,
                start: torch.Tensor | None = None) -> LoweredLayer:
    """One layer: Δ = W' - W in fp64 (W' folded from `start`, the base the adapter was trained on when a checkpoint
    saved one, else W), its truncated SVD, the fp32 factors and their true relative error."""
    if kind not in LOWERABLE:
        raise PeftcError(f"layer '{name}' ({kind}): lowering to LoRA supports {', '.join(LOWERABLE)} layers")
    with torch.no_grad():
        w0 = weight.to(torch.float64)
        w1, b1 = fold_layer(weight if start is None else start, bias, kind, sites, shared, dtype=torch.float64)
        delta = _as_matrix(w1 - w0, kind)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = _rank_for(s, rank, max_error)
        root = s[:r].sqrt()
        b = (u[:, :r] * root).to(torch.float32).contiguous()
        a = (root[:, None] * vh[:r]).to(torch.float32).contiguous()
        norm = float(torch.linalg.norm(delta))
        err = float(torch.linalg.norm(delta - b.double() @ a.double())) / norm if norm > 0 else 0.0
        db = None
        if b1 is not None and bias is not None and not torch.equal(b1, bias.to(torch.float64)):
            db = (b1 - bias.to(torch.float64)).to(torch.float32)
    return LoweredLayer(name, kind, r, err, min(delta.shape), _factors(kind, tuple(weight.shape), b, a), db)


def lower_plan(plan: Plan, model: nn.Module | None, rank: int | None, max_error: float | None,
               read: Callable[[str], torch.Tensor] | None = None) -> Lowered:
    """Every layer the spec's active adapters touch, lowered to one LoRA adapter ('default').

    Weights come from `model`, or, for a plan made on a model skeleton (`peftc lower` on a safetensors model
    directory), from `read(fqn)` one layer at a time; then what the adapters compute from the base weight is
    recomputed from the real one (`merged_weight.realize_site`)."""
    if read is None:
        assert model is not None
        params = dict(model.named_parameters(remove_duplicate=False))

        def read(fqn: str) -> torch.Tensor:
            return params[fqn].detach()
    shared = {name: ap.shared for name, ap in plan.adapters.items()}
    # bias = "all" / "<method>_only": the trained biases are the lowered LoRA's too (its `bias` option), and the
    # adapters' own change of a bias is measured from them
    trained = {fqn: (ap.options.get("bias", "none"), t) for ap in plan.adapters.values() if ap.active
               for fqn, (_, t) in ap.biases.items()}
    out: list[LoweredLayer] = []
    for lname, sas in plan.sites.items():
        act = [sa for sa in sas if sa.active]
        if not act:
            continue
        layer = plan.layers[lname]
        if plan.followers.get(lname):
            tied = plan.followers[lname]
            raise PeftcError(f"layer '{lname}': {', '.join(tied)} {'shares' if len(tied) == 1 else 'share'} its "
                             f"weight and reads the adapted rows too ({act[0].method.name}), which a LoRA on "
                             f"'{lname}' cannot express; "
                             "merge it instead (`peftc merge`, or --merge)")
        if layer.kind not in LOWERABLE:
            raise PeftcError(f"layer '{lname}' ({layer.module_type}): lowering to LoRA supports "
                             f"{', '.join(LOWERABLE)} layers, not {layer.kind}")
        if layer.kind.startswith("conv") and layer.kind != "conv1d_hf" and layer.dims.get("groups", 1) != 1:
            raise PeftcError(f"layer '{lname}': a grouped convolution cannot be lowered to LoRA")
        weight = read(layer.weight)
        bias = read(layer.bias) if layer.bias else None
        bias = trained[layer.bias][1] if layer.bias in trained else bias
        if model is None:
            act = [realize_site(sa, layer.kind, weight, bias, shared.get(sa.adapter, {}),
                                loaded=plan.adapters[sa.adapter].source != "fresh") for sa in act]
        start = plan.base_overrides.get(layer.weight)
        out.append(lower_layer(lname, layer.kind, weight, bias, act, shared, rank, max_error, start))
    if not out:
        raise PeftcError("no active adapter touches any layer: nothing to lower")
    lora_bias = any(l.bias is not None for l in out)
    if lora_bias:
        emb = [l.name for l in out if l.kind == "embedding"]
        if emb:
            raise PeftcError(f"the adapters change a bias, which LoRA keeps in lora_B.bias, but layer '{emb[0]}' "
                             "is an embedding (peft's LoRA has no bias there)")
    ranks = Counter(l.rank for l in out)
    r0 = ranks.most_common(1)[0][0]
    options = {"r": r0, "alpha": float(r0), "dropout": 0.0, "rslora": False, "lora_bias": lora_bias, "init": "default"}
    if trained:
        from peftc.checkpoint import PREFIX
        from peftc.sites import peft_param_key
        modes = {mode for mode, _ in trained.values()}
        options["bias"] = "all" if "all" in modes or len(modes) > 1 else "lora_only"
        names = [l.name for l in out]
        if options["bias"] == "lora_only" and any(f.rsplit(".", 1)[0] not in names for f in trained):
            options["bias"] = "all"
    rec = AdapterRecord("default", "lora", options, {}, {})
    for fqn, (_, t) in trained.items():
        rec.extra_tensors[PREFIX + peft_param_key(fqn, [l.name for l in out], plan.layers)] = t
    for l in out:
        rec.layer_options[l.name] = {**options, "r": l.rank, "alpha": float(l.rank)}
        tensors = dict(l.tensors)
        if lora_bias:
            tensors["lora_B.bias"] = l.bias if l.bias is not None else torch.zeros(l.tensors["lora_B.weight"].shape[0])
        rec.tensors[l.name] = tensors
    for ap in plan.adapters.values():
        if ap.active and (model is not None or ap.source != "fresh"):   # a fresh copy on a skeleton: no values
            for mod, ps in ap.modules_to_save.items():
                rec.modules_to_save.setdefault(mod, {}).update(ps)
            for k in ("task_type",):
                if k in ap.spec.extra_config and k not in rec.extra_config:
                    rec.extra_config[k] = ap.spec.extra_config[k]
    return Lowered(out, rec, lora_bias)


def write_lowered(lowered: Lowered, directory: str | Path, kinds: dict[str, str],
                  base_model_name_or_path: str | None) -> Path:
    from peftc.emit.checkpoint import write_adapters
    manifest = Manifest(adapters={"default": lowered.record}, base_model_name_or_path=base_model_name_or_path)
    return write_adapters(manifest, directory, kinds)[0]


def plan_lowering(spec: Spec, model: str | Path | nn.Module, example_inputs: Any = None
                  ) -> tuple[Plan, nn.Module | None, Callable[[str], torch.Tensor] | None, str | None]:
    """(plan, module, read, base model name) for lowering `spec` on `model`: a safetensors model directory is
    planned on its skeleton and read one layer at a time (`read`); anything else is loaded whole (`module`)."""
    from peftc.models import load_model
    from peftc.pipeline import base_model_name
    from peftc.plan import build_plan
    from peftc.progress import step
    from peftc.stream_merge import is_safetensors_dir, skeleton_plan
    if isinstance(model, (str, Path)) and is_safetensors_dir(str(model)):
        plan, _, _, read = skeleton_plan(spec, model)
        return plan, None, read, str(model)
    with step("Loading model"):
        loaded = load_model(model, example_inputs)
    with step("Planning adapters"):
        plan = build_plan(spec, loaded.module)
    return plan, loaded.module, None, base_model_name(loaded)


def lower_to_lora(spec: str | Path | Spec, model: str | Path | nn.Module, *, rank: int | None = None,
                  max_error: float | None = None, output: str | Path | None = None,
                  example_inputs: Any = None) -> Lowered:
    """Python API of `peftc lower`: the spec's active adapters on `model` as one plain LoRA adapter, by a
    truncated SVD of each layer's update. `rank`: a fixed rank (capped per layer); None with `max_error`: the
    smallest rank per layer whose relative error is at most `max_error`; both: fixed rank, and an error above
    `max_error` raises (nothing written). With `output`, the PEFT checkpoint is written there (atomically).
    Returns each layer's name, kind, rank and relative error (`.layers`)."""
    from peftc.pipeline import check_spec, load_spec
    from peftc.stream_merge import check_mergeable
    if rank is None and max_error is None:
        raise PeftcError("lower: give a rank, a max_error, or both")
    sp = load_spec(spec)
    check_spec(sp)
    plan, module, read, base_name = plan_lowering(sp, model, example_inputs)
    check_mergeable(plan, sp, "peftc lower")
    from peftc.progress import step
    with step("Lowering (SVD of each layer's update)"):
        low = lower_plan(plan, module, rank, max_error, read)
    low.plan = plan
    worst = max(low.layers, key=lambda l: l.error)
    if rank is not None and max_error is not None and worst.error > max_error:
        raise PeftcError(f"layer '{worst.name}': relative error {worst.error:.2e} at rank {worst.rank} is above "
                         f"--max-error {max_error:g} (nothing written; raise --rank, or use --rank auto)")
    if output is not None:
        low.path = write_lowered(low, output, {n: l.kind for n, l in plan.layers.items()}, base_name)
    return low
