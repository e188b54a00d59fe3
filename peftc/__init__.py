"""peftc: a compiler for parameter-efficient fine-tuning adapters.

    text -> spec (peftc.spec) -> plan (peftc.plan) -> graph rewrites (peftc.rewrite) -> emit (peftc.emit)

Python API: `compile(spec, model) -> torch.fx.GraphModule`, `save_adapter(gm, dir)`, `export_onnx`,
`save_pt2`, `parse_spec` / `read_spec`.
"""
from peftc.emit.checkpoint import save_adapter
from peftc.emit.onnx import export_onnx
from peftc.emit.pt2 import save_pt2
from peftc.errors import PeftcError
from peftc.pipeline import compile, compile_model
from peftc.spec.parse import parse_spec, read_spec

__all__ = ["compile", "compile_model", "save_adapter", "export_onnx", "save_pt2", "parse_spec", "read_spec",
           "PeftcError"]
__version__ = "0.1.0"
