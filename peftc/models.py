"""MODEL argument -> nn.Module plus example inputs.

MODEL is one of: a built-in name (`tiny-llama`, ...), a local Hugging Face model directory (config.json
and safetensors weights, sharded or not), or a custom model `path/to/file.py:callable` /
`package.module:callable` returning an nn.Module (the current directory is importable). Example inputs
come from `--example-input NAME=SHAPE[:DTYPE]`, an `example_inputs()` function beside the callable, or
the model type (text: input_ids + attention_mask; vision: pixel_values; speech: input_features).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftc.builtin_models import BUILTINS
from peftc.errors import PeftcError, did_you_mean

_DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "float64": torch.float64, "int64": torch.int64, "long": torch.int64,
           "int32": torch.int32, "bool": torch.bool}


@dataclass
class LoadedModel:
    module: nn.Module
    inputs: dict[str, torch.Tensor]
    name: str
    config: Any = None                  # the HF config, if any
    is_hf: bool = False
    source: str = ""


def parse_example_input(text: str) -> tuple[str, tuple[int, ...], torch.dtype]:
    """'x=9x10:float32' -> ('x', (9, 10), torch.float32)."""
    if "=" not in text:
        raise PeftcError(f"--example-input {text!r}: expected NAME=SHAPE[:DTYPE], e.g. x=9x10:float32")
    name, rest = text.split("=", 1)
    shape_s, _, dtype_s = rest.partition(":")
    try:
        shape = tuple(int(d) for d in shape_s.lower().split("x"))
    except ValueError:
        raise PeftcError(f"--example-input {text!r}: shape {shape_s!r} is not like 2x16") from None
    dtype_s = dtype_s or "float32"
    if dtype_s not in _DTYPES:
        raise PeftcError(f"--example-input {text!r}: unknown dtype {dtype_s!r}{did_you_mean(dtype_s, _DTYPES)}")
    if not name.isidentifier():
        raise PeftcError(f"--example-input {text!r}: {name!r} is not a valid input name")
    return name, shape, _DTYPES[dtype_s]


def _vocab(config: Any) -> int:
    for attr in ("vocab_size", "n_vocab"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return 100


def make_inputs(specs: list[tuple[str, tuple[int, ...], torch.dtype]], config: Any = None,
                seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape, dtype in specs:
        if dtype.is_floating_point:
            out[name] = torch.randn(shape, generator=g).to(dtype)
        elif dtype == torch.bool:
            out[name] = torch.ones(shape, dtype=torch.bool)
        elif "mask" in name:
            out[name] = torch.ones(shape, dtype=dtype)
        else:
            out[name] = torch.randint(0, _vocab(config), shape, generator=g).to(dtype)
    return out


def default_input_specs(module: nn.Module, config: Any, batch: int = 2, seq: int = 16) -> list:
    main = getattr(module, "main_input_name", "input_ids")
    if main == "pixel_values":
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        return [("pixel_values", (batch, getattr(config, "num_channels", 3), size, size), torch.float32)]
    if main == "input_values":
        return [("input_values", (batch, 16000), torch.float32)]
    if main == "input_features":
        return _feature_specs(config, batch, seq)
    specs = [("input_ids", (batch, seq), torch.int64), ("attention_mask", (batch, seq), torch.int64)]
    if getattr(config, "is_encoder_decoder", False):
        specs.append(("decoder_input_ids", (batch, max(seq // 2, 2)), torch.int64))
    return specs


def _feature_specs(config: Any, batch: int, seq: int) -> list:
    """Speech encoders reading log-mel features: Whisper-style (batch, mel bins, 2 * max_source_positions frames:
    the encoder checks that length), else (batch, frames, features per frame) as Speech2Text reads them."""
    mels = getattr(config, "num_mel_bins", None)
    if isinstance(mels, int):
        frames = 2 * getattr(config, "max_source_positions", 1500)
        specs = [("input_features", (batch, mels, frames), torch.float32)]
    else:
        per = getattr(config, "input_feat_per_channel", 80) * getattr(config, "input_channels", 1)
        specs = [("input_features", (batch, seq * 4, per), torch.float32),
                 ("attention_mask", (batch, seq * 4), torch.int64)]
    if getattr(config, "is_encoder_decoder", False):
        specs.append(("decoder_input_ids", (batch, max(seq // 2, 2)), torch.int64))
    return specs


def fresh_like(inputs: dict[str, torch.Tensor], seed: int = 1,
               axes: dict[str, dict[int, str]] | None = None) -> dict[str, torch.Tensor]:
    """New inputs with a different batch and sequence length (checks dynamic axes), same names and dtypes,
    and integer values in the range the example used (token ids stay inside a custom model's vocabulary).
    `axes` (a trace's dynamic axes, input -> {axis: name}): grow only those (a Conv1d input's channels stay)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in inputs.items():
        shape = list(t.shape)
        if axes is not None:
            for i in axes.get(name, {}):
                shape[i] += 1 if i == 0 else 3
        else:
            if shape:
                shape[0] = shape[0] + 1
            # the (decoder_)sequence axis; not a speech input's features (Whisper checks their length)
            if len(shape) >= 2 and (not t.dtype.is_floating_point or t.dim() == 3) and name != "input_features":
                shape[1] = shape[1] + 3
        if t.dtype.is_floating_point:
            out[name] = torch.randn(shape, generator=g).to(t.dtype)
        elif t.dtype == torch.bool or "mask" in name:
            out[name] = torch.ones(shape, dtype=t.dtype)
        else:
            lo, hi = int(t.min()), int(t.max()) + 1
            out[name] = torch.randint(lo, max(hi, lo + 1), shape, generator=g).to(t.dtype)
    return out


def _load_hf(path: Path) -> tuple[nn.Module, Any]:
    try:
        import transformers  # noqa: F401 - only whether it is installed
    except ImportError:
        raise PeftcError("loading a Hugging Face model needs the 'transformers' package") from None
    cfg_file = path / "config.json"
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise PeftcError(f"{cfg_file}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    cls = model_class(cfg_file, raw)
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
    if not weights:
        raise PeftcError(f"{path}: no model weights (*.safetensors or *.bin) next to config.json")
    try:
        model = cls.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PeftcError(f"{path}: cannot load model: {msg}") from None
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model.eval(), model.config


def _import_callable(ref: str) -> tuple[Any, Any]:
    """'file.py:fn' or 'pkg.mod:fn' -> (callable, module)."""
    mod_ref, _, attr = ref.rpartition(":")
    if not attr or not mod_ref:
        raise PeftcError(f"model {ref!r}: expected path/to/file.py:callable or package.module:callable")
    if mod_ref.endswith(".py") or os.sep in mod_ref:
        path = Path(mod_ref)
        if not path.exists():
            raise PeftcError(f"model file not found: {path}")
        spec = importlib.util.spec_from_file_location(f"peftc_user_model_{abs(hash(str(path.resolve())))}", path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.resolve().parent))
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - user code
            raise PeftcError(f"{path}: error while importing: {type(e).__name__}: {e}") from None
        finally:
            sys.path.pop(0)
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(mod_ref)
        except ImportError as e:
            raise PeftcError(f"model {ref!r}: cannot import {mod_ref!r}: {e}") from None
    fn = getattr(module, attr, None)
    if fn is None:
        names = [n for n in dir(module) if not n.startswith("_")]
        raise PeftcError(f"model {ref!r}: {mod_ref} has no attribute {attr!r}{did_you_mean(attr, names)}")
    return fn, module


def model_class(cfg_file: Path, config: dict[str, Any]) -> type:
    """The transformers class a config.json's `architectures` names (a located error when it names none)."""
    import transformers
    archs = config.get("architectures") or []
    if not archs:
        raise PeftcError(f"{cfg_file}: no 'architectures' entry; cannot tell which model class to build")
    cls = getattr(transformers, archs[0], None)
    if cls is None:
        raise PeftcError(f"{cfg_file}: unknown architecture {archs[0]!r} for this transformers version")
    return cls


def load_model(ref: str | nn.Module, example_inputs: list[str] | dict[str, torch.Tensor] | None = None
               ) -> LoadedModel:
    """Resolve a MODEL reference (or take an nn.Module as is) and its example inputs."""
    config, is_hf, name = None, False, ""
    if isinstance(ref, nn.Module):
        module, fn_module, name = ref, None, type(ref).__name__
        config = getattr(ref, "config", None)
        is_hf = config is not None and hasattr(config, "to_dict")
    elif ref in BUILTINS:
        module, fn_module, name = BUILTINS[ref][0](), None, ref
        config = getattr(module, "config", None)
        is_hf = config is not None
    elif Path(ref).is_dir():
        path = Path(ref)
        if not (path / "config.json").exists():
            raise PeftcError(f"{path}: not a Hugging Face model directory (no config.json)")
        module, config = _load_hf(path)
        fn_module, name, is_hf = None, str(path), True
    elif ":" in ref and not Path(ref).exists():
        fn, fn_module = _import_callable(ref)
        try:
            module = fn() if not isinstance(fn, nn.Module) else fn
        except Exception as e:  # noqa: BLE001 - user code
            fn_name = ref.rpartition(":")[2]
            raise PeftcError(f"model {ref!r}: calling {fn_name}() failed: {type(e).__name__}: {e}") from None
        if not isinstance(module, nn.Module):
            raise PeftcError(f"model {ref!r}: returned {type(module).__name__}, not a torch.nn.Module")
        module = module.eval()
        name = ref
        config = getattr(module, "config", None)
    else:
        if Path(ref).exists():
            raise PeftcError(f"model {ref!r}: not a model directory or path/to/file.py:callable")
        raise PeftcError(f"model not found: {ref!r} is not a directory, a file.py:callable or a built-in model"
                         f"{did_you_mean(ref, BUILTINS)} (built-ins: {', '.join(BUILTINS)})")
    if not isinstance(ref, nn.Module):
        for p in module.parameters():  # a model we built: frozen (a caller's module is left as it is)
            p.requires_grad_(False)
    if isinstance(example_inputs, dict):
        inputs = {k: v.contiguous() for k, v in example_inputs.items()}
    elif example_inputs:
        inputs = make_inputs([parse_example_input(t) for t in example_inputs], config)
    elif fn_module is not None and hasattr(fn_module, "example_inputs"):
        inputs = fn_module.example_inputs()
        if not isinstance(inputs, dict) or not all(isinstance(v, torch.Tensor) for v in inputs.values()):
            raise PeftcError(f"model {name!r}: example_inputs() must return a dict of name -> tensor")
        inputs = {k: v.contiguous() for k, v in inputs.items()}
    elif config is not None and hasattr(config, "to_dict"):
        inputs = make_inputs(default_input_specs(module, config), config)
    else:
        raise PeftcError(f"model {name!r}: give example inputs with --example-input NAME=SHAPE[:DTYPE] "
                         "or define example_inputs() beside the model callable")
    return LoadedModel(module, inputs, name, config, is_hf, str(ref) if not isinstance(ref, nn.Module) else name)
