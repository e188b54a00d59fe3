"""Adapter sites beyond "one module, one weight", for the planner: a method's default targets (peft's per-model
norm names, the input embeddings), the parts a layer kind adapts with it (an nn.MultiheadAttention's out_proj,
whose weight the attention module's own code reads), the base biases peft's `bias` option trains (`all`, or
`<method>_only`: those of the adapted layers), and the modules tied to an adapted weight (an output head sharing
the embedding table), with the checkpoint keys peft writes for each.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from peftc.checkpoint import PREFIX, CheckpointTensors
from peftc.errors import PeftcError
from peftc.lang.methods import MethodDef
from peftc.layer_kinds import KINDS
from peftc.spec.model import AdapterSpec, TargetRule
from peftc.targeting import Layer

INPUT_EMBEDDINGS = "@input_embeddings"   # a default target: the model's get_input_embeddings() module


def default_targets(ad: AdapterSpec, method: MethodDef, model: nn.Module) -> list[TargetRule]:
    """The targets a method picks when the spec names none, as peft does: by the model's `model_type`
    (LN tuning's norm names), or the input embeddings (trainable tokens)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    names = method.default_targets.get(str(model_type), method.default_targets.get("*"))
    if names is None:
        known = ", ".join(sorted(k for k in method.default_targets if k != "*"))
        raise PeftcError(f"adapter '{ad.name}': {method.name} has no default targets for model type "
                         f"{model_type!r} (it has them for {known}); name them: `targets ...`")
    out = []
    for n in names:
        if n == INPUT_EMBEDDINGS:
            n = _input_embeddings(model) or "embed_tokens"
        out.append(TargetRule("name", n, ad.span))
    return out


def _input_embeddings(model: nn.Module) -> str | None:
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except Exception:  # noqa: BLE001 - some models raise NotImplementedError
        emb = None
    return next((n for n, m in model.named_modules() if m is emb), None) if emb is not None else None


def add_parts(matched: list[str], layers: dict[str, Layer]) -> list[str]:
    """`matched` plus the parts its layers' kinds adapt with them (an MHA's out_proj); each part's Layer learns
    which module reads its weight and its checkpoint path (peft nests it: `<mha>.base_layer.out_proj`)."""
    out = list(matched)
    for lname in matched:
        layer = layers.get(lname)
        for child, key in KINDS[layer.kind].parts if layer is not None else ():
            part = f"{lname}.{child}"
            if part in layers and part not in out:
                layers[part] = dataclasses.replace(layers[part], reader=lname, key=f"{lname}.{key}", part_of=lname,
                                                   dims={**layers[part].dims, "part": True})
                out.append(part)
    return out


def layer_key(layers: dict[str, Layer], lname: str) -> str:
    """A layer's path in a PEFT checkpoint."""
    layer = layers.get(lname)
    return layer.key if layer is not None and layer.key else lname


def saved_module(lname: str, key: str | None, saved_names: dict[str, str] | None = None) -> str:
    """Where a PEFT checkpoint keeps a layer's adapter tensors (their keys' prefix after PREFIX): the layer's
    checkpoint path where that is not its name (`Layer.key`: an MHA's out_proj part), else, for a targeted
    parameter, the module peft wraps (`saved_names`, plan.parameter_saved_names), else the layer's name. The
    one rule the loader (plan.py), the manifest and the checkpoint writer share."""
    return key or (saved_names or {}).get(lname, lname)


def peft_param_key(fqn: str, matched: list[str], layers: dict[str, Layer]) -> str:
    """The key peft saves a base parameter under: inside an adapted layer peft wraps the original module as
    `base_layer` (`q_proj.bias` -> `q_proj.base_layer.bias`); elsewhere the parameter's own name."""
    owner = max((l for l in matched if fqn.startswith(l + ".")), key=len, default=None)
    if owner is None:
        return fqn
    return f"{layer_key(layers, owner)}.base_layer.{fqn[len(owner) + 1:]}"


def trained_biases(mode: str, method: MethodDef, model: nn.Module, matched: list[str], layers: dict[str, Layer],
                   ckpt: CheckpointTensors | None, adapter: str, saved_modules: list[str],
                   extra: dict[str, torch.Tensor]) -> dict[str, tuple[str, torch.Tensor]]:
    """peft's `bias` option: base parameter FQN -> (full checkpoint key, trainable copy) for every bias of the model
    (`all`: every parameter with "bias" in its name) or of the adapted layers (`<method>_only`); loaded from the
    checkpoint, or copies of the model's own. As peft: `all` means every parameter named `bias` (not an MHA's
    in_proj_bias). A bias inside a module saved whole (`saved_modules`) trains with that module's copy; peft's
    file also holds it as `<module>.modules_to_save.bias` (written from the copy) and `<module>.original_module.bias`
    (the unused original: kept in `extra`, key -> tensor, and written back as it was)."""
    named = dict(model.named_modules())
    params = dict(model.named_parameters())
    if mode == "all":
        fqns = [n for n in params if n == "bias" or n.endswith(".bias")]
    else:
        fqns = [f"{l}.bias" for l in matched if isinstance(getattr(named.get(l), "bias", None), nn.Parameter)]
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for fqn in fqns:
        if fqn not in params:
            continue
        saved = next((m for m in saved_modules if fqn.startswith(m + ".")), None)
        if saved is not None:
            rest, base = fqn[len(saved) + 1:], params[fqn]
            for part in ("original_module", "modules_to_save"):
                key = f"{PREFIX}{saved}.{part}.{rest}"
                if ckpt is not None and key in ckpt:
                    t = ckpt.take(key, tuple(base.shape), f"bias of '{saved}' (saved whole by adapter '{adapter}')")
                    if part == "original_module":
                        extra[key] = t.to(base.dtype)
                elif part == "original_module":
                    extra[key] = base.detach().clone()
            continue
        key = PREFIX + peft_param_key(fqn, matched, layers)
        base = params[fqn]
        if ckpt is not None:
            t = ckpt.take(key, tuple(base.shape), f"bias of adapter '{adapter}' ({method.name}, bias = "
                          f"\"{mode}\")").to(base.dtype)
        else:
            t = base.detach().clone()
        out[fqn] = (key, t)
    return out


def check_bias_mode(mode: str, method: MethodDef) -> str | None:
    """A message when `bias = mode` is not one peft's config for this method takes."""
    if mode in ("none", "all", method.bias_only) or mode.endswith("_only"):   # peft takes any "<name>_only"
        return None
    return f"bias must be \"none\", \"all\" or \"{method.bias_only}\", not {mode!r}"


def tied_modules(model: nn.Module, layer: Layer) -> list[str]:
    """Other modules whose weight is this layer's weight (an output head tied to the embedding table)."""
    named = dict(model.named_modules())
    own = getattr(named.get(layer.name), KINDS[layer.kind].weight_name, None)
    if own is None:
        return []
    return [n for n, m in named.items() if n and n != layer.name and getattr(m, "weight", None) is own]
