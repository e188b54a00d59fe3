"""Switchable ONNX: one model whose adapter tensors are graph inputs, and `.onnx_adapter` files that fill them.

onnxruntime's adapter convention (1.20+): each adapter tensor is a graph input that is also an initializer
(its default). The default has every dimension the graph leaves free (a LoRA rank, VeRA's `r`) set to 0 and is
zeros otherwise, so a run with no adapter computes an empty (or zero) delta: the base model. An adapter file
(`onnxruntime.AdapterFormat`) holds one adapter's values; `onnxruntime.LoraAdapter` loads it and
`RunOptions.add_active_adapter` activates it for a run, with no session reload. Several files may be active at
once when their inputs differ (the spec's adapters each have their own, named with the adapter: they add up,
as peft's several active adapters do).

The model records its adapter inputs in its metadata (`peftc.adapter_inputs`: name, adapter, layer, peft key,
shape with free dims as null, dtype), the adapters and their methods (`peftc.adapters`), the graph's
fingerprint, the MODEL reference and whether it is a generation-ready decoder (`peftc.with_past`), so that
`export_adapter` can turn another PEFT checkpoint into a file for the same model, checking method, targets and
shapes. A generation-ready decoder (`export_generation(..., adapters_as_inputs=True)`) is written the same way,
its inputs renamed (`past_key_values.N.key`) and checked on a first and a later decoding step.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx
from torch.export import Dim

from peftc.atomic import check_file_target, finish_file
from peftc.emit.export_folder import export_errors, export_folder, first_line, needs_external_data
from peftc.emit.fold_for_export import fold_for_export
from peftc.emit.onnx import export_program, flat_outputs
from peftc.errors import PeftcError
from peftc.low_precision import onnx_tol
from peftc.models import fresh_like
from peftc.progress import step
from peftc.quiet import quiet_libraries
from peftc.switchable import AdapterInput, Lifted, ident, lift

ADAPTER_SUFFIX = ".onnx_adapter"
META_INPUTS = "peftc.adapter_inputs"
META_ADAPTERS = "peftc.adapters"
META_FINGERPRINT = "peftc.fingerprint"
META_MODEL = "peftc.model"
META_WITH_PAST = "peftc.with_past"   # "1": the decoder takes its key/value cache (`peftc export --with-past`)
ADAPTER_VERSION = 1
MODEL_VERSION = 1


@dataclass
class SwitchCheck:
    base_diff: float                                         # no adapter file vs the base model
    adapter_diffs: dict[str, float] = field(default_factory=dict)   # one file active vs torch with that adapter
    input_shapes: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class SwitchExport:
    model: Path
    adapters: dict[str, Path]              # adapter name -> its .onnx_adapter file
    inputs: list[str]                      # the adapter input names
    check: SwitchCheck | None


def _onnx_dims(vi: Any) -> list[Any]:
    return [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
            for d in vi.type.tensor_type.shape.dim]


def _export(lifted: Lifted, gm: fx.GraphModule, inputs: dict[str, torch.Tensor], external: bool,
            rename: dict[str, str]) -> Any:
    return export_program(
        lifted.module, gm, inputs, external, kwargs={**inputs, **{ident(ai.name): ai.value for ai in lifted.inputs}},
        input_names=[*(rename.get(n, n) for n in inputs), *(ai.name for ai in lifted.inputs)],
        # the free dims of the adapter tensors (a rank) may vary between adapter files
        extra_shapes={ident(ai.name): {i: Dim.AUTO for i in ai.free} for ai in lifted.inputs})


def adapter_session(path: str | Path) -> Any:
    """An onnxruntime session for a model with adapter inputs (its warning that initializers are also graph
    inputs, once per adapter tensor, is the point of the convention and is silenced)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def write_adapter_file(path: Path, values: dict[str, np.ndarray]) -> None:
    """One `.onnx_adapter` file (onnxruntime.AdapterFormat), written to `path` as it is (the caller renames)."""
    import onnxruntime as ort
    if not hasattr(ort, "AdapterFormat"):
        raise PeftcError(f"onnxruntime {ort.__version__} cannot write adapter files (.onnx_adapter needs "
                         "onnxruntime 1.20 or newer)")
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(ADAPTER_VERSION)
    fmt.set_model_version(MODEL_VERSION)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in values.items()})
    fmt.export_adapter(str(path))


def run_with_adapters(sess: Any, feeds: dict[str, np.ndarray], files: list[Path]) -> list[np.ndarray]:
    """A session run with these adapter files active (none: the base model)."""
    import onnxruntime as ort
    ro = ort.RunOptions()
    keep = []
    for f in files:
        ad = ort.LoraAdapter()
        ad.Load(str(f))
        ro.add_active_adapter(ad)
        keep.append(ad)
    try:
        return sess.run(None, feeds, ro)
    except Exception as e:  # noqa: BLE001 - onnxruntime's Fail, InvalidArgument, ...
        first = first_line(e)
        with_files = ", ".join(str(f) for f in files) or "no adapter file"
        raise PeftcError(f"onnxruntime could not run the model with {with_files}: {first}") from None


def _diff(got: list[np.ndarray], want: list[torch.Tensor], what: str) -> float:
    if len(got) != len(want):
        raise PeftcError(f"{what}: onnxruntime gave {len(got)} outputs, torch {len(want)}")
    diff = 0.0
    for g, w in zip(got, want):
        if tuple(g.shape) != tuple(w.shape):
            raise PeftcError(f"{what}: onnxruntime output shape {list(g.shape)} != torch {list(w.shape)}")
        if w.is_floating_point() and g.size:
            diff = max(diff, float(np.abs(g.astype(np.float64) - w.double().numpy()).max()))
        elif not w.is_floating_point() and not np.array_equal(g, w.numpy()):
            diff = float("inf")
    return diff


def _check(gm: fx.GraphModule, lifted: Lifted, model: Path, files: dict[str, Path], defaults: dict[str, np.ndarray],
           checks: list[dict[str, torch.Tensor]], rename: dict[str, str], tol: float) -> SwitchCheck:
    """One onnxruntime session, on each input of `checks`: no adapter (vs the base model), then each file alone
    (vs torch with that adapter on and the others at their defaults). Diffs are the worst over `checks`."""
    base = getattr(gm, "peftc_base", None)
    with step("onnxruntime check: loading the ONNX model"):
        sess = adapter_session(model)
    result = SwitchCheck(0.0, input_shapes={rename.get(k, k): list(v.shape) for k, v in checks[0].items()})
    zero = {ai.name: torch.from_numpy(defaults[ai.name]) for ai in lifted.inputs}
    for fresh in checks:
        feeds = {rename.get(k, k): v.numpy() for k, v in fresh.items()}
        with torch.no_grad():
            want = flat_outputs(base(**fresh)) if base is not None else flat_outputs(lifted.module.run(fresh, zero))
        with step("onnxruntime check: no adapter vs the base model"):
            d = _diff(run_with_adapters(sess, feeds, []), want, f"{model} (no adapter)")
        if d > tol:
            raise PeftcError(f"{model}: with no adapter file, onnxruntime differs from the base model by "
                             f"{d:.3e} > {tol:.0e}: the adapters' default inputs do not switch them off")
        result.base_diff = max(result.base_diff, d)
        for name, f in files.items():
            feed = {**zero, **{ai.name: ai.value for ai in lifted.inputs if ai.adapter == name}}
            with torch.no_grad():
                want = flat_outputs(lifted.module.run(fresh, feed))
            with step(f"onnxruntime check: adapter {name}"):
                d = _diff(run_with_adapters(sess, feeds, [f]), want, f"{f}")
            if d > tol:
                raise PeftcError(f"{f}: onnxruntime with this adapter differs from torch by {d:.3e} > {tol:.0e}")
            result.adapter_diffs[name] = max(result.adapter_diffs.get(name, 0.0), d)
        # every adapter on: the lifted graph must be the compiled graph
        if files:
            with torch.no_grad():
                want = flat_outputs(gm(**fresh))
                got = flat_outputs(lifted.module.run(fresh, {ai.name: ai.value for ai in lifted.inputs}))
            d = max((float((g.double() - w.double()).abs().max()) for g, w in zip(got, want) if g.numel()),
                    default=0.0)
            if d > tol:
                raise PeftcError(f"adapters as inputs: the graph with its adapter inputs differs from the compiled "
                                 f"graph by {d:.3e} (an internal error)")
    return result


def choose_defaults(gm: fx.GraphModule, lifted: Lifted, inputs: dict[str, torch.Tensor], tol: float = 1e-4) -> None:
    """Each adapter's "no adapter" default: its free dims at 0 where the graph then gives the base model (in torch),
    else zeros of its own shapes (a free dim that is not a rank, such as MiSS's block size: the run then costs what
    the adapter's does). An error when neither gives the base model."""
    base = getattr(gm, "peftc_base", None)
    if base is None:
        return
    with torch.no_grad():
        want = flat_outputs(base(**inputs))

        def gives_base(rank0: set[str]) -> bool:
            feed = {ai.name: ai.default() if ai.adapter in rank0 else torch.zeros_like(ai.value)
                    for ai in lifted.inputs}
            try:
                got = flat_outputs(lifted.module.run(inputs, feed))
            except Exception:  # noqa: BLE001 - a shape the graph cannot take
                return False
            return all(g.shape == w.shape and (not g.is_floating_point() or float((g - w).abs().max()) <= tol)
                       for g, w in zip(got, want))

        if not gives_base(set()):
            bad = gm.peftc.adapters
            raise PeftcError("--adapters-as-inputs: with zeros for every adapter tensor the graph does not give the "
                             f"base model ({', '.join(f'{a}: {r.method}' for a, r in bad.items())}): these methods "
                             "cannot be switchable")
        for name in {ai.adapter for ai in lifted.inputs}:
            keep = gives_base({name})
            for ai in lifted.inputs:
                if ai.adapter == name:
                    ai.rank0 = keep and bool(ai.free)


def export_switchable(gm: fx.GraphModule, path: str | Path, inputs: dict[str, torch.Tensor] | None = None, *,
                      check: bool = True, tol: float | None = None, rename: dict[str, str] | None = None,
                      check_inputs: list[dict[str, torch.Tensor]] | None = None) -> SwitchExport:
    """Write `path` (.onnx) with the adapters' tensors as inputs, and `<adapter>.onnx_adapter` beside it (in the
    same folder) for each adapter of the spec; check them in one onnxruntime session. `gm`: compiled with
    adapters_as_inputs=True. `rename`: graph input name -> ONNX input name, where they differ; `check_inputs`:
    the inputs of the check (default: a fresh input of another batch size and length); `tol`: its max abs diff
    (default by the graph's dtype, as export_onnx's)."""
    import onnx
    path = Path(path)
    tol = onnx_tol(gm) if tol is None else tol
    inputs = inputs if inputs is not None else gm.peftc_inputs
    rename = dict(rename or {})
    check_file_target(path)
    lifted = lift(gm)
    lifted.module.inner = fold_for_export(lifted.module.inner)
    lifted.module.eval()
    choose_defaults(gm, lifted, inputs)
    external = needs_external_data(gm)
    with export_folder(path) as tmpdir:
        tmp = tmpdir / path.name
        with export_errors("ONNX export with adapters as inputs", gm):
            with step("Exporting to ONNX with adapter inputs (torch.onnx, dynamo)"), quiet_libraries():
                prog = _export(lifted, gm, inputs, external, rename)
                proto = prog.model_proto
        by_name = {vi.name: vi for vi in proto.graph.input}
        defaults: dict[str, np.ndarray] = {}
        records = []
        for ai in lifted.inputs:
            vi = by_name.get(ai.name)
            if vi is None:   # the exporter dropped it: the graph does not read it (cannot happen for a live tensor)
                raise PeftcError(f"adapters as inputs: input '{ai.name}' is missing from the exported model")
            dims = _onnx_dims(vi)
            if any(isinstance(dims[i], int) and dims[i] for i in ai.free):
                method = gm.peftc.adapters[ai.adapter].method
                raise PeftcError(f"--adapters-as-inputs: adapter '{ai.adapter}' ({method}): the graph fixes dim "
                                 f"{ai.free} of '{ai.key}' on '{ai.layer}' (its rank), so no "
                                 "file of another rank, nor a rank-0 default, would fit: this method cannot be "
                                 "switchable")
            defaults[ai.name] = ai.default().numpy() if ai.rank0 else np.zeros_like(ai.value.numpy())
            proto.graph.initializer.append(onnx.numpy_helper.from_array(defaults[ai.name], ai.name))
            records.append({"name": ai.name, "adapter": ai.adapter, "layer": ai.layer, "key": ai.key,
                            "scaled": ai.scaled, "dtype": str(ai.value.dtype).removeprefix("torch."),
                            "shape": [None if i in ai.free else int(d) for i, d in enumerate(ai.value.shape)]})
        methods = {name: rec.method for name, rec in gm.peftc.adapters.items()}
        meta = {META_INPUTS: json.dumps(records), META_ADAPTERS: json.dumps(methods),
                META_FINGERPRINT: json.dumps(lifted.fingerprints)}
        ref = getattr(gm, "peftc_model_ref", None)
        if ref:
            meta[META_MODEL] = ref
        if getattr(gm, "peftc_cache", None) is not None:   # a generation-ready decoder (peftc.emit.generation)
            meta[META_WITH_PAST] = "1"
        for k, v in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        with step("Writing .onnx and .onnx_adapter files"), quiet_libraries():
            if external:
                onnx.save_model(proto, str(tmp), save_as_external_data=True, location=path.name + ".data")
            else:
                onnx.save_model(proto, str(tmp))
            files: dict[str, Path] = {}
            for name in methods:
                f = tmpdir / f"{name}{ADAPTER_SUFFIX}"
                write_adapter_file(f, {ai.name: ai.value.numpy() for ai in lifted.inputs if ai.adapter == name})
                files[name] = f
        checks = check_inputs or [fresh_like(inputs, axes=getattr(getattr(gm, "peftc_axes", None), "names", None))]
        result = _check(gm, lifted, tmp, files, defaults, checks, rename, tol) if check else None
    return SwitchExport(path, {n: path.parent / f.name for n, f in files.items()},
                        [ai.name for ai in lifted.inputs], result)


@dataclass
class ModelAdapters:
    """What a switchable model says about its adapter inputs (from its metadata)."""
    path: Path
    inputs: list[dict[str, Any]]
    adapters: dict[str, str]        # adapter (slot) -> method
    fingerprints: dict[str, str]    # adapter -> what another file for it must share with it
    model: str | None
    with_past: bool = False         # a generation-ready decoder (inputs: input_ids, ..., past_key_values.N.key)


def read_model_adapters(path: str | Path) -> ModelAdapters:
    import onnx
    path = Path(path)
    if not path.is_file():
        raise PeftcError(f"--like {path}: no such file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001
        raise PeftcError(f"--like {path}: not a readable ONNX model ({type(e).__name__})") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if META_INPUTS not in meta:
        raise PeftcError(f"--like {path}: this model has no adapter inputs (export it with "
                         "`peftc export SPEC MODEL --adapters-as-inputs`)")
    try:
        return ModelAdapters(path, json.loads(meta[META_INPUTS]), json.loads(meta[META_ADAPTERS]),
                             json.loads(meta.get(META_FINGERPRINT, "{}")), meta.get(META_MODEL),
                             meta.get(META_WITH_PAST) == "1")
    except (json.JSONDecodeError, KeyError) as e:
        raise PeftcError(f"--like {path}: its peftc metadata is damaged ({e})") from None


def _fmt_shape(shape: list[Any]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def export_adapter(adapter_dir: str | Path, like: str | Path, output: str | Path, *, model: Any = None,
                   adapter: str | None = None, check: bool = True, tol: float | None = None,
                   example_inputs: Any = None) -> dict[str, Any]:
    """Turn a PEFT checkpoint directory into an `.onnx_adapter` file for the switchable model `like`.

    The checkpoint is compiled onto `model` (default: the MODEL the ONNX model records) as that model's adapter
    `adapter` (default: its only one); method, targets, shapes (the free dims, such as the rank, may differ) and
    the graph itself (options that are constants of the graph, such as LoHa's alpha / r) must fit the model.
    Returns {"inputs": n, "missing": [names the checkpoint does not cover], "diff": max abs diff or None}."""
    from peftc.pipeline import compile_model
    output = Path(output)
    if output.suffix != ADAPTER_SUFFIX:
        raise PeftcError(f"output {output}: give a name ending in {ADAPTER_SUFFIX}")
    check_file_target(output)
    info = read_model_adapters(like)
    slots = list(info.adapters)
    if adapter is None:
        if len(slots) != 1:
            raise PeftcError(f"--like {info.path}: the model has inputs for {len(slots)} adapters "
                             f"({', '.join(slots)}); say which one this checkpoint fills with --adapter NAME")
        adapter = slots[0]
    elif adapter not in slots:
        raise PeftcError(f"--adapter {adapter}: {info.path} has no inputs for it; its adapters: {', '.join(slots)}")
    model = model if model is not None else info.model
    if model is None:
        raise PeftcError(f"--like {info.path}: the model does not record which MODEL it was exported from; "
                         "give it with --model")
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise PeftcError(f"{adapter_dir}: not a PEFT checkpoint directory (no adapter_config.json)")
    if info.with_past and example_inputs:
        raise PeftcError(f"--example-input does not apply: {info.path} is a generation-ready decoder (its inputs are "
                         "input_ids, attention_mask, position_ids and the key/value cache)")
    spec = f'adapter {adapter}: import "{adapter_dir.resolve().as_posix()}"\n'
    try:
        compiled = compile_model(spec, model, adapters_as_inputs=True, example_inputs=example_inputs,
                                 with_past=info.with_past)
    except PeftcError as e:   # the spec is ours, not the user's: no `<spec>:1:19:` in front of the message
        raise PeftcError(re.sub(r"^<spec>:\d+:\d+: ", "", str(e).split("\n")[0])) from None
    method = compiled.plan.adapters[adapter].method.name
    if method != info.adapters[adapter]:
        raise PeftcError(f"{adapter_dir}: a {method} checkpoint, but the model's adapter '{adapter}' is "
                         f"{info.adapters[adapter]}")
    lifted = lift(compiled.gm, single=len(slots) == 1)
    want = {r["name"]: r for r in info.inputs if r["adapter"] == adapter}
    for ai in lifted.inputs:
        r = want.get(ai.name)
        if r is None:
            where = f"layer '{ai.layer}'" if ai.layer else "the adapter"
            covered = sorted({r["layer"] for r in want.values() if r["layer"]})
            raise PeftcError(f"{adapter_dir}: {where} has tensor '{ai.key}', but {info.path} has no input "
                             f"'{ai.name}' for it (the model's adapter '{adapter}' covers "
                             f"{', '.join(covered[:6])}{', ...' if len(covered) > 6 else ''}); export the model "
                             "with a spec that targets this layer")
        shape = list(ai.value.shape)
        fixed = r["shape"]
        if len(fixed) != len(shape) or any(f is not None and f != s for f, s in zip(fixed, shape)):
            raise PeftcError(f"{adapter_dir}: tensor '{ai.key}' of layer '{ai.layer}' has shape {shape}, but the "
                             f"model's input '{ai.name}' takes {_fmt_shape(fixed)} (? = free: the rank may differ)")
        if r["dtype"] != str(ai.value.dtype).removeprefix("torch."):
            raise PeftcError(f"{adapter_dir}: tensor '{ai.key}' of layer '{ai.layer}' is "
                             f"{str(ai.value.dtype).removeprefix('torch.')}, the model's input '{ai.name}' "
                             f"{r['dtype']}")
    if adapter in info.fingerprints and lifted.fingerprints.get(adapter) != info.fingerprints[adapter]:
        raise PeftcError(f"{adapter_dir}: its options change the model's graph, not only its adapter tensors (for "
                         f"{method}, options such as alpha / r or a frequency seed are constants of the graph "
                         f"{info.path} was exported with); export a model from this checkpoint instead")
    missing = sorted(set(want) - {ai.name for ai in lifted.inputs})
    tmp = output.parent / f".{output.name}.tmp"
    try:
        write_adapter_file(tmp, {ai.name: ai.value.numpy() for ai in lifted.inputs})
        tol = onnx_tol(compiled.gm) if tol is None else tol
        diff = _check_adapter(compiled.gm, info.path, tmp, *_check_feeds(compiled), tol) if check else None
        finish_file(tmp, output)
    except OSError as e:
        raise PeftcError(f"cannot write {output}: {e.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return {"inputs": len(lifted.inputs), "missing": missing, "diff": diff}


def _check_feeds(compiled: Any) -> tuple[list[dict[str, torch.Tensor]], dict[str, str]]:
    """The check's inputs and the graph -> ONNX input names: a fresh input, or for a generation-ready decoder a
    first and a later decoding step (peftc.generation.check_inputs)."""
    gm = compiled.gm
    layout = getattr(gm, "peftc_cache", None)
    if layout is None:
        return [fresh_like(gm.peftc_inputs, axes=getattr(getattr(gm, "peftc_axes", None), "names", None))], {}
    from peftc.generation import check_inputs, onnx_renames
    vocab = int(getattr(compiled.model.config, "vocab_size", 0) or 0)
    return check_inputs(layout, vocab), onnx_renames(gm.peftc_inputs)


def _check_adapter(gm: fx.GraphModule, model: Path, file: Path, checks: list[dict[str, torch.Tensor]],
                   rename: dict[str, str], tol: float) -> float:
    """The model with the new file active vs the checkpoint compiled in torch (the worst diff over `checks`)."""
    with step("onnxruntime check: the model with the new adapter file"):
        sess = adapter_session(model)
    gm.eval()
    d = 0.0
    for fresh in checks:
        got = run_with_adapters(sess, {rename.get(k, k): v.numpy() for k, v in fresh.items()}, [file])
        with torch.no_grad():
            want = flat_outputs(gm(**fresh))
        d = max(d, _diff(got, want, str(file)))
    if d > tol:
        raise PeftcError(f"{file}: onnxruntime with this adapter differs from torch by {d:.3e} > {tol:.0e}")
    return d


__all__ = ["AdapterInput", "SwitchExport", "export_adapter", "export_switchable", "read_model_adapters"]
