"""peftc: a compiler for parameter-efficient fine-tuning adapters.

    text -> spec (peftc.spec) -> plan (peftc.plan) -> graph rewrites (peftc.rewrite) -> emit (peftc.emit)

Python API: `compile(spec, model) -> torch.fx.GraphModule`, `save_adapter(gm, dir)`, `export_onnx`,
`export_adapter` (an `.onnx_adapter` file for a switchable ONNX model), `export_generation` (a decoder
compiled `with_past=True` -> an onnxruntime-genai folder; `adapters_as_inputs=True`: with switchable adapter
files), `save_pt2`, `parse_spec` / `read_spec`,
`merge_model(spec, model_dir, out_dir)` (peftc merge), `lower_to_lora(spec, model, rank=..., max_error=...,
output=...)` (peftc lower).

The API is exported lazily (PEP 562 module `__getattr__`): `import peftc` imports neither torch nor the
compiler, so the command line answers `--help`, `--version`, syntax errors and `import` in well under a
second; `peftc.compile` and friends load their modules on first use.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "compile": "peftc.pipeline",
    "compile_model": "peftc.pipeline",
    "save_adapter": "peftc.emit.checkpoint",
    "export_onnx": "peftc.emit.onnx",
    "export_adapter": "peftc.emit.onnx_adapters",
    "export_generation": "peftc.emit.generation",
    "save_pt2": "peftc.emit.pt2",
    "parse_spec": "peftc.spec.parse",
    "read_spec": "peftc.spec.parse",
    "merge_model": "peftc.stream_merge",
    "lower_to_lora": "peftc.lower",
    "PeftcError": "peftc.errors",
    "PeftcWarning": "peftc.errors",
    "refresh_frozen": "peftc.rewrite.freeze_detached",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ below does the importing
    from peftc.emit.checkpoint import save_adapter  # noqa: F401
    from peftc.emit.generation import export_generation  # noqa: F401
    from peftc.emit.onnx import export_onnx  # noqa: F401
    from peftc.emit.onnx_adapters import export_adapter  # noqa: F401
    from peftc.emit.pt2 import save_pt2  # noqa: F401
    from peftc.errors import PeftcError, PeftcWarning  # noqa: F401
    from peftc.lower import lower_to_lora  # noqa: F401
    from peftc.pipeline import compile, compile_model  # noqa: F401
    from peftc.rewrite.freeze_detached import refresh_frozen  # noqa: F401
    from peftc.spec.parse import parse_spec, read_spec  # noqa: F401
    from peftc.stream_merge import merge_model  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'peftc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
