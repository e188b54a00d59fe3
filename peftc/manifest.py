"""What a compiled GraphModule carries besides its graph: the adapters it was built with.

`gm.peftc` holds, per adapter, its method, options, matched layers and tensors (live nn.Parameters for
unmerged adapters, so training shows up; copies for merged ones), which `save_adapter` writes back
as a PEFT checkpoint, and the set of attribute paths that are live (never constant-folded).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


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


@dataclass
class Manifest:
    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    live: set[str] = field(default_factory=set)          # attribute paths of trainable adapter tensors
    pinned: set[str] = field(default_factory=set)        # frozen tensors of live adapters: never constant-folded
    registered: set[str] = field(default_factory=set)    # every attribute path peftc added
    base_model_name_or_path: str | None = None
