"""The compile pipeline: spec + model -> plan -> traced graph -> passes -> adapted GraphModule.

    strip -> insert -> fold -> factor -> stack -> rejoin -> cse -> choose -> addbmm -> fuse -> cache -> dce

`strip` first removes torch.export's bookkeeping (metadata asserts, identity casts) and makes the graph follow
its parameters' dtype, so every later pass (and `--dump-after`) sees the model's own computation.

`fold` runs before `factor` (the design sketch has them the other way round): folding first turns every
merged transform into a constant, so the factoring rules only ever see live adapters and need no
"is this weight constant?" guard. Each pass is a function GraphModule -> PassResult.
"""
from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import fx, nn

from peftc.errors import PeftcError
from peftc.library import Library, library
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
from peftc.rewrite.fuse_shared_input import fuse_shared_input
from peftc.rewrite.insert_adapters import insert_adapters
from peftc.rewrite.rejoin_dense import rejoin_dense
from peftc.rewrite.stack_adapters import IDS, stack_adapters
from peftc.rewrite.strip_bookkeeping import strip_bookkeeping
from peftc.spec.combinations import expand_combinations
from peftc.spec.model import Spec
from peftc.spec.parse import parse_spec, read_spec
from peftc.trace import trace

_PRESERVED = "_user_preserved_attributes"   # torch.fx.graph_module._USER_PRESERVED_ATTRIBUTES_KEY
PASSES = ("strip", "insert", "fold", "factor", "stack", "rejoin", "cse", "choose", "addbmm", "fuse", "cache", "dce")


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
    merged = [a for a in sp.adapters.values() if a.merge]
    if merge or merged:
        where = f"adapter '{merged[0].name}' is declared with `merge`" if merged else "--merge folds every adapter"
        raise PeftcError(f"--adapter-ids: {where}, but a per-row choice needs every adapter live "
                         "(a merged adapter would act on every row)")
    if not sp.adapters:
        raise PeftcError("--adapter-ids: the spec declares no adapter")
    terms = [a for a in sp.adapters.values() if a.delta_scale is not None]
    if terms:
        comb = terms[0].extra_config["__combination"][0]
        raise PeftcError(f"--adapter-ids: combination '{comb}' (type exact) runs as one adapter per term, so ids "
                         "would not count the spec's adapters; combine imported LoRA checkpoints (one adapter), or "
                         "drop --adapter-ids")
    return dataclasses.replace(sp, active=None)


def with_adapter_ids(inputs: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """The example inputs plus `adapter_ids` ([batch] int64: -1, 0, 1, ... cycling over the adapters)."""
    if IDS in inputs:
        raise PeftcError(f"--adapter-ids: the model already has an input named '{IDS}'")
    batch = next((t.shape[0] for t in inputs.values() if t.dim() >= 1), 1)
    return {**inputs, IDS: torch.arange(batch, dtype=torch.int64) % (n + 1) - 1}


def compile_model(spec: str | Path | Spec, model: str | nn.Module, *, merge: bool = False, train: bool = False,
                  example_inputs: list[str] | dict[str, torch.Tensor] | None = None,
                  dump_after: str | None = None, dump: Callable[[str], None] = print, seed: int = 0,
                  observe: Callable[[str, fx.GraphModule], None] | None = None,
                  adapter_ids: bool = False) -> Compiled:
    if dump_after is not None and dump_after not in PASSES:
        raise PeftcError(f"--dump-after: unknown pass '{dump_after}'; passes are {', '.join(PASSES)}")
    sp = expand_combinations(load_spec(spec))   # combinations computed once, before the model loads
    check_spec(sp)
    if adapter_ids:
        sp = selectable_spec(sp, merge)
    with step("Loading model"):
        loaded = load_model(model, example_inputs)
        loaded.module = with_replication(sp, loaded.module)   # peft's layer_replication: a view, weights shared
    with step("Planning adapters"):
        plan = build_plan(sp, loaded.module, merge_all=merge, train=train, seed=seed)
    selectable = list(sp.adapters) if adapter_ids else None
    if adapter_ids:
        with_mts = [a for a, ap in plan.adapters.items() if ap.modules_to_save]
        if with_mts:
            raise PeftcError(f"--adapter-ids: adapter '{with_mts[0]}' has `save` modules (modules_to_save); "
                             "a per-row choice of those is not supported yet")
        loaded.inputs = with_adapter_ids(loaded.inputs, len(selectable))
    live = {lname: [sa.adapter for sa in sas if sa.active and not sa.merge] for lname, sas in plan.sites.items()}
    with step("Tracing (torch.export)"):
        gm = trace(loaded.module, loaded.inputs, extra=(IDS,) if adapter_ids else ())
    manifest = Manifest(base_model_name_or_path=base_model_name(loaded))
    rule_log: list[str] = []
    rule_hits: Counter = Counter()
    passes = {
        "strip": strip_bookkeeping(),
        "insert": insert_adapters(plan, manifest),
        "fold": fold_frozen(manifest),
        "factor": factor(library().checked().rules, rule_log, rule_hits),
        "stack": stack_adapters(selectable, live, rule_log, rule_hits),
        "rejoin": rejoin_dense(),
        "cse": eliminate_common_subexpressions(),
        "choose": choose_form(rule_log, rule_hits),
        "addbmm": fold_branch_add(rule_log, rule_hits),
        "fuse": fuse_shared_input(manifest),
        "cache": cache_weights(manifest),
        "dce": eliminate_dead_code(manifest),
    }
    for name in PASSES:
        with step(f"Pass {name}"):
            gm = passes[name](gm).graph_module
        if dump_after == name:
            dump(f"# graph after pass '{name}'\n{describe(gm)}")
        if observe is not None:   # `peftc graph`: the graph after each pass
            observe(name, gm)
    dense = dense_layers(gm, {n: layer.shape for n, layer in plan.layers.items()}, manifest.live)
    gm.peftc = manifest
    gm.peftc_inputs = dict(loaded.inputs)
    gm.peftc_layer_kinds = {name: layer.kind for name, layer in plan.layers.items()}
    # copy.deepcopy(gm) keeps these (a GraphModule's copy keeps only its graph and tensors otherwise)
    gm.meta.setdefault(_PRESERVED, {}).update({k: getattr(gm, k) for k in
                                               ("peftc", "peftc_inputs", "peftc_axes", "peftc_layer_kinds")})
    add_optional_inputs(gm)
    gm.train(train)
    return Compiled(gm, plan, loaded, rule_log=rule_log, rule_hits=rule_hits, dense_layers=dense)


def compile(spec: str | Path | Spec, model: str | nn.Module, *, merge: bool = False, train: bool = False,
            example_inputs: list[str] | dict[str, torch.Tensor] | None = None, seed: int = 0,
            adapter_ids: bool = False) -> fx.GraphModule:
    """Compile `spec` onto `model` and return the adapted fx GraphModule.

    `spec`: a .peft path, spec text, or Spec. `model`: an nn.Module or any MODEL reference the CLI takes.
    `merge`: fold every active adapter into the base weights. `train`: include adapter dropout (the module
    is returned in training mode; unmerged adapter tensors require grad either way, base weights never do).
    `adapter_ids`: the graph takes one more input, `adapter_ids` (int64, [batch]): row b runs the spec's
    `adapter_ids[b]`-th adapter (declaration order), -1 the base model.
    """
    return compile_model(spec, model, merge=merge, train=train, example_inputs=example_inputs, seed=seed,
                         adapter_ids=adapter_ids).gm
