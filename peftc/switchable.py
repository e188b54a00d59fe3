"""Switchable adapters (`--adapters-as-inputs`): which adapters can be switched at run time, and the graph
whose adapter tensors are inputs.

A switchable adapter adds a delta to its layers that depends on its own tensors only (`W + delta(theta)`, the
test `spec.combinations.scale_delta` makes): then an adapter whose tensors have a rank dimension of 0 (or are
zeros) adds nothing, and the graph with those defaults is the base model. Weight-scaling methods (IA3, DoRA),
rotations (OFT, BOFT, HRA, RoAd), replacements, merged adapters and `save` modules cannot be switched off that
way, and are refused with the adapter and the reason named.

`lift(gm)` turns a graph compiled with `adapters_as_inputs=True` into one whose live adapter tensors are
placeholders. Where a tensor's only use scales it by a constant (LoRA's `s * B`, folded onto B by the `stack`
pass), the scaled tensor is the input, as Olive's adapter files hold `lora_B` pre-multiplied by the scaling: the
graph then holds no value that depends on alpha, and an adapter file of another alpha (and rank) fits it.
"""
from __future__ import annotations

import hashlib
import inspect
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from peftc.errors import PeftcError
from peftc.manifest import Manifest
from peftc.rewrite.graph_tools import TAG, get_path
from peftc.spec.all_live import all_adapters_live

aten = torch.ops.aten
_SCALES = {aten.mul.Tensor, aten.div.Tensor, operator.mul, operator.truediv}


def switchable_spec(sp: Any, merge: bool) -> Any:
    """The spec `--adapters-as-inputs` compiles: every declared adapter live, with its own inputs (the `active`
    line does not apply: which adapter files are active is chosen at run time)."""
    return all_adapters_live(
        sp, merge, flag="--adapters-as-inputs",
        merged_why="a switchable adapter must stay live (a merged one is part of the base weights and cannot be "
                   "switched off)",
        terms_why="; combine imported LoRA checkpoints into one checkpoint (`peftc combine`) and import that")


def check_switchable(plan: Any) -> None:
    """Every adapter of the plan must add a delta of its own tensors to its layers, and have no `save` modules."""
    from peftc.spec.combinations import scale_delta
    for name, ap in plan.adapters.items():
        if ap.modules_to_save:
            raise PeftcError(f"--adapters-as-inputs: adapter '{name}' has `save` modules (modules_to_save): a copy "
                             "of a whole module has no 'no adapter' value; drop `save` or merge it into the model")
    for lname, sas in plan.sites.items():
        for sa in sas:
            try:
                scale_delta(sa.program, 1.0)
            except ValueError as e:
                raise PeftcError(f"--adapters-as-inputs: adapter '{sa.adapter}' ({sa.method.name}) on '{lname}' "
                                 f"cannot be switched at run time: it {e}, so no value of its tensors gives the base "
                                 "model back; only additive methods (LoRA, LoHa, LoKr, AdaLoRA, VeRA, ...) can be "
                                 "inputs. Export it merged (--merge) or as an ordinary unmerged model") from None


def free_dims(plan: Any) -> dict[tuple[str, str, str], tuple[int, ...]]:
    """(adapter, layer, saved key) -> the dims of that tensor that follow the adapter's rank-like options there.

    The general rule for "no adapter": a dim that changes when an integer option of the method changes (LoRA's
    `r`, AdaLoRA's `init_r` or a rank bound from the checkpoint, FourierFT's `n_frequency`) is free: it may
    differ between adapter files, and is 0 in the default. Found by instantiating the method again with each
    integer option one larger; no method is named. An adapter with adapter-level (shared) tensors, whose dims
    follow the adapter rather than a layer, keeps every dim fixed (its default is zeros)."""
    from peftc.lang.methods import instantiate
    out: dict[tuple[str, str, str], tuple[int, ...]] = {}
    for lname, sas in plan.sites.items():
        kind = plan.layers[lname].kind
        for sa in sas:
            if plan.adapters[sa.adapter].shared_decls:
                continue
            base = {d.name: d.shape for d in sa.program.params}
            free: dict[str, set[int]] = {d.name: set(d.bound) for d in sa.program.params}
            for opt, decl in sa.method.options.items():
                v = sa.layer_options.get(opt)
                if decl.type != "int" or not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    continue
                try:
                    prog = instantiate(sa.method, kind, {**sa.layer_options, opt: v + 1}, dict(sa.program.env))
                except Exception:  # noqa: BLE001 - an option whose change the method refuses is not a rank
                    continue
                for d in prog.params:
                    if d.name in base and len(d.shape) == len(base[d.name]):
                        free[d.name] |= {i for i, (a, b) in enumerate(zip(d.shape, base[d.name])) if a != b}
            for d in sa.program.params:
                if d.saved is not None:
                    out[(sa.adapter, lname, d.saved)] = tuple(sorted(free[d.name]))
    return out


@dataclass
class AdapterInput:
    name: str              # the ONNX input name (Olive's `<layer>.<peft key>`, or peft's in-memory name)
    adapter: str           # the spec's adapter (its slot)
    path: str              # the graph attribute it replaces (the adapter tensor)
    layer: str | None      # None for an adapter-level (shared) tensor
    key: str               # peft's saved key ("lora_B.weight")
    scaled: bool           # the input is the tensor times a constant (the file holds the scaled tensor)
    value: torch.Tensor    # this adapter's value (scaled where `scaled`)
    free: tuple[int, ...] = ()   # dims that may differ between adapter files (0 in the default)
    rank0: bool = True           # the default has the free dims 0 (else: zeros of the value's shape)

    def default(self) -> torch.Tensor:
        """The "no adapter" value: free dims 0, zeros."""
        return torch.zeros([0 if i in self.free else s for i, s in enumerate(self.value.shape)],
                           dtype=self.value.dtype)


def _sources(manifest: Manifest) -> dict[int, tuple[str, str | None, str]]:
    """id(tensor) -> (adapter, layer or None, saved key), for every tensor of every adapter record."""
    out: dict[int, tuple[str, str | None, str]] = {}
    for name, rec in manifest.adapters.items():
        for layer, tensors in rec.tensors.items():
            for key, t in tensors.items():
                out[id(t)] = (name, layer, key)
        for key, t in rec.shared.items():
            out[id(t)] = (name, None, key)
    return out


def _scale_of(node: fx.Node) -> fx.Node | None:
    """The node that scales `node` by a constant, when that is its one use."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.op != "call_function" or user.target not in _SCALES or user.kwargs or len(user.args) != 2:
        return None
    other = user.args[1] if user.args[0] is node else user.args[0] if user.target in (aten.mul.Tensor,
                                                                                       operator.mul) else None
    return user if isinstance(other, (int, float)) and not isinstance(other, bool) else None


def input_name(adapter: str, layer: str | None, key: str, path: str, single: bool) -> str:
    """Olive's name (`model.layers.0.self_attn.q_proj.lora_A.weight`: the layer path and peft's saved key) when
    the spec has one adapter; peft's in-memory name (with the adapter name) when it has several. An adapter-level
    tensor: its key (`vera_A`), with `.<adapter>` when there are several."""
    if layer is None:   # an adapter-level tensor: peft keeps it at base_model.<key>[adapter]
        return key if single else f"{key}.{adapter}"
    return f"{layer}.{key}" if single else path


@dataclass
class Lifted:
    module: nn.Module                  # forward(**model inputs, **adapter inputs) -> the model's outputs
    inputs: list[AdapterInput]
    fingerprints: dict[str, str]       # adapter -> hash of its graph constants (see _fingerprints)


class _Wrapper(nn.Module):
    """forward(**inputs) with keyword names: the model's inputs, then `ident(name)` of each adapter input."""

    def __init__(self, inner: fx.GraphModule, order: list[str], out_spec: Any) -> None:
        super().__init__()
        self.inner = inner
        self.order = order
        self.out_spec = out_spec

        def forward(**kw: torch.Tensor) -> Any:
            flat = self.inner(*[kw[n] for n in self.order])
            return pytree.tree_unflatten(list(flat), self.out_spec) if self.out_spec is not None else flat

        forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in order])
        self.__dict__["forward"] = forward

    def run(self, inputs: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor]) -> Any:
        """The outputs for model inputs and adapter inputs by their (dotted) names."""
        return self(**inputs, **{ident(k): v for k, v in adapters.items()})


def lift(gm: fx.GraphModule, single: bool | None = None) -> Lifted:
    """A module computing `gm` with every live adapter tensor (or its constant multiple) as a keyword input.
    `single`: name the inputs as for a spec of one adapter (Olive's names; default: when gm has one)."""
    manifest: Manifest = gm.peftc
    if not getattr(gm, "peftc_switchable", False):
        raise PeftcError("adapters as inputs: compile the spec with adapters_as_inputs=True (the `fuse` pass of an "
                         "ordinary compile concatenates adapter tensors at fixed ranks)")
    sources = _sources(manifest)
    single = len(manifest.adapters) == 1 if single is None else single
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    lifted: list[AdapterInput] = []
    replace: dict[fx.Node, AdapterInput] = {}
    seen: dict[str, fx.Node] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for n in gm.graph.nodes:
        if n.op != "get_attr" or n.target not in manifest.live | manifest.pinned:
            continue
        t = get_path(gm, n.target)
        src = sources.get(id(t))
        if src is None:
            continue
        adapter, layer, key = src
        top, scaled = n, False
        up = _scale_of(n)
        if up is not None:
            top, scaled = up, True
        name = input_name(adapter, layer, key, n.target, single)
        with torch.no_grad():
            value = t.detach().clone()
            if scaled:
                other = top.args[1] if top.args[0] is n else top.args[0]
                value = value * other if top.target in (aten.mul.Tensor, operator.mul) else value / other
        if name in seen:   # a second read of the same tensor (a tied reader): the same input
            if scaled:
                raise PeftcError(f"adapters as inputs: tensor '{n.target}' is read twice with a scale")
            replace[n] = next(a for a in lifted if a.name == name)
            continue
        free = getattr(gm, "peftc_free_dims", {}).get((adapter, layer, key), ())
        ai = AdapterInput(name, adapter, str(n.target), layer, key, scaled, value.contiguous(), free)
        lifted.append(ai)
        replace[top] = ai
        seen[name] = top
    if not lifted:
        raise PeftcError("--adapters-as-inputs: the graph has no live adapter tensor to make an input")
    # the new graph: the model's placeholders, then one per adapter input, then the rest
    new_ph: dict[str, fx.Node] = {}
    for n in placeholders:
        env[n] = graph.node_copy(n, lambda x: env[x])
    for ai in lifted:
        ph = graph.placeholder(ident(ai.name))
        ph.meta["val"] = ai.value
        new_ph[ai.name] = ph
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            continue
        if n in replace:
            env[n] = new_ph[replace[n].name]
            continue
        env[n] = graph.node_copy(n, lambda x: env[x])
    graph.eliminate_dead_code()
    inner = fx.GraphModule(gm, graph)   # default codegen: positional inputs, the flat outputs
    out_spec = getattr(getattr(gm.graph._codegen, "pytree_info", None), "out_spec", None)
    for attr in ("peftc", "peftc_inputs", "peftc_axes", "peftc_layer_kinds"):
        if hasattr(gm, attr):
            setattr(inner, attr, getattr(gm, attr))
    order = [str(n.target) for n in placeholders] + [ident(ai.name) for ai in lifted]
    return Lifted(_Wrapper(inner, order, out_spec), lifted, _fingerprints(inner, manifest, lifted))


def ident(name: str) -> str:
    """A Python identifier for an input name."""
    return "adapter_input_" + "".join(c if c.isalnum() else "_" for c in name)


def _fingerprints(inner: fx.GraphModule, manifest: Manifest, lifted: list[AdapterInput]) -> dict[str, str]:
    """adapter -> what must be equal for another adapter file to fill its inputs: the numbers in the graph that
    act on that adapter's inputs alone (a scale left in the graph, such as LoHa's alpha / r: the ops peftc
    inserted that depend on its inputs and on no other adapter's, with their numeric arguments), and its plan-time
    constant tensors (frequency locations); not its inputs, nor the base weights."""
    parts: dict[str, list[str]] = {name: [] for name in manifest.adapters}
    owner_of = {ident(ai.name): ai.adapter for ai in lifted}
    deps: dict[fx.Node, frozenset[str]] = {}
    for n in inner.graph.nodes:
        if n.op == "placeholder":
            deps[n] = frozenset([owner_of[n.target]]) if n.target in owner_of else frozenset()
            continue
        deps[n] = frozenset().union(*(deps[a] for a in n.all_input_nodes)) if n.all_input_nodes else frozenset()
        numbers = [repr(a) for a in pytree.tree_leaves((n.args, n.kwargs))
                   if isinstance(a, (int, float)) and not isinstance(a, bool)]
        if n.op == "call_function" and TAG in n.meta and len(deps[n]) == 1 and numbers:
            parts[next(iter(deps[n]))].append(f"{getattr(n.target, '__name__', n.target)}({', '.join(numbers)})")
        if n.op == "get_attr" and n.target in manifest.registered:
            t = get_path(inner, n.target)
            owner = next((a for a in parts if f".{a}." in f".{n.target}." or n.target.endswith(f".{a}")), None)
            if owner is not None and isinstance(t, torch.Tensor) and t.numel() < 1_000_000:
                digest = hashlib.sha256(t.detach().contiguous().view(-1).to(torch.float64).numpy().tobytes())
                parts[owner].append(f"const{tuple(t.shape)}:{digest.hexdigest()[:12]}")
    return {a: hashlib.sha256("\n".join(sorted(p)).encode()).hexdigest()[:16] for a, p in parts.items()}
