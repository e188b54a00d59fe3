"""Pass `fold`: constant-fold every inserted subgraph whose inputs are all frozen (merging).

Merged adapters' tensors are frozen, so their whole weight transform T(W, theta) is a constant: it is
computed once here, in fp32 (fp64 for fp64 models), and cast once to the weight's dtype. When the
folded value replaces a base weight that nothing else reads, it takes that parameter's place (same
name, same op), so a merged graph is the base graph with new weights. A non-finite result is an
error naming the layer. Live (trainable, unmerged) adapter tensors are never folded.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from peftc.errors import PeftcError
from peftc.manifest import Manifest
from peftc.ops import cast, dropin
from peftc.rewrite.graph_tools import BASE, TAG, constant_evaluator, get_path, has_path, set_path

_PASS_THROUGH = {cast}


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    if t.is_floating_point():
        return torch.float64 if t.dtype == torch.float64 else torch.float32
    return t.dtype


def fold_frozen(manifest: Manifest) -> Any:
    def run(gm: fx.GraphModule) -> PassResult:
        const: set[fx.Node] = set()
        adapted: set[fx.Node] = set()   # constant nodes that read an adapter tensor
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                if n.target not in manifest.live and n.target not in manifest.pinned:
                    const.add(n)
                    if n.target in manifest.registered:
                        adapted.add(n)
            elif n.op == "call_function" and TAG in n.meta and n.target is not dropin:
                if all(a in const for a in n.all_input_nodes):
                    const.add(n)
                    if any(a in adapted for a in n.all_input_nodes):
                        adapted.add(n)
        # fold only what involves a merged adapter: a mere view of a base weight (GPT-2's transposed
        # Conv1D weight) stays a view, rather than becoming a second copy of the weight
        roots = [n for n in adapted if n.op == "call_function" and any(u not in const for u in n.users)]
        if not roots:
            return PassResult(gm, False)
        value = constant_evaluator(gm, leaf=lambda t: t.to(_compute_dtype(t)), pass_through=_PASS_THROUGH)

        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        # a base tensor several folded roots start from (layers that share weights: peft's layer_replication)
        # keeps its value: each root gets a folded tensor of its own
        shared = Counter(id(get_path(gm, r.meta[BASE])) for r in roots if r.meta.get(BASE) is not None
                         and has_path(gm, r.meta[BASE]))
        folded = 0
        with torch.no_grad():
            for root in sorted(roots, key=order.get):
                v = value(root)
                if not isinstance(v, torch.Tensor):
                    continue
                layer = root.meta.get(TAG, "?")
                if v.is_floating_point() and not torch.isfinite(v).all():
                    raise PeftcError(f"merging into layer '{layer}' gives non-finite values (NaN/Inf); "
                                     "the adapter weights are broken or overflow this dtype")
                dtype = _target_dtype(gm, root, v)
                new_value = v.to(dtype)
                base = root.meta.get(BASE)
                path = None
                if base is not None and has_path(gm, base) and shared[id(get_path(gm, base))] == 1 \
                        and _only_reader(gm, base, const):
                    path = base
                    set_path(gm, path, nn.Parameter(new_value, requires_grad=False))
                else:
                    path = f"peftc_folded_{folded}"
                    while hasattr(gm, path):
                        folded += 1
                        path = f"peftc_folded_{folded}"
                    set_path(gm, path, new_value)
                    manifest.registered.add(path)
                folded += 1
                with gm.graph.inserting_before(root):
                    node = gm.graph.get_attr(path)
                node.meta[TAG] = layer
                for key in ("nn_module_stack", "stack_trace"):
                    if key in root.meta:
                        node.meta[key] = root.meta[key]
                root.replace_all_uses_with(node)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return PassResult(gm, True)

    return run


def _target_dtype(gm: fx.GraphModule, root: fx.Node, v: torch.Tensor) -> torch.dtype:
    base = root.meta.get(BASE)
    if base is not None:
        try:
            return get_path(gm, base).dtype
        except AttributeError:
            pass
    val = root.meta.get("peftc_val")
    if isinstance(val, torch.Tensor):
        return val.dtype
    return v.dtype


def _only_reader(gm: fx.GraphModule, base: str, const: set[fx.Node]) -> bool:
    """True if every graph read of the tensor at `base` is inside the folded (constant) region."""
    try:
        t = get_path(gm, base)
    except AttributeError:
        return False
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n not in const and get_path(gm, n.target) is t:
            return False
        if n.op == "get_attr" and n in const and get_path(gm, n.target) is t:
            if any(u not in const for u in n.users):
                return False
    return True
