"""Emit a compiled GraphModule as a .pt2 file (torch.export.save), written atomically."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import fx

from peftc.atomic import atomic_path
from peftc.errors import PeftcError
from peftc.progress import step
from peftc.quiet import quiet_libraries
from peftc.trace import dynamic_shapes_for


def export_graph(gm: fx.GraphModule, inputs: dict[str, torch.Tensor]) -> torch.export.ExportedProgram:
    """Re-export the rewritten graph (inference mode) with the same dynamic axes."""
    was_training = gm.training
    gm.eval()
    axes = getattr(gm, "peftc_axes", None)
    try:
        with quiet_libraries():
            try:
                return torch.export.export(gm, (), kwargs=dict(inputs), strict=False,
                                           dynamic_shapes=dynamic_shapes_for(inputs, axes))
            except Exception:  # noqa: BLE001 - named axes the graph cannot take: torch's own choice (Dim.AUTO)
                if axes is None:
                    raise
                return torch.export.export(gm, (), kwargs=dict(inputs), strict=False,
                                           dynamic_shapes=dynamic_shapes_for(inputs))
    except Exception as e:  # noqa: BLE001
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PeftcError(f"re-exporting the adapted graph failed: {type(e).__name__}: {first}") from None
    finally:
        gm.train(was_training)


def save_pt2(gm: fx.GraphModule, path: str | Path, inputs: dict[str, torch.Tensor] | None = None) -> Path:
    path = Path(path)
    inputs = inputs if inputs is not None else gm.peftc_inputs
    with step("Re-exporting the adapted graph (torch.export)"):
        ep = export_graph(gm, inputs)
    with step("Writing .pt2"), atomic_path(path, suffix=".pt2") as tmp, quiet_libraries():
        torch.export.save(ep, str(tmp))
    return path
