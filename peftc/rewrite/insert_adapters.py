"""Pass `insert`: put each planned adapter's weight transform into the graph.

For every targeted layer, the nodes of that layer that read its weight (aten.linear, addmm for GPT-2
Conv1D, conv, embedding, or whatever a custom layer computes) read W' = T(W, theta) instead (and b'
if the method declares one), built from the method's declared expressions. Adapter tensors become
parameters under peft's in-memory names. The result is correct but dense: later passes fold merged
transforms into constants and factor the live ones into their efficient unmerged form.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from peftc.errors import PeftcError
from peftc.lang.evaluate import evaluate
from peftc.layer_kinds import KINDS
from peftc.manifest import Manifest, adapter_record, add_layer
from peftc.model_inputs import graph_funcs
from peftc.ops import TENSOR_OPS
from peftc.plan import Plan
from peftc.rewrite.graph_tools import ADAPTER, BASE, TAG, GraphBuilder, get_path, has_path, normalized_args, set_path
from peftc.rewrite.sites import NotAdaptable, not_adaptable_error, train_biases, why_not_read
from peftc.stochastic import weight_dropout

aten = torch.ops.aten


def param_path(layer: str, saved: str | None, adapter: str, name: str = "") -> str:
    """peft's in-memory name: 'lora_A.weight' -> '<layer>.lora_A.<adapter>.weight',
    'ia3_l' -> '<layer>.ia3_l.<adapter>'; a tensor that is never saved: '<layer>.peftc_<name>.<adapter>'."""
    if saved is None:
        return f"{layer}.peftc_{name}.{adapter}"
    head, dot, leaf = saved.rpartition(".")
    if dot and leaf in ("weight", "bias"):
        return f"{layer}.{head}.{adapter}.{leaf}"
    return f"{layer}.{saved}.{adapter}"


def module_of(node: fx.Node) -> str | None:
    """The innermost module a node was traced in (from nn_module_stack), or None if unknown."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path.split("@")[0] if isinstance(path, str) else None


def _consumers(gm: fx.GraphModule, fqn: str | None, layer: str | None) -> tuple[fx.Node | None,
                                                                               list[tuple[fx.Node, fx.Node]]]:
    """A get_attr node reading the tensor at `fqn`, and (node, get_attr it reads) for every node of module
    `layer` that reads that tensor (a tied weight has readers in other modules too; they are left alone, unless
    `layer` is None: every reader)."""
    if fqn is None or not has_path(gm, fqn):
        return None, []
    t = get_path(gm, fqn)
    reader, users = None, []
    for n in gm.graph.nodes:
        if n.op == "get_attr" and get_path(gm, n.target) is t:
            mine = [(u, n) for u in n.users if layer is None or module_of(u) in (None, layer)]
            if mine and reader is None:
                reader = n
            users += mine
    return reader, users


def insert_adapters(plan: Plan, manifest: Manifest) -> Any:
    def run(gm: fx.GraphModule) -> PassResult:
        modified = False
        for fqn, value in plan.base_overrides.items():
            old = get_path(gm, fqn)
            new = nn.Parameter(value.clone(), requires_grad=False)
            for name, p in list(gm.named_parameters(remove_duplicate=False)):
                if p is old:
                    set_path(gm, name, new)
            modified = True
        shared_paths: dict[tuple[str, str], str] = {}
        for name, ap in plan.adapters.items():
            manifest.adapters[name] = adapter_record(name, ap)
            live = ap.active and not ap.merge
            for decl in ap.shared_decls:   # one tensor per adapter, read by every layer
                path = f"peftc_shared.{name}.{decl.name}"
                _register(gm, manifest, path, ap.shared[decl.name], live, decl.frozen)
                if decl.saved is not None:
                    manifest.adapters[name].shared[decl.saved] = get_path(gm, path)
                shared_paths[(name, decl.name)] = path
        for lname, sas in plan.sites.items():
            layer = plan.layers[lname]
            # register every adapter tensor once per layer
            paths: dict[tuple[str, str], str] = dict(shared_paths)
            for sa in sas:
                rec = manifest.adapters[sa.adapter]
                live = sa.active and not sa.merge
                for decl in sa.program.params:
                    home = plan.adapters[sa.adapter].saved_names.get(lname, lname)   # a parameter: its module's
                    path = param_path(home, decl.saved, sa.adapter, decl.name)
                    _register(gm, manifest, path, sa.tensors[decl.name], live, decl.frozen)
                    paths[(sa.adapter, decl.name)] = path
                add_layer(rec, lname, sa, {d.name: get_path(gm, paths[(sa.adapter, d.name)])
                                           for d in sa.program.params}, layer)
                for cname, value in sa.consts.items():
                    path = f"{lname}.peftc_{cname}.{sa.adapter}"
                    set_path(gm, path, value)
                    manifest.registered.add(path)
                    paths[(sa.adapter, cname)] = path
                if sa.active and not sa.merge and plan.train and sa.program.dropout:
                    p_drop, stem = sa.program.dropout
                    mpath = f"{lname}.{stem}.{sa.adapter}"
                    set_path(gm, mpath, nn.Dropout(p_drop))
                    manifest.registered.add(mpath)
                if sa.active and not sa.merge and plan.train:
                    for p_drop, stem, over, rescale in sa.program.weight_dropouts:
                        mpath = f"{lname}.{stem}.{sa.adapter}"
                        set_path(gm, mpath, weight_dropout(over, p_drop, rescale))
                        manifest.registered.add(mpath)
                    for p_drop, stem, over, _ in sa.program.tensor_dropouts:
                        mpath = f"{lname}.{stem}.{sa.adapter}"
                        set_path(gm, mpath, weight_dropout(over, p_drop, False))
                        manifest.registered.add(mpath)
            try:
                modified |= _rewrite_layer(gm, layer, [sa for sa in sas if sa.active], paths, plan.train)
            except NotAdaptable as e:
                raise not_adaptable_error(plan, lname, sas, str(e)) from None
        modified |= train_biases(gm, plan, manifest)
        for name, ap in plan.adapters.items():
            rec = manifest.adapters[name]
            for mod, params in ap.modules_to_save.items():
                rec.modules_to_save[mod] = {}
                for pname, t in params.items():
                    live = ap.active and not ap.merge
                    p = nn.Parameter(t.clone(), requires_grad=live)
                    rec.modules_to_save[mod][pname] = p
                    if ap.active and ap.merge:
                        # merged: the trained copy becomes the module's weights, under the base name
                        _replace_own(gm, f"{mod}.{pname}", mod, p)
                        modified = True
                        continue
                    path = f"{mod}.modules_to_save.{name}.{pname}"
                    set_path(gm, path, p)
                    manifest.registered.add(path)
                    if live:
                        manifest.live.add(path)
                    if not ap.active:
                        continue
                    base_t = get_path(gm, f"{mod}.{pname}")
                    for n in list(gm.graph.nodes):
                        if n.op == "get_attr" and n.target != path and get_path(gm, n.target) is base_t:
                            with gm.graph.inserting_before(n):
                                new = gm.graph.get_attr(path)
                            new.meta.update(n.meta)
                            # only the module's own reads: a tied weight's other readers keep the base tensor
                            n.replace_all_uses_with(new, delete_user_cb=lambda u, m=mod: _inside(u, m))
                            modified = True
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, modified)

    return run


def _replace_own(gm: fx.GraphModule, path: str, module: str, t: torch.Tensor) -> None:
    """Put `t` at `path` (a parameter of `module`). A tied weight (an embedding and its head: one tensor under
    two names, read by a single get_attr) stays the old tensor for the other module's reads, under its name."""
    old = get_path(gm, path)
    named = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
    alias = next((n for n, v in named
                  if v is old and n != path and not n.startswith(module + ".")), None)
    readers = [n for n in gm.graph.nodes if n.op == "get_attr" and get_path(gm, n.target) is old]
    if alias is None and any(not _inside(u, module) for n in readers for u in n.users):
        alias = f"{module}.peftc_base.{path.rpartition('.')[2]}"   # read elsewhere under no other name
        set_path(gm, alias, old)
    set_path(gm, path, t)
    for n in readers:
        for u in list(n.users):
            want = path if _inside(u, module) else alias
            if want is None or want == n.target:
                continue
            with gm.graph.inserting_before(u):
                new = gm.graph.get_attr(want)
            new.meta.update(n.meta)
            u.replace_input_with(n, new)
        if not n.users:
            gm.graph.erase_node(n)


def _inside(node: fx.Node, module: str) -> bool:
    """True when `node` was traced inside `module` (or its place is unknown)."""
    where = module_of(node)
    return where is None or where == module or where.startswith(module + ".")


def _register(gm: fx.GraphModule, manifest: Manifest, path: str, t: torch.Tensor, live: bool, frozen: bool) -> None:
    """Put an adapter tensor on the graph module: trainable when its adapter is live (unless frozen or not
    a float); a frozen tensor of a live adapter is pinned (never constant-folded, so a shared tensor stays one)."""
    set_path(gm, path, nn.Parameter(t, requires_grad=live and not frozen and t.is_floating_point()))
    manifest.registered.add(path)
    if live and not frozen and t.is_floating_point():
        manifest.live.add(path)
    elif live:
        manifest.pinned.add(path)


def _rewrite_layer(gm: fx.GraphModule, layer: Any, sas: list, paths: dict, train: bool) -> bool:
    """Replace the layer's weight (and bias) wherever the layer's own ops read them by W' = T(W, theta)."""
    if not sas:
        return False
    owner = layer.reader or layer.module or layer.name   # an MHA's out_proj: the MHA; a bare parameter: its module
    reader = None if any(sa.method.tied_follow for sa in sas) else owner
    wnode, w_reads = _consumers(gm, layer.weight, reader)
    bnode, b_reads = _consumers(gm, layer.bias, owner)
    if not w_reads:
        raise NotAdaptable(why_not_read(gm, layer))
    w_users = [u for u, _ in w_reads]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    anchor = min(w_users + [u for u, _ in b_reads], key=order.get)
    b = GraphBuilder(gm, anchor, layer.name, meta_from=min(w_users, key=order.get))
    transposed = KINDS[layer.kind].transposed   # methods see W in nn.Linear orientation (out, in)
    w_cur: Any = _orient(b, wnode, layer) if transposed else wnode
    b_cur: Any = bnode
    # Adapters compose in order, merged ones first: W'' = T2(T1(W)). Methods see the current weight as
    # W and the base weight as W0: DoRA normalises by ||W0 + s*B@A||, as peft does when several adapters
    # are active (and when it merges them), so merging never changes what the model computes.
    w_base = w_cur
    for sa in sas:
        funcs = graph_funcs(gm, f"adapter '{sa.adapter}' on layer '{layer.name}'")   # input("input_ids")
        b.adapters = (sa.adapter,)   # provenance of every node built for this adapter
        prog = sa.program
        env: dict[str, Any] = dict(prog.env)
        tensors = [(d.name, sa.tensors[d.name]) for d in prog.params] + list(sa.consts.items())
        tensors += [(n, get_path(gm, paths[(sa.adapter, n)])) for n in prog.shared]
        for pname, t in tensors:
            node = b.get_attr(paths[(sa.adapter, pname)])
            if t.is_floating_point() and t.dtype != layer.dtype:
                node = b.apply(TENSOR_OPS["cast"], TENSOR_OPS["cast"].target, [node, layer.dtype])
            env[pname] = node
        env["W"], env["W0"], env["b"] = w_cur, w_base, b_cur
        dropped = {of: stem for _, stem, _, of in prog.tensor_dropouts} if train and not sa.merge else {}
        for name, expr in prog.lets:
            if name not in prog.env:   # lets over tensors; the others were computed when the method was instantiated
                env[name] = evaluate(expr, env, b, funcs)
                if name in dropped:    # a training-only dropout over this tensor's blocks
                    env[name] = b.apply(TENSOR_OPS["dropout"], None,
                                        [env[name], f"{layer.name}.{dropped[name]}.{sa.adapter}"])
        w_new = evaluate(prog.weight, env, b, funcs) if prog.weight is not None else w_cur
        b_new = evaluate(prog.bias, env, b, funcs) if prog.bias is not None else b_cur
        if train and (prog.dropout or prog.weight_dropouts) and not sa.merge and w_new is not w_cur:
            delta = b.apply(TENSOR_OPS["sub"], aten.sub.Tensor, [w_new, w_cur])
            for _, stem, _, _ in prog.weight_dropouts:   # rank / module dropout on the update itself
                delta = b.apply(TENSOR_OPS["dropout"], None, [delta, f"{layer.name}.{stem}.{sa.adapter}"])
            if prog.dropout:   # input dropout: marked here, moved onto the input by the rule `input_dropout`
                mpath = f"{layer.name}.{prog.dropout[1]}.{sa.adapter}"
                delta = b.apply(TENSOR_OPS["dropin"], TENSOR_OPS["dropin"].target, [delta, mpath])
            w_new = b.apply(TENSOR_OPS["add"], aten.add.Tensor, [w_cur, delta])
        w_cur, b_cur = w_new, b_new
    b.adapters = ()
    w_out = _orient(b, w_cur, layer) if transposed else w_cur
    if w_out is not wnode:
        w_out.meta[BASE] = layer.weight
        for u, read in w_reads:
            u.replace_input_with(read, w_out)
        _ungroup_if_widened(layer, w_users, w_out)
    if b_cur is not bnode and b_cur is not None:
        if bnode is not None:
            b_cur.meta[BASE] = layer.bias
            for u, read in b_reads:
                u.replace_input_with(read, b_cur)
        else:
            _add_bias(layer, w_users, b_cur)
    for u in w_users:
        u.meta[TAG] = layer.name
        u.meta[ADAPTER] = tuple(sa.adapter for sa in sas)
    return True


def _ungroup_if_widened(layer: Any, users: list[fx.Node], w_out: fx.Node) -> None:
    """A method may widen a grouped conv kernel (out, in/g, ..) to an ungrouped one (out, in, ..) that computes
    the same plus an update that mixes groups (LoRA's full-width A): the layer's op then runs ungrouped."""
    kind = KINDS[layer.kind]
    val = w_out.meta.get("peftc_val")
    if kind.groups_arg is None or layer.dims.get("groups", 1) == 1 or val is None:
        return
    if val.dim() < 2 or val.shape[1] != layer.dims["in"] or layer.shape[1] == layer.dims["in"]:
        return
    for u in users:
        if u.target is not kind.op:
            raise PeftcError(f"cannot ungroup layer '{layer.name}': it computes {u.target} rather than {kind.op}")
        args = normalized_args(u, TENSOR_OPS[layer.kind])
        args[kind.groups_arg] = 1
        u.args = tuple(args)


def _orient(b: GraphBuilder, w: Any, layer: Any) -> Any:
    """Swap a stored-transposed weight to (out, in) and back: t() for a matrix, the last two dims of a stack."""
    if len(layer.shape) == 3:
        return b.apply(TENSOR_OPS["transpose"], aten.transpose.int, [w, -2, -1])
    return b.apply(TENSOR_OPS["t"], aten.t.default, [w])


def _add_bias(layer: Any, users: list[fx.Node], bias: fx.Node) -> None:
    """Give a bias-less layer a bias (LoRA's lora_bias): only where the layer is a known op with a bias slot."""
    kind = KINDS[layer.kind]
    target, bidx = kind.op, kind.bias_arg
    for u in users:
        if u.target is not target or bidx is None:
            raise PeftcError(f"cannot add a bias to layer '{layer.name}': it computes {u.target} "
                             "rather than a standard op with a bias argument")
        args = list(u.args)
        if TENSOR_OPS.get(layer.kind) is not None and TENSOR_OPS[layer.kind].arity:
            args = normalized_args(u, TENSOR_OPS[layer.kind])
        while len(args) <= bidx:
            args.append(None)
        args[bidx] = bias
        u.args = tuple(args)
