"""Run-time adapter control of a compiled graph, with transformers' PeftAdapterMixin names and meanings.

`peftc.compile(spec, model)` returns a GraphModule with `load_adapter`, `set_adapter`, `disable_adapters`,
`enable_adapters`, `active_adapters`, `get_adapter_state_dict` and `delete_adapter`. Each call changes graph
*state* (the gate buffers of pass `gate`, the adapter tensors), never the graph's code: nothing retraces, and a
`torch.compile`d module does not recompile.

The graph holds adapters in *slots*: a slot is one live adapter as compiled (its method, its layers, its
tensors at their compiled shapes, one gate per layer where it adds a branch). With `switchable=True` every
declared additive adapter is compiled live (the `active` line only sets the gates); `max_adapters=N` adds
spare slots (copies of the spec's first switchable adapter: method, options, targets) and `max_rank=R`
compiles the `r` option of every slot at R, so a checkpoint of any rank up to R fits, zero-padded.

Loading a checkpoint into a slot is checked numerically, so it is general over methods: for every layer the
update the compiled form computes from the padded tensors, C, must be a multiple of the checkpoint's own
update, T = k * C (fp64, both from the method's declared transform: `peftc.merged_weight.fold_layer`); k (an
alpha or rank that differs from the compiled one) goes into the layer's gate. A checkpoint the slot cannot
reproduce is an error saying what to compile instead; it is never loaded approximately.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from peftc.emit.checkpoint import adapter_tensors
from peftc.errors import PeftcError, PeftcWarning
from peftc.manifest import Manifest, records_from_plan
from peftc.merged_weight import fold_layer
from peftc.model_inputs import program_inputs
from peftc.plan import Plan, SiteAdapter, build_plan, resolve_adapter
from peftc.rewrite.gate_adapters import gate_path
from peftc.rewrite.graph_tools import get_path
from peftc.rewrite.insert_adapters import param_path
from peftc.spec.combinations import scale_delta
from peftc.spec.model import AdapterSpec, Span, Spec

_PRESERVED = "_user_preserved_attributes"   # torch.fx.graph_module._USER_PRESERVED_ATTRIBUTES_KEY
SLOT = "__slot"            # spare slots are named __slot0, __slot1, ...
RANK = "r"                 # the option `max_rank` sets (the rank of every method that has one)


# ---------------------------------------------------------------- compile time
def fixed_reason(plan: Plan, name: str) -> str | None:
    """Why adapter `name` of a plan cannot be gated at run time (None: it can)."""
    ap = plan.adapters[name]
    if ap.merge:
        return "it is merged into the base weights"
    if ap.modules_to_save:
        return "it has `save` modules (modules_to_save), which replace modules rather than add a branch"
    if ap.spec.delta_scale is not None:
        return "it is a term of an exact combination"
    for sas in plan.sites.values():
        for sa in sas:
            if sa.adapter == name:
                try:
                    scale_delta(sa.program, 1.0)
                except ValueError:
                    return (f"{ap.method.name} scales or rotates the weight rather than adding a branch "
                            "(`W + delta`)")
    return None


@dataclass
class Skeleton:
    spec: Spec                    # what is compiled
    gated: list[str]              # adapters (and spare slots) that get gates
    active: list[str]             # the declared adapters the gates start on
    install: bool                 # declared adapters' tensors must be installed after compiling (max_rank)


def skeleton(sp: Spec, plan: Plan, max_adapters: int | None, max_rank: int | None) -> Skeleton:
    """The spec a switchable graph is compiled from: every additive adapter of `sp` live and active (its gate
    says whether it runs), the others as declared; with `max_rank`, each gated adapter fresh with `r` = max_rank
    (its real tensors are installed, padded, after compiling); `max_adapters` - (gated adapters) spare slots."""
    from peftc.library import library
    lib = library().checked()
    if max_rank is not None and max_rank < 1:
        raise PeftcError(f"max_rank = {max_rank}: give a positive rank")
    gated = [n for n in sp.adapters if fixed_reason(plan, n) is None]
    active_decl = sp.active_names()
    adapters: dict[str, AdapterSpec] = {}
    for name, ad in sp.adapters.items():
        if name in gated and max_rank is not None:
            ad = _at_rank(ad, sp, lib, max_rank)
        adapters[name] = ad
    spare = 0
    if max_adapters is not None:
        if not gated:
            raise PeftcError("max_adapters: the spec has no switchable adapter to copy slots from (spare slots take "
                             "the method and targets of the spec's first additive, unmerged adapter)")
        spare = max_adapters - len(gated)
        if spare < 0:
            raise PeftcError(f"max_adapters = {max_adapters} is fewer than the spec's {len(gated)} switchable "
                             f"adapters ({', '.join(gated)})")
        template = _at_rank(sp.adapters[gated[0]], sp, lib, max_rank)
        for i in range(spare):
            adapters[f"{SLOT}{i}"] = dataclasses.replace(template, name=f"{SLOT}{i}")
    fixed_active = [n for n in active_decl if n not in gated]
    spec = Spec(sp.file, sp.source, adapters, fixed_active + [n for n in adapters if n in gated or
                                                              n.startswith(SLOT)], dict(sp.active_spans))
    return Skeleton(spec, gated + [f"{SLOT}{i}" for i in range(spare)],
                    [n for n in active_decl if n in gated], install=max_rank is not None)


def _at_rank(ad: AdapterSpec, sp: Spec, lib: Any, rank: int | None) -> AdapterSpec:
    """A fresh copy of `ad` (method, options and targets resolved; no weights) with option `r` = rank."""
    res, method, options = resolve_adapter(ad, sp, lib)
    opts = dict(options)
    per = list(res.per_pattern)
    if rank is not None and RANK in method.options:
        declared = [opts.get(RANK)] + [pp.value for pp in per if pp.option == RANK]
        big = [r for r in declared if isinstance(r, int) and r > rank]
        if big:
            raise PeftcError(f"max_rank = {rank}, but adapter '{ad.name}' has {RANK} = {max(big)}; give max_rank >= "
                             f"{max(big)}")
        opts[RANK] = rank
        per = [pp for pp in per if pp.option != RANK]
    return dataclasses.replace(res, options=opts, per_pattern=per, weights=None, import_dir=None, preloaded=None,
                               merge=False, modules_to_save=[])


# ---------------------------------------------------------------- slots
@dataclass
class Slot:
    name: str                                   # the name it was compiled under (paths use it)
    method: str
    sites: dict[str, SiteAdapter]               # layer -> the compiled site (program at compiled options)
    params: dict[str, dict[str, str]]           # layer -> param name -> graph path
    shared: dict[str, str]                      # shared tensor name -> graph path
    gates: dict[str, str]                       # layer -> gate path (layers where it adds a gated branch)
    ratio: dict[str, float] = field(default_factory=dict)   # layer -> the gate's value when on
    holds: str | None = None                    # the adapter in it now (None: free)
    seq: int = 0                                # when it was filled (peft keeps adapters in loading order)


def _slots(gm: fx.GraphModule, plan: Plan, names: Sequence[str], found: dict[str, set[str]]) -> dict[str, Slot]:
    out = {}
    for name in names:
        ap = plan.adapters[name]
        slot = Slot(name, ap.method.name, {}, {}, {f"{d.name}": f"peftc_shared.{name}.{d.name}"
                                                       for d in ap.shared_decls}, {})
        for lname, sas in plan.sites.items():
            for sa in sas:
                if sa.adapter != name:
                    continue
                slot.sites[lname] = sa
                home = ap.saved_names.get(lname, lname)
                slot.params[lname] = {d.name: param_path(home, d.saved, name, d.name) for d in sa.program.params}
                if name in found.get(lname, ()):
                    slot.gates[lname] = gate_path(lname, name)
                slot.ratio[lname] = 1.0
        slot.holds = None if name.startswith(SLOT) else name
        out[name] = slot
    return out


def _pad(t: torch.Tensor, shape: torch.Size, what: str) -> torch.Tensor:
    if t.dim() != len(shape):
        raise _Misfit(f"{what} has shape {tuple(t.shape)}, another form than the compiled {tuple(shape)}")
    if any(a > b for a, b in zip(t.shape, shape)):
        raise _Misfit(f"{what} has shape {tuple(t.shape)}, larger than the compiled {tuple(shape)}",
                      larger_rank_helps=True)
    if t.shape == shape:
        return t
    pads: list[int] = []
    for a, b in reversed(list(zip(t.shape, shape))):
        pads += [0, b - a]
    return F.pad(t, pads)


class _Misfit(Exception):
    """A checkpoint that does not fit a slot (the message says why). `larger_rank_helps`: a tensor is larger
    than the slot's, so a larger max_rank would make room; otherwise the checkpoint is another form (another
    method, other layers, options that change the method's factors), and only a spec declaring it helps."""

    def __init__(self, msg: str, larger_rank_helps: bool = False) -> None:
        super().__init__(msg)
        self.larger_rank_helps = larger_rank_helps

    def advice(self) -> str:
        if self.larger_rank_helps:
            return "compile with a larger max_rank, or a spec that declares this checkpoint"
        return "compile with a spec that declares an adapter like this checkpoint (its method, layers and options)"


def _delta(weight64: torch.Tensor, bias64: torch.Tensor | None, kind: str, sa: SiteAdapter,
           shared: dict[str, torch.Tensor]) -> torch.Tensor:
    """The update (W' - W, b' - b) one adapter makes to a layer, flattened, in fp64."""
    w, b = fold_layer(weight64, bias64, kind, [dataclasses.replace(sa, active=True)], {sa.adapter: shared},
                      dtype=torch.float64)
    parts = [(w - weight64).flatten()]
    if b is not None:
        parts.append((b - bias64 if bias64 is not None else b).flatten())
    return torch.cat(parts)


# ---------------------------------------------------------------- the runtime state
class Runtime:
    """The run-time state of one compiled graph: its slots, which adapter each holds, the active list."""

    def __init__(self, gm: fx.GraphModule, plan: Plan, module: nn.Module, slots: dict[str, Slot],
                 active: list[str], merged: list[str], switchable: bool) -> None:
        self.gm, self.plan, self.module, self.slots = gm, plan, module, slots
        self.active, self.merged, self.enabled, self.switchable = list(active), merged, True, switchable
        self.hotswap_enabled = False      # set by enable_peft_hotswap (load_adapter's hotswap="auto")
        self.per_row: list[str] | None = None   # with adapter_ids: the compiled adapters (slots) in id order
        self._params = dict(module.named_parameters(remove_duplicate=False))

    @property
    def manifest(self) -> Manifest:
        return self.gm.peftc

    def held(self) -> dict[str, Slot]:
        """adapter -> its slot, in the order they were loaded (declared ones first)."""
        slots = sorted((s for s in self.slots.values() if s.holds is not None), key=lambda s: s.seq)
        return {s.holds: s for s in slots}

    # ---- state
    def check_state(self, active: Sequence[str], enabled: bool) -> None:
        """An error if some adapter that must change cannot (it has layers without a gate)."""
        for a, slot in self.held().items():
            on = enabled and a in active
            if on:
                continue
            fixed = [l for l in slot.sites if l not in slot.gates]
            if fixed:
                why = "is compiled without run-time gates (compile with switchable=True)" if not self.switchable \
                    else f"({slot.method}) does not add a separate branch to layer '{fixed[0]}' (it scales or " \
                         "rotates the weight), so it is compiled always on"
                raise PeftcError(f"adapter '{a}' {why}: it cannot be switched off at run time; compile a spec "
                                 f"without it for that configuration")

    def apply(self) -> None:
        """Write every gate from the active list, the enabled flag and each slot's ratios."""
        with torch.no_grad():
            for slot in self.slots.values():
                # with adapter_ids every held adapter is on (each row chooses), unless adapters are disabled
                on = slot.holds is not None and self.enabled and (self.per_row is not None
                                                                  or slot.holds in self.active)
                for lname, path in slot.gates.items():
                    get_path(self.gm, path).fill_(slot.ratio.get(lname, 0.0) if on else 0.0)

    def names(self, adapter_name: str | Sequence[str], what: str) -> list[str]:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        held = self.held()
        for n in names:
            if n in self.merged:
                raise PeftcError(f"{what}: adapter '{n}' is merged into the base weights (declared with `merge` or "
                                 "compiled with merge=True): it is a constant of the graph, always on; compile it "
                                 "unmerged to control it at run time")
            if n not in held and n in self.plan.adapters and n not in self.slots:   # (not a deleted one)
                raise PeftcError(f"{what}: adapter '{n}' is inactive in the spec and was not compiled; compile with "
                                 "switchable=True to switch it on at run time")
            if n not in held:
                known = ", ".join(held) or "none"
                raise PeftcError(f"{what}: no adapter named '{n}'; this module holds: {known}")
        return names

    # ---- loading
    def plan_checkpoint(self, path: str | Path, name: str) -> Plan:
        directory = Path(path)
        if not directory.is_dir():
            raise PeftcError(f"load_adapter: {directory} is not a directory (give a PEFT checkpoint folder with "
                             "adapter_config.json and adapter_model.safetensors)")
        ad = AdapterSpec(name, Span(str(directory / "adapter_config.json")), import_dir=str(directory.resolve()))
        spec = Spec("<load_adapter>", "", {name: ad})
        return build_plan(spec, self.module)

    def plan_config(self, config: Any, name: str) -> Plan:
        """The plan of a fresh adapter made from a peft config (a `PeftConfig` or its dict): the method's own
        initialization, as `get_peft_model` would make it (LoRA's B = 0: the base model's function)."""
        from peftc.checkpoint import adapter_from_config
        from peftc.library import library
        cfg = config.to_dict() if hasattr(config, "to_dict") else config
        if not isinstance(cfg, dict):
            raise PeftcError(f"add_adapter: adapter_config must be a peft config or a dict, not "
                             f"{type(config).__name__}")
        # as adapter_config.json holds it (enums as their strings, sets as lists)
        cfg = json.loads(json.dumps(cfg, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
        lib = library().checked()
        method = lib.method_for_config(cfg)
        if method is None:
            raise PeftcError(f"add_adapter: unsupported peft_type {cfg.get('peft_type')!r} "
                             f"(peftc supports {', '.join(lib.peft_types())})")
        where = "<add_adapter config>"
        ad = adapter_from_config(name, where, cfg, method, Span(where))
        ad = dataclasses.replace(ad, method=method.name, import_dir=None)
        return build_plan(Spec(where, "", {name: ad}), self.module, lib=lib)

    def fit(self, slot: Slot, new: Plan, name: str) -> tuple[dict, dict, dict[str, float]]:
        """(layer -> param -> padded tensor, shared name -> padded tensor, layer -> gate ratio); _Misfit when
        the checkpoint does not fit the slot."""
        ap = new.adapters[name]
        if ap.method.name != slot.method:
            raise _Misfit(f"it is a {ap.method.name} adapter, the slot holds {slot.method}")
        if ap.modules_to_save:
            raise _Misfit("it has modules_to_save, which a slot cannot hold")
        sites = {l: sa for l, sas in new.sites.items() for sa in sas if sa.adapter == name}
        extra = [l for l in sites if l not in slot.sites]
        if extra:
            raise _Misfit(f"it adapts layer '{extra[0]}'{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}, "
                          f"which the slot was not compiled on (it covers {len(slot.sites)} layers)")
        shared: dict[str, torch.Tensor] = {}
        for sname, path in slot.shared.items():
            t = ap.shared.get(sname)
            if t is None:
                raise _Misfit(f"it has no shared tensor '{sname}'")
            shared[sname] = _pad(t, get_path(self.gm, path).shape, f"shared tensor '{sname}'")
        params: dict[str, dict[str, torch.Tensor]] = {}
        ratios: dict[str, float] = {}
        checked: dict[str, float] = {}   # configuration -> its ratio (one dense check per distinct configuration)
        for lname, cur in slot.sites.items():
            sa = sites.get(lname)
            shapes = {p: get_path(self.gm, path).shape for p, path in slot.params[lname].items()}
            if sa is None:   # a layer of the slot this adapter does not use: its gate stays off
                if lname not in slot.gates:
                    raise _Misfit(f"it does not adapt layer '{lname}', and the slot cannot be switched off there")
                params[lname] = {p: torch.zeros(s) for p, s in shapes.items()}
                ratios[lname] = 0.0
                continue
            padded = {p: _pad(sa.tensors[p], s, f"'{p}' on layer '{lname}'") for p, s in shapes.items()
                      if p in sa.tensors}
            missing = [p for p in shapes if p not in padded] or [p for p in sa.tensors if p not in shapes]
            if missing:
                raise _Misfit(f"its tensors on layer '{lname}' are not the compiled form's (no '{missing[0]}' in "
                              f"{'the checkpoint' if missing[0] in shapes else 'the slot'}: {_opts(sa)} vs "
                              f"{_opts(cur)} change the method's factors)")
            for c, compiled_const in cur.consts.items():   # plan-time constants may be folded into the graph
                t = sa.consts.get(c)
                if t is None or t.shape != compiled_const.shape or not torch.equal(t, compiled_const):
                    raise _Misfit(f"its plan-time constant '{c}' on layer '{lname}' differs from the compiled one "
                                  "(a seed or option the graph has folded in)")
            same_shapes = all(sa.tensors[p].shape == s for p, s in shapes.items()) and all(
                ap.shared[n].shape == t.shape for n, t in shared.items())
            if same_shapes and sa.layer_options == cur.layer_options:
                # the compiled program at the same options on tensors of the same shapes: the same update
                params[lname], ratios[lname] = padded, 1.0
                continue
            read = program_inputs(cur.program) or program_inputs(sa.program)
            if read:   # an update computed from a model input (a token mask): only the compiled options fit
                diff = sorted(k for k in {*sa.layer_options, *cur.layer_options}
                              if sa.layer_options.get(k) != cur.layer_options.get(k))
                shown = ", ".join(f"{k} = {sa.layer_options.get(k)!r}, compiled {cur.layer_options.get(k)!r}"
                                  for k in diff)
                what = f"its options differ from the compiled ones ({shown})" if diff else \
                    "its tensors' shapes differ from the compiled ones"
                raise _Misfit(f"on layer '{lname}' {what}, and the update is computed from the model input "
                              f"'{read[0]}'")
            layer = self.plan.layers[lname]
            # Layers of the same kind and shapes at the same options run the same program on other values: the
            # update is a polynomial in the tensors, so the check on one of them (random trained values) holds for
            # all; the others take its ratio.
            config = repr((layer.kind, tuple(layer.shape), layer.bias is not None,
                           sorted(sa.layer_options.items()), sorted(cur.layer_options.items()),
                           sorted((p, tuple(t.shape)) for p, t in sa.tensors.items()),
                           sorted((p, tuple(t.shape)) for p, t in padded.items())))
            if config in checked:
                params[lname], ratios[lname] = padded, checked[config]
                continue
            # checked on the CPU, where the checkpoint's tensors are (the graph may be on an accelerator)
            weight = self._params[layer.weight].detach().to("cpu", torch.float64)
            bias = self._params[layer.bias].detach().to("cpu", torch.float64) if layer.bias else None
            compiled = dataclasses.replace(cur, adapter=slot.name, tensors=padded)
            c = _delta(weight, bias, layer.kind, compiled, shared)
            t = _delta(weight, bias, layer.kind, sa, dict(ap.shared))
            cc, tt = float(c @ c), float(t @ t)
            k = float(t @ c) / cc if cc > 0 else 1.0
            resid = float((t - k * c).norm()) if cc > 0 else tt ** 0.5
            if resid > 1e-6 * tt ** 0.5 + 1e-9 * float(weight.norm()):
                raise _Misfit(f"on layer '{lname}' the compiled form ({_opts(cur)}) cannot reproduce its update "
                              f"({_opts(sa)}): they differ beyond a scale")
            if abs(k - 1.0) > 1e-9 and lname not in slot.gates:
                raise _Misfit(f"on layer '{lname}' its scale differs from the compiled one ({_opts(sa)} vs "
                              f"{_opts(cur)}) and the slot has no gate there")
            params[lname], ratios[lname] = padded, k
            if cc > 0 and tt > 0:   # a zero update (a fresh LoRA's B = 0) proves nothing about the others
                checked[config] = k
        return params, shared, ratios

    def install(self, slot: Slot, new: Plan, name: str) -> None:
        """Fit, then copy the checkpoint's tensors into the slot (nothing changes when it does not fit)."""
        params, shared, ratios = self.fit(slot, new, name)
        with torch.no_grad():
            for lname, ps in params.items():
                for p, t in ps.items():
                    dst = get_path(self.gm, slot.params[lname][p])
                    dst.copy_(t.to(dst.dtype))
            for sname, t in shared.items():
                dst = get_path(self.gm, slot.shared[sname])
                dst.copy_(t.to(dst.dtype))
        # constants an inference compile derived from these tensors (DoRA's norm): recomputed now, so that a
        # torch.compile'd module (where the eager staleness check does not run) sees the new adapter too
        from peftc.rewrite.freeze_detached import refresh_frozen
        refresh_frozen(self.gm, [*(path for ps in slot.params.values() for path in ps.values()),
                                 *slot.shared.values()])
        slot.ratio = ratios
        if slot.holds != name:
            slot.holds, slot.seq = name, max(s.seq for s in self.slots.values()) + 1
        rec = records_from_plan(new)[name]
        for lname, saved in rec.tensors.items():     # the graph's tensors, at the checkpoint's shapes
            decls = {d.saved: d.name for d in slot.sites[lname].program.params if d.saved is not None}
            for key, t in saved.items():
                g = get_path(self.gm, slot.params[lname][decls[key]])
                saved[key] = g[tuple(slice(0, n) for n in t.shape)]
        for key, t in list(rec.shared.items()):
            decl = next(d.name for d in new.adapters[name].shared_decls if d.saved == key)
            g = get_path(self.gm, slot.shared[decl])
            rec.shared[key] = g[tuple(slice(0, n) for n in t.shape)]
        self.manifest.adapters[name] = rec


def _opts(sa: SiteAdapter) -> str:
    return ", ".join(f"{k}={v}" for k, v in sa.layer_options.items() if k in ("r", "alpha", "rslora")) or "options"


def attach(gm: fx.GraphModule, plan: Plan, module: nn.Module, found: dict[str, set[str]],
           skel: Skeleton | None = None, true_plan: Plan | None = None,
           per_row: Sequence[str] | None = None) -> None:
    """Give `gm` the run-time methods. `plan` is what was compiled; with a skeleton, `true_plan` holds the
    declared adapters' real tensors (installed when the skeleton compiled them at max_rank). `per_row`: the
    compiled adapters in `adapter_ids` order, when the graph chooses per row."""
    merged = [n for n, ap in plan.adapters.items() if ap.merge and ap.active]
    live = [n for n, ap in plan.adapters.items() if ap.active and not ap.merge]
    slots = _slots(gm, plan, live, found)
    if skel is None:
        active = [n for n in live if not n.startswith(SLOT)]
    else:
        active = list(skel.active) + [n for n in live if n not in skel.gated]
    for n in live:
        if n.startswith(SLOT):
            gm.peftc.adapters.pop(n, None)     # spare slots are not adapters (nothing to save)
    rt = Runtime(gm, plan, module, slots, active, merged, switchable=skel is not None)
    rt.per_row = list(per_row) if per_row is not None else None
    if skel is not None and skel.install and true_plan is not None:
        for name in skel.gated:
            if name in true_plan.adapters:
                try:
                    rt.install(slots[name], true_plan, name)
                except _Misfit as e:
                    raise PeftcError(f"adapter '{name}' does not fit its max_rank slot: {e}") from None
    rt.apply()
    gm.peftc_runtime = rt
    # copy.deepcopy(gm) keeps it (a GraphModule's copy keeps only its graph, tensors and these)
    gm.meta.setdefault(_PRESERVED, {})["peftc_runtime"] = rt
    # a GraphModule's class is made per instance (torch.fx keeps its forward there): one more such class, under
    # PeftcGraphModule, then recompile to put the forward on it; copy.deepcopy makes its copy's class the same way
    gm.__class__ = type("GraphModuleImpl", (PeftcGraphModule,), {})
    gm.recompile()


# ---------------------------------------------------------------- the methods
class RuntimeControl:
    """transformers' PeftAdapterMixin methods on a compiled GraphModule (see `peftc.runtime`)."""

    peftc_runtime: Runtime

    def load_adapter(self, path: str | Path, adapter_name: str = "default",
                     hotswap: bool | Literal["auto"] = "auto") -> None:
        """Load a PEFT checkpoint directory into the graph. A new `adapter_name` takes a free slot (one
        compiled for the same method on the checkpoint's layers, with rank room) and is loaded inactive (call
        `set_adapter`), unless the module holds no adapter; `hotswap=True` replaces an existing adapter's
        tensors in place (same method, rank up to the compiled one; alpha may differ), its state unchanged.
        `hotswap="auto"` (transformers' default) hot swaps once `enable_peft_hotswap` was called and the module
        holds an adapter, and loads otherwise."""
        rt = self.peftc_runtime
        held = rt.held()
        if hotswap not in (True, False, "auto"):
            raise PeftcError(f"load_adapter: hotswap must be True, False or \"auto\", not {hotswap!r}")
        if hotswap == "auto":
            hotswap = rt.hotswap_enabled and bool(held)
        if hotswap:
            rt.names(adapter_name, "load_adapter(hotswap=True)")
            new = rt.plan_checkpoint(path, adapter_name)
            try:
                rt.install(held[adapter_name], new, adapter_name)
            except _Misfit as e:
                raise PeftcError(f"load_adapter: cannot hot swap '{adapter_name}' with {path}: {e}; "
                                 f"{e.advice()}") from None
            rt.apply()
            return
        if adapter_name in held or adapter_name in rt.merged:
            raise PeftcError(f"load_adapter: an adapter named '{adapter_name}' exists already; pass hotswap=True to "
                             "replace its weights, or choose another name")
        self._install_free(rt.plan_checkpoint(path, adapter_name), adapter_name, str(path), "load_adapter")

    def add_adapter(self, adapter_config: Any, adapter_name: str | None = None) -> None:
        """A new adapter made from a peft config (`LoraConfig(...)`, or its dict), initialized as
        `get_peft_model` initializes it, in a free slot; it becomes active, as in transformers (which makes
        every added adapter the active one). A compiled graph trains in place only with `train=True`."""
        rt = self.peftc_runtime
        adapter_name = adapter_name or "default"
        if adapter_name in rt.held() or adapter_name in rt.merged:
            raise PeftcError(f"add_adapter: an adapter named '{adapter_name}' exists already; choose another name")
        self._install_free(rt.plan_config(adapter_config, adapter_name), adapter_name, "the config",
                           "add_adapter", activate=True)

    def enable_peft_hotswap(self, target_rank: int = 128, check_compiled: str = "error") -> None:
        """transformers' `enable_peft_hotswap`: later `load_adapter(..., hotswap="auto")` calls hot swap. The
        rank room was fixed when the graph was compiled (`max_rank`), so `target_rank` is only checked against
        it: a larger one warns that checkpoints above the compiled rank will not fit. `check_compiled` is
        accepted for compatibility: a compiled peftc graph never recompiles on a hot swap."""
        rt = self.peftc_runtime
        if check_compiled not in ("error", "warn", "ignore"):
            raise PeftcError(f"enable_peft_hotswap: check_compiled must be 'error', 'warn' or 'ignore', not "
                             f"{check_compiled!r}")
        if not isinstance(target_rank, int) or target_rank < 1:
            raise PeftcError(f"enable_peft_hotswap: target_rank must be a positive int, not {target_rank!r}")
        ranks = {sa.layer_options[RANK] for s in rt.slots.values() for sa in s.sites.values()
                 if RANK in sa.layer_options}
        if ranks and target_rank > max(ranks):
            warnings.warn(f"enable_peft_hotswap: the graph's slots were compiled at rank {max(ranks)}; a checkpoint "
                          f"of rank up to {target_rank} fits only if the graph is compiled with max_rank="
                          f"{target_rank}", PeftcWarning, stacklevel=2)
        rt.hotswap_enabled = True

    def _install_free(self, new: Plan, adapter_name: str, source: str, what: str, activate: bool = False) -> None:
        rt = self.peftc_runtime
        held = rt.held()
        free = [s for s in rt.slots.values() if s.holds is None]
        if not free:
            raise PeftcError(f"{what}: no free slot for '{adapter_name}': every slot holds an adapter "
                             f"({', '.join(held) or 'none'}); compile with max_adapters=N (and max_rank=R) to reserve "
                             "slots, or delete_adapter one first")
        why = []
        for slot in free:
            try:
                rt.install(slot, new, adapter_name)
            except _Misfit as e:
                why.append(f"slot '{slot.name}' ({slot.method}): {e}")
                continue
            if not held or activate:
                rt.active = [adapter_name]
            rt.apply()
            return
        raise PeftcError(f"{what}: {source} fits no free slot: {'; '.join(why)}; slots are compiled with "
                         "the method and layers of the spec's first adapter (max_adapters) and rank max_rank: "
                         "compile with a spec that declares an adapter like it")

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make these adapters the active ones (the others stop running)."""
        rt = self.peftc_runtime
        if rt.per_row is not None:
            raise PeftcError("set_adapter: this graph chooses adapters per row (adapter_ids); every adapter it holds "
                             "is on for the rows that choose it (adapter_index(name) gives its id)")
        names = rt.names(adapter_name, "set_adapter")
        rt.check_state(names, rt.enabled)
        rt.active = names
        rt.apply()

    def disable_adapters(self) -> None:
        """Run the base model (merged adapters, part of the base weights, stay)."""
        rt = self.peftc_runtime
        rt.check_state(rt.active, False)
        if rt.merged:
            warnings.warn(f"disable_adapters: merged adapters ({', '.join(rt.merged)}) are part of the base weights "
                          "and stay on", PeftcWarning, stacklevel=2)
        rt.enabled = False
        rt.apply()

    def enable_adapters(self) -> None:
        """Run the active adapters again."""
        rt = self.peftc_runtime
        rt.enabled = True
        rt.apply()

    def active_adapters(self) -> list[str]:
        """The active adapters (as set, also while they are disabled); with adapter_ids, every held adapter."""
        rt = self.peftc_runtime
        return list(rt.held()) if rt.per_row is not None else list(rt.active)

    def adapter_index(self, adapter_name: str) -> int:
        """The `adapter_ids` value that chooses this adapter for a row (graphs compiled with adapter_ids): its
        slot's position, the spec's adapters first in declaration order, then the spare slots; an adapter
        loaded into a spare slot takes that slot's id."""
        rt = self.peftc_runtime
        if rt.per_row is None:
            raise PeftcError("adapter_index: this graph was compiled without adapter_ids")
        rt.names(adapter_name, "adapter_index")
        return rt.per_row.index(rt.held()[adapter_name].name)

    def get_adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """peft's `get_peft_model_state_dict(model, adapter_name=...)`: the adapter's tensors under their
        checkpoint keys (default: the first active adapter)."""
        rt = self.peftc_runtime
        if adapter_name is None:
            if not rt.active:
                raise PeftcError("get_adapter_state_dict: no adapter is active; name one")
            adapter_name = rt.active[0]
        rec = rt.manifest.adapters.get(adapter_name)
        if rec is None:
            raise PeftcError(f"get_adapter_state_dict: no adapter named '{adapter_name}'; this module holds: "
                             f"{', '.join(rt.manifest.adapters) or 'none'}")
        return adapter_tensors(rec)

    def delete_adapter(self, adapter_names: str | list[str]) -> None:
        """Remove adapters; their slots become free for `load_adapter`. If no active adapter is left, the first
        remaining one becomes active (as peft does)."""
        rt = self.peftc_runtime
        names = rt.names(adapter_names, "delete_adapter")
        held = rt.held()
        for n in names:
            if set(held[n].sites) - set(held[n].gates):
                raise PeftcError(f"delete_adapter: adapter '{n}' ({held[n].method}) has no run-time gate on "
                                 "some of its layers, so it cannot be removed from the compiled graph")
        for n in names:
            held[n].holds = None
            rt.manifest.adapters.pop(n, None)
        was = list(rt.active)
        rt.active = [a for a in rt.active if a not in names]
        remaining = list(rt.held())
        if was and not rt.active and remaining:
            warnings.warn(f"delete_adapter: the active adapter was deleted; setting active adapter to "
                          f"'{remaining[0]}'", PeftcWarning, stacklevel=2)
            rt.active = [remaining[0]]
        rt.apply()


class PeftcGraphModule(RuntimeControl, fx.GraphModule):
    """The class of a GraphModule `peftc.compile` returns: an fx GraphModule with the run-time adapter methods."""
