"""The compile pipeline: spec + model -> plan -> traced graph -> passes -> adapted GraphModule.

    strip -> insert -> fold -> factor -> cse -> fuse -> dce

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

from peftc.errors import PeftcError
from peftc.library import Library, library
from peftc.manifest import Manifest
from peftc.models import LoadedModel, load_model
from peftc.optional_inputs import add_optional_inputs
from peftc.plan import Plan, build_plan, resolve_adapter
from peftc.progress import step
from peftc.replicate import with_replication
from peftc.rewrite.eliminate_common_subexpressions import eliminate_common_subexpressions
from peftc.rewrite.eliminate_dead_code import eliminate_dead_code
from peftc.rewrite.explain import dense_layers, describe
from peftc.rewrite.factor import factor
from peftc.rewrite.fold_frozen import fold_frozen
from peftc.rewrite.fuse_shared_input import fuse_shared_input
from peftc.rewrite.insert_adapters import insert_adapters
from peftc.rewrite.rejoin_dense import rejoin_dense
from peftc.rewrite.strip_bookkeeping import strip_bookkeeping
from peftc.spec.model import Spec
from peftc.spec.parse import parse_spec, read_spec
from peftc.trace import trace

_PRESERVED = "_user_preserved_attributes"   # torch.fx.graph_module._USER_PRESERVED_ATTRIBUTES_KEY
PASSES = ("strip", "insert", "fold", "factor", "rejoin", "cse", "fuse", "dce")


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
    for ad in spec.adapters.values():
        resolve_adapter(ad, spec, lib)


def compile_model(spec: str | Path | Spec, model: str | nn.Module, *, merge: bool = False, train: bool = False,
                  example_inputs: list[str] | dict[str, torch.Tensor] | None = None,
                  dump_after: str | None = None, dump: Callable[[str], None] = print, seed: int = 0) -> Compiled:
    if dump_after is not None and dump_after not in PASSES:
        raise PeftcError(f"--dump-after: unknown pass '{dump_after}'; passes are {', '.join(PASSES)}")
    sp = load_spec(spec)
    check_spec(sp)
    with step("Loading model"):
        loaded = load_model(model, example_inputs)
        loaded.module = with_replication(sp, loaded.module)   # peft's layer_replication: a view, weights shared
    with step("Planning adapters"):
        plan = build_plan(sp, loaded.module, merge_all=merge, train=train, seed=seed)
    with step("Tracing (torch.export)"):
        gm = trace(loaded.module, loaded.inputs)
    manifest = Manifest(base_model_name_or_path=base_model_name(loaded))
    rule_log: list[str] = []
    rule_hits: Counter = Counter()
    passes = {
        "strip": strip_bookkeeping(),
        "insert": insert_adapters(plan, manifest),
        "fold": fold_frozen(manifest),
        "factor": factor(library().checked().rules, rule_log, rule_hits),
        "rejoin": rejoin_dense(),
        "cse": eliminate_common_subexpressions(),
        "fuse": fuse_shared_input(manifest),
        "dce": eliminate_dead_code(manifest),
    }
    for name in PASSES:
        with step(f"Pass {name}"):
            gm = passes[name](gm).graph_module
        if dump_after == name:
            dump(f"# graph after pass '{name}'\n{describe(gm)}")
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
            example_inputs: list[str] | dict[str, torch.Tensor] | None = None, seed: int = 0) -> fx.GraphModule:
    """Compile `spec` onto `model` and return the adapted fx GraphModule.

    `spec`: a .peft path, spec text, or Spec. `model`: an nn.Module or any MODEL reference the CLI takes.
    `merge`: fold every active adapter into the base weights. `train`: include adapter dropout (the module
    is returned in training mode; unmerged adapter tensors require grad either way, base weights never do).
    """
    return compile_model(spec, model, merge=merge, train=train, example_inputs=example_inputs, seed=seed).gm
