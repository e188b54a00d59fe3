"""Spec + model -> Plan: for every targeted layer, the adapters on it (method instantiated with that
layer's option values) and their tensors (fresh, or loaded and checked against a PEFT checkpoint).

This is where a spec is checked against the method library and the model: unknown methods/options,
wrong option types, targets that match nothing, and checkpoints with missing, extra or misshapen
tensors all become PeftcErrors that point at the spec (file:line:col) or at the checkpoint key.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftc.checkpoint import (
    CONFIG_NAME,
    PREFIX,
    SHARED_PREFIX,
    CheckpointTensors,
    adapter_from_config,
    read_adapter_config,
    read_adapter_tensors,
    task_head_candidates,
)
from peftc.errors import PeftcError, PeftcWarning, did_you_mean
from peftc.lang.evaluate import EvalError, evaluate
from peftc.lang.methods import (
    MethodDef,
    ParamDecl,
    RequireFailed,
    SiteProgram,
    coerce_option,
    instantiate,
    instantiate_shared,
    spec_repr,
)
from peftc.layer_kinds import KINDS
from peftc.library import Library, library
from peftc.ops import DTYPES, Init
from peftc.sites import add_parts, check_bias_mode, default_targets, saved_module, tied_modules, trained_biases
from peftc.spec.combinations import expand_combinations, scale_delta
from peftc.spec.model import AdapterSpec, Span, Spec
from peftc.targeting import (
    Layer,
    is_targeted,
    layer_index,
    layer_kind,
    layers_of,
    option_targets_hit,
    output_layer_names,
    parameter_layers,
    pattern_value,
)


@dataclass
class SiteAdapter:
    """One adapter on one layer."""
    adapter: str
    method: MethodDef
    program: SiteProgram
    tensors: dict[str, torch.Tensor]        # param name -> tensor
    layer_options: dict[str, Any]            # option values at this layer
    merge: bool
    active: bool
    consts: dict[str, torch.Tensor] = field(default_factory=dict)  # plan-time constants (never saved/trained)


@dataclass
class AdapterPlan:
    spec: AdapterSpec
    method: MethodDef
    options: dict[str, Any]
    layers: list[str]
    modules_to_save: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    merge: bool = False
    active: bool = True
    source: str = "fresh"                    # fresh | weights | import
    base_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # checkpoint key -> a saved base weight
    shared: dict[str, torch.Tensor] = field(default_factory=dict)        # adapter-level tensors, by name
    shared_decls: list[ParamDecl] = field(default_factory=list)
    biases: dict[str, tuple[str, torch.Tensor]] = field(default_factory=dict)  # base bias FQN -> (key, trained copy)
    tied: dict[str, list[str]] = field(default_factory=dict)  # layer -> modules tied to its weight that follow it
    saved_names: dict[str, str] = field(default_factory=dict)  # layer -> peft's module name in the checkpoint
    replicate: list[tuple[int, int]] | None = None  # the layer replication of the model it is on (peftc.replicate)


@dataclass
class Plan:
    layers: dict[str, Layer]
    sites: dict[str, list[SiteAdapter]]      # layer -> adapters, in application order
    adapters: dict[str, AdapterPlan]
    train: bool = False
    base_overrides: dict[str, torch.Tensor] = field(default_factory=dict)  # base param FQN -> value to use
    warnings: list[str] = field(default_factory=list)    # allowed but probably not meant (also warnings.warn)
    # layer -> the modules tied to its weight that read the adapted weight (a `tied follow` method's layers)
    followers: dict[str, list[str]] = field(default_factory=dict)

    def trainable_count(self) -> int:
        n = 0
        for sas in self.sites.values():
            for sa in sas:
                if sa.active and not sa.merge:
                    n += sum(sa.tensors[d.name].numel() for d in sa.program.params if not d.frozen
                             and sa.tensors[d.name].is_floating_point())
        for ap in self.adapters.values():
            if ap.active and not ap.merge:
                n += sum(t.numel() for mod in ap.modules_to_save.values() for t in mod.values())
                n += sum(ap.shared[d.name].numel() for d in ap.shared_decls if not d.frozen)
                n += sum(t.numel() for _, t in ap.biases.values())
        return n


def _err(msg: str, span: Span | None, spec: Spec | None) -> PeftcError:
    """An error at a spec position (with the source line and a caret when it is in the spec itself)."""
    if span is None:
        return PeftcError(msg)
    source = spec.source if spec is not None and span.file == spec.file else None
    return PeftcError(msg, file=span.file or None, line=span.line or None, column=span.column or None,
                      source=source)


def resolve_adapter(ad: AdapterSpec, spec: Spec, lib: Library) -> tuple[AdapterSpec, MethodDef, dict[str, Any]]:
    """Expand an `import` and check method and options. Returns (adapter, method, coerced options)."""
    if ad.import_dir is not None and ad.method is None:
        _check_clauses(ad, None, spec)
        _only_merge_and_exclude(ad, spec)
        directory = ad.preloaded[2] if ad.preloaded else spec.resolve_path(ad.import_dir)
        try:
            config = ad.preloaded[0] if ad.preloaded else read_adapter_config(directory)
        except PeftcError as e:
            raise _err(str(e), ad.option_spans.get("import"), spec) from None
        method = lib.method_for_config(config)
        if method is None and not config.get("peft_type"):
            raise _err(f"{directory}: adapter_config.json has no peft_type (is it a PEFT adapter checkpoint?)",
                       ad.option_spans.get("import"), spec)
        if method is None:
            raise _err(f"{directory}: unsupported peft_type {config.get('peft_type')!r} "
                       f"(peftc supports {', '.join(lib.peft_types())})", ad.option_spans.get("import"), spec)
        imported = adapter_from_config(ad.name, directory, config, method, ad.span)
        imported.merge = ad.merge
        imported.exclude += ad.exclude
        imported.option_spans = dict(ad.option_spans)
        imported.extra_config["__heads"] = task_head_candidates(config)
        imported.preloaded, imported.seed_index, imported.delta_scale = ad.preloaded, ad.seed_index, ad.delta_scale
        if "__combination" in ad.extra_config:
            imported.extra_config["__combination"] = ad.extra_config["__combination"]
        ad = imported
    else:
        method = lib.method(ad.method) if ad.method in lib.methods else None
        if method is None:
            raise _err(f"unknown method '{ad.method}'{did_you_mean(ad.method, lib.methods)}; "
                       f"known methods: {', '.join(sorted(lib.methods))}", ad.option_spans.get("method"), spec)
        _check_clauses(ad, method, spec)
        if not ad.targets and not ad.parameters and not method.default_targets:
            raise _err(f"adapter '{ad.name}' has no targets: add e.g. `targets q_proj, v_proj` "
                       "or `targets all-linear`", ad.span, spec)
    options: dict[str, Any] = {}
    for key, value in ad.options.items():
        decl = method.options.get(key)
        if decl is None or decl.type == "targets":
            choices = [k for k, d in method.options.items() if d.type != "targets"]
            aliases = {d.config_key: k for k, d in method.options.items() if d.config_key and d.config_key != k}
            aliases.update({"rank": "r"} if "r" in choices else {})
            raise _err(f"unknown option '{key}' for {method.name}{did_you_mean(key, choices, aliases=aliases)}; "
                       f"options: {', '.join(choices)}", ad.option_spans.get(key), spec)
        try:
            options[key] = coerce_option(decl, value)
        except ValueError as e:
            raise _err(f"option '{key}' of {method.name} {e}", ad.option_spans.get(key), spec) from None
    for decl in method.options.values():
        if decl.type != "targets":
            options.setdefault(decl.name, decl.default)
    for pp in ad.per_pattern:
        decl = method.options.get(pp.option)
        if decl is None or not decl.pattern_key:
            choices = [k for k, d in method.options.items() if d.pattern_key]
            known = f"; per-layer values exist for: {', '.join(choices)}" if choices else \
                f"; {method.name} takes no per-layer values"
            what = "unknown option" if decl is None else "no per-layer values for option"
            raise _err(f"{what} '{pp.option}' of {method.name}{did_you_mean(pp.option, choices)}{known}",
                       pp.span, spec)
        try:
            pp.value = coerce_option(decl, pp.value)
        except ValueError as e:
            raise _err(f"option '{pp.option}' of {method.name} {e}", pp.span, spec) from None
        try:
            re.compile(pp.rule.value)
        except re.error as e:
            raise _err(f"invalid pattern {pp.rule.value!r}: {e}", pp.rule.span, spec) from None
    for r in ad.targets + ad.exclude:
        if r.kind == "regex":
            try:
                re.compile(r.value)
            except re.error as e:
                raise _err(f"invalid regex /{r.value}/: {e}", r.span, spec) from None
    return ad, method, options


# grammar/spec.lark's clause keywords
CLAUSES = ("targets", "exclude", "layers", "save", "weights", "merge", "parameters", "replicate")


def _check_clauses(ad: AdapterSpec, method: MethodDef | None, spec: Spec) -> None:
    """`NAME target, ...` is a clause only when NAME is a targets-typed option of the method (ia3's
    `feedforward`); anything else is a misspelled clause, reported where it is written (with `method` None,
    for an imported adapter, only near misses of the clause keywords are reported here)."""
    options = [k for k, d in method.options.items() if d.type == "targets"] if method is not None else []
    for key in ad.option_targets:
        if key in options:
            continue
        hint = did_you_mean(key, list(CLAUSES) + options, n=1)
        if method is None and not hint:
            continue
        takes = f" {method.name} also takes: {', '.join(options)}." if options else ""
        where = f" for {method.name}" if method is not None else ""
        raise _err(f"unknown clause '{key}'{where}{hint}; clauses are {', '.join(CLAUSES)}, and "
                   f"`OPTION at NAME = VALUE`.{takes}".rstrip("."), ad.option_spans.get(key), spec)


def _only_merge_and_exclude(ad: AdapterSpec, spec: Spec) -> None:
    """An imported adapter takes method, options, targets and weights from its checkpoint; its block may
    only add `merge` and `exclude`."""
    extra = []
    if ad.targets:
        extra.append(("targets", ad.targets[0].span))
    if ad.layers is not None:
        extra.append(("layers", ad.option_spans.get("layers", ad.span)))
    extra += [(f"{pp.option} at ...", pp.span) for pp in ad.per_pattern]
    extra += [(k, ad.option_spans.get(k)) for k in ad.option_targets]
    if ad.modules_to_save:
        extra.append(("save", ad.span))
    if ad.weights is not None:
        extra.append(("weights", ad.option_spans.get("weights")))
    if ad.parameters:
        extra.append(("parameters", ad.option_spans.get("parameters")))
    if ad.replicate is not None:
        extra.append(("replicate", ad.option_spans.get("replicate")))
    if extra:
        clause, span = extra[0]
        raise _err(f"adapter '{ad.name}' is imported whole from its PEFT checkpoint: its block takes only "
                   f"`merge` and `exclude`, not `{clause}` (declare it as method(options) with "
                   "`weights \"dir\"` to choose targets or options yourself)", span, spec)


def _check_options_agree(ad: AdapterSpec, method: MethodDef, options: dict[str, Any], config: dict[str, Any],
                         directory: str, spec: Spec) -> None:
    """Weights loaded with `weights "dir"` were trained with the options in dir/adapter_config.json: an
    option that differs (given in the spec, or a default) would silently compute something else."""
    cfg_file = _display_path(Path(directory) / CONFIG_NAME)
    for decl in method.options.values():
        if decl.type == "targets" or decl.name == "init" or decl.config_key not in config:
            continue
        try:
            saved = coerce_option(decl, config[decl.config_key])
        except ValueError:
            continue
        ours = options[decl.name]
        if saved == ours or (isinstance(saved, float) and isinstance(ours, float) and abs(saved - ours) < 1e-12):
            continue
        given = decl.name in ad.options
        what = f"{decl.name} = {_value(ours)}" if given else f"{decl.name} is {_value(ours)} (the default)"
        raise _err(f"adapter '{ad.name}': {what} but its weights were saved with {decl.config_key} = "
                   f"{json.dumps(config[decl.config_key])} ({cfg_file}); write {decl.name} = {_value(saved)}, or "
                   "declare the adapter as `import \"dir\"` to take every option from the checkpoint",
                   ad.option_spans.get(decl.name) if given else ad.option_spans.get("weights"), spec)


def _display_path(p: Path) -> str:
    """A path as the user would write it: relative to the working folder when it is inside it."""
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(p)


def _value(v: Any) -> str:
    """An option value as a user writes it: 16 rather than 16.0, true, "gaussian"."""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return spec_repr(v)


def _ranges(nums: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out: list[str] = []
    for n in nums:
        if out and out[-1].split("-")[-1] == str(n - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{n}"
        else:
            out.append(str(n))
    return ", ".join(out)


def _shown(rule: Any) -> str:
    """A per-layer key as written: a name (stored escaped, as a peft rank_pattern key) or a /regex/."""
    plain = re.sub(r"\\(.)", r"\1", rule.value)
    return plain if re.escape(plain) == rule.value else f"/{rule.value}/"


def _at(msg: str, span: Span | None) -> str:
    if span is None or not span.file:
        return msg
    return f"{span.file}:{span.line}:{span.column}: {msg}" if span.line else f"{span.file}: {msg}"


def _warn(plan: Plan, msg: str) -> None:
    plan.warnings.append(msg)
    warnings.warn(msg, PeftcWarning, stacklevel=3)


def _near_misses(ad: AdapterSpec, names: list[str]) -> str:
    suffixes = sorted({n.split(".")[-1] for n in names} | set(names))
    hints: list[str] = []
    for r in ad.targets:
        if r.kind == "name":
            hints += difflib.get_close_matches(r.value, suffixes, n=3, cutoff=0.5)
        elif r.kind == "regex":
            hints += difflib.get_close_matches(r.value.replace("\\", ""), names, n=3, cutoff=0.3)
    hints = list(dict.fromkeys(hints))[:5]
    if not hints:
        hints = [n for n in names][:5]
        return f"; the model's layers include: {', '.join(hints)}" if hints else ""
    return f"; nearest module names: {', '.join(hints)}"


def make_tensors(steps: list[tuple[str, Any]], env: dict[str, Any], dtype: torch.dtype, gen: torch.Generator,
                 load: Callable[[ParamDecl], torch.Tensor | None]) -> tuple[dict[str, torch.Tensor], dict]:
    """Run a method's lets, consts and params eagerly, in declaration order: each param is loaded (`load`
    gives the checkpoint's tensor, or None) or initialised; each `const` is computed. Returns (params, consts)."""
    out: dict[str, torch.Tensor] = {}
    consts: dict[str, torch.Tensor] = {}
    for kind, item in steps:
        if kind == "let":
            name, expr = item
            try:
                env[name] = evaluate(expr, env)
            except EvalError:
                pass
            continue
        if kind == "const":
            name, expr = item
            value = evaluate(expr, env)
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            consts[name] = value
            env[name] = value
            continue
        decl: ParamDecl = item
        t = load(decl)
        if t is None:
            init = evaluate(decl.init, env)
            if isinstance(init, Init):
                t = init.make(decl.shape, dtype, gen)
            elif isinstance(init, torch.Tensor):
                t = init.detach().to(dtype if init.is_floating_point() else init.dtype).reshape(decl.shape).clone()
            else:
                raise PeftcError(f"param {decl.name}: init gave {type(init).__name__}, not a tensor")
        if decl.dtype is not None:
            t = t.to(DTYPES[decl.dtype])
        out[decl.name] = t
        env[decl.name] = t
    return out, consts


def _param_dtype(base: torch.dtype) -> torch.dtype:
    return torch.float32 if base in (torch.float16, torch.bfloat16) else base


def _checkpoint_shapes(ckpt: CheckpointTensors | None, prefix: str) -> Callable[[str], tuple[int, ...] | None]:
    """shape_of(saved key) for a layer's (or the shared) tensors of a checkpoint: None when absent."""
    def shape_of(key: str) -> tuple[int, ...] | None:
        full = prefix + key
        return tuple(ckpt.tensors[full].shape) if ckpt is not None and full in ckpt else None
    return shape_of


def _checkpoint_loader(ckpt: CheckpointTensors | None, prefix: str, dtype: torch.dtype,
                       what: str) -> Callable[[ParamDecl], torch.Tensor | None]:
    """load(decl): a param's tensor from the checkpoint (shape checked, floats cast to `dtype` unless the param
    declares its own dtype), or None when it is to be initialised (no checkpoint, unsaved, optional and absent)."""
    def load(decl: ParamDecl) -> torch.Tensor | None:
        if ckpt is None or decl.saved is None:
            return None
        key = prefix + decl.saved
        if decl.optional and key not in ckpt:
            return None
        t = ckpt.take(key, decl.shape, what)
        want_float = decl.dtype is None or DTYPES[decl.dtype].is_floating_point
        if t.is_floating_point() != want_float:
            kind = "a floating-point" if want_float else f"an integer ({decl.dtype})"
            raise PeftcError(f"{ckpt.file}: tensor '{key}' has dtype {str(t.dtype).replace('torch.', '')}, expected "
                             f"{kind} tensor ({what})")
        return t.to(dtype) if t.is_floating_point() and decl.dtype is None else t
    return load


def aggregate_dims(layers: list[Layer]) -> dict[str, int]:
    """Dims over all of an adapter's layers: the largest `in` and `out` (for the tensors they share), the sum
    of in * out and the number of layers (to split a parameter budget in proportion)."""
    if not layers:
        return {}
    return {"max_in": max(int(l.dims["in"]) for l in layers), "max_out": max(int(l.dims["out"]) for l in layers),
            "total_in_out": sum(int(l.dims["in"]) * int(l.dims["out"]) for l in layers), "n_layers": len(layers)}


def _shared_tensors(method: MethodDef, options: dict[str, Any], layers: list[Layer], agg: dict[str, int],
                    ckpt: CheckpointTensors | None, gen: torch.Generator,
                    adapter: str) -> tuple[list[ParamDecl], dict[str, torch.Tensor]]:
    """An adapter's `shared` tensors: shapes from its layers' largest dims (`max_in`, `max_out`), loaded
    from `base_model.<key>` in the checkpoint or initialised (seeded draws regenerate peft's exactly)."""
    if not layers:
        return [], {}
    decls, steps, env = instantiate_shared(method, {l.kind for l in layers}, options, agg)
    if not decls:
        return [], {}
    dtype = _param_dtype(layers[0].dtype)
    load = _checkpoint_loader(ckpt, SHARED_PREFIX, dtype, f"adapter '{adapter}', {method.name} shared tensor")
    tensors, _ = make_tensors(steps, env, dtype, gen, load)
    return decls, tensors


def _instantiate_layer(ad: AdapterSpec, method: MethodDef, options: dict[str, Any], lname: str, layer: Layer | None,
                       module: nn.Module, extra_dims: dict[str, Any], ckpt: CheckpointTensors | None, merge: bool,
                       spec: Spec, saved_as: str | None = None) -> tuple[SiteProgram, dict[str, Any]]:
    """The method's program at one layer, with the option values that hold there (per-layer patterns,
    targets-typed options); a failed `require` or an unmergeable `merge` is an error at the spec."""
    name = ad.name
    kind = layer.kind if layer else layer_kind(module)
    if layer is None or kind not in method.kinds:
        raise _err(f"adapter '{name}': {method.name} does not support layer '{lname}' ({type(module).__name__}); "
                   f"it supports {', '.join(method.kinds)}", ad.targets[0].span if ad.targets else ad.span, spec)
    lopts = dict(options)
    pp_by_opt: dict[str, list[tuple[str, Any]]] = {}
    for pp in ad.per_pattern:
        pp_by_opt.setdefault(pp.option, []).append((pp.rule.value, pp.value))
    for opt, pats in pp_by_opt.items():
        hit, val = pattern_value(pats, lname)
        if hit:
            lopts[opt] = val
    for opt, rules in ad.option_targets.items():
        lopts[opt] = option_targets_hit(rules, lname)
    for decl in method.options.values():
        if decl.type == "targets" and decl.name not in lopts:
            lopts[decl.name] = False
    try:
        prog = instantiate(method, kind, lopts, {**layer.dims, **extra_dims},
                           _checkpoint_shapes(ckpt, f"{PREFIX}{layer.key or saved_as or lname}."))
    except RequireFailed as e:
        opts = [n for n in e.names if n in ad.option_spans]
        about_layer = bool(e.names & set(layer.dims))
        where = f" on '{lname}'" if about_layer else ""
        span = ad.option_spans[opts[0]] if opts else ad.span
        raise _err(f"adapter '{name}'{where}: {e.message}", span, spec) from None
    if ad.delta_scale is not None:
        try:
            prog = scale_delta(prog, ad.delta_scale)
        except ValueError as e:
            comb, span = ad.extra_config["__combination"]
            raise _err(f"combination '{comb}' (type exact) sums the deltas of additive adapters, but {method.name} "
                       f"on '{lname}' {e}", span, spec) from None
    if merge and not prog.mergeable:
        why = f": {prog.unmergeable_why}" if prog.unmergeable_why else ""
        raise _err(f"adapter '{name}' cannot be merged into '{lname}' ({method.name} with these options "
                   f"is not mergeable here{why}); drop `merge` / --merge", ad.span, spec)
    return prog, lopts


def _companion_sites(plan: Plan, ad: AdapterSpec, method: MethodDef, options: dict[str, Any], model: nn.Module,
                     layers: dict[str, Layer], ckpt: CheckpointTensors | None, gen: torch.Generator, merge: bool,
                     active: bool, spec: Spec, lib: Library, matched: list[str]) -> None:
    """A method's companions (LoRA's trainable_token_indices: trainable tokens on the embeddings): the companion
    method on each layer the option names, as part of this adapter, its tensors under `<layer>.<prefix>.`."""
    for comp_name, opt, prefix in method.companions:
        value = options.get(opt)
        if not value:
            continue
        comp = lib.method(comp_name)
        span = ad.option_spans.get(opt, ad.span)
        if isinstance(value, dict):
            wanted = dict(value)
        else:
            try:
                wanted = {r.value: value for r in default_targets(ad, comp, model)}
            except PeftcError as e:
                raise _err(str(e), span, spec) from None
        list_opt = next(d.name for d in comp.options.values() if d.type == "list")
        for key, indices in wanted.items():
            hits = [n for n in layers if n == key or n.endswith("." + key)]
            if len(hits) != 1:
                raise _err(f"adapter '{ad.name}': {opt} names '{key}', which matches "
                           f"{'no layer' if not hits else 'several layers: ' + ', '.join(hits)}", span, spec)
            lname = hits[0]
            if lname in matched or layers[lname].kind not in comp.kinds:
                what = "is also a target" if lname in matched else f"is a {layers[lname].kind} layer"
                raise _err(f"adapter '{ad.name}': {opt} cannot go on '{lname}': it {what}", span, spec)
            layers[lname] = dataclasses.replace(layers[lname], key=f"{lname}.{prefix}", part_of=lname)
            layer = layers[lname]
            copts = {d.name: d.default for d in comp.options.values() if d.type != "targets"}
            copts[list_opt] = tuple(indices)
            try:
                prog = instantiate(comp, layer.kind, copts, dict(layer.dims),
                                   _checkpoint_shapes(ckpt, f"{PREFIX}{layer.key}."))
            except RequireFailed as e:
                raise _err(f"adapter '{ad.name}': {opt} on '{lname}': {e.message}", span, spec) from None
            weight = dict(model.named_parameters(remove_duplicate=False))[layer.weight]
            pdtype = _param_dtype(layer.dtype)
            env = {**prog.env, "W": weight.detach().to(pdtype), "b": None}
            env["W0"] = env["W"]
            load = _checkpoint_loader(ckpt, f"{PREFIX}{layer.key}.", pdtype, f"adapter '{ad.name}', {opt} on '{lname}'")
            tensors, consts = make_tensors(prog.steps, env, pdtype, gen, load)
            plan.sites.setdefault(lname, []).append(
                SiteAdapter(ad.name, comp, prog, tensors, copts, merge, active, consts))
            if comp.tied_follow and (tied := tied_modules(model, layer)):
                plan.followers[lname] = tied


def parameter_saved_names(params: dict[str, Layer]) -> dict[str, str]:
    """Where peft keeps a targeted parameter's tensors: under its module, and when an adapter targets several
    parameters of one module, peft nests one wrapper per parameter (the first declared innermost), so the
    earlier ones sit one `.base_layer` deeper each."""
    by_module: dict[str, list[str]] = {}
    for name, layer in params.items():   # in the module's declaration order
        by_module.setdefault(layer.module, []).append(name)
    return {name: module + ".base_layer" * (len(names) - 1 - i)
            for module, names in by_module.items() for i, name in enumerate(names)}


def _check_parameter_targets(ad: AdapterSpec, hits: dict[str, Layer], modules: list[str], model: nn.Module,
                             spec: Spec) -> None:
    """Each `parameters` name must select a 2-d or 3-d parameter, on a module no `targets` adapts (as peft)."""
    for rule in ad.parameters:
        if any(k == rule.value or k.endswith("." + rule.value) for k in hits):
            continue
        names = [n for n, _ in model.named_parameters()]
        found = [n for n in names if n == rule.value or n.endswith("." + rule.value)]
        if found:
            shape = list(dict(model.named_parameters())[found[0]].shape)
            msg = (f"adapter '{ad.name}': parameter '{found[0]}' has shape {shape}; only 2-d and 3-d floating "
                   "point parameters (on a submodule) can be adapted")
        else:
            leaves = sorted({".".join(n.split(".")[-2:]) for n in names if n.count(".") >= 1})
            msg = (f"adapter '{ad.name}': parameters {rule.value} match no parameter of the model"
                   f"{did_you_mean(rule.value, leaves)}")
        raise _err(msg, rule.span, spec)
    clash = sorted({layer.module for layer in hits.values()} & set(modules))
    if clash:
        raise _err(f"adapter '{ad.name}': module '{clash[0]}' is both a target and the owner of a targeted "
                   "parameter; target one or the other (as peft requires)", ad.parameters[0].span, spec)


def build_plan(spec: Spec, model: nn.Module, *, merge_all: bool = False, train: bool = False,
               seed: int = 0, lib: Library | None = None) -> Plan:
    lib = lib or library().checked()
    spec = expand_combinations(spec)
    layers = layers_of(model)
    named = dict(model.named_modules())
    module_names = [n for n in named if n]
    params = dict(model.named_parameters(remove_duplicate=False))  # tied weights under every name
    active = spec.active_names()
    for a in active:
        if a not in spec.adapters:
            raise _err(f"'active' names unknown adapter '{a}'{did_you_mean(a, spec.adapters)}; "
                       f"declared: {', '.join(spec.adapters) or 'none'}",
                       spec.active_spans.get(a), spec)
    plan = Plan(layers, {}, {}, train)
    from peftc.replicate import replication_of
    replicated = replication_of(spec, lib)
    for idx, (name, raw) in enumerate(spec.adapters.items()):
        ad, method, options = resolve_adapter(raw, spec, lib)
        if not ad.targets and method.default_targets:
            try:
                ad = dataclasses.replace(ad, targets=default_targets(ad, method, model))
            except PeftcError as e:
                raise _err(str(e), ad.span, spec) from None
        bias_mode = options.get("bias", "none") if method.bias_only else "none"
        if (msg := check_bias_mode(bias_mode, method)) is not None:
            raise _err(f"adapter '{name}': {msg}", ad.option_spans.get("bias", ad.span), spec)
        is_active = name in active
        merge = (ad.merge or merge_all) and is_active
        from_cfg = ad.import_dir is not None and raw.method is None
        all_linear = {n for n, l in layers.items() if KINDS[l.kind].linear_like}
        task_type = ad.extra_config.get("task_type")
        all_linear -= output_layer_names(model, classifier_head=(task_type == "SEQ_CLS") if from_cfg else True)
        # modules_to_save (a classification head, say): resolve names to modules
        mts_names = list(ad.modules_to_save)
        mts: list[str] = []
        for m in mts_names:
            hits = [n for n in module_names if n.endswith(m)]  # peft's rule: a plain suffix
            if not hits and from_cfg:
                continue  # peft skips modules_to_save names (task defaults) the model lacks
            if not hits:
                leaves = [n.split(".")[-1] for n in module_names]
                raise _err(f"adapter '{name}': modules_to_save '{m}' matches no module{did_you_mean(m, leaves)}",
                           ad.span, spec)
            mts += hits
        matched = [n for n in module_names if is_targeted(ad, n, all_linear)]
        if not matched and ad.layers is not None:
            unfiltered = dataclasses.replace(ad, layers=None)
            hits = [n for n in module_names if is_targeted(unfiltered, n, all_linear)]
            if hits:
                found = sorted({i for n in hits if (i := layer_index(n, ad.layers_pattern)) is not None})
                have = f" (layer indices {_ranges(found)})" if found else ""
                raise _err(f"adapter '{name}': `layers {', '.join(map(str, ad.layers))}` selects none of the "
                           f"{len(hits)} layers its targets match{have}", ad.option_spans.get("layers"), spec)
        params_hit = parameter_layers(model, ad.parameters)
        _check_parameter_targets(ad, params_hit, matched, model, spec)
        layers.update(params_hit)
        saved_names = parameter_saved_names(params_hit)
        matched += list(params_hit)
        if not matched:
            where = ad.targets[0].span if ad.targets and ad.targets[0].span else ad.span
            desc = ", ".join(r.value if r.kind != "regex" else f"/{r.value}/" for r in ad.targets)
            raise _err(f"adapter '{name}': targets {desc} match no layer of the model"
                       f"{_near_misses(ad, module_names)}", where, spec)
        matched = add_parts(matched, layers)   # an MHA's out_proj goes with it
        # where weights come from
        ckpt: CheckpointTensors | None = None
        if ad.weights is not None or from_cfg:
            directory = spec.resolve_path(ad.weights) if ad.weights is not None else ad.import_dir
            try:
                ckpt = CheckpointTensors(*(ad.preloaded[1:] if ad.preloaded else read_adapter_tensors(directory)))
            except PeftcError as e:
                raise _err(str(e), ad.option_spans.get("weights") or ad.option_spans.get("import"), spec) from None
            if ad.weights is not None and not from_cfg:
                cfg = None
                try:
                    cfg = read_adapter_config(directory)
                except PeftcError:
                    pass
                if cfg is not None:
                    other = lib.method_for_config(cfg)
                    if other is not None and other.name != method.name:
                        raise _err(f"adapter '{name}' is {method.name} but {directory} holds a {other.name} adapter",
                                   ad.option_spans.get("weights"), spec)
                    _check_options_agree(ad, method, options, cfg, directory, spec)
        gen = torch.Generator().manual_seed(seed + (idx if ad.seed_index is None else ad.seed_index))
        targeted = [layers[n] for n in matched if n in layers]
        agg_dims = aggregate_dims(targeted)
        # every layer's program first (its `require`s checked), then the adapter's shared tensors, then each
        # layer's own tensors (which may read the shared ones)
        programs = [(lname, *_instantiate_layer(ad, method, options, lname, layers.get(lname),
                                                named[lname if lname not in layers else layers[lname].module or lname],
                                                {**agg_dims, "training": train, "loading": ckpt is not None},
                                                ckpt, merge, spec, saved_names.get(lname)))
                    for lname in matched]
        shared_decls, shared = _shared_tensors(method, options, targeted, agg_dims, ckpt, gen, name)
        _companion_sites(plan, ad, method, options, model, layers, ckpt, gen, merge, is_active, spec, lib, matched)
        for lname, prog, lopts in programs:
            layer = layers[lname]
            weight = params[layer.weight]
            w_lin = weight.transpose(-2, -1) if KINDS[layer.kind].transposed else weight
            bias = params.get(layer.bias) if layer.bias else None
            pdtype = _param_dtype(layer.dtype)
            load = _checkpoint_loader(ckpt, f"{PREFIX}{saved_module(lname, layer.key, saved_names)}.", pdtype,
                                      f"adapter '{name}', {method.name} on '{lname}'")
            env = {**prog.env, **shared, "W": w_lin.detach().to(pdtype),
                   "b": bias.detach().to(pdtype) if bias is not None else None}
            env["W0"] = env["W"]
            tensors, consts = make_tensors(prog.steps, env, pdtype, gen, load)
            plan.sites.setdefault(lname, []).append(
                SiteAdapter(name, method, prog, tensors, lopts, merge, is_active, consts))
        for pp in ad.per_pattern:
            if from_cfg or any(pattern_value([(pp.rule.value, pp.value)], lname)[0] for lname in matched):
                continue
            _warn(plan, _at(f"adapter '{name}': `{pp.option} at {_shown(pp.rule)} = {spec_repr(pp.value)}` matches "
                            f"none of its {len(matched)} targeted layers, so it changes nothing", pp.span))
        ap = AdapterPlan(ad, method, options, matched, merge=merge, active=is_active,
                         source="import" if from_cfg else ("weights" if ad.weights else "fresh"),
                         shared=shared, shared_decls=shared_decls, saved_names=saved_names,
                         replicate=replicated if "layer_replication" in method.config_fields else None)
        if method.tied_follow:
            ap.tied = {l: t for l in matched if (t := tied_modules(model, layers[l]))}
            plan.followers.update(ap.tied)
        heads = [n for n in module_names if ckpt is not None and ckpt.has_unused_under(f"{PREFIX}{n}.")
                 and any(n.endswith(h) for h in ad.extra_config.get("__heads", [])
                         if h not in mts_names)]
        for m in mts + heads:
            copy: dict[str, torch.Tensor] = {}
            for pname, p in named[m].named_parameters():
                if ckpt is not None:
                    t = ckpt.take(f"{PREFIX}{m}.{pname}", tuple(p.shape), f"modules_to_save '{m}' of adapter '{name}'")
                    copy[pname] = t.to(p.dtype)
                else:
                    copy[pname] = p.detach().clone()
            ap.modules_to_save[m] = copy
        if bias_mode != "none":
            ap.biases = trained_biases(bias_mode, method, model, matched, layers, ckpt, name, mts + heads,
                                       ap.base_weights)
        if ckpt is not None:
            for lname, tied in ap.tied.items():   # peft saves a tied module's copy of the rows too: checked, not loaded
                for site in plan.sites.get(lname, []):
                    for decl in site.program.params if site.adapter == name else []:
                        for other in tied:
                            key = f"{PREFIX}{other}.{decl.saved}"
                            if decl.saved is not None and key in ckpt:
                                ckpt.take(key, decl.shape, f"adapter '{name}', the copy tied to '{lname}'")
            for decl in shared_decls:   # per-layer copies of a shared tensor: checked, not loaded twice
                if decl.each_layer and decl.saved is not None:
                    for lname in matched:
                        key = f"{PREFIX}{lname}.{decl.saved}"
                        if key in ckpt:
                            ckpt.take(key, decl.shape, f"adapter '{name}', copy of the shared {decl.saved}")
            # peft saves whole embedding / output layers (save_embedding_layers) as <layer>.base_layer.*:
            # they are the base weights the adapter was trained on, and replace the model's own
            for lname in matched:
                for leaf, fqn in (("weight", layers[lname].weight), ("bias", layers[lname].bias)):
                    key = f"{PREFIX}{layers[lname].key or lname}.base_layer.{leaf}"
                    if fqn is None or key not in ckpt or fqn in ap.biases:
                        continue
                    base_t = params[fqn]
                    t = ckpt.take(key, tuple(base_t.shape), f"base {leaf} of '{lname}'")
                    ap.base_weights[key] = t
                    if not torch.equal(t.to(base_t.dtype), base_t):
                        plan.base_overrides[fqn] = t.to(base_t.dtype)
            extra = ckpt.unused()
            if extra:
                more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
                raise PeftcError(f"{ckpt.file}: unexpected tensor '{extra[0]}'{more}: it matches no layer that "
                                 f"adapter '{name}' targets (is the checkpoint for another model or config?)")
        plan.adapters[name] = ap
    # application order on each layer: merged adapters first (they fold into the base weight), then the
    # live ones in the order of `active` (peft applies active adapters in set_adapter order)
    rank = {a: i for i, a in enumerate(active)}
    for sas in plan.sites.values():
        sas.sort(key=lambda sa: (not sa.merge, rank.get(sa.adapter, len(rank))))
    return plan
