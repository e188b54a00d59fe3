"""Pass `stack`: several adapters on one layer become one computation, and a per-row adapter choice.

After `factor`, a layer with additive adapters computes a chain `base + branch_1 + branch_2 + ...`, one branch
per adapter (found by provenance: each branch node carries its layer and its one adapter). This pass:

- stacks the low-rank branches that read the same input, `linear(linear(x, A_i), B_i) * s_i`, into one
  product: `linear(linear(x, cat(A_i)), cat(s_i * B_i))` (the scalings fold into B: a [out, r] multiply on the
  weight instead of one over every token's output; a lone branch gets that too). Sibling layers that read
  the same x then share one `x @ A` matmul (pass `fuse`);
- with a per-row choice (`adapter_ids`, an int64 graph input of shape [batch]: row b takes adapter
  `adapter_ids[b]` in declaration order, -1 the base model): where one low-rank adapter reads x, its rank
  columns are multiplied by a [batch, r] 0/1 mask `adapter_ids[:, None] == column_adapter[None, :]` between
  the two matmuls; where several do, their A's and scaled B's are stacked along a new axis behind a zero slot
  (the base model; ranks padded to the largest), each row gathers its own pair by id and two batched matmuls
  run over its tokens (one adapter's work per row, not n). Any other additive branch (no low-rank form:
  LoHa, LoKr, ...) is multiplied by its adapter's [batch] 0/1 mask. Fixed shapes, no loop over adapters, no
  split of the batch.

A bad id (< -1 or >= n) fails an `_assert_async` in torch (kept in a .pt2) and turns its row into NaN (what
an ONNX model, which has no assert, returns for it): never a silently wrong row. With a per-row choice every
adapter must add a separate branch: an adapter that scales or rotates the layer (IA3, DoRA, OFT) is an error.
"""
from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from peftc.errors import PeftcError
from peftc.rewrite.graph_tools import ADAPTER, RULE, TAG, input_dependent, log_rule, static_val

aten = torch.ops.aten
IDS = "adapter_ids"


def _call(n: Any, target: Any) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target is target


def _branch_of(n: Any, layer: str) -> str | None:
    """The one adapter a branch node computes, or None."""
    if not isinstance(n, fx.Node) or n.meta.get(TAG) != layer:
        return None
    ads = n.meta.get(ADAPTER) or ()
    return ads[0] if len(ads) == 1 else None


def find_chains(gm: fx.GraphModule) -> list[tuple[str, fx.Node, list[tuple[str, fx.Node]], fx.Node]]:
    """(layer, head, [(adapter, branch)], end) for every `head + branch_1 + ... + branch_k` chain of adds."""
    def is_link(n: Any) -> bool:
        return (_call(n, aten.add.Tensor) and TAG in n.meta and len(n.args) == 2 and not n.kwargs
                and isinstance(n.args[0], fx.Node) and _branch_of(n.args[1], n.meta[TAG]) is not None
                and len(n.args[1].users) == 1)

    chains = []
    for n in gm.graph.nodes:
        if not is_link(n) or (is_link(n.args[0]) and len(n.args[0].users) == 1
                              and n.args[0].meta[TAG] == n.meta[TAG]):
            continue   # not the first link of a chain
        layer, links, cur = n.meta[TAG], [], n
        while True:
            links.append((_branch_of(cur.args[1], layer), cur.args[1]))
            nxt = next(iter(cur.users)) if len(cur.users) == 1 else None
            if not (is_link(nxt) and nxt.args[0] is cur and nxt.meta[TAG] == layer):
                break
            cur = nxt
        chains.append((layer, n.args[0], links, cur))
    return chains


def _low_rank(gm: fx.GraphModule, branch: fx.Node, dep: set[fx.Node]) -> tuple[fx.Node, fx.Node, fx.Node, Any] | None:
    """(x, A, B, s) for a branch `linear(linear(x, A), B) [* s]` with weight-side 2-D A, B and a number s."""
    s: Any = 1.0
    n = branch
    if _call(n, aten.mul.Tensor) and isinstance(n.args[1], (int, float)) and not isinstance(n.args[1], bool):
        n, s = n.args[0], n.args[1]
    if not (_call(n, aten.linear.default) and len(n.users) == 1 and (len(n.args) == 2 or n.args[2] is None)):
        return None
    inner, b = n.args[0], n.args[1]
    if not (_call(inner, aten.linear.default) and len(inner.users) == 1
            and (len(inner.args) == 2 or inner.args[2] is None)):
        return None
    x, a = inner.args[0], inner.args[1]
    for w in (a, b):
        v = static_val(gm, w)
        if w in dep or v is None or getattr(v, "dim", lambda: 0)() != 2:
            return None
    return x, a, b, s


class _Emit:
    """Emits nodes before `anchor`, tagged with a layer, adapters and the rule `stack`."""

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node, layer: str, adapters: tuple[str, ...]) -> None:
        self.g, self.anchor, self.layer, self.adapters = gm.graph, anchor, layer, adapters
        self.meta_from = anchor

    def __call__(self, target: Any, *args: Any) -> fx.Node:
        with self.g.inserting_before(self.anchor):
            node = self.g.call_function(target, args)
        node.meta[TAG] = self.layer
        node.meta[ADAPTER] = self.adapters
        node.meta[RULE] = "stack"
        if "nn_module_stack" in self.meta_from.meta:
            node.meta["nn_module_stack"] = self.meta_from.meta["nn_module_stack"]
        gm = self.g.owning_module
        if all(static_val(gm, a) is not None for a in node.all_input_nodes):
            try:   # a weight-side node's meta value (its shape, for `fuse`)
                node.meta["peftc_val"] = target(*fx.node.map_arg(args, lambda a: static_val(gm, a)))
            except Exception:  # noqa: BLE001 - best effort
                pass
        return node


class _Masks:
    """Per-row masks built once from `adapter_ids`, right after the graph's inputs."""

    def __init__(self, gm: fx.GraphModule, ids: fx.Node, names: Sequence[str]) -> None:
        self.gm, self.ids, self.names = gm, ids, list(names)
        self.anchor = [n for n in gm.graph.nodes if n.op == "placeholder"][-1].next
        self.cache: dict[Any, fx.Node] = {}
        emit = self._emit()
        n = len(self.names)
        ok = emit(aten.logical_and.default, emit(aten.ge.Scalar, ids, -1), emit(aten.lt.Scalar, ids, n))
        listed = ", ".join(f"{i} = {a}" for i, a in enumerate(self.names))
        emit(aten._assert_async.msg, emit(aten.all.default, ok),
             f"adapter_ids: every id must be -1 (the base model) or an adapter's index in the spec ({listed})")
        # 0 for a good row, NaN for a bad one: what reaches the outputs where no assert runs (ONNX)
        self.bad = emit(aten.where.Scalar, ok, 0.0, math.nan)
        self.ok, self.safe = ok, None
        self.batch = emit(aten.sym_size.int, ids, 0)

    def _emit(self) -> _Emit:
        return _Emit(self.gm, self.anchor, IDS, ())

    def index(self, adapter: str) -> int:
        return self.names.index(adapter)

    def columns(self, parts: tuple[tuple[str, int], ...]) -> fx.Node:
        """[batch, sum r] float mask: column j is 1 where the row's id is the adapter column j belongs to."""
        if parts not in self.cache:
            cols = torch.tensor([self.index(a) for a, r in parts for _ in range(r)], dtype=torch.int64)
            path = f"peftc_adapter_columns_{len(self.cache)}"
            self.gm.register_buffer(path, cols)
            emit = self._emit()
            with self.gm.graph.inserting_before(self.anchor):
                c = self.gm.graph.get_attr(path)
            eq = emit(aten.eq.Tensor, emit(aten.unsqueeze.default, self.ids, 1), c)
            m = emit(aten.add.Tensor, emit(aten.mul.Tensor, eq, 1.0), emit(aten.unsqueeze.default, self.bad, 1))
            self.cache[parts] = m
        return self.cache[parts]

    def slots(self, adapters: tuple[str, ...]) -> fx.Node:
        """[batch] int64: each row's slot among `adapters` (1 + position), 0 for the base model, any other
        adapter and a bad id."""
        key = ("slots", adapters)
        if key not in self.cache:
            table = torch.zeros(len(self.names) + 1, dtype=torch.int64)
            for pos, a in enumerate(adapters):
                table[self.index(a) + 1] = pos + 1
            path = f"peftc_adapter_slots_{len(self.cache)}"
            self.gm.register_buffer(path, table)
            emit = self._emit()
            with self.gm.graph.inserting_before(self.anchor):
                t = self.gm.graph.get_attr(path)
            if self.safe is None:
                self.safe = emit(aten.where.self, self.ok, emit(aten.add.Tensor, self.ids, 1),
                                 emit(aten.mul.Tensor, self.ids, 0))
            self.cache[key] = emit(aten.index_select.default, t, 0, self.safe)
        return self.cache[key]

    def rows(self, adapter: str) -> fx.Node:
        """[batch] float mask: 1 where the row's id is `adapter`."""
        if adapter not in self.cache:
            emit = self._emit()
            eq = emit(aten.eq.Scalar, self.ids, self.index(adapter))
            self.cache[adapter] = emit(aten.add.Tensor, emit(aten.mul.Tensor, eq, 1.0), self.bad)
        return self.cache[adapter]


def stack_adapters(selectable: Sequence[str] | None = None, live: dict[str, list[str]] | None = None,
                   rule_log: list[str] | None = None, rule_hits: Counter | None = None) -> Any:
    """The pass. `selectable`: the adapters `adapter_ids` indexes (declaration order), or None for no per-row
    choice; `live`: layer -> its live adapters (each must add a branch when there is a per-row choice).
    Each layer it rewrites is logged as the rule `stack` (in `rule_log` / `rule_hits`, as the factor rules)."""
    def run(gm: fx.GraphModule) -> PassResult:
        ids = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.target == IDS), None)
        if selectable is not None and ids is None:
            raise PeftcError(f"the traced graph has no '{IDS}' input")
        masks = _Masks(gm, ids, selectable) if selectable is not None else None
        dep = input_dependent(gm)
        chains = find_chains(gm)
        seen: dict[str, set[str]] = {}
        modified = masks is not None
        for layer, head, links, end in chains:
            seen.setdefault(layer, set()).update(a for a, _ in links)
            if masks is not None:
                _check_additive(gm, layer, end, links)
            groups: dict[fx.Node, list[tuple[str, fx.Node, tuple]]] = {}
            others: list[tuple[str, fx.Node]] = []
            for adapter, branch in links:
                lr = _low_rank(gm, branch, dep)
                if lr is not None:
                    groups.setdefault(lr[0], []).append((adapter, branch, lr))
                else:
                    others.append((adapter, branch))
            stacked = {x: g for x, g in groups.items()   # (one branch too: its scaling folds into B)
                       if len(g) >= 2 or masks is not None or any(lr[3] != 1.0 for _, _, lr in g)}
            if not stacked and masks is None:
                continue
            for x, g in groups.items():
                if x not in stacked:
                    others += [(a, br) for a, br, _ in g]
            emit = _Emit(gm, end, layer, tuple(a for a, _ in links))
            total: fx.Node = head
            for adapter, branch in others:   # branches kept as they are (masked per row): first, so `rejoin` sees them
                if masks is not None:
                    branch = _mask_rows(emit, branch, masks.rows(adapter), masks.batch)
                total = emit(aten.add.Tensor, total, branch)
            for x, g in stacked.items():
                bs = [lr[2] if lr[3] == 1.0 else emit(aten.mul.Tensor, lr[2], lr[3]) for _, _, lr in g]
                if masks is not None and len(g) > 1:
                    y = _gathered(gm, emit, x, g, bs, head, masks)
                    total = emit(aten.add.Tensor, total, y)
                    continue
                a_cat = emit(aten.cat.default, [lr[1] for _, _, lr in g], 0) if len(g) > 1 else g[0][2][1]
                b_cat = emit(aten.cat.default, bs, 1) if len(g) > 1 else bs[0]
                h = emit(aten.linear.default, x, a_cat)
                if masks is not None:
                    ranks = tuple((a, static_val(gm, lr[1]).shape[0]) for a, _, lr in g)
                    m = emit(aten.type_as.default, masks.columns(ranks), h)
                    rows = emit(aten.reshape.default, h, [masks.batch, -1, sum(r for _, r in ranks)])
                    y = emit(aten.linear.default, emit(aten.mul.Tensor, rows, emit(aten.unsqueeze.default, m, 1)),
                             b_cat)
                    y = emit(aten.reshape_as.default, y, head)
                else:
                    y = emit(aten.linear.default, h, b_cat)
                total = emit(aten.add.Tensor, total, y)
            end.replace_all_uses_with(total)
            modified = True
            log_rule(rule_log, rule_hits, "stack", layer)
        if masks is not None and live:
            for layer, names in live.items():
                missing = [a for a in names if a not in seen.get(layer, set())]
                if missing:
                    raise PeftcError(f"--adapter-ids: adapter '{missing[0]}' on layer '{layer}' does not add a "
                                     "separate branch to the layer's output (it scales or rotates the weight), "
                                     "so it cannot be chosen per row; a per-row choice needs additive adapters "
                                     "(LoRA, LoHa, LoKr, ...)")
        if modified:
            gm.graph.eliminate_dead_code()
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)

    return run


def _gathered(gm: fx.GraphModule, emit: _Emit, x: fx.Node, g: list, bs: list[fx.Node], head: fx.Node,
              masks: _Masks) -> fx.Node:
    """A per-row choice among several low-rank adapters, with one adapter's work per row: the adapters' A and
    (scaled) B stacked along a new first axis behind a zero slot (the base model), ranks padded to the largest,
    each row's pair gathered by its id, then two batched matmuls over the row's tokens."""
    ranks = [static_val(gm, lr[1]).shape[0] for _, _, lr in g]
    r_max, d_in = max(ranks), static_val(gm, g[0][2][1]).shape[1]
    a_rows = [lr[1] if r == r_max else emit(aten.constant_pad_nd.default, lr[1], [0, 0, 0, r_max - r])
              for (_, _, lr), r in zip(g, ranks)]
    b_rows = [b if r == r_max else emit(aten.constant_pad_nd.default, b, [0, r_max - r]) for b, r in zip(bs, ranks)]
    zero_slot = [0, 0, 0, 0, 1, 0]
    a_st = emit(aten.constant_pad_nd.default, emit(aten.stack.default, a_rows, 0), zero_slot)   # [k+1, r, in]
    b_st = emit(aten.constant_pad_nd.default, emit(aten.stack.default, b_rows, 0), zero_slot)   # [k+1, out, r]
    slot = masks.slots(tuple(a for a, _, _ in g))
    a_g = emit(aten.index_select.default, a_st, 0, slot)
    b_g = emit(aten.index_select.default, b_st, 0, slot)
    bad = emit(aten.type_as.default, masks.bad, b_g)   # NaN on a bad row's gathered B (small), not on its output
    b_g = emit(aten.add.Tensor, b_g, emit(aten.unsqueeze.default, emit(aten.unsqueeze.default, bad, 1), 2))
    xr = emit(aten.reshape.default, x, [masks.batch, -1, d_in])
    h = emit(aten.bmm.default, xr, emit(aten.transpose.int, a_g, 1, 2))
    y = emit(aten.bmm.default, h, emit(aten.transpose.int, b_g, 1, 2))
    return emit(aten.reshape_as.default, y, head)


def _mask_rows(emit: _Emit, branch: fx.Node, mask: fx.Node, batch: fx.Node) -> fx.Node:
    """branch * mask per row: the branch viewed as [batch, -1] (rows are batch-major: [B, S, ...] or [B*S, ...])."""
    m = emit(aten.unsqueeze.default, emit(aten.type_as.default, mask, branch), 1)
    flat = emit(aten.reshape.default, branch, [batch, -1])
    return emit(aten.reshape_as.default, emit(aten.mul.Tensor, flat, m), branch)


def _check_additive(gm: fx.GraphModule, layer: str, end: fx.Node, links: list[tuple[str, fx.Node]]) -> None:
    """With a per-row choice, nothing of the layer's may act on the sum of its branches (a scale, a rotation)."""
    branch = {a for a, _ in links}
    stack = [u for u in end.users]
    while stack:
        u = stack.pop()
        if u.meta.get(TAG) != layer or u.op != "call_function" or u.target is operator.getitem:
            continue
        here = list(u.meta.get(ADAPTER) or ())
        extra = [a for a in here if a not in branch] or here or sorted(branch)
        raise PeftcError(f"--adapter-ids: adapter '{extra[0]}' on layer '{layer}' does not add a separate branch "
                         "to the layer's output (it scales or rotates the weight), so it cannot be chosen per row; "
                         "a per-row choice needs additive adapters (LoRA, LoHa, LoKr, ...)")
