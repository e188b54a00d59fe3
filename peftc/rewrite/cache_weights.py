"""Pass `cache`: the small weight-side tensors peftc computes from live adapter tensors (stacked A's, scaled and
stacked B's, the concatenated A of q/k/v, gated factors) are computed once and reused until a tensor they read
changes, instead of on every forward.

Every such computation moves into one `WeightCache` submodule, called once at the start of the graph. It runs
its subgraph again when any tensor it reads is another object, moved, or written in place (its version
counter: an optimizer step, `load_adapter`'s hot swap, a gate switched by `set_adapter`), and computes without
caching while autograd records gradients for them (training), under torch.compile and torch.export (a `.pt2`
or ONNX export traces the plain computation). Only results no larger than the adapter tensors they come from
are cached (never a full-size W + ΔW: that would hold a second copy of the layer's weight).
"""
from __future__ import annotations

import math
import operator
import re
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from peftc.manifest import Manifest
from peftc.rewrite.graph_tools import TAG, get_path

CACHE = "peftc_weight_cache"


class WeightCache(nn.Module):
    """Calls `fn` on the tensors it is given and keeps the result until one of them changes."""

    def __init__(self, fn: fx.GraphModule) -> None:
        super().__init__()
        self.fn = fn
        self._seen: tuple | None = None
        self._inputs: tuple = ()
        self._value: Any = None

    def forward(self, *ts: torch.Tensor) -> Any:
        if (torch.compiler.is_compiling() or torch.compiler.is_exporting()
                or torch.is_grad_enabled() and any(t.requires_grad for t in ts)):
            return self.fn(*ts)
        try:
            seen = tuple((t._version, t.data_ptr()) for t in ts)
        except RuntimeError:   # inference tensors keep no version counter
            return self.fn(*ts)
        if seen != self._seen or len(ts) != len(self._inputs) or any(a is not b for a, b in zip(ts, self._inputs)):
            with torch.no_grad():
                self._value = self.fn(*ts)
            self._seen, self._inputs = seen, ts   # held, so that no other tensor reuses their ids
        return self._value


def _numel(gm: fx.GraphModule, n: fx.Node) -> int | None:
    v = n.meta.get("peftc_val")
    if v is None and n.op == "get_attr":
        v = get_path(gm, n.target)
    return math.prod(v.shape) if hasattr(v, "shape") else None


def cache_weights(manifest: Manifest) -> Any:
    def run(gm: fx.GraphModule) -> PassResult:
        g = gm.graph
        side: set[fx.Node] = set()   # weight-side: get_attr tensors and peftc's ops on them alone
        for n in g.nodes:
            if n.op == "get_attr" and isinstance(get_path(gm, n.target), torch.Tensor):
                side.add(n)
            elif (n.op == "call_function" and TAG in n.meta and n.all_input_nodes
                  and all(a in side for a in n.all_input_nodes)):
                side.add(n)
        cone: dict[fx.Node, set[fx.Node]] = {}
        for n in g.nodes:
            if n in side:
                cone[n] = {n}.union(*(cone[a] for a in n.all_input_nodes))
        roots = []
        for n in g.nodes:
            if n not in side or n.op != "call_function" or all(u in side for u in n.users):
                continue
            live = [a for a in cone[n] if a.op == "get_attr" and a.target in manifest.live]
            size, budget = _numel(gm, n), sum(_numel(gm, a) or 0 for a in live)
            if live and size is not None and size <= budget:
                roots.append(n)
        if not roots:
            return PassResult(gm, False)
        nodes = [n for n in g.nodes if any(n in cone[r] for r in roots)]
        inputs = [n for n in nodes if n.op == "get_attr"]
        sub = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for n in inputs:
            env[n] = sub.placeholder(re.sub(r"\W", "_", n.target))   # `mix[a]`: a term of a combination
        for n in nodes:
            if n not in env:
                env[n] = sub.node_copy(n, lambda a: env[a])
        sub.output(tuple(env[r] for r in roots))
        name = CACHE
        while hasattr(gm, name):
            name += "_"
        gm.add_module(name, WeightCache(fx.GraphModule(nn.Module(), sub)))
        anchor = next(n for n in g.nodes if n.op != "placeholder")
        with g.inserting_before(anchor):
            args = tuple(g.get_attr(n.target) for n in inputs)
            call = g.call_module(name, args)
            parts = [g.call_function(operator.getitem, (call, i)) for i in range(len(roots))]
        for r, part in zip(roots, parts):
            part.meta.update({k: v for k, v in r.meta.items() if k != "val"})
            r.replace_all_uses_with(part)
        g.eliminate_dead_code()
        g.lint()
        gm.recompile()
        return PassResult(gm, True)

    return run



def inline_cache(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` itself when it calls no WeightCache, else a copy (sharing gm's tensors) with each cache call replaced by
    the computation it caches: what an exporter should see, and fold_for_export can then fold what the ONNX
    converter cannot express (a linear solve) out of it."""
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), WeightCache)]
    if not calls:
        return gm
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen   # the model's own input and output structure (output names: `logits`)
    env: dict[fx.Node, Any] = {}
    for n in gm.graph.nodes:
        if n in calls:
            fn: fx.GraphModule = gm.get_submodule(n.target).fn
            sub_env: dict[fx.Node, Any] = {}
            args = iter(n.args)
            for s in fn.graph.nodes:
                if s.op == "placeholder":
                    sub_env[s] = env[next(args)]
                elif s.op == "output":
                    env[n] = tuple(sub_env[o] for o in s.args[0])
                else:
                    sub_env[s] = graph.node_copy(s, sub_env.__getitem__)
            continue
        if n.op == "call_function" and n.target is operator.getitem and n.args[0] in calls:
            env[n] = env[n.args[0]][n.args[1]]
            continue
        env[n] = graph.node_copy(n, lambda a: env[a])
    out = fx.GraphModule(gm, graph)
    for attr in ("peftc", "peftc_inputs", "peftc_axes", "peftc_layer_kinds"):
        if hasattr(gm, attr):
            setattr(out, attr, getattr(gm, attr))
    return out
