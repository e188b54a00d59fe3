"""Step `freeze` (inference compiles only): compute once the values that read only stored tensors, depend on a
trainable adapter tensor, and carry no gradient to it (they go through `detach`).

Such a value is the same on every forward while the adapter tensors do not change, and its gradient is zero, so
replacing it by a stored constant changes neither outputs nor gradients at the compile-time values. DoRA's weight
norm ||W0 + s B A|| is one (a full-size weight built and reduced on every forward otherwise); no method is named
here: any `detach(f(stored tensors))` of a method's weight expression qualifies.

Each constant is a buffer `peftc_frozen_N`, computed in the graph's own dtype (so outputs equal the live form's
bit for bit). `manifest.frozen[path]` records the tensors it derives from (`sources`, attribute paths) and a
small fx graph that recomputes it from them. When a source tensor changes in place (an optimizer step on an
inference compile, `load_state_dict`, swapping adapter weights), its version counter moves, and when it is
replaced by another tensor its identity changes: an eager forward notices (a forward pre-hook compares both) and
recomputes the constants first. Code that runs
under torch.compile / torch.export (no hook runs there) or replaces tensors without an in-place op calls
`refresh_frozen(gm)` (every constant, or those that derive from the given paths). A training compile
(`train=True`) keeps the live form: nothing to refresh.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from peftc.manifest import Manifest
from peftc.ops import dropin
from peftc.rewrite.graph_tools import TAG, constant_evaluator, get_path, set_path

PREFIX = "peftc_frozen_"


@dataclass
class FrozenConstant:
    """A stored constant of an inference compile: `recipe(*tensors at sources)` recomputes it."""
    sources: tuple[str, ...]   # attribute paths of the stored tensors it reads (adapter tensors and base weights)
    adapters: tuple[str, ...]  # attribute paths among `sources` that are adapter tensors (live or pinned)
    recipe: fx.GraphModule
    layer: str
    versions: list[int]        # the sources' version counters when last computed


def freeze_detached(manifest: Manifest) -> Any:
    def run(gm: fx.GraphModule) -> PassResult:
        trainable = manifest.live
        const: set[fx.Node] = set()     # input-independent nodes (stored tensors and what is computed from them)
        grad: set[fx.Node] = set()      # nodes a gradient to a trainable tensor flows through
        reads: dict[fx.Node, bool] = {}  # whether the node depends on a trainable tensor
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                const.add(n)
                reads[n] = n.target in trainable
                if n.target in trainable:
                    grad.add(n)
            elif n.op == "call_function" and n.target is not dropin and n.all_input_nodes \
                    and all(a in const for a in n.all_input_nodes):
                const.add(n)
                reads[n] = any(reads[a] for a in n.all_input_nodes)
                if n.target is not torch.ops.aten.detach.default and any(a in grad for a in n.all_input_nodes):
                    grad.add(n)
        frozen = {n for n in const if n.op == "call_function" and reads[n] and n not in grad}
        roots = [n for n in frozen if any(u not in frozen for u in n.users)]
        if not roots:
            return PassResult(gm, False)
        value = constant_evaluator(gm)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        index = 0
        with torch.no_grad():
            for root in sorted(roots, key=order.get):
                v = value(root)
                if not isinstance(v, torch.Tensor):
                    continue
                while hasattr(gm, f"{PREFIX}{index}"):
                    index += 1
                path = f"{PREFIX}{index}"
                set_path(gm, path, v.detach().clone())
                manifest.registered.add(path)
                sources, recipe = _recipe(gm, root)
                adapters = tuple(p for p in sources if p in manifest.live or p in manifest.pinned
                                 or p in manifest.registered)
                versions = [get_path(gm, p)._version for p in sources]
                manifest.frozen[path] = FrozenConstant(sources, adapters, recipe, root.meta.get(TAG, "?"), versions)
                with gm.graph.inserting_before(root):
                    node = gm.graph.get_attr(path)
                node.meta.update({k: root.meta[k] for k in (TAG, "nn_module_stack", "stack_trace") if k in root.meta})
                root.replace_all_uses_with(node)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        _install_hook(gm)
        return PassResult(gm, True)

    return run


def _recipe(gm: fx.GraphModule, root: fx.Node) -> tuple[tuple[str, ...], fx.GraphModule]:
    """The subexpression under `root` as a standalone graph whose inputs are the stored tensors it reads."""
    needed: list[fx.Node] = []
    seen: set[fx.Node] = set()

    def visit(n: fx.Node) -> None:
        if n in seen:
            return
        seen.add(n)
        for a in n.all_input_nodes:
            visit(a)
        needed.append(n)

    visit(root)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    sources: list[str] = []
    for n in needed:
        if n.op == "get_attr":
            env[n] = graph.placeholder(f"t{len(sources)}")
            sources.append(n.target)
        else:
            env[n] = graph.node_copy(n, lambda x: env[x])
    graph.output(env[root])
    return tuple(sources), fx.GraphModule(torch.nn.Module(), graph)


def refresh_frozen(gm: fx.GraphModule, changed: Iterable[str] | None = None, stale_only: bool = False) -> list[str]:
    """Recompute the stored constants of an inference compile from the current tensors, in place: all of them,
    those that derive from an attribute path in `changed`, or (`stale_only`) those whose sources' version
    counters moved. Returns the paths recomputed."""
    manifest: Manifest | None = getattr(gm, "peftc", None)
    if manifest is None:
        return []
    changed_set = None if changed is None else set(changed)
    done = []
    with torch.no_grad():
        for path, fc in manifest.frozen.items():
            if changed_set is not None and not changed_set.intersection(fc.sources):
                continue
            tensors = [get_path(gm, p) for p in fc.sources]
            versions = [t._version for t in tensors]
            if stale_only and versions == fc.versions:
                continue
            target = get_path(gm, path)
            target.copy_(fc.recipe(*tensors).to(target.dtype))
            fc.versions[:] = versions
            done.append(path)
    return done


def _slot(gm: fx.GraphModule, path: str) -> tuple[dict, str]:
    """The dict that holds the tensor at `path` (its module's parameters or buffers) and its key there."""
    *parents, leaf = path.split(".")
    mod = get_path(gm, ".".join(parents)) if parents else gm
    return (mod._parameters if leaf in mod._parameters else mod._buffers), leaf


def _refresh_stale(gm: fx.GraphModule, args: Any, kwargs: Any = None) -> None:
    """Forward pre-hook: recompute the constants when a source changed in place (its version counter moved) or
    was replaced by another tensor (eager runs only). The sources' slots are looked up once per module (a dict
    read per source and forward after that)."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return
    manifest: Manifest | None = getattr(gm, "peftc", None)
    if manifest is None or not manifest.frozen:
        return
    cache = gm.__dict__.get("_peftc_frozen_slots")
    if cache is None or len(cache) != len(manifest.frozen):
        cache = []
        for fc in manifest.frozen.values():
            where = [_slot(gm, p) for p in fc.sources]
            cache.append((fc, where, [id(d.get(key)) for d, key in where]))
        gm.__dict__["_peftc_frozen_slots"] = cache
    for fc, where, ids in cache:
        current = [d.get(key) for d, key in where]
        if [id(t) for t in current] != ids or [t._version for t in current] != fc.versions:
            refresh_frozen(gm)
            for _, where2, ids2 in cache:
                ids2[:] = [id(d.get(key)) for d, key in where2]
            return


def _install_hook(gm: fx.GraphModule) -> None:
    """The pre-hook on `gm`, and on its deep copies (a GraphModule's copy keeps no forward hooks)."""
    gm.register_forward_pre_hook(_refresh_stale)
    if _install_hook not in getattr(gm, "_deepcopy_hooks", []):
        gm._register_deepcopy_hook(_install_hook)
