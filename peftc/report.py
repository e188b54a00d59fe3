"""Reports of `peftc check` (what a spec matches, parameter counts) and `peftc inspect` (a model's targetable
layers): as data (`check_data`, `inspect_data`: what `--json` prints) and as text rendered from that data."""
from __future__ import annotations

import math
from typing import Any

from torch import nn

from peftc.plan import Plan
from peftc.targeting import layers_of


def _compact(names: list[str], limit: int = 6) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f", ... (+{len(names) - limit} more)"


def _plain(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)


def check_data(plan: Plan, model: nn.Module) -> dict[str, Any]:
    """Every adapter of the plan (method, options, state, layers, parameter counts) and the totals."""
    base_total = sum(p.numel() for p in model.parameters())
    adapters = []
    for name, ap in plan.adapters.items():
        n_adapter = 0
        for sas in plan.sites.values():   # its layers, and the layers its companions run on (token rows)
            for sa in sas:
                if sa.adapter == name:
                    n_adapter += sum(t.numel() for t in sa.tensors.values())
        n_adapter += sum(t.numel() for _, t in ap.biases.values())   # bias = "all" / "<method>_only"
        n_mts = sum(t.numel() for mod in ap.modules_to_save.values() for t in mod.values())
        kinds: dict[str, int] = {}
        for lname in ap.layers:
            k = plan.layers[lname].kind
            kinds[k] = kinds.get(k, 0) + 1
        comb = None
        if ap.spec.delta_scale is not None:
            comb = {"name": ap.spec.extra_config["__combination"][0], "scale": ap.spec.delta_scale}
        adapters.append({
            "name": name, "method": ap.method.name,
            "options": _plain({k: v for k, v in ap.options.items() if v is not None}), "active": ap.active,
            "merged": ap.merge, "weights": ap.source, "combination": comb, "layers": list(ap.layers),
            "layer_kinds": dict(sorted(kinds.items())), "modules_to_save": list(ap.modules_to_save),
            "modules_to_save_params": n_mts, "params": n_adapter + n_mts})
    trainable = plan.trainable_count()
    total = base_total + trainable
    return {"adapters": adapters, "trainable_params": trainable, "all_params": total,
            "trainable_percent": 100.0 * trainable / total if total else 0.0, "warnings": list(plan.warnings)}


def check_report(plan: Plan, model: nn.Module) -> str:
    data = check_data(plan, model)
    lines = []
    for ad in data["adapters"]:
        state = ["active" if ad["active"] else "inactive"] + (["merged"] if ad["merged"] else [])
        if ad["combination"] is not None:
            state.append(f"{ad['combination']['scale']:g} x its delta in combination '{ad['combination']['name']}'")
        opts = ", ".join(f"{k}={v!r}" for k, v in ad["options"].items())
        lines.append(f"adapter {ad['name']}: {ad['method']}({opts})  [{', '.join(state)}; weights: {ad['weights']}]")
        kind_s = ", ".join(f"{v} {k}" for k, v in ad["layer_kinds"].items())
        lines.append(f"  matches {len(ad['layers'])} layers ({kind_s}): {_compact(ad['layers'])}")
        if ad["modules_to_save"]:
            lines.append(f"  modules_to_save: {', '.join(ad['modules_to_save'])} "
                         f"({ad['modules_to_save_params']:,} params)")
        lines.append(f"  adapter params: {ad['params']:,}")
    lines.append(f"trainable params: {data['trainable_params']:,} || all params: {data['all_params']:,} || "
                 f"trainable%: {data['trainable_percent']:.4f}")
    return "\n".join(lines)


def inspect_data(model: nn.Module) -> dict[str, Any]:
    """The layers an adapter can target (name, kind, weight shape, parameter count) and the totals."""
    layers = layers_of(model)
    kinds: dict[str, int] = {}
    for layer in layers.values():
        kinds[layer.kind] = kinds.get(layer.kind, 0) + 1
    return {"layers": [{"name": name, "kind": layer.kind, "shape": list(layer.shape),
                        "params": math.prod(layer.shape)} for name, layer in layers.items()],
            "layer_kinds": dict(sorted(kinds.items())),
            "total_params": sum(p.numel() for p in model.parameters())}


def inspect_report(model: nn.Module) -> str:
    data = inspect_data(model)
    rows = [("layer", "kind", "weight shape", "params")]
    rows += [(r["name"], r["kind"], "x".join(map(str, r["shape"])), f"{r['params']:,}") for r in data["layers"]]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    kinds = ", ".join(f"{v} {k}" for k, v in data["layer_kinds"].items())
    out.append(f"{len(data['layers'])} targetable layers ({kinds}); {data['total_params']:,} parameters in all")
    return "\n".join(out)
