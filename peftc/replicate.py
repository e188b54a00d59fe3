"""peft's `layer_replication`: a model whose decoder layers are repeated by ranges, the copies sharing the
base weights (each copy gets its own adapter). peft does it in place (`replicate_layers`); peftc builds a view
of the model instead (the containers down to the layer list are copied, the layers cloned around their
shared parameters), so the caller's model is never changed.
"""
from __future__ import annotations

import copy
from typing import Any

from torch import nn

from peftc.errors import PeftcError


def _layer_list(model: nn.Module) -> list[str]:
    """The attribute path to the repeated layer list, found as peft finds it: below any chain of `.model`
    (and `.bert`), a `layers` (Llama-style), `encoder.layer` (BERT-style) or `h` (Falcon-style) ModuleList."""
    path: list[str] = []
    m = model
    while hasattr(m, "model") and isinstance(m.model, nn.Module):
        path.append("model")
        m = m.model
    if isinstance(getattr(m, "bert", None), nn.Module):
        path.append("bert")
        m = m.bert
    for tail in (["layers"], ["encoder", "layer"], ["h"]):
        t = m
        for a in tail:
            t = getattr(t, a, None)
        if isinstance(t, nn.ModuleList):
            return path + tail
    raise PeftcError("layer replication needs a model with its layers at [model.]layers, encoder.layer or h "
                     "(Llama-, BERT- or Falcon-style), as peft does")


def _view(m: nn.Module) -> nn.Module:
    """A shallow copy of a module with its own table of submodules (so a child can be replaced in the copy)."""
    c = copy.copy(m)
    c._modules = dict(m._modules)
    return c


def _clone(layer: nn.Module) -> nn.Module:
    """A deep copy of a layer that shares every parameter and buffer with it."""
    memo: dict[int, Any] = {id(t): t for t in list(layer.parameters()) + list(layer.buffers())}
    return copy.deepcopy(layer, memo)


def replicate_layers(model: nn.Module, ranges: list[tuple[int, int]]) -> nn.Module:
    """A view of `model` whose layer list is layers[start:end] for each (start, end) in turn, each entry a clone
    sharing the original layer's weights; `num_hidden_layers` of the config follows (as in peft)."""
    path = _layer_list(model)
    layers = model.get_submodule(".".join(path))
    n = len(layers)
    for start, end in ranges:
        if not (0 <= start < end <= n):
            raise PeftcError(f"layer replication range [{start}, {end}] is outside the model's {n} layers "
                             "(each range is [start, end) with 0 <= start < end <= the number of layers)")
    new = []
    for start, end in ranges:
        for i in range(start, end):
            clone = _clone(layers[i])
            for sub in clone.modules():   # as peft: the attention cache index follows the new position
                if hasattr(sub, "layer_idx"):
                    sub.layer_idx = len(new)
            new.append(clone)
    root = _view(model)
    config = getattr(model, "config", None)
    new_config = copy.deepcopy(config) if config is not None and hasattr(config, "num_hidden_layers") else None
    if new_config is not None:
        new_config.num_hidden_layers = len(new)
    node = root
    for attr in path[:-1]:
        child = _view(node._modules[attr])
        node._modules[attr] = child
        node = child
    node._modules[path[-1]] = nn.ModuleList(new)
    if new_config is not None:   # every module on the path that shares the config sees the new one
        for m in [root] + [root.get_submodule(".".join(path[:i + 1])) for i in range(len(path) - 1)]:
            if getattr(m, "config", None) is config:
                m.__dict__["config"] = new_config
    return root


def replication_of(spec: Any, lib: Any = None) -> list[tuple[int, int]] | None:
    """The layer map a spec asks for (a `replicate` clause, or an imported checkpoint's layer_replication), checked:
    only methods whose peft config has the field take it, and at most one adapter may declare it (peft replicates
    the layers again for every adapter that does)."""
    from peftc.library import library
    from peftc.plan import _err, resolve_adapter
    lib = lib or library().checked()
    found: list[tuple[str, list[tuple[int, int]], Any]] = []
    for raw in spec.adapters.values():
        ad, method, _ = resolve_adapter(raw, spec, lib)
        if ad.replicate is None:
            continue
        span = raw.option_spans.get("replicate") or raw.option_spans.get("import") or raw.span
        if "layer_replication" not in method.config_fields:
            raise _err(f"adapter '{ad.name}': {method.name} does not replicate layers (peft's layer_replication "
                       "belongs to LoRA's config)", span, spec)
        found.append((ad.name, [tuple(r) for r in ad.replicate], span))
    if len(found) > 1:
        raise _err(f"adapters '{found[0][0]}' and '{found[1][0]}' both replicate layers; declare it on one adapter "
                   "(peft would replicate the layers again for each)", found[1][2], spec)
    return found[0][1] if found else None


def with_replication(spec: Any, model: nn.Module) -> nn.Module:
    """The model the spec's adapters go on: `model` itself, or its view with replicated layers."""
    ranges = replication_of(spec)
    return model if ranges is None else replicate_layers(model, ranges)
