"""Pass `strip`: drop what torch.export leaves in an unlifted graph for its own checks, and make the graph run
at the dtype (and device) of its parameters.

Removed: `aten._assert_tensor_metadata` (which fails as soon as the module is cast: "Tensor dtype mismatch!"),
the `_guards_fn` input-check call, and casts that are identities at any dtype (`.to(float32)` of a float32
activation, `.to(bool)` of a bool). Together they cost ~13% of a small model's forward. The dtype constants
that remain follow the parameters at run time (peftc/rewrite/dtype_kinds.py), so `gm.to(torch.bfloat16)` runs.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from peftc.rewrite.dtype_kinds import make_dtype_generic

BOOKKEEPING = {torch.ops.aten._assert_tensor_metadata.default}


def strip_bookkeeping() -> Any:
    def run(gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            if (node.op == "call_function" and node.target in BOOKKEEPING
                    or node.op == "call_module" and node.target == "_guards_fn"):
                gm.graph.erase_node(node)
                modified = True
        if hasattr(gm, "_guards_fn") and not any(n.op == "call_module" and n.target == "_guards_fn"
                                                 for n in gm.graph.nodes):
            gm.delete_submodule("_guards_fn")
        modified |= make_dtype_generic(gm)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, modified)

    return run
