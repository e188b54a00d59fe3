"""The compile pipeline: spec + model -> plan -> traced graph -> passes -> adapted GraphModule.

    strip -> insert -> fold -> factor -> gate -> stack -> rejoin -> cse -> freeze -> choose -> addbmm -> fuse
    -> cache -> dce

`gate` (run-time adapter control, `switchable=True`) multiplies each switchable adapter's branches by a gate
buffer; without `switchable` it changes nothing. `freeze` (inference compiles) stores the gradient-free values
computed from adapter tensors (DoRA's norm) as constants; it runs before `choose` and `cache` regroup the
weight-side computations it looks for.

`strip` first removes torch.export's bookkeeping (metadata asserts, identity casts) and makes the graph follow
its parameters' dtype, so every later pass (and `--dump-after`) sees the model's own computation.

`fold` runs before `factor` (the design sketch has them the other way round): folding first turns every
merged transform into a constant, so the factoring rules only ever see live adapters and need no
"is this weight constant?" guard. Each pass is a function GraphModule -> PassResult.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from peftc.errors import PeftcError
from peftc.library import Library, library
from peftc.low_precision import cast_model
from peftc.manifest import Manifest
from peftc.models import LoadedModel, load_model
from peftc.optional_inputs import add_optional_inputs
from peftc.plan import Plan, build_plan, resolve_adapter
from peftc.progress import step
from peftc.replicate import with_replication
from peftc.rewrite.cache_weights import cache_weights
from peftc.rewrite.choose_form import choose_form
from peftc.rewrite.eliminate_common_subexpressions import eliminate_common_subexpressions
from peftc.rewrite.eliminate_dead_code import eliminate_dead_code
from peftc.rewrite.explain import dense_layers, describe
from peftc.rewrite.factor import factor
from peftc.rewrite.fold_branch_add import fold_branch_add
from peftc.rewrite.fold_frozen import fold_frozen
from peftc.rewrite.freeze_detached import freeze_detached
from peftc.rewrite.fuse_shared_input import fuse_shared_input
from peftc.rewrite.gate_adapters import gate_adapters
from peftc.rewrite.insert_adapters import insert_adapters
from peftc.rewrite.rejoin_dense import rejoin_dense
from peftc.rewrite.stack_adapters import IDS, stack_adapters
from peftc.rewrite.strip_bookkeeping import strip_bookkeeping
from peftc.spec.all_live import all_adapters_live
from peftc.spec.combinations import expand_combinations
from peftc.spec.model import Spec
from peftc.spec.parse import parse_spec, read_spec
from peftc.switchable import check_switchable, free_dims, switchable_spec
from peftc.trace import base_forward, trace

_PRESERVED = "_user_preserved_attributes"   # torch.fx.graph_module._USER_PRESERVED_ATTRIBUTES_KEY
PASSES = ("strip", "insert", "fold", "factor", "gate", "stack", "rejoin", "cse", "freeze", "choose", "addbmm",
          "fuse", "cache", "dce")


@dataclass
class Compiled:
    gm: fx.GraphModule
    plan: Plan
    model: LoadedModel
    timings: dict[str, float] = field(default_factory=dict)
    rule_log: list[str] = field(default_factory=list)      # "rule @ layer", in the order the rules fired
    rule_hits: Counter = field(default_factory=Counter)     # rule name -> times it fired
    dense_layers: list[str] = field(default_factory=list)   # live adapters no rule could factor


_SPEC_SYNTAX = re.compile(r"[\n{}()#=]|^\s*(adapter|active)\b")


def load_spec(spec: str | Path | Spec) -> Spec:
    """A Spec from a Path, a string (spec text, or a path to a .peft file), or a Spec.

    A string is spec text when it has a newline, spec syntax (`{ } ( ) # =`) or starts with `adapter` /
    `active`; otherwise it is a file name. Text is never taken for a path (nor a path for text)."""
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, Path):
        return read_spec(spec)
    if _SPEC_SYNTAX.search(spec) and not spec.endswith(".peft") or "\n" in spec:
        return parse_spec(spec, "<spec>")
    return read_spec(spec)


def base_model_name(loaded: LoadedModel) -> str | None:
    """What a saved checkpoint records as base_model_name_or_path."""
    return getattr(loaded.config, "_name_or_path", None) or None


def check_spec(spec: Spec, lib: Library | None = None) -> None:
    """The checks that need no model (methods, options, clause names, regexes): run before the model is
    loaded so that a mistake in the spec is reported at once."""
    lib = lib or library().checked()
    spec = expand_combinations(spec)
    for ad in spec.adapters.values():
        resolve_adapter(ad, spec, lib)


def selectable_spec(sp: Spec, merge: bool) -> Spec:
    """The spec a per-row adapter choice compiles: every declared adapter live (the `active` line does not
    apply: `adapter_ids` chooses per row); a merged adapter is an error (it would act on every row)."""
    return all_adapters_live(
        sp, merge, flag="--adapter-ids",
        merged_why="a per-row choice needs every adapter live (a merged adapter would act on every row)",
        terms_why=", so ids would not count the spec's adapters; combine imported LoRA checkpoints (one adapter), "
                  "or drop --adapter-ids")


def with_adapter_ids(inputs: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """The example inputs plus `adapter_ids` ([batch] int64: -1, 0, 1, ... cycling over the adapters)."""
    if IDS in inputs:
        raise PeftcError(f"--adapter-ids: the model already has an input named '{IDS}'")
    batch = next((t.shape[0] for t in inputs.values() if t.dim() >= 1), 1)
    return {**inputs, IDS: torch.arange(batch, dtype=torch.int64) % (n + 1) - 1}


def check_modes(*, merge: bool, adapter_ids: bool, switchable: bool, adapters_as_inputs: bool, with_past: bool,
                example_inputs: object) -> None:
    """An error for compile options that do not go together (checked before the model loads)."""
    if adapters_as_inputs and adapter_ids:
        raise PeftcError("--adapters-as-inputs and --adapter-ids do not go together: onnxruntime activates "
                         "one set of adapter files per run, for every row")
    if with_past and adapter_ids:
        raise PeftcError("--with-past and --adapter-ids together are not supported (onnxruntime-genai feeds "
                         "no adapter_ids); export one or the other")
    if with_past and example_inputs:
        raise PeftcError("--example-input does not apply with --with-past: the inputs are the decoder's "
                         "(input_ids, attention_mask, position_ids and the key/value cache)")
    if switchable and adapters_as_inputs:
        raise PeftcError("switchable / max_adapters / max_rank and adapters_as_inputs do not go together: with "
                         "adapters as ONNX inputs the adapter files are the switch (onnxruntime's RunOptions)")
    if switchable and merge:
        raise PeftcError("switchable / max_adapters / max_rank: merge=True folds every adapter into the weights, so "
                         "there is nothing to switch")


@dataclass
class Planned:
    """The planning step's result: the plan compiled, and for a switchable compile the skeleton it was built
    from and the plan of the spec as written (`true_plan`)."""
    plan: Plan
    skel: object = None
    true_plan: Plan | None = None


def prepare_spec(spec: str | Path | Spec, *, merge: bool, adapter_ids: bool, switchable: bool,
                 adapters_as_inputs: bool, with_past: bool, example_inputs: object) -> Spec:
    """The spec the options compile (combinations expanded, every adapter live for a run-time choice); the
    options that do not go together are refused here, before the model loads."""
    sp = expand_combinations(load_spec(spec))   # combinations computed once, before the model loads
    check_spec(sp)
    if adapter_ids:
        sp = selectable_spec(sp, merge)
    check_modes(merge=merge, adapter_ids=adapter_ids, switchable=switchable, adapters_as_inputs=adapters_as_inputs,
                with_past=with_past, example_inputs=example_inputs)
    if adapters_as_inputs:
        sp = switchable_spec(sp, merge)
    return sp


def load_for(sp: Spec, model: str | nn.Module, example_inputs: list[str] | dict[str, torch.Tensor] | None, *,
             dtype: torch.dtype | None, with_past: bool) -> LoadedModel:
    """The model and its example inputs, cast to `dtype`, with the spec's layer replication, and for
    `with_past` the decoder with its key/value cache as flat inputs."""
    with step("Loading model"):
        loaded = load_model(model, example_inputs)
        if dtype is not None:
            loaded.module, loaded.inputs = cast_model(loaded.module, loaded.inputs, dtype,
                                                      owned=not isinstance(model, nn.Module))
        loaded.module = with_replication(sp, loaded.module)   # peft's layer_replication: a view, weights shared
        if with_past:
            from peftc.generation import with_past as wrap_with_past
            loaded = wrap_with_past(loaded)
    return loaded


def plan_for(sp: Spec, loaded: LoadedModel, *, merge: bool, train: bool, seed: int, switchable: bool,
             max_adapters: int | None, max_rank: int | None) -> Planned:
    with step("Planning adapters"):
        plan = build_plan(sp, loaded.module, merge_all=merge, train=train, seed=seed)
        if not switchable:
            return Planned(plan)
        # compile a skeleton: every additive adapter live, spare slots, ranks at max_rank
        from peftc.runtime import skeleton
        skel = skeleton(sp, plan, max_adapters, max_rank)
        return Planned(build_plan(skel.spec, loaded.module, train=train, seed=seed), skel, plan)


def _unchanged(g: fx.GraphModule) -> PassResult:
    return PassResult(g, False)


def pass_table(plan: Plan, manifest: Manifest, *, skel: object, selectable: list[str] | None,
               rule_log: list[str], rule_hits: Counter, gated_at: dict[str, set[str]], freeze: bool,
               adapters_as_inputs: bool) -> dict[str, Callable[[fx.GraphModule], PassResult]]:
    """Each pass of PASSES, set up for this compile (a pass that does not apply changes nothing)."""
    live = {lname: [sa.adapter for sa in sas if sa.active and not sa.merge] for lname, sas in plan.sites.items()}
    passes = {
        "strip": strip_bookkeeping(),
        "insert": insert_adapters(plan, manifest),
        "fold": fold_frozen(manifest),
        "factor": factor(library().checked().rules, rule_log, rule_hits),
        "gate": gate_adapters(skel.gated if skel else None, manifest, gated_at),
        "stack": stack_adapters(selectable, live, rule_log, rule_hits),
        "rejoin": rejoin_dense(),
        "cse": eliminate_common_subexpressions(),
        "freeze": freeze_detached(manifest) if freeze else _unchanged,
        "choose": choose_form(rule_log, rule_hits),
        "addbmm": fold_branch_add(rule_log, rule_hits),
        "fuse": fuse_shared_input(manifest),
        "cache": cache_weights(manifest),
        "dce": eliminate_dead_code(manifest),
    }
    if adapters_as_inputs:
        # the adapter tensors become ONNX inputs of free rank: `fuse` and `choose` concatenate A's and split at fixed
        # ranks, and `cache` would hold values computed from them
        for skipped in ("choose", "fuse", "cache"):
            passes[skipped] = _unchanged
    return passes


def run_passes(gm: fx.GraphModule, passes: dict[str, Callable[[fx.GraphModule], PassResult]], *,
               dump_after: str | None, dump: Callable[[str], None],
               observe: Callable[[str, fx.GraphModule], None] | None) -> fx.GraphModule:
    """The passes in PASSES order; the graph dumped after `dump_after`, and shown to `observe` after each."""
    for name in PASSES:
        with step(f"Pass {name}"):
            gm = passes[name](gm).graph_module
        if dump_after == name:
            dump(f"# graph after pass '{name}'\n{describe(gm)}")
        if observe is not None:   # `peftc graph`: the graph after each pass
            observe(name, gm)
    return gm


def annotate(gm: fx.GraphModule, plan: Plan, loaded: LoadedModel, manifest: Manifest, *, with_past: bool,
             adapters_as_inputs: bool, free: object, model: str | nn.Module) -> None:
    """What the emitters and the runtime read from the compiled graph: its manifest (`gm.peftc`), example inputs,
    layer kinds, key/value layout, optional inputs, and with adapters as inputs their free dims and the base
    model (all kept by copy.deepcopy)."""
    gm.peftc = manifest
    gm.peftc_inputs = dict(loaded.inputs)
    gm.peftc_layer_kinds = {name: layer.kind for name, layer in plan.layers.items()}
    if with_past:
        gm.peftc_cache = loaded.module.peftc_cache   # the key/value layout (peftc.generation.CacheLayout)
    # copy.deepcopy(gm) keeps these (a GraphModule's copy keeps only its graph and tensors otherwise)
    gm.meta.setdefault(_PRESERVED, {}).update({k: getattr(gm, k) for k in
                                               ("peftc", "peftc_inputs", "peftc_axes", "peftc_layer_kinds",
                                                "peftc_cache") if hasattr(gm, k)})
    add_optional_inputs(gm)
    if adapters_as_inputs:
        gm.peftc_switchable = True
        gm.peftc_free_dims = free
        gm.meta[_PRESERVED].update(peftc_switchable=True, peftc_free_dims=free)
        # the base model, for the check that a run without adapter files gives its outputs (not a submodule)
        gm.__dict__["peftc_base"] = base_forward(loaded.module, list(loaded.inputs))
        gm.__dict__["peftc_model_ref"] = model if isinstance(model, str) else None


def compile_model(spec: str | Path | Spec, model: str | nn.Module, *, merge: bool = False, train: bool = False,
                  example_inputs: list[str] | dict[str, torch.Tensor] | None = None,
                  dump_after: str | None = None, dump: Callable[[str], None] = print, seed: int = 0,
                  observe: Callable[[str, fx.GraphModule], None] | None = None,
                  adapter_ids: bool = False, switchable: bool = False, max_adapters: int | None = None,
                  max_rank: int | None = None, adapters_as_inputs: bool = False, with_past: bool = False,
                  freeze: bool | None = None, dtype: torch.dtype | None = None) -> Compiled:
    """`compile` with its options, returning the graph with the plan and the loaded model. `with_past`: trace the
    decoder with its key/value cache as flat inputs and outputs (peftc.generation), for a generation-ready
    export. `freeze` (default: `not train`, and off with `adapters_as_inputs`, whose adapter tensors become
    inputs): compute once the gradient-free values that depend on adapter tensors (DoRA's weight norm;
    rewrite/freeze_detached.py); `gm.peftc.frozen` says what each derives from. `dtype`: cast the model (a copy
    of a caller's module) and its float example inputs before tracing.

    Steps: prepare_spec, load_for, plan_for, the mode checks on the plan, trace, pass_table + run_passes,
    annotate, and the runtime's adapter methods (peftc.runtime.attach)."""
    if dump_after is not None and dump_after not in PASSES:
        raise PeftcError(f"--dump-after: unknown pass '{dump_after}'; passes are {', '.join(PASSES)}")
    switchable = switchable or max_adapters is not None or max_rank is not None
    sp = prepare_spec(spec, merge=merge, adapter_ids=adapter_ids, switchable=switchable,
                      adapters_as_inputs=adapters_as_inputs, with_past=with_past, example_inputs=example_inputs)
    loaded = load_for(sp, model, example_inputs, dtype=dtype, with_past=with_past)
    planned = plan_for(sp, loaded, merge=merge, train=train, seed=seed, switchable=switchable,
                       max_adapters=max_adapters, max_rank=max_rank)
    plan = planned.plan
    if with_past:
        from peftc.model_inputs import check_whole_sequence
        check_whole_sequence(plan, "with --with-past each step's input_ids are only the new tokens (the key/value "
                                   "cache holds the rest)")
    # the adapters adapter_ids indexes: the spec's, then a switchable compile's spare slots
    selectable = list((planned.skel.spec if planned.skel is not None else sp).adapters) if adapter_ids else None
    from peftc.model_inputs import row_inputs_needed, with_row_inputs
    row_extra = tuple(row_inputs_needed(plan, loaded.inputs))   # per-row inputs a method reads (task ids, say)
    if row_extra:
        loaded.inputs = with_row_inputs(loaded.inputs, list(row_extra))
    free = None
    if adapters_as_inputs:
        check_switchable(plan)
        free = free_dims(plan)
    if adapter_ids:
        with_mts = [a for a, ap in plan.adapters.items() if ap.modules_to_save]
        if with_mts:
            raise PeftcError(f"--adapter-ids: adapter '{with_mts[0]}' has `save` modules (modules_to_save); "
                             "a per-row choice of those is not supported yet")
        loaded.inputs = with_adapter_ids(loaded.inputs, len(selectable))
    with step("Tracing (torch.export)"):
        gm = trace(loaded.module, loaded.inputs, extra=((IDS,) if adapter_ids else ()) + row_extra)
    manifest = Manifest(base_model_name_or_path=base_model_name(loaded))
    rule_log: list[str] = []
    rule_hits: Counter = Counter()
    gated_at: dict[str, set[str]] = {}
    passes = pass_table(plan, manifest, skel=planned.skel, selectable=selectable, rule_log=rule_log,
                        rule_hits=rule_hits, gated_at=gated_at, adapters_as_inputs=adapters_as_inputs,
                        freeze=(not train and not adapters_as_inputs) if freeze is None else freeze)
    gm = run_passes(gm, passes, dump_after=dump_after, dump=dump, observe=observe)
    dense = dense_layers(gm, {n: layer.shape for n, layer in plan.layers.items()}, manifest.live)
    annotate(gm, plan, loaded, manifest, with_past=with_past, adapters_as_inputs=adapters_as_inputs, free=free,
             model=model)
    gm.train(train)
    if not merge:   # load_adapter, set_adapter, ... (peftc.runtime)
        from peftc.runtime import attach
        attach(gm, plan, loaded.module, gated_at, planned.skel, planned.true_plan, per_row=selectable)
    return Compiled(gm, plan, loaded, rule_log=rule_log, rule_hits=rule_hits, dense_layers=dense)


def compile(spec: str | Path | Spec, model: str | nn.Module, *, merge: bool = False, train: bool = False,
            example_inputs: list[str] | dict[str, torch.Tensor] | None = None, seed: int = 0,
            adapter_ids: bool = False, switchable: bool = False, max_adapters: int | None = None,
            max_rank: int | None = None, adapters_as_inputs: bool = False) -> fx.GraphModule:
    """Compile `spec` onto `model` and return the adapted fx GraphModule.

    `spec`: a .peft path, spec text, or Spec. `model`: an nn.Module or any MODEL reference the CLI takes.
    `merge`: fold every active adapter into the base weights. `train`: include adapter dropout (the module
    is returned in training mode; unmerged adapter tensors require grad either way, base weights never do).
    Without `train`, values that depend on adapter tensors but carry no gradient (DoRA's weight norm) are
    computed once here (see `refresh_frozen` after changing adapter tensors in place); with `train` they are
    recomputed on every forward.
    `adapter_ids`: the graph takes one more input, `adapter_ids` (int64, [batch]): row b runs the spec's
    `adapter_ids[b]`-th adapter (declaration order), -1 the base model.

    The module has transformers' adapter methods (`load_adapter`, `set_adapter`, `disable_adapters`,
    `enable_adapters`, `active_adapters`, `get_adapter_state_dict`, `delete_adapter`; see `peftc.runtime`).
    `switchable`: every additive adapter is compiled live behind a gate, so those calls switch adapters without
    retracing; `max_adapters`: how many adapters the module can hold at once (spare slots take the spec's first
    switchable adapter's method and targets); `max_rank`: the rank (option `r`) every slot is compiled at, so
    checkpoints of any rank up to it load or hot swap. Either implies `switchable`.
    `adapters_as_inputs`: every declared adapter stays live with its tensors free to become ONNX inputs
    (`export_onnx(gm, path, adapters_as_inputs=True)`: onnxruntime's `.onnx_adapter` convention); additive
    methods only.
    """
    return compile_model(spec, model, merge=merge, train=train, example_inputs=example_inputs, seed=seed,
                         adapter_ids=adapter_ids, switchable=switchable, max_adapters=max_adapters,
                         max_rank=max_rank, adapters_as_inputs=adapters_as_inputs).gm
