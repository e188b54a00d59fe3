"""The PEFT checkpoint format: read adapter_config.json + adapter_model.{safetensors,bin}, turn a config
into an AdapterSpec, and write checkpoints that `peft` and `transformers` load unchanged.

On disk, keys are `base_model.model.<module>.<tensor>` with no adapter name; an adapter that is not the
only/default one lives in a subfolder named after it.
"""
from __future__ import annotations

import contextlib
import json
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftc.atomic import atomic_dir
from peftc.errors import PeftcError
from peftc.lang.methods import MethodDef, coerce_option
from peftc.spec.model import AdapterSpec, PerPattern, Span, TargetRule

if TYPE_CHECKING:  # torch is imported where tensors are read or written: `peftc import` never needs it
    import torch

PREFIX = "base_model.model."
SHARED_PREFIX = "base_model."       # adapter-level tensors shared by all layers (VeRA's vera_A, ...)
CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"],
              "QUESTION_ANS": ["qa_outputs"]}


def _adapter_dir(path: str | Path, what: str = "adapter") -> Path:
    p = Path(path)
    if not p.exists():
        raise PeftcError(f"{what} directory not found: {p}")
    if not p.is_dir():
        raise PeftcError(f"{p}: expected a PEFT checkpoint directory (adapter_config.json + adapter_model.safetensors)")
    return p


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    p = _adapter_dir(path)
    f = p / CONFIG_NAME
    if not f.exists():
        subs = sorted(d.name for d in p.iterdir() if (d / CONFIG_NAME).exists()) if p.is_dir() else []
        shown = ", ".join(subs[:5]) + (f" and {len(subs) - 5} more" if len(subs) > 5 else "")
        hint = f"; it holds adapters in subfolders: {shown} (use e.g. \"{p / subs[0]}\")" if subs else ""
        raise PeftcError(f"{p}: no {CONFIG_NAME} (not a PEFT checkpoint directory){hint}")
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise PeftcError(f"{f}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PeftcError(f"{f}: cannot read: {e}") from None
    if not isinstance(cfg, dict):
        raise PeftcError(f"{f}: expected a JSON object")
    return cfg


def read_adapter_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], Path]:
    p = _adapter_dir(path)
    st, binf = p / SAFETENSORS_NAME, p / BIN_NAME
    if st.exists():
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(st)), st
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            reason = str(e).strip() or type(e).__name__
            raise PeftcError(f"{st}: corrupt or truncated safetensors file ({reason})") from None
    if binf.exists():
        import pickle

        import torch
        try:
            sd = torch.load(str(binf), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            why = next((ln for ln in lines if ln.startswith("Unsupported")), None)
            raise PeftcError(f"{binf}: refused: it does not load with torch.load(weights_only=True), so it may run "
                             f"code when unpickled{f' ({why})' if why else ''}; convert it to safetensors where you "
                             "trust it") from None
        except Exception as e:  # noqa: BLE001 - pickle raises many kinds
            raise PeftcError(f"{binf}: corrupt adapter weights file ({type(e).__name__}: {e})") from None
        if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in sd.items()):
            raise PeftcError(f"{binf}: expected a state dict of named tensors, found {type(sd).__name__}")
        return sd, binf
    raise PeftcError(f"{p}: no {SAFETENSORS_NAME} or {BIN_NAME} found")


def check_adapter_weights(path: str | Path) -> Path:
    """Check that a checkpoint directory has a readable weights file, without loading it (and without
    importing torch): a safetensors file must have a valid header whose tensors fit in the file."""
    p = _adapter_dir(path)
    st, binf = p / SAFETENSORS_NAME, p / BIN_NAME
    if not st.exists():
        if binf.exists():
            return binf
        raise PeftcError(f"{p}: no {SAFETENSORS_NAME} or {BIN_NAME} found")

    def corrupt(reason: str) -> PeftcError:
        return PeftcError(f"{st}: corrupt or truncated safetensors file ({reason})")

    try:
        size = st.stat().st_size
        with open(st, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise corrupt("no header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise corrupt(f"header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
    except OSError as e:
        raise PeftcError(f"{st}: cannot read: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise corrupt(f"invalid header: {e}") from None
    if not isinstance(header, dict):
        raise corrupt("invalid header")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise corrupt(f"tensor '{key}' has no valid data_offsets")
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise corrupt(f"its tensors need {8 + n + end} bytes, the file has {size}")
    return st


class CheckpointTensors:
    """The tensors of one checkpoint file, taken one key at a time: a missing key or a wrong shape is an
    error naming the file, the key and both shapes; what is never taken is reported by `unused()`."""

    def __init__(self, tensors: dict[str, torch.Tensor], file: Path) -> None:
        self.tensors = tensors
        self.file = file
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def take(self, key: str, shape: tuple[int, ...], what: str) -> torch.Tensor:
        if key not in self.tensors:
            raise PeftcError(f"{self.file}: missing tensor '{key}' ({what}, expected shape {list(shape)})")
        t = self.tensors[key]
        if tuple(t.shape) != tuple(shape):
            raise PeftcError(f"{self.file}: tensor '{key}' has shape {list(t.shape)}, expected {list(shape)} ({what})")
        self.used.add(key)
        return t

    def unused(self) -> list[str]:
        return sorted(set(self.tensors) - self.used)

    def has_unused_under(self, prefix: str) -> bool:
        return any(k.startswith(prefix) and k not in self.used for k in self.tensors)


def _rules(value: Any, span: Span) -> list[TargetRule]:
    if value is None:
        return []
    if isinstance(value, str):
        if value == "all-linear":
            return [TargetRule("all-linear", value, span)]
        return [TargetRule("regex", value, span)]
    return [TargetRule("name", str(v), span) for v in value]


# config keys whose non-default value peftc cannot honour (value -> default)
_UNSUPPORTED_LORA = {"use_qalora": False, "megatron_config": None,
                     "use_bdlora": None, "arrow_config": None}
# config keys of LoRA variants that some method files declare as options (an import into another method refuses them)
_LORA_VARIANT_KEYS = {"alora_invocation_tokens": None}


def adapter_from_config(name: str, directory: str | Path, config: dict[str, Any], method: MethodDef,
                        span: Span) -> AdapterSpec:
    """The spec an imported PEFT adapter stands for."""
    cfg_file = str(Path(directory) / CONFIG_NAME)
    cspan = Span(cfg_file)
    ad = AdapterSpec(name, span, method=method.name, import_dir=str(directory))
    if method.peft_type == "LORA":
        for key, default in _UNSUPPORTED_LORA.items():
            v = config.get(key, default)
            if v not in (default, [], {}, False):
                raise PeftcError(f"{cfg_file}: {key} = {v!r} is not supported by peftc yet")
        declared = {d.config_key for d in method.options.values()}
        for key, default in _LORA_VARIANT_KEYS.items():   # honoured only where the method declares the option
            v = config.get(key, default)
            if v not in (default, [], {}, False) and key not in declared:
                raise PeftcError(f"{cfg_file}: {key} = {v!r} together with {method.name} is not supported by peftc")
    if config.get("bias", "none") not in ("none", None) and not method.bias_only:
        raise PeftcError(f"{cfg_file}: bias = {config['bias']!r} is not supported for {method.name} (only \"none\"; "
                         "a method takes other values once its file declares `bias_option`)")
    for decl in method.options.values():
        if decl.config_key is None or decl.config_key not in config:
            continue
        value = config[decl.config_key]
        if decl.type == "targets":
            if value:
                ad.option_targets[decl.name] = _rules(value, cspan)
            continue
        try:
            value = coerce_option(decl, value)
        except ValueError as e:
            if decl.name == "init":
                continue  # an init scheme only matters for fresh weights; these are loaded
            raise PeftcError(f"{cfg_file}: {decl.config_key} {e}") from None
        if decl.name == "init" and decl.values and value not in decl.values.values():
            continue
        ad.options[decl.name] = value
    ad.targets = _rules(config.get("target_modules"), cspan)
    ad.parameters = [TargetRule("name", str(v), cspan) for v in config.get("target_parameters") or []]
    lr = config.get("layer_replication")
    if lr:
        if not (isinstance(lr, list) and all(isinstance(r, (list, tuple)) and len(r) == 2
                                             and all(isinstance(i, int) for i in r) for r in lr)):
            raise PeftcError(f"{cfg_file}: layer_replication = {lr!r} is not a list of [start, end] pairs")
        ad.replicate = [(int(a), int(b)) for a, b in lr]
    if not ad.targets and not ad.parameters:
        raise PeftcError(f"{cfg_file}: target_modules is empty; nothing to adapt")
    ad.exclude = _rules(config.get("exclude_modules"), cspan)
    ltt = config.get("layers_to_transform")
    if ltt is not None:
        ad.layers = [ltt] if isinstance(ltt, int) else list(ltt)
    lp = config.get("layers_pattern")
    if lp:
        ad.layers_pattern = [lp] if isinstance(lp, str) else list(lp)
    for decl in method.options.values():
        if decl.pattern_key:
            for pat, val in (config.get(decl.pattern_key) or {}).items():
                if decl.pattern_search:   # found anywhere in the name: as a key matched at the name's end
                    pat = f".*(?:{pat}).*"
                ad.per_pattern.append(PerPattern(decl.name, TargetRule("pattern", pat, cspan), val, cspan))
    mts = list(config.get("modules_to_save") or [])
    ad.modules_to_save = list(dict.fromkeys(mts))
    ad.extra_config = {k: config[k] for k in ("task_type", "base_model_name_or_path", "revision") if k in config}
    return ad


def task_head_candidates(config: dict[str, Any]) -> list[str]:
    return TASK_HEADS.get(str(config.get("task_type") or ""), [])


# ---------------------------------------------------------------- writing
def write_checkpoint(directory: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], *,
                     atomic: bool = True) -> None:
    """Write adapter_config.json and adapter_model.safetensors, both at once (`atomic`), or straight into
    `directory` when it is itself part of an output being written atomically."""
    from safetensors.torch import save
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_dir(directory) if atomic else contextlib.nullcontext(directory) as out:
        out.mkdir(parents=True, exist_ok=True)
        (out / SAFETENSORS_NAME).write_bytes(save(tensors, metadata={"format": "pt"}))
        (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def pattern_key_for(layer: str) -> str:
    """A rank_pattern key that selects exactly one layer."""
    return re.escape(layer)
