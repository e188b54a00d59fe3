"""Helpers of the insert pass for sites beyond one layer's own weight: why a targeted layer cannot be adapted
(its weight is read by an enclosing module's code, only by other modules, or never), and the base biases that
peft's `bias` option trains (a trainable copy put in place of the model's own bias, read by every op that
read it, and saved under peft's key).
"""
from __future__ import annotations

from typing import Any

from torch import fx, nn

from peftc.errors import PeftcError
from peftc.manifest import Manifest
from peftc.rewrite.graph_tools import get_path, has_path, set_path


class NotAdaptable(Exception):
    """A targeted layer whose weight no op of its own reads (the message says who does)."""


def _stack_entry(node: fx.Node) -> tuple[str, Any] | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    return (path.split("@")[0] if isinstance(path, str) else None), cls


def _type_name(cls: Any) -> str:
    if isinstance(cls, str):
        return cls.rsplit(".", 1)[-1].rstrip("'>")
    return getattr(cls, "__name__", str(cls))


def why_not_read(gm: fx.GraphModule, layer: Any) -> str:
    """Why no op of `layer` reads its weight in the traced forward: which module's code does, if any."""
    if layer.weight is None or not has_path(gm, layer.weight):
        return f"its weight {layer.weight} is not a parameter of the traced model"
    t = get_path(gm, layer.weight)
    readers: dict[str, str] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr" and get_path(gm, n.target) is t:
            for u in n.users:
                entry = _stack_entry(u)
                if entry is not None and entry[0] is not None:
                    readers.setdefault(entry[0], _type_name(entry[1]))
    enclosing = sorted((m for m in readers if layer.name.startswith(m + ".")), key=len, reverse=True)
    if enclosing:
        m = enclosing[0]
        return (f"the forward of its enclosing module '{m}' ({readers[m]}) reads '{layer.weight}' itself, without "
                f"calling '{layer.name}', so an adapter there would change nothing; target '{m}' if its kind is "
                "supported (LoRA adapts an nn.MultiheadAttention's in_proj_weight and out_proj, as peft does)")
    if readers:
        return (f"its weight is read only by other modules ({', '.join(sorted(readers))}), never by "
                f"'{layer.name}' itself (a tied weight?)")
    return "it is never called in the model's traced forward, so an adapter there would change nothing"


def not_adaptable_error(plan: Any, lname: str, sas: list, why: str) -> PeftcError:
    """The error for a targeted layer peftc cannot adapt, at the adapter's `targets` clause."""
    names = ", ".join(f"'{sa.adapter}'" for sa in sas if sa.active)
    ad = plan.adapters[next(sa.adapter for sa in sas if sa.active)].spec
    span = ad.targets[0].span if ad.targets and ad.targets[0].span is not None else ad.span
    msg = f"adapter {names}: cannot adapt '{lname}' ({plan.layers[lname].module_type}): {why}"
    if span is None or not span.file:
        return PeftcError(msg)
    return PeftcError(msg, file=span.file, line=span.line or None, column=span.column or None)


def train_biases(gm: fx.GraphModule, plan: Any, manifest: Manifest) -> bool:
    """peft's `bias` = all / <method>_only: each trained bias replaces the model's own (every name it has in
    the graph module), trainable while its adapter is live; the adapter's record saves it under peft's key."""
    modified = False
    for name, ap in plan.adapters.items():
        rec = manifest.adapters[name]
        for fqn, (key, t) in ap.biases.items():
            if not ap.active or not has_path(gm, fqn):
                continue
            live = not ap.merge
            old = get_path(gm, fqn)
            new = nn.Parameter(t.clone(), requires_grad=live)
            for pname, p in list(gm.named_parameters(remove_duplicate=False)):
                if p is old:
                    set_path(gm, pname, new)
                    if live:
                        manifest.live.add(pname)
            rec.extra_tensors[key] = new
            modified = True
    return modified
