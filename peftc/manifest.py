"""What a compiled GraphModule carries besides its graph: the adapters it was built with.

`gm.peftc` holds, per adapter, its method, options, matched layers and tensors (live nn.Parameters for
unmerged adapters, so training shows up; copies for merged ones), which `save_adapter` writes back
as a PEFT checkpoint, and the set of attribute paths that are live (never constant-folded).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from peftc.plan import AdapterPlan, Plan


@dataclass
class AdapterRecord:
    name: str
    method: str
    options: dict[str, Any]                       # spec-level option values (before per-layer overrides)
    layer_options: dict[str, dict[str, Any]]      # layer -> option values that differ per layer (r, alpha, ...)
    tensors: dict[str, dict[str, torch.Tensor]]   # layer -> saved key ("lora_A.weight") -> tensor
    modules_to_save: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # module -> param -> tensor
    merged: bool = False
    active: bool = True
    extra_config: dict[str, Any] = field(default_factory=dict)  # config keys carried over from an import
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # saved base weights, written back as is
    shared: dict[str, torch.Tensor] = field(default_factory=dict)  # saved key -> adapter-level tensor
    shared_each_layer: set[str] = field(default_factory=set)       # shared keys also written under every layer
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # config key -> {"<layer>.<suffix>": value}
    unsavable: str | None = None     # why no PEFT checkpoint can hold this adapter (a term of a combination)
    keys: dict[str, str] = field(default_factory=dict)        # layer -> its checkpoint path, where not its name
    parts: set[str] = field(default_factory=set)              # layers adapted as parts of another (not targets)
    tied: dict[str, list[str]] = field(default_factory=dict)  # layer -> tied modules peft saves a copy under
    saved_names: dict[str, str] = field(default_factory=dict)  # layer -> peft's module name for its tensors
    replicate: list[tuple[int, int]] | None = None  # the model's layer replication (peft's layer_replication)

    def saved_module(self, layer: str) -> str:
        """Where the PEFT checkpoint keeps this layer's tensors (`keys`, else `saved_names`, else its name)."""
        from peftc.sites import saved_module
        return saved_module(layer, self.keys.get(layer), self.saved_names)


@dataclass
class Manifest:
    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    live: set[str] = field(default_factory=set)          # attribute paths of trainable adapter tensors
    pinned: set[str] = field(default_factory=set)        # frozen tensors of live adapters: never constant-folded
    registered: set[str] = field(default_factory=set)    # every attribute path peftc added
    base_model_name_or_path: str | None = None
    # constants of an inference compile computed from adapter tensors (rewrite/freeze_detached.py): path ->
    # FrozenConstant(sources, adapters, recipe, layer); recompute them with refresh_frozen(gm) when those change
    frozen: dict[str, Any] = field(default_factory=dict)


def adapter_record(name: str, ap: AdapterPlan) -> AdapterRecord:
    """An adapter's record without its layers' tensors (the insert pass adds them as graph parameters); its
    shared tensors are the plan's (the insert pass replaces them by the graph's)."""
    rec = AdapterRecord(name, ap.method.name, dict(ap.options), {}, {}, merged=ap.merge, active=ap.active,
                        extra_config={k: v for k, v in ap.spec.extra_config.items() if not k.startswith("__")},
                        extra_tensors={**ap.base_weights, **{key: t for key, t in ap.biases.values()}},
                        tied={l: list(t) for l, t in ap.tied.items()}, saved_names=dict(ap.saved_names),
                        replicate=ap.replicate)
    rec.unsavable = unsavable(name, ap)
    for decl in ap.shared_decls:
        if decl.saved is not None:
            rec.shared[decl.saved] = ap.shared[decl.name]
            if decl.each_layer:
                rec.shared_each_layer.add(decl.saved)
    return rec


def unsavable(name: str, ap: AdapterPlan) -> str | None:
    """Why no PEFT checkpoint can hold this planned adapter, or None."""
    if ap.spec.delta_scale is None:
        return None
    comb, _ = ap.spec.extra_config["__combination"]
    return (f"adapter '{name}' is a term of the exact combination '{comb}' (its delta scaled by "
            f"{ap.spec.delta_scale:g}); no PEFT checkpoint holds a weighted sum of adapters of different methods "
            "or of fresh ones: save the sources, or combine imported LoRA checkpoints")


def add_layer(rec: AdapterRecord, layer: str, sa: Any, tensors: dict[str, torch.Tensor], info: Any = None) -> None:
    """A layer's part of an adapter's record: its option values, the config entries its method records,
    and its saved tensors (`tensors`: param name -> the tensor to save); `info`, the planned Layer, says
    where peft keeps a part (an MHA's out_proj)."""
    if info is not None and info.key:
        rec.keys[layer] = info.key
    if info is not None and info.part_of:
        rec.parts.add(layer)
    rec.layer_options[layer] = dict(sa.layer_options)
    for (key, suffix), value in sa.program.records.items():
        rec.records.setdefault(key, {})[f"{layer}.{suffix}"] = value
    rec.tensors[layer] = {decl.saved: tensors[decl.name] for decl in sa.program.params if decl.saved is not None}


def records_from_plan(plan: Plan) -> dict[str, AdapterRecord]:
    """Every adapter's record with the plan's own tensors: what `peftc save` writes without tracing. It
    holds what the insert pass registers, so a checkpoint saved either way is the same."""
    records = {name: adapter_record(name, ap) for name, ap in plan.adapters.items()}
    for lname, sas in plan.sites.items():
        for sa in sas:
            add_layer(records[sa.adapter], lname, sa, sa.tensors, plan.layers.get(lname))
    for name, ap in plan.adapters.items():
        records[name].modules_to_save = {mod: dict(params) for mod, params in ap.modules_to_save.items()}
    return records
