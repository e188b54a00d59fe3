"""The typed spec: what a .peft file says, with source positions kept for error messages."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Span:
    file: str
    line: int = 0
    column: int = 0


@dataclass(frozen=True)
class TargetRule:
    """One target: 'name' (exact or dot-suffix), 'regex' (full match), 'pattern' (peft rank_pattern key),
    or 'all-linear'."""
    kind: str
    value: str
    span: Span | None = None


@dataclass
class PerPattern:
    option: str
    rule: TargetRule
    value: Any
    span: Span | None = None


@dataclass
class AdapterSpec:
    name: str
    span: Span
    method: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    option_spans: dict[str, Span] = field(default_factory=dict)
    import_dir: str | None = None
    targets: list[TargetRule] = field(default_factory=list)
    exclude: list[TargetRule] = field(default_factory=list)
    layers: list[int] | None = None
    layers_pattern: list[str] | None = None
    per_pattern: list[PerPattern] = field(default_factory=list)
    option_targets: dict[str, list[TargetRule]] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    weights: str | None = None
    merge: bool = False
    extra_config: dict[str, Any] = field(default_factory=dict)
    parameters: list[TargetRule] = field(default_factory=list)   # bare nn.Parameters (peft's target_parameters)
    replicate: list[tuple[int, int]] | None = None  # peft's layer_replication: [start, end) ranges of layers


@dataclass
class Spec:
    file: str
    source: str
    adapters: dict[str, AdapterSpec]
    active: list[str] | None = None
    active_spans: dict[str, Span] = field(default_factory=dict)

    def active_names(self) -> list[str]:
        return list(self.active) if self.active is not None else list(self.adapters)
