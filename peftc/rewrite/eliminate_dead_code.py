"""Pass `dce`: drop nodes nothing uses, and the attributes (folded-away adapter tensors) no node reads."""
from __future__ import annotations

from typing import Any

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from peftc.manifest import Manifest
from peftc.rewrite.graph_tools import del_path


def eliminate_dead_code(manifest: Manifest) -> Any:
    def run(gm: fx.GraphModule) -> PassResult:
        modified = gm.graph.eliminate_dead_code()
        read = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
        for path in sorted(manifest.registered):
            if path not in read and not any(r.startswith(path + ".") for r in read):
                del_path(gm, path)
                manifest.registered.discard(path)
                manifest.live.discard(path)
                manifest.pinned.discard(path)
                modified = True
        gm.recompile()
        return PassResult(gm, modified)

    return run
