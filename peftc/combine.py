"""`peftc combine`: several PEFT LoRA (or IA3) checkpoints into one, with the semantics of peft's
`add_weighted_adapter` (same combination types, same delta weights), written as a PEFT checkpoint.

The math is pure functions on tensors in `peftc.combine_math`; `combine_checkpoints` reads the configs and
checks that they can be combined (as peft does, with the file named) before torch is imported, then reads the
tensors (checking their shapes, with the tensor named) and combines them.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftc.checkpoint import PREFIX, pattern_key_for, read_adapter_config, read_adapter_tensors, write_checkpoint
from peftc.errors import PeftcError

if TYPE_CHECKING:  # torch is imported once the options and configs have been checked: those errors come at once
    import torch

    from peftc.combine_math import LoraFactors

# type -> (how the task tensors merge, whether the result is re-factored by SVD)
TYPES: dict[str, tuple[str, bool]] = {
    "linear": ("linear", False), "cat": ("cat", False), "svd": ("linear", True),
    "ties": ("ties", False), "ties_svd": ("ties", True),
    "magnitude_prune": ("magnitude_prune", False), "magnitude_prune_svd": ("magnitude_prune", True),
    "dare_linear": ("dare_linear", False), "dare_linear_svd": ("dare_linear", True),
    "dare_ties": ("dare_ties", False), "dare_ties_svd": ("dare_ties", True),
}
EXACT = "exact"   # the true weighted sum of the deltas: for LoRAs, `cat`; across methods, in a spec
ALL_TYPES = (EXACT, *TYPES)
SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # peft needs equal r for these
IA3_TYPES = ("linear",)
_LORA_KEY = re.compile(r"^(?P<layer>.+)\.(?P<which>lora_A|lora_B)\.weight$")
_EMB_KEY = re.compile(r"^(?P<layer>.+)\.(?P<which>lora_embedding_A|lora_embedding_B)$")
_IA3_KEY = re.compile(r"^(?P<layer>.+)\.ia3_l$")
_BASE_KEY = re.compile(r"^.+\.base_layer\.weight$")  # a saved embedding layer (peft's save_embedding_layers)
# LoRA config keys whose non-default value makes the checkpoint more than plain A/B factors
_NOT_PLAIN = {"use_dora": False, "lora_bias": False, "layer_replication": None, "target_parameters": None,
              "trainable_token_indices": None, "use_qalora": False, "alora_invocation_tokens": None,
              "use_bdlora": None, "arrow_config": None}


@dataclass
class Options:
    """The command's options, as peft's add_weighted_adapter takes them."""
    type: str
    weights: list[float]
    density: float | None = None
    majority_sign_method: str = "total"
    svd_rank: int | None = None
    svd_clamp: float | None = None
    seed: int = 0


@dataclass
class Combined:
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    layers: int
    rank: int
    type: str                      # the type used (peft uses `linear` for a single adapter)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- checkpoints
@dataclass
class _Adapter:
    directory: Path
    config: dict[str, Any]
    file: Path | None = None                    # the weights file, once read
    layers: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # layer -> {"A"/"B" or "l": ...}
    embedding: set[str] = field(default_factory=set)
    base: dict[str, torch.Tensor] = field(default_factory=dict)  # saved base-layer weights, by key

    @property
    def cfg_file(self) -> str:
        return str(self.directory / "adapter_config.json")


def _read_config(directory: str | Path, kind: str = "") -> _Adapter:
    d = Path(directory)
    cfg = read_adapter_config(d)
    peft_type = str(cfg.get("peft_type", ""))
    if peft_type not in ("LORA", "IA3"):
        hint = ("; a spec combines additive adapters of any methods: `adapter mix: combine(0.5 * a, 0.5 * b)` "
                "with a and b imported" if kind == EXACT else "")
        raise PeftcError(f"{d / 'adapter_config.json'}: peft_type {peft_type or '(missing)'!r}: `peftc combine` "
                         f"combines LORA (or IA3) checkpoints{hint}")
    return _Adapter(d, cfg)


def _read_tensors(ad: _Adapter) -> None:
    tensors, file = read_adapter_tensors(ad.directory)
    peft_type = ad.config["peft_type"]
    ad.file = file
    layers, embedding, base = ad.layers, ad.embedding, ad.base
    for key, t in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else None
        if name is not None and _BASE_KEY.match(name):
            base[key] = t
            continue
        m = None
        if name is not None:
            m = (_LORA_KEY.match(name) or _EMB_KEY.match(name)) if peft_type == "LORA" else _IA3_KEY.match(name)
        if m is None:
            what = "a LoRA A/B factor" if peft_type == "LORA" else "an IA3 vector"
            raise PeftcError(f"{file}: tensor '{key}' is not {what}; `peftc combine` handles plain "
                             f"{peft_type} checkpoints only")
        which = m.group("which")[-1] if peft_type == "LORA" else "l"
        if m.re is _EMB_KEY:
            embedding.add(m.group("layer"))
        layers.setdefault(m.group("layer"), {})[which] = t
    if peft_type == "LORA":
        for layer, ab in layers.items():
            for which in "AB":
                if which not in ab:
                    raise PeftcError(f"{file}: layer '{layer}' has lora_{'B' if which == 'A' else 'A'} but no "
                                     f"lora_{which}")
            for which in "AB":
                if ab[which].dim() < 2:
                    raise PeftcError(f"{file}: layer '{layer}': lora_{which} has shape {list(ab[which].shape)}; a "
                                     "LoRA factor has at least 2 dimensions")
            if ab["A"].shape[0] != ab["B"].shape[1]:
                raise PeftcError(f"{file}: layer '{layer}': lora_A has rank {ab['A'].shape[0]} but lora_B has "
                                 f"{ab['B'].shape[1]}")
    if not layers:
        raise PeftcError(f"{file}: no adapter tensors")


def _scaling(ad: _Adapter, layer: str, rank: int) -> float:
    from peftc.targeting import pattern_value
    alpha = ad.config.get("lora_alpha", 8)
    hit, v = pattern_value(list((ad.config.get("alpha_pattern") or {}).items()), layer)
    if hit:
        alpha = v
    return alpha / math.sqrt(rank) if ad.config.get("use_rslora") else alpha / rank


def _config_rank(cfg: dict[str, Any]) -> int:
    r = int(cfg.get("r", 8))
    rp = cfg.get("rank_pattern") or {}
    return max(r, *rp.values()) if rp else r


def _new_targets(ads: list[_Adapter]) -> Any:
    kinds = {type(a.config.get("target_modules")) for a in ads}
    if len(kinds) > 1 or not kinds <= {list, str}:
        shown = ", ".join(f"{a.cfg_file}: {a.config.get('target_modules')!r}" for a in ads)
        raise PeftcError("target_modules must be all lists or all regex strings to combine (as peft requires); "
                         f"found {shown}")
    if kinds == {str}:
        return "|".join(f"({a.config['target_modules']})" for a in ads)
    return sorted(set().union(*(a.config["target_modules"] for a in ads)))


def _check_options(opts: Options, n: int, peft_type: str) -> str:
    """The type actually used (peft uses `linear` for one adapter); option misuse is an error."""
    if len(opts.weights) != n:
        raise PeftcError(f"--weights has {len(opts.weights)} value(s) for {n} adapter(s); give one weight per adapter")
    types = IA3_TYPES if peft_type == "IA3" else tuple(TYPES)
    if opts.type not in types:
        raise PeftcError(f"--type {opts.type!r} is not a combination type for {peft_type}; choose one of "
                         + ", ".join(types))
    how, svd = TYPES[opts.type]
    if how in ("ties", "magnitude_prune", "dare_linear", "dare_ties"):
        if opts.density is None:
            raise PeftcError(f"--type {opts.type} needs --density (the fraction of values kept, in (0, 1])")
        if not 0 < opts.density <= 1:
            raise PeftcError(f"--density {opts.density}: must be in (0, 1]")
    elif opts.density is not None:
        raise PeftcError(f"--density is not used by --type {opts.type}")
    if how not in ("ties", "dare_ties") and opts.majority_sign_method != "total":
        raise PeftcError(f"--majority-sign-method is not used by --type {opts.type}")
    if not svd and (opts.svd_rank is not None or opts.svd_clamp is not None):
        raise PeftcError(f"--svd-rank / --svd-clamp are only used by the *svd types, not --type {opts.type}")
    if opts.svd_rank is not None and opts.svd_rank < 1:
        raise PeftcError(f"--svd-rank {opts.svd_rank}: must be at least 1")
    if opts.svd_clamp is not None and not 0 <= opts.svd_clamp <= 1:
        raise PeftcError(f"--svd-clamp {opts.svd_clamp}: a quantile, must be in [0, 1]")
    return "linear" if n == 1 else opts.type


def combine_checkpoints(dirs: Sequence[str | Path], opts: Options) -> Combined:
    """Read, check and combine PEFT checkpoints as peft's add_weighted_adapter would (nothing is written)."""
    ads = [_read_config(d, opts.type) for d in dirs]
    types = {a.config.get("peft_type") for a in ads}
    if len(types) > 1:
        shown = ", ".join(f"{a.cfg_file}: {a.config.get('peft_type')}" for a in ads)
        hint = (" into one checkpoint; a spec combines additive adapters of any methods: `adapter mix: "
                "combine(0.5 * a, 0.5 * b)` with a and b imported" if opts.type == EXACT else "")
        raise PeftcError(f"cannot combine adapters of different methods ({shown}){hint}")
    peft_type = ads[0].config["peft_type"]
    if opts.type == EXACT:
        if peft_type != "LORA":
            raise PeftcError(f"--type exact sums the deltas of additive adapters; {peft_type} scales the weights "
                             "(combine IA3 checkpoints with --type linear)")
        if len(ads) > 1:   # the weighted sum of LoRA deltas is exactly peft's `cat`
            done = combine_checkpoints(dirs, replace(opts, type="cat"))
            done.type = EXACT
            return done
    used = _check_options(opts, len(ads), peft_type)
    notes = []
    if used != opts.type:
        notes.append(f"one adapter: combined with type 'linear' (as peft does), not {opts.type!r}")
    opts = replace(opts, type=used)
    for a in ads:
        if a.config.get("modules_to_save"):
            raise PeftcError(f"{a.cfg_file}: modules_to_save = {a.config['modules_to_save']!r}: "
                             "`peftc combine` does not combine modules_to_save copies yet")
    targets = _new_targets(ads)
    if peft_type == "IA3":
        for a in ads:
            _read_tensors(a)
        done = _combine_ia3(ads, opts, targets)
        done.tensors.update(_base_weights(ads))
        return done
    for a in ads:
        for key, default in _NOT_PLAIN.items():
            v = a.config.get(key, default)
            if v not in (default, [], {}, False, None):
                raise PeftcError(f"{a.cfg_file}: {key} = {v!r}: `peftc combine` combines plain LoRA factors only")
        if a.config.get("bias", "none") != "none":
            raise PeftcError(f"{a.cfg_file}: bias = {a.config['bias']!r}: `peftc combine` needs bias \"none\"")
    ranks = [_config_rank(a.config) for a in ads]
    how, svd = TYPES[used]
    if used in SAME_RANK:
        if len(set(ranks)) != 1:
            shown = ", ".join(f"{a.cfg_file}: r = {r}" for a, r in zip(ads, ranks))
            raise PeftcError(f"--type {used} needs adapters of the same rank (as peft does; `cat` or `svd` "
                             f"combine different ranks); found {shown}")
        new_rank = ranks[0]
    elif used == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = opts.svd_rank or max(ranks)
    import torch

    from peftc.combine_math import LoraFactors, combine_layer
    for a in ads:
        _read_tensors(a)
    base = _base_weights(ads)
    gen = torch.Generator().manual_seed(opts.seed) if how.startswith("dare") else None
    out: dict[str, torch.Tensor] = {}
    rslora = bool(ads[0].config.get("use_rslora"))
    new_scaling = new_rank / math.sqrt(new_rank) if rslora else 1.0   # lora_alpha = r = new_rank, as in peft
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    layers = sorted(set().union(*(a.layers for a in ads)))
    for layer in layers:
        factors: list[LoraFactors | None] = []
        for a in ads:
            ab = a.layers.get(layer)
            if ab is None:
                factors.append(None)
                continue
            # embeddings store A as (r, num_embeddings), B as (dim, r): peft's delta is (B @ A).T, and its SVD
            # transposes back, so every layer is combined in B @ A form
            factors.append(LoraFactors(ab["A"], ab["B"], _scaling(a, layer, ab["A"].shape[0])))
        _check_layer(ads, factors, layer, how, new_rank, svd)
        a_new, b_new = combine_layer(factors, opts, new_rank, gen)
        if a_new.shape[0] != new_rank:
            # a layer of another rank (a rank_pattern): peft's combined adapter keeps that rank there at the new
            # scaling, but saves no pattern for it and cannot load its own save; say it, so peft can
            key = pattern_key_for(layer)
            rank_pattern[key] = a_new.shape[0]
            alpha_pattern[key] = new_scaling * (math.sqrt(a_new.shape[0]) if rslora else a_new.shape[0])
        emb = any(layer in a.embedding for a in ads)
        if emb:
            out[f"{PREFIX}{layer}.lora_embedding_A"], out[f"{PREFIX}{layer}.lora_embedding_B"] = a_new, b_new
        else:
            out[f"{PREFIX}{layer}.lora_A.weight"], out[f"{PREFIX}{layer}.lora_B.weight"] = a_new, b_new
    out.update(base)
    config = dict(ads[0].config)
    config.update(r=new_rank, lora_alpha=new_rank, target_modules=targets, alpha_pattern=alpha_pattern,
                  rank_pattern=rank_pattern)
    return Combined(config, out, len(layers), new_rank, used, notes)


def _base_weights(ads: list[_Adapter]) -> dict[str, torch.Tensor]:
    """Embedding weights that peft saved with an adapter: carried over, if every adapter that has one agrees
    (peft's combined adapter runs on one base layer, whichever was loaded last)."""
    import torch
    out: dict[str, torch.Tensor] = {}
    owner: dict[str, _Adapter] = {}
    for a in ads:
        for key, t in a.base.items():
            if key in out and not (out[key].shape == t.shape and torch.equal(out[key], t)):
                raise PeftcError(f"{a.file}: tensor '{key}' (a saved base layer) differs from the one in "
                                 f"{owner[key].file}; the adapters were trained on different base weights")
            out.setdefault(key, t)
            owner.setdefault(key, a)
    return out


def _check_layer(ads: list[_Adapter], factors: list[LoraFactors | None], layer: str, how: str, new_rank: int,
                 svd: bool) -> None:
    """Shapes that peft could not combine, named by file and tensor."""
    present = [(a, f) for a, f in zip(ads, factors) if f is not None]
    a0, f0 = present[0]
    for a, f in present[1:]:
        if (tuple(f.a.shape[1:]), f.b.shape[0]) != (tuple(f0.a.shape[1:]), f0.b.shape[0]):
            raise PeftcError(f"{a.file}: layer '{layer}' has lora_A {list(f.a.shape)} / lora_B {list(f.b.shape)}, "
                             f"but {a0.file} has lora_A {list(f0.a.shape)} / lora_B {list(f0.b.shape)}: not the "
                             "same layer shape")
        if how != "cat" and not svd and f.rank != f0.rank:
            raise PeftcError(f"{a.file}: layer '{layer}' has rank {f.rank}, {a0.file} has {f0.rank}: --type "
                             f"{how} needs equal ranks on every layer")
    if svd:
        limit = min(f0.b.shape[0], f0.a[0].numel())
        if new_rank > limit:
            raise PeftcError(f"--svd-rank {new_rank} is larger than layer '{layer}' allows ({limit})")


def _combine_ia3(ads: list[_Adapter], opts: Options, targets: Any) -> Combined:
    """IA3: the weighted sum of the scaling vectors, over the layers any adapter has."""
    import torch
    kinds = {type(a.config.get("feedforward_modules")) for a in ads}
    ff_lists = [a.config.get("feedforward_modules") or [] for a in ads]
    if kinds <= {list, type(None)}:
        ff: Any = sorted(set().union(*ff_lists))
    elif kinds == {str}:
        ff = "|".join(f"({a.config['feedforward_modules']})" for a in ads)
    else:
        raise PeftcError("feedforward_modules must be all lists or all regex strings to combine (as peft requires)")
    out: dict[str, torch.Tensor] = {}
    layers = sorted(set().union(*(a.layers for a in ads)))
    for layer in layers:
        present = [(a, a.layers[layer]["l"], w) for a, w in zip(ads, opts.weights) if layer in a.layers]
        a0, t0, _ = present[0]
        for a, t, _ in present[1:]:
            if t.shape != t0.shape:
                raise PeftcError(f"{a.file}: tensor '{PREFIX}{layer}.ia3_l' has shape {list(t.shape)}, but "
                                 f"{a0.file} has {list(t0.shape)}")
        acc = torch.zeros_like(t0)
        for _, t, w in present:
            acc += t * w
        out[f"{PREFIX}{layer}.ia3_l"] = acc
    config = dict(ads[0].config)
    config.update(target_modules=targets, feedforward_modules=ff)
    return Combined(config, out, len(layers), 0, opts.type)


def write_combined(combined: Combined, directory: str | Path) -> Path:
    d = Path(directory)
    write_checkpoint(d, combined.config, combined.tensors)
    return d
