"""The shared scaffolding of the differential test files (test_additive_methods, test_sites, test_rotation_methods,
test_rotation_hra_road_osf): a `Case` (a peft config on a tiny model, and optionally the same method written in a
spec), its `Prepared` peft reference (a saved checkpoint, the base, unmerged and merged outputs on fixed inputs),
and the model / input / compile helpers that also know the `seqvol` test model."""
from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass

import torch
from conftest import MODELS, compile_on, inputs_for, peft_adapter, run_logits
from test_method_files import seqvol, seqvol_inputs

import peftc


@dataclass(frozen=True)
class Case:
    id: str
    model: str
    config: Callable[[], object]
    fresh: str | None = None      # a native spec of the same method (init = "random"), saved and loaded in peft


@dataclass
class Prepared:
    case: Case
    dir: str
    inputs: dict
    base_out: torch.Tensor
    peft_out: torch.Tensor
    merged_out: torch.Tensor


def _models(name: str):
    return seqvol() if name == "seqvol" else MODELS[name]()


def _inputs(name: str) -> dict[str, torch.Tensor]:
    return seqvol_inputs() if name == "seqvol" else inputs_for(name)


def _compile(spec: str, model_name: str, **kw):
    if model_name == "seqvol":
        return peftc.compile(spec, seqvol(), example_inputs=seqvol_inputs(batch=2, seed=3), **kw)
    return compile_on(spec, model_name, **kw)


def prepare(case: Case, tmp_path_factory) -> Prepared:
    """A real peft adapter of `case` (noise on every trainable tensor) saved by save_pretrained, and the base,
    peft unmerged and peft merged outputs on the model's fixed inputs."""
    tmp = tmp_path_factory.mktemp(case.id)
    base, pm, d = peft_adapter(case.model, case.config(), tmp, base=_models(case.model))
    x = _inputs(case.model)
    base_out, peft_out = run_logits(base, x), run_logits(pm, x)
    merged_out = run_logits(copy.deepcopy(pm).merge_and_unload(), x)
    return Prepared(case, str(d), x, base_out, peft_out, merged_out)


def _tamper(src, dst, edit):
    """A copy of the checkpoint folder `src` at `dst`, its state dict and config changed by `edit(sd, cfg)`."""
    import shutil

    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    sd = load_file(f"{dst}/adapter_model.safetensors")
    cfg = json.loads((dst / "adapter_config.json").read_text())
    sd, cfg = edit(sd, cfg)
    save_file(sd, f"{dst}/adapter_model.safetensors")
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst
