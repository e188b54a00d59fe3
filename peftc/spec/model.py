"""The typed spec: what a .peft file says, with source positions kept for error messages."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
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
class Combination:
    """`combine(0.7 * a, 0.3 * b, type = "ties", density = 0.5)`: weighted source adapters and the options of
    the combination (peft's add_weighted_adapter types, or `exact`)."""
    terms: list[tuple[float, str, Span]]              # (weight, source adapter, where it is written)
    options: dict[str, Any] = field(default_factory=dict)


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
    combine: Combination | None = None        # a combination of other adapters (expanded before planning)
    # set by the expansion of a combination, never written in a spec:
    delta_scale: float | None = None           # W' = W + delta_scale * delta (an `exact` combination's term)
    seed_index: int | None = None              # which adapter's seed fresh tensors are drawn with (its position)
    preloaded: tuple[dict[str, Any], dict[str, Any], str] | None = None  # (config, tensors, label) in memory
    parameters: list[TargetRule] = field(default_factory=list)   # bare nn.Parameters (peft's target_parameters)
    replicate: list[tuple[int, int]] | None = None  # peft's layer_replication: [start, end) ranges of layers


@dataclass
class Spec:
    file: str
    source: str
    adapters: dict[str, AdapterSpec]
    active: list[str] | None = None
    active_spans: dict[str, Span] = field(default_factory=dict)

    def resolve_path(self, p: str) -> str:
        """A path written in the spec: relative to the spec file (as given for spec text)."""
        path = Path(p)
        if not path.is_absolute() and self.file and not self.file.startswith("<"):
            path = Path(self.file).resolve().parent / path
        return str(path)

    def active_names(self) -> list[str]:
        """The `active` list, or else every adapter that no combination consumes."""
        if self.active is not None:
            return list(self.active)
        used = {src for ad in self.adapters.values() if ad.combine for _, src, _ in ad.combine.terms}
        return [n for n in self.adapters if n not in used]
