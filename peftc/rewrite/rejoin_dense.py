"""Pass `rejoin`: where factoring left a live update as a full-size weight (no rule had a cheaper form:
LoHa's Hadamard product, FourierFT's inverse FFT, SHiRA's scatter, ...), compute the layer as one matmul
again, the way peft does:

    linear(x, W, b) + linear(x, D) * s   =>   linear(x, W + s * D, b)      (s optional; D the size of W)

Two matmuls over every token cost more than one elementwise add over the weight. Only updates the size of
the base weight rejoin; a factored (thin) update never does."""
from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from peftc.ops import TENSOR_OPS
from peftc.rewrite.graph_tools import TAG, GraphBuilder, static_val

aten = torch.ops.aten


def _linear(n: Any) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target is aten.linear.default


def _update(n: Any) -> tuple[fx.Node, Any] | None:
    """(linear(x, D) node, scalar s) for `linear(x, D)` or `linear(x, D) * s`, else None."""
    if _linear(n) and len(n.users) == 1:
        return n, 1.0
    if (isinstance(n, fx.Node) and n.op == "call_function" and n.target is aten.mul.Tensor and len(n.users) == 1
            and _linear(n.args[0]) and len(n.args[0].users) == 1 and isinstance(n.args[1], (int, float))
            and not isinstance(n.args[1], bool)):
        return n.args[0], n.args[1]
    return None


def _shape(gm: fx.GraphModule, n: Any) -> tuple[int, ...] | None:
    v = static_val(gm, n)
    if v is None and isinstance(n, fx.Node) and hasattr(n.meta.get("val"), "shape"):
        v = n.meta["val"]
    return tuple(v.shape) if v is not None and hasattr(v, "shape") else None


def rejoin_dense() -> Any:
    def run(gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target is not aten.add.Tensor or len(node.args) != 2:
                continue
            for base, other in (node.args, node.args[::-1]):
                upd = _update(other)
                if not _linear(base) or upd is None:
                    continue
                lin, s = upd
                x, w = base.args[0], base.args[1]
                d = lin.args[1]
                if lin.args[0] is not x or len(lin.args) > 2 and lin.args[2] is not None:
                    continue
                if not (isinstance(d, fx.Node) and TAG in d.meta) or _shape(gm, d) != _shape(gm, w) \
                        or _shape(gm, w) is None:
                    continue
                bias = base.args[2] if len(base.args) > 2 else None
                builder = GraphBuilder(gm, node, d.meta[TAG], meta_from=node, rule="rejoin_dense")
                scaled = d if s == 1.0 else builder.apply(TENSOR_OPS["mul"], aten.mul.Tensor, [d, s])
                weight = builder.apply(TENSOR_OPS["add"], aten.add.Tensor, [w, scaled])
                new = builder.apply(TENSOR_OPS["linear"], aten.linear.default, [x, weight, bias])
                new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta")})
                node.replace_all_uses_with(new)
                modified = True
                break
        if modified:
            gm.graph.eliminate_dead_code()
            gm.recompile()
        return PassResult(gm, modified)

    return run
