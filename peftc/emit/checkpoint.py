"""Emit PEFT checkpoints from a compiled GraphModule (`save_adapter`): adapter_config.json +
adapter_model.safetensors per adapter, loadable by peft's PeftModel.from_pretrained and by
transformers' load_adapter. The only adapter (or the one named 'default') goes at the root of the
directory; other adapters go to a subfolder named after them, as peft does."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import fx

from peftc.atomic import atomic_dir
from peftc.checkpoint import PREFIX, SHARED_PREFIX, pattern_key_for, write_checkpoint
from peftc.errors import PeftcError, PeftcWarning
from peftc.layer_kinds import KINDS
from peftc.library import library
from peftc.manifest import AdapterRecord, Manifest, records_from_plan
from peftc.plan import Plan


def _config_value(decl: Any, value: Any) -> Any:
    for cfg_value, opt_value in decl.values.items():
        if opt_value == value:
            return cfg_value
    return value


def adapter_config(rec: AdapterRecord, manifest: Manifest, layer_kinds: dict[str, str] | None = None) -> dict:
    method = library().method(rec.method)
    cfg: dict[str, Any] = {"peft_type": method.peft_type, **method.fixed_config}
    layers = sorted(l for l in rec.tensors if l not in rec.parts)
    for decl in method.options.values():
        if decl.config_key is None:
            continue
        if decl.type == "targets":
            cfg[decl.config_key] = sorted(l for l in layers if rec.layer_options.get(l, {}).get(decl.name))
            continue
        value = rec.options.get(decl.name, decl.default)
        cfg[decl.config_key] = _config_value(decl, value)
        if decl.pattern_key:
            cfg[decl.pattern_key] = {pattern_key_for(l): rec.layer_options[l][decl.name] for l in layers
                                     if rec.layer_options.get(l, {}).get(decl.name, value) != value}
    if method.config_if:   # `config { ... } if COND`: entries that the adapter's options call for
        from peftc.lang.evaluate import evaluate
        env = {**{d.name: d.default for d in method.options.values()}, **rec.options}
        for entries, cond in method.config_if:
            if evaluate(cond, env):
                cfg.update(entries)
    for key, entries in rec.records.items():   # per-layer entries a method records (AdaLoRA's rank_pattern)
        cfg[key] = {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(entries.items())}
    kinds = layer_kinds or {}
    params = [l for l in layers if kinds.get(l) in KINDS and KINDS[kinds[l]].parameter]
    cfg["target_modules"] = [l for l in layers if l not in params]
    if params:   # bare nn.Parameters (stacked MoE experts): peft's target_parameters
        cfg["target_parameters"] = params
    if "bias" in method.config_fields:
        cfg.setdefault("bias", "none")
    if "layer_replication" in method.config_fields:
        cfg["layer_replication"] = [list(r) for r in rec.replicate] if rec.replicate else None
    if "fan_in_fan_out" in method.config_fields:
        cfg["fan_in_fan_out"] = any(kinds.get(l) in KINDS and KINDS[kinds[l]].peft_fan_in_fan_out for l in layers)
    if "modules_to_save" not in method.config_omits:
        cfg["modules_to_save"] = sorted(rec.modules_to_save) or None
    cfg["inference_mode"] = True
    cfg["task_type"] = rec.extra_config.get("task_type", cfg.get("task_type"))   # an import's, else the method's
    cfg["base_model_name_or_path"] = rec.extra_config.get("base_model_name_or_path", manifest.base_model_name_or_path)
    cfg["revision"] = rec.extra_config.get("revision")
    return cfg


def adapter_tensors(rec: AdapterRecord) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for layer, tensors in rec.tensors.items():
        for saved, t in tensors.items():
            out[f"{PREFIX}{rec.saved_module(layer)}.{saved}"] = t.detach()
            for other in rec.tied.get(layer, []):   # peft saves the tied module's copy too
                out[f"{PREFIX}{other}.{saved}"] = t.detach().clone()
    for mod, params in rec.modules_to_save.items():
        for pname, t in params.items():
            out[f"{PREFIX}{mod}.{pname}"] = t.detach()
            if rec.options.get("bias") == "all" and (pname == "bias" or pname.endswith(".bias")):
                # peft's bias = "all" saves the copy's bias twice
                out[f"{PREFIX}{mod}.modules_to_save.{pname}"] = t.detach().clone()
    out.update({k: t.detach() for k, t in rec.extra_tensors.items()})
    out.update({f"{SHARED_PREFIX}{k}": t.detach() for k, t in rec.shared.items()})
    for k in rec.shared_each_layer:   # peft keeps a copy under every layer too (a separate tensor in the file)
        for layer in rec.tensors:
            out[f"{PREFIX}{layer}.{k}"] = rec.shared[k].detach().clone()
    return out


def save_adapter(gm: fx.GraphModule, directory: str | Path, adapters: list[str] | None = None) -> list[Path]:
    """Write the adapters of a compiled GraphModule as PEFT checkpoints; returns the folders written."""
    manifest: Manifest | None = getattr(gm, "peftc", None)
    if manifest is None:
        raise PeftcError("this GraphModule was not compiled by peftc (no adapter manifest)")
    return write_adapters(manifest, directory, getattr(gm, "peftc_layer_kinds", {}), adapters)


def save_plan(plan: Plan, directory: str | Path, adapters: list[str] | None = None, *,
              base_model_name_or_path: str | None = None) -> list[Path]:
    """Write the adapters of a plan as PEFT checkpoints without tracing the model (`peftc save`): the same
    files `save_adapter` writes for a graph compiled from that plan."""
    manifest = Manifest(adapters=records_from_plan(plan), base_model_name_or_path=base_model_name_or_path)
    kinds = {name: layer.kind for name, layer in plan.layers.items()}
    return write_adapters(manifest, directory, kinds, adapters)


def write_adapters(manifest: Manifest, directory: str | Path, kinds: dict[str, str],
                   adapters: list[str] | None = None) -> list[Path]:
    """One checkpoint per adapter: the only one (or 'default') at the root, the others in subfolders."""
    names = adapters or list(manifest.adapters)
    unknown = [n for n in names if n not in manifest.adapters]
    if unknown:
        raise PeftcError(f"no adapter named {unknown[0]!r}; this graph has {', '.join(manifest.adapters)}")
    unsavable = [manifest.adapters[n].unsavable for n in names if manifest.adapters[n].unsavable]
    if unsavable and (adapters or len(unsavable) == len(names)):
        raise PeftcError(f"cannot save: {unsavable[0]}")
    for why in unsavable:   # saving every adapter: those that can be saved are, the others are named
        warnings.warn(f"not saved: {why}", PeftcWarning, stacklevel=2)
    names = [n for n in names if not manifest.adapters[n].unsavable]
    root = Path(directory)
    written = []
    with atomic_dir(root) as tmp:    # every checkpoint appears at once, or none does
        for name in names:
            rec = manifest.adapters[name]
            rel = Path() if len(names) == 1 or name == "default" else Path(name)
            write_checkpoint(tmp / rel, adapter_config(rec, manifest, kinds), adapter_tensors(rec), atomic=False)
            written.append(root / rel)
    return written
