"""Human-readable reports: `peftc check` (what a spec matches, parameter counts) and `peftc inspect`."""
from __future__ import annotations

import math

from torch import nn

from peftc.plan import Plan
from peftc.targeting import layers_of


def _compact(names: list[str], limit: int = 6) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f", ... (+{len(names) - limit} more)"


def check_report(plan: Plan, model: nn.Module) -> str:
    base_total = sum(p.numel() for p in model.parameters())
    lines = []
    for name, ap in plan.adapters.items():
        n_adapter = 0
        for sas in plan.sites.values():   # its layers, and the layers its companions run on (token rows)
            for sa in sas:
                if sa.adapter == name:
                    n_adapter += sum(t.numel() for t in sa.tensors.values())
        n_adapter += sum(t.numel() for _, t in ap.biases.values())   # bias = "all" / "<method>_only"
        n_mts = sum(t.numel() for mod in ap.modules_to_save.values() for t in mod.values())
        state = []
        state.append("active" if ap.active else "inactive")
        if ap.merge:
            state.append("merged")
        opts = ", ".join(f"{k}={v!r}" for k, v in ap.options.items() if v is not None)   # unset list options: none
        lines.append(f"adapter {name}: {ap.method.name}({opts})  [{', '.join(state)}; weights: {ap.source}]")
        kinds: dict[str, int] = {}
        for lname in ap.layers:
            k = plan.layers[lname].kind
            kinds[k] = kinds.get(k, 0) + 1
        kind_s = ", ".join(f"{v} {k}" for k, v in sorted(kinds.items()))
        lines.append(f"  matches {len(ap.layers)} layers ({kind_s}): {_compact(ap.layers)}")
        if ap.modules_to_save:
            lines.append(f"  modules_to_save: {', '.join(ap.modules_to_save)} ({n_mts:,} params)")
        lines.append(f"  adapter params: {n_adapter + n_mts:,}")
    trainable = plan.trainable_count()
    total = base_total + trainable
    pct = 100.0 * trainable / total if total else 0.0
    lines.append(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}")
    return "\n".join(lines)


def inspect_report(model: nn.Module) -> str:
    layers = layers_of(model)
    rows = [("layer", "kind", "weight shape", "params")]
    for name, l in layers.items():
        rows.append((name, l.kind, "x".join(map(str, l.shape)), f"{math.prod(l.shape):,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    kinds: dict[str, int] = {}
    for l in layers.values():
        kinds[l.kind] = kinds.get(l.kind, 0) + 1
    total = sum(p.numel() for p in model.parameters())
    out.append(f"{len(layers)} targetable layers ({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))}); "
               f"{total:,} parameters in all")
    return "\n".join(out)
