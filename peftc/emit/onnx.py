"""Emit ONNX (torch.onnx.export with dynamo=True, dynamic batch/sequence axes) and check it in onnxruntime
against the torch graph on a fresh input of another batch size and length. Models over 2 GB use ONNX
external data. Written atomically: a temp folder, then rename
(peftc.emit.export_folder)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx
from torch.utils import _pytree as pytree

from peftc.atomic import check_file_target
from peftc.emit.export_folder import TWO_GB as TWO_GB  # its old home: others may import it from here
from peftc.emit.export_folder import export_errors, export_folder, needs_external_data
from peftc.emit.fold_for_export import fold_for_export
from peftc.errors import PeftcError
from peftc.low_precision import check_runnable_in_onnxruntime, onnx_tol
from peftc.models import fresh_like
from peftc.progress import step
from peftc.quiet import quiet_libraries
from peftc.trace import dynamic_shapes_for


@dataclass
class OnnxCheck:
    max_abs_diff: float
    outputs: int
    input_shapes: dict[str, list[int]]


def output_names(gm: fx.GraphModule) -> list[str] | None:
    """The graph's outputs by name, in flat order: dict keys (`logits`), `output` for a lone tensor, `output_0`,
    `output_1`, ... for a tuple; nested entries joined with dots (`hidden_states.0`). None if unknown."""
    spec = getattr(getattr(gm.graph._codegen, "pytree_info", None), "out_spec", None)
    if spec is None:
        return None
    tree = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    names = []
    for path, _ in pytree.tree_flatten_with_path(tree)[0]:
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        if not parts:
            names.append("output")
        elif isinstance(tree, (tuple, list)):
            names.append("output_" + ".".join(parts))
        else:
            names.append(".".join(parts))
    return names


def flat_outputs(out: Any) -> list[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def ort_session(path: str | Path) -> Any:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_onnx(path: str | Path, inputs: dict[str, torch.Tensor], rename: dict[str, str] | None = None
             ) -> list[np.ndarray]:
    """`rename`: graph input name -> ONNX input name, where they differ."""
    sess = ort_session(path)
    inputs = {(rename or {}).get(k, k): v for k, v in inputs.items()}
    names = [i.name for i in sess.get_inputs()]
    missing = [n for n in names if n not in inputs]
    if missing:
        raise PeftcError(f"{path}: ONNX inputs {missing} have no value")
    return sess.run(None, {n: inputs[n].numpy() for n in names})


def check_onnx(gm: fx.GraphModule, path: str | Path, inputs: dict[str, torch.Tensor], tol: float,
               rename: dict[str, str] | None = None) -> OnnxCheck:
    was = gm.training
    gm.eval()
    with step("onnxruntime check: the torch graph on a fresh input"), torch.no_grad():
        want = flat_outputs(gm(**inputs))
    gm.train(was)
    with step("onnxruntime check: loading and running the ONNX model"):
        got = run_onnx(path, inputs, rename)
    if len(got) != len(want):
        raise PeftcError(f"{path}: onnxruntime gave {len(got)} outputs, torch {len(want)}")
    diff = 0.0
    for g, w in zip(got, want):
        if tuple(g.shape) != tuple(w.shape):
            raise PeftcError(f"{path}: onnxruntime output shape {list(g.shape)} != torch {list(w.shape)}")
        if w.is_floating_point():
            diff = max(diff, float(np.abs(g.astype(np.float64) - w.double().numpy()).max()) if g.size else 0.0)
        elif not np.array_equal(g, w.numpy()):
            diff = float("inf")
    if diff > tol:
        raise PeftcError(f"{path}: onnxruntime disagrees with torch: max abs diff {diff:.3e} > {tol:.0e}")
    return OnnxCheck(diff, len(want), {k: list(v.shape) for k, v in inputs.items()})


def export_program(module: Any, gm: fx.GraphModule, inputs: dict[str, torch.Tensor], external: bool, *,
                   kwargs: dict[str, Any] | None = None, input_names: list[str] | None = None,
                   extra_shapes: dict[str, Any] | None = None) -> Any:
    """torch.onnx.export of `module` (called with `kwargs`, default `inputs`) with `gm`'s output names and its
    named dynamic axes for `inputs` (torch's own axes if the graph cannot take the named ones); `extra_shapes`:
    the dynamic shapes of the other keyword inputs; `input_names`: the ONNX input names (default: `inputs`')."""
    axes = getattr(gm, "peftc_axes", None)
    for attempt in ([axes, None] if axes is not None else [None]):
        shapes = dynamic_shapes_for(inputs, attempt)
        shapes.update(extra_shapes or {})
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
                return torch.onnx.export(module, (), kwargs=dict(inputs) if kwargs is None else kwargs,
                                         dynamo=True, external_data=external, verbose=False, dynamic_shapes=shapes,
                                         input_names=list(inputs) if input_names is None else input_names,
                                         output_names=output_names(gm))
        except Exception:  # noqa: BLE001
            if attempt is None:
                raise
    raise AssertionError("unreachable")


def _export(gm: fx.GraphModule, inputs: dict[str, torch.Tensor], external: bool,
            rename: dict[str, str] | None = None) -> Any:
    """torch.onnx.export with the model's input and output names (inputs renamed by `rename`) and named dynamic
    axes (torch's own axes if the graph cannot take the named ones)."""
    return export_program(gm, gm, inputs, external, input_names=[(rename or {}).get(n, n) for n in inputs])


def export_onnx(gm: fx.GraphModule, path: str | Path, inputs: dict[str, torch.Tensor] | None = None,
                *, check: bool = True, tol: float | None = None, adapters_as_inputs: bool = False,
                rename: dict[str, str] | None = None,
                check_inputs: list[dict[str, torch.Tensor]] | None = None) -> Any:
    """Write `gm` as ONNX and check it in onnxruntime against `gm` on `check_inputs` (default: a fresh input
    of another batch size and length); returns the worst check (an OnnxCheck), or None without check.
    `tol`: the check's max abs diff (default by the graph's dtype: 1e-4, float16 1e-2); a bfloat16 graph is
    refused when checked (onnxruntime's CPU provider cannot run it). `rename`: graph input name -> ONNX input
    name, where they differ.

    `adapters_as_inputs=True` (gm compiled with `adapters_as_inputs=True`): the adapter tensors become graph inputs
    with "no adapter" defaults, and `<adapter>.onnx_adapter` files are written beside `path` (see
    peftc.emit.onnx_adapters), checked with no file and with each file on `check_inputs`; returns a SwitchExport."""
    if adapters_as_inputs:
        if check:
            check_runnable_in_onnxruntime(gm)
        from peftc.emit.onnx_adapters import export_switchable
        return export_switchable(gm, path, inputs, check=check, tol=onnx_tol(gm) if tol is None else tol,
                                 rename=rename, check_inputs=check_inputs)
    path = Path(path)
    inputs = inputs if inputs is not None else gm.peftc_inputs
    if check:
        check_runnable_in_onnxruntime(gm)
    tol = onnx_tol(gm) if tol is None else tol
    external = needs_external_data(gm)
    check_file_target(path)
    with export_folder(path) as tmpdir:
        tmp = tmpdir / path.name
        with export_errors("ONNX export", gm):
            with step("Exporting to ONNX (torch.onnx, dynamo)"), quiet_libraries():
                prog = _export(fold_for_export(gm), inputs, external, rename)
            with step("Writing .onnx"), quiet_libraries():
                prog.save(str(tmp), external_data=external)
        result = None
        axes = getattr(getattr(gm, "peftc_axes", None), "names", None)
        for feed in (check_inputs or [fresh_like(inputs, axes=axes)]) if check else []:
            done = check_onnx(gm, tmp, feed, tol, rename)
            result = done if result is None or done.max_abs_diff > result.max_abs_diff else result
    return result
