"""Which layers of a model an adapter targets, with PEFT's matching semantics exactly.

* a name matches a module whose full name equals it, or ends with "." + name;
* a regex must match the whole module name (re.fullmatch);
* `all-linear`: every nn.Linear / Conv1D except the output layer (for a classification model with no
  output embeddings: its `score` / `classifier` head), expanded to full names;
* exclude uses the same rules; modules_to_save are never targeted;
* layers_to_transform / layers_pattern filter only the name-suffix branch (as in peft): the layer
  index is the first numbered segment after `<pattern>.` (or after any segment when no pattern).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftc.layer_kinds import kind_of, parameter_kind
from peftc.spec.model import AdapterSpec, TargetRule

SEQ_CLS_HEAD_NAMES = ("score", "classifier")


@dataclass
class Layer:
    """A layer an adapter can attach to."""
    name: str
    kind: str                 # linear | conv1d_hf | conv1d | conv2d | conv3d | embedding
    module_type: str
    weight: str               # FQN of the weight parameter
    bias: str | None
    dims: dict[str, Any] = field(default_factory=dict)
    shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32
    reader: str | None = None  # the module whose code reads the weight, when not this one (an MHA's out_proj)
    key: str | None = None     # the layer's path in a PEFT checkpoint, when not its name (peft nests parts)
    part_of: str | None = None # the targeted layer this one is adapted with (not a target itself)
    module: str = ""          # the module whose ops read the weight, when it is not `name` (a bare parameter)


def layer_kind(module: nn.Module) -> str | None:
    kind = kind_of(module)
    return kind.name if kind else None


def layers_of(model: nn.Module) -> dict[str, Layer]:
    out: dict[str, Layer] = {}
    for name, mod in model.named_modules():
        kind = kind_of(mod)
        if kind is None or not name:
            continue
        w = getattr(mod, kind.weight_name)
        has_bias = getattr(mod, kind.bias_name, None) is not None
        dims = dict(kind.dims(mod))
        dims.setdefault("groups", 1)
        dims["has_bias"] = has_bias
        dims["part"] = False
        out[name] = Layer(name, kind.name, type(mod).__name__, f"{name}.{kind.weight_name}",
                          f"{name}.{kind.bias_name}" if has_bias else None, dims, tuple(w.shape), w.dtype)
    return out


def parameter_layers(model: nn.Module, rules: list[TargetRule]) -> dict[str, Layer]:
    """The bare parameters `rules` (peft's target_parameters) select, as layers named by the parameter's full
    name: a name matches `<module>.<param>` exactly or as a dot-suffix (peft has no regex here). Parameters
    of the top-level module cannot be targeted (peft refuses them too)."""
    out: dict[str, Layer] = {}
    if not rules:
        return out
    for mname, mod in model.named_modules():
        if not mname:
            continue
        for pname, p in mod.named_parameters(recurse=False):
            key = f"{mname}.{pname}"
            if not any(_name_hit(r.value, key) for r in rules):
                continue
            found = parameter_kind(p, mod)
            if found is None:
                continue
            kind, dims = found
            out[key] = Layer(key, kind.name, type(mod).__name__, key, None, {**dims, "groups": 1, "has_bias": False},
                             tuple(p.shape), p.dtype, module=mname)
    return out


def output_layer_names(model: nn.Module, classifier_head: bool = True) -> set[str]:
    """The output head `all-linear` leaves out, as peft does: a Hugging Face model's output embeddings,
    else (for classification, `classifier_head`) its `score` / `classifier` module."""
    names: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = None
    if callable(get_out):
        try:
            out_emb = get_out()
        except Exception:  # noqa: BLE001 - some models raise NotImplementedError
            out_emb = None
    if out_emb is not None:
        for n, m in model.named_modules():
            if m is out_emb:
                names.add(n)
                break
    elif classifier_head and hasattr(model, "config"):
        for head in SEQ_CLS_HEAD_NAMES:
            mod = getattr(model, head, None)
            if isinstance(mod, nn.Module):
                for n, m in model.named_modules():
                    if m is mod:
                        names.add(n)
                break
    return names


def _name_hit(rule_value: str, key: str) -> bool:
    return key == rule_value or key.endswith("." + rule_value)


def layer_index(key: str, patterns: list[str] | None) -> int | None:
    """The layer index peft reads from a module name: the first numbered segment, or the number after one
    of `patterns` (layers_pattern)."""
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for p in patterns:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if match:
                break
    return int(match.group("idx")) if match is not None else None


def _layer_index_ok(key: str, layers: list[int] | None, patterns: list[str] | None) -> bool:
    if not layers:
        return True
    return layer_index(key, patterns) in layers


def rule_hits(rules: list[TargetRule], key: str, all_linear: set[str]) -> bool:
    """Does a list of exclude-style rules hit `key` (no layer filter)?"""
    for r in rules:
        if r.kind == "regex" and re.fullmatch(r.value, key):
            return True
        if r.kind == "name" and _name_hit(r.value, key):
            return True
        if r.kind == "all-linear" and key in all_linear:
            return True
    return False


def is_targeted(ad: AdapterSpec, key: str, all_linear: set[str]) -> bool:
    if ad.exclude and rule_hits(ad.exclude, key, all_linear):
        return False
    if any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in ad.modules_to_save):
        return False
    for r in ad.targets:
        if r.kind == "regex" and re.fullmatch(r.value, key):
            return True
        if r.kind == "all-linear" and key in all_linear:
            return True  # an exact full-name hit: peft applies no layer filter here
    names = [r.value for r in ad.targets if r.kind == "name"]
    if key in names:
        return True
    if any(key.endswith("." + n) for n in names):
        return _layer_index_ok(key, ad.layers, ad.layers_pattern)
    return False


def pattern_value(patterns: list[tuple[str, Any]], key: str) -> tuple[bool, Any]:
    """peft's rank_pattern / alpha_pattern lookup: the first key with re.match(rf"(.*\\.)?({k})$") wins."""
    for k, v in patterns:
        if re.match(rf"(.*\.)?({k})$", key):
            return True, v
    return False, None


def option_targets_hit(rules: list[TargetRule], key: str) -> bool:
    """Targets-typed method options (IA3 feedforward_modules): regex fullmatch, or the name ends with it."""
    for r in rules:
        if r.kind == "regex" and re.fullmatch(r.value, key):
            return True
        if r.kind == "name" and key.endswith(r.value):
            return True
    return False
