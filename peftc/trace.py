"""Model -> fx GraphModule with torch.export (strict=False), dynamic batch and sequence dimensions."""
from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim

from peftc.errors import PeftcError


def dynamic_shapes_for(inputs: dict[str, torch.Tensor]) -> dict[str, dict[int, Any]]:
    """Batch (dim 0) is dynamic; so is dim 1 of token ids/masks (rank 2, integer) and of (B, S, H) floats."""
    shapes: dict[str, dict[int, Any]] = {}
    for name, t in inputs.items():
        dims: dict[int, Any] = {}
        if t.dim() >= 1:
            dims[0] = Dim.AUTO
        if t.dim() == 2 and not t.dtype.is_floating_point or t.dim() == 3 and t.dtype.is_floating_point:
            dims[1] = Dim.AUTO
        shapes[name] = dims
    return shapes


def export_program(module: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.export.ExportedProgram:
    try:
        return torch.export.export(module, (), kwargs=dict(inputs), dynamic_shapes=dynamic_shapes_for(inputs),
                                   strict=False)
    except PeftcError:
        raise
    except Exception as e:  # noqa: BLE001 - torch.export raises many kinds
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PeftcError(f"torch.export could not trace the model with inputs "
                         f"{ {k: list(v.shape) for k, v in inputs.items()} }: {type(e).__name__}: {first}") from None


def trace(module: nn.Module, inputs: dict[str, torch.Tensor]) -> fx.GraphModule:
    """The model as a plain (trainable) fx GraphModule over ATen ops, parameters as get_attr nodes."""
    ep = export_program(module, inputs)
    unlifted = ep.module()
    gm = fx.GraphModule(unlifted, unlifted.graph)   # a plain GraphModule: .train()/.eval() work
    # Frozen parameters of our own that share storage with the model's: the caller's module keeps its
    # requires_grad flags, and nothing peftc does writes into its tensors.
    fresh: dict[int, nn.Parameter] = {}
    for mod in gm.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                if id(p) not in fresh:
                    fresh[id(p)] = nn.Parameter(p.detach(), requires_grad=False)
                mod._parameters[name] = fresh[id(p)]
    return gm
