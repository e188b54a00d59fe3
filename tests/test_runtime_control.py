"""Run-time adapter control of a compiled graph (peftc.runtime): transformers' PeftAdapterMixin methods on the
module `peftc.compile` returns, checked step by step against peft given the same sequence of calls; hot swap
under torch.compile without recompiling; and each call peftc cannot honour is a clear PeftcError that changes
nothing."""
from __future__ import annotations

import random
import warnings

import peft
import pytest
import torch
from conftest import CHANGED, MODELS, TOL, inputs_for, max_diff, randomize_, run_logits

import peftc
from peftc.errors import PeftcError

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
FEWER = {"llama": dict(target_modules=["q_proj"]), "gpt2": dict(target_modules=["c_attn"], layers_to_transform=[0])}


def _lora(model: str, **kw):
    kw.setdefault("target_modules", TARGETS[model])
    return peft.LoraConfig(init_lora_weights=False, fan_in_fan_out=model == "gpt2", **kw)


def _loha(model: str, **kw):
    return peft.LoHaConfig(init_weights=False, target_modules=TARGETS[model], **kw)


CHECKPOINTS = {   # name -> (config, seed); every name a checkpoint of its own
    "a": (lambda m: _lora(m, r=4, lora_alpha=8), 1),
    "b": (lambda m: _lora(m, r=8, lora_alpha=4), 2),              # another rank and alpha
    "c": (lambda m: _lora(m, r=2, lora_alpha=16, **FEWER[m]), 3),  # fewer layers
    "d": (lambda m: _lora(m, r=6, lora_alpha=6, use_rslora=True), 4),
    "h": (lambda m: _loha(m, r=4, alpha=8), 5),
    "h2": (lambda m: _loha(m, r=2, alpha=3), 6),
    "big": (lambda m: _lora(m, r=16, lora_alpha=16), 7),         # above max_rank 8
    "k": (lambda m: _lora(m, r=4, lora_alpha=8, target_modules=["k_proj"] if m == "llama" else ["c_proj"]), 8),
    "i": (lambda m: peft.IA3Config(target_modules=TARGETS[m], feedforward_modules=[], init_ia3_weights=False), 9),
    "i2": (lambda m: peft.IA3Config(target_modules=TARGETS[m], feedforward_modules=[], init_ia3_weights=False), 10),
    "o": (lambda m: _lora(m, r=4, lora_alpha=8, use_dora=True), 11),
    "o2": (lambda m: _lora(m, r=4, lora_alpha=8, use_dora=True), 12),
    "v": (lambda m: peft.VeraConfig(r=8, target_modules=TARGETS[m], init_weights=False), 13),
    "v2": (lambda m: peft.VeraConfig(r=4, target_modules=TARGETS[m], init_weights=False, projection_prng_key=3), 14),
    "kr4": (lambda m: peft.LoKrConfig(r=4, alpha=4, target_modules=["q_proj"], init_weights=False), 15),  # full w2
    "kr2": (lambda m: peft.LoKrConfig(r=2, alpha=2, target_modules=["q_proj"], init_weights=False), 16),  # w2_a @ w2_b
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """model -> name -> checkpoint directory (built lazily, once per module)."""
    root = tmp_path_factory.mktemp("rt")
    made: dict[tuple[str, str], object] = {}

    def get(model: str, name: str):
        if (model, name) not in made:
            cfg, seed = CHECKPOINTS[name]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pm = peft.get_peft_model(MODELS[model](), cfg(model)).eval()
            randomize_(pm, seed, scale=0.2)
            d = root / f"{model}-{name}"
            pm.save_pretrained(str(d))
            made[(model, name)] = d
        return made[(model, name)]

    return get


def _spec(dirs: dict[str, object]) -> str:
    return "".join(f'adapter {n}: import "{d}"\n' for n, d in dirs.items())


def _peft(model: str, dirs: dict[str, object], mixed: bool):
    cls = peft.PeftMixedModel if mixed else peft.PeftModel
    (first, d0), *rest = dirs.items()
    pm = cls.from_pretrained(MODELS[model](), str(d0), adapter_name=first)
    for n, d in rest:
        pm.load_adapter(str(d), adapter_name=n)
    return pm.eval()


class Oracle:
    """peft given the same calls: `PeftModel` (or `PeftMixedModel` for mixed methods)."""

    def __init__(self, pm, mixed: bool) -> None:
        self.pm, self.mixed, self.disabled = pm, mixed, False

    def set(self, names: list[str]) -> None:
        self.pm.base_model.set_adapter(names)
        self._sync()

    def _sync(self) -> None:
        """PeftModel keeps its own `active_adapter` (one name) beside its layers' list: keep it valid."""
        active = self.active()
        if not self.mixed and active and self.pm.active_adapter not in active:
            self.pm.active_adapter = active[0]

    def active(self) -> list[str]:
        return list(self.pm.base_model.active_adapters)

    def disable(self) -> None:
        self.pm.base_model.disable_adapter_layers()
        self.disabled = True

    def enable(self) -> None:
        self.pm.base_model.enable_adapter_layers()
        self.disabled = False

    def load(self, d, name: str) -> None:
        self.pm.load_adapter(str(d), adapter_name=name)
        if self.disabled:   # a new adapter's layers start enabled in peft; the model-wide switch says off
            self.pm.base_model.disable_adapter_layers()

    def swap(self, d, name: str) -> None:
        """Hot swap = the same name, another checkpoint, the same active list and switch."""
        active = self.active()
        self.pm.delete_adapter(name)
        self.pm.load_adapter(str(d), adapter_name=name)
        self.set(active)
        if self.disabled:
            self.pm.base_model.disable_adapter_layers()

    def delete(self, name: str) -> None:
        self.pm.delete_adapter(name)
        self._sync()


def _same(gm, oracle: Oracle, x, step: str) -> None:
    got, want = run_logits(gm, x), run_logits(oracle.pm, x)
    assert max_diff(got, want) <= TOL, f"{step}: max diff {max_diff(got, want):.3g}"
    assert gm.active_adapters() == oracle.active(), step


def _state_dicts_equal(gm, pm, name: str) -> None:
    ours = gm.get_adapter_state_dict(name)
    theirs = peft.get_peft_model_state_dict(pm, adapter_name=name)
    assert sorted(ours) == sorted(theirs)
    for k, t in theirs.items():
        assert ours[k].shape == t.shape, k
        assert max_diff(ours[k], t) == 0.0, k


def _run_sequence(gm, oracle: Oracle, ckpt, model: str, pool: dict[str, list[str]], seed: int, steps: int,
                  can_delete: bool) -> list[str]:
    """Random calls (seeded) on both; outputs compared after each. `pool`: method -> checkpoint names that may
    be loaded or swapped in. Returns the calls made."""
    rng = random.Random(seed)
    x = inputs_for(model)
    method_of = {n: m for m, names in pool.items() for n in names}
    held = {n: method_of[n] for n in gm.active_adapters()}   # name -> method of what it holds
    fresh = iter(f"new{i}" for i in range(100))
    log: list[str] = []
    _same(gm, oracle, x, "start")
    for _ in range(steps):
        ops = ["set", "set", "disable", "enable", "load", "swap", "swap"] + (["delete"] if can_delete else [])
        op = rng.choice(ops)
        if op == "set":
            names = rng.sample(sorted(held), rng.randint(1, len(held)))
            gm.set_adapter(names if len(names) > 1 or rng.random() < 0.5 else names[0])
            oracle.set(names)
        elif op == "disable":
            gm.disable_adapters()
            oracle.disable()
        elif op == "enable":
            gm.enable_adapters()
            oracle.enable()
        elif op == "load":
            src = rng.choice(pool["lora"])
            name = next(fresh)
            try:
                gm.load_adapter(ckpt(model, src), adapter_name=name)
            except PeftcError as e:
                assert "no free slot" in str(e)
                log.append(f"load {src} as {name}: no free slot")
                continue
            oracle.load(ckpt(model, src), name)
            held[name] = "lora"
            op = f"load {src} as {name}"
        elif op == "swap":
            name = rng.choice(sorted(held))
            src = rng.choice(pool[held[name]])
            gm.load_adapter(ckpt(model, src), adapter_name=name, hotswap=True)
            oracle.swap(ckpt(model, src), name)
            op = f"swap {name} <- {src}"
        elif op == "delete":
            if len(held) < 2:
                continue
            name = rng.choice(sorted(held))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gm.delete_adapter(name)
            oracle.delete(name)
            del held[name]
            op = f"delete {name}"
        log.append(op)
        _same(gm, oracle, x, " -> ".join(log))
    return log


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_random_calls_lora_match_peft(model, ckpts):
    """LoRA adapters of several ranks, alphas (rslora too) and layer sets: set_adapter, disable/enable, load
    into spare slots, hot swap and delete in a seeded random order; each step equals peft's PeftModel."""
    dirs = {"a": ckpts(model, "a"), "b": ckpts(model, "b")}
    gm = peftc.compile(_spec(dirs) + "active a\n", MODELS[model](), max_adapters=4, max_rank=8)
    oracle = Oracle(_peft(model, dirs, mixed=False), mixed=False)
    oracle.set(["a"])
    log = _run_sequence(gm, oracle, ckpts, model, {"lora": ["a", "b", "c", "d"]}, seed=0, steps=24, can_delete=True)
    assert any(s.startswith("swap") for s in log) and any(s.startswith("load") for s in log)
    for name in gm.active_adapters():
        _state_dicts_equal(gm, oracle.pm, name)


@pytest.mark.parametrize("model", ["llama"])   # peft's LoHa does not take GPT-2's Conv1D
def test_random_calls_lora_and_loha_match_peft(model, ckpts):
    """LoRA and LoHa in one graph (peft's PeftMixedModel): switching, hot swaps of each method (other ranks
    and alphas), a new LoRA in a spare slot."""
    dirs = {"a": ckpts(model, "a"), "h": ckpts(model, "h")}
    gm = peftc.compile(_spec(dirs), MODELS[model](), max_adapters=3, max_rank=8)
    oracle = Oracle(_peft(model, dirs, mixed=True), mixed=True)
    oracle.set(["a", "h"])
    log = _run_sequence(gm, oracle, ckpts, model, {"lora": ["a", "b", "c"], "loha": ["h", "h2"]}, seed=1,
                        steps=16, can_delete=False)
    assert any(s.startswith("swap h") for s in log), log


def test_state_dict_and_delete_like_peft(ckpts, tmp_path):
    """get_adapter_state_dict gives peft's keys and tensors (at the checkpoint's own rank, not the padded
    one); deleting the active adapter makes the first remaining one active, as peft does."""
    model = "llama"
    dirs = {"a": ckpts(model, "a"), "c": ckpts(model, "c")}
    gm = peftc.compile(_spec(dirs) + "active c\n", MODELS[model](), max_rank=8)
    pm = _peft(model, dirs, mixed=False)
    pm.base_model.set_adapter(["c"])
    for name in dirs:
        _state_dicts_equal(gm, pm, name)
    with pytest.warns(peftc.PeftcWarning, match="setting active adapter to 'a'"):
        gm.delete_adapter("c")
    pm.delete_adapter("c")
    oracle = Oracle(pm, mixed=False)
    _same(gm, oracle, inputs_for(model), "delete c")
    gm.load_adapter(ckpts(model, "c"), adapter_name="c")      # into the freed slot; loaded inactive
    oracle.load(ckpts(model, "c"), "c")
    _same(gm, oracle, inputs_for(model), "load c again")
    gm.set_adapter(["c", "a"])
    oracle.set(["c", "a"])
    _same(gm, oracle, inputs_for(model), "set c, a")
    _state_dicts_equal(gm, pm, "c")
    written = peftc.save_adapter(gm, tmp_path / "saved")     # the held adapters, no spare slot
    assert sorted(p.name for p in written) == ["a", "c"]
    reloaded = peft.PeftModel.from_pretrained(MODELS[model](), str(tmp_path / "saved" / "c")).eval()
    assert max_diff(run_logits(reloaded, inputs_for(model)), run_logits(
        peft.PeftModel.from_pretrained(MODELS[model](), str(ckpts(model, "c"))).eval(), inputs_for(model))) == 0.0


@pytest.mark.parametrize("first,second", [("i", "i2"), ("o", "o2")], ids=["ia3", "dora"])
def test_weight_scaling_adapters_hot_swap_but_cannot_switch_off(first, second, ckpts):
    """An adapter that scales the weight (IA3, DoRA) has no gate: hot swap (same shapes, same scale) works;
    turning it off is an error that changes nothing."""
    model = "llama"
    gm = peftc.compile(_spec({"i": ckpts(model, first)}), MODELS[model](), switchable=True)
    x = inputs_for(model)
    gm.load_adapter(ckpts(model, second), adapter_name="i", hotswap=True)
    want = run_logits(peft.PeftModel.from_pretrained(MODELS[model](), str(ckpts(model, second))).eval(), x)
    assert max_diff(run_logits(gm, x), want) <= TOL
    for call in (gm.disable_adapters, lambda: gm.delete_adapter("i")):
        with pytest.raises(PeftcError, match="'i'.*(always on|no run-time gate)"):
            call()
        assert max_diff(run_logits(gm, x), want) <= TOL
    assert gm.active_adapters() == ["i"]


def test_vera_slots_match_peft(ckpts):
    """VeRA (shared projections, no alpha): hot swap to another rank and projection seed, a second VeRA in a
    spare slot; each state equals peft's model of that checkpoint."""
    model = "llama"
    gm = peftc.compile(_spec({"v": ckpts(model, "v")}), MODELS[model](), max_adapters=2, max_rank=8)
    x = inputs_for(model)

    def peft_of(name: str):
        return run_logits(peft.PeftModel.from_pretrained(MODELS[model](), str(ckpts(model, name))).eval(), x)

    base = run_logits(MODELS[model](), x)
    assert max_diff(run_logits(gm, x), peft_of("v")) <= TOL
    gm.load_adapter(ckpts(model, "v2"), adapter_name="v", hotswap=True)
    assert max_diff(run_logits(gm, x), peft_of("v2")) <= TOL
    gm.load_adapter(ckpts(model, "v"), adapter_name="n")
    gm.set_adapter("n")
    assert max_diff(run_logits(gm, x), peft_of("v")) <= TOL
    gm.disable_adapters()
    assert max_diff(run_logits(gm, x), base) <= TOL < max_diff(peft_of("v"), base)


def test_errors_are_clear_and_change_nothing(ckpts):
    model = "llama"
    gm = peftc.compile(_spec({"a": ckpts(model, "a")}), MODELS[model](), max_adapters=2, max_rank=8)
    x = inputs_for(model)
    before = run_logits(gm, x)
    cases = [
        (lambda: gm.set_adapter("nope"), r"set_adapter: no adapter named 'nope'; this module holds: a"),
        (lambda: gm.delete_adapter(["a", "nope"]), r"no adapter named 'nope'"),
        (lambda: gm.load_adapter(ckpts(model, "k"), adapter_name="k"), r"layer '.*k_proj'.*not compiled on"),
        (lambda: gm.load_adapter(ckpts(model, "big"), adapter_name="big"), r"larger than the compiled .*max_rank"),
        (lambda: gm.load_adapter(ckpts(model, "big"), adapter_name="a", hotswap=True),
         r"cannot hot swap 'a'.*larger than the compiled \(8, 64\).*larger max_rank"),
        (lambda: gm.load_adapter(ckpts(model, "h"), adapter_name="a", hotswap=True),
         r"cannot hot swap 'a'.*it is a loha adapter, the slot holds lora"),
        (lambda: gm.load_adapter(ckpts(model, "b"), adapter_name="a"), r"'a' exists already; pass hotswap=True"),
        (lambda: gm.load_adapter(ckpts(model, "b"), adapter_name="zz", hotswap=True), r"no adapter named 'zz'"),
        (lambda: gm.load_adapter("/nonexistent/dir", adapter_name="x"), r"is not a directory"),
        (lambda: gm.get_adapter_state_dict("nope"), r"no adapter named 'nope'"),
    ]
    for call, msg in cases:
        with pytest.raises(PeftcError, match=msg):
            call()
        assert max_diff(run_logits(gm, x), before) == 0.0, msg
        assert gm.active_adapters() == ["a"]
    gm.load_adapter(ckpts(model, "b"), adapter_name="b")     # the one spare slot
    with pytest.raises(PeftcError, match="no free slot for 'c'.*max_adapters=N"):
        gm.load_adapter(ckpts(model, "c"), adapter_name="c")


def test_merged_and_not_switchable_graphs_say_so(ckpts):
    model = "llama"
    spec = f'adapter m: import "{ckpts(model, "a")}" {{ merge }}\nadapter b: import "{ckpts(model, "b")}"\n'
    gm = peftc.compile(spec, MODELS[model](), switchable=True)
    with pytest.raises(PeftcError, match="adapter 'm' is merged into the base weights.*compile it unmerged"):
        gm.set_adapter("m")
    with pytest.raises(PeftcError, match="'m' is merged"):
        gm.load_adapter(ckpts(model, "c"), adapter_name="m", hotswap=True)
    with pytest.warns(peftc.PeftcWarning, match=r"merged adapters \(m\) are part of the base weights"):
        gm.disable_adapters()
    plain = peftc.compile(_spec({"a": ckpts(model, "a"), "b": ckpts(model, "b")}), MODELS[model]())
    assert plain.active_adapters() == ["a", "b"]
    with pytest.raises(PeftcError, match="'a' is compiled without run-time gates \\(compile with switchable=True\\)"):
        plain.set_adapter("b")
    one = peftc.compile(_spec({"a": ckpts(model, "a"), "b": ckpts(model, "b")}) + "active a\n", MODELS[model]())
    with pytest.raises(PeftcError, match="'b' is inactive in the spec and was not compiled; compile with switchable"):
        one.set_adapter("b")
    with pytest.raises(PeftcError, match="merge=True folds every adapter"):
        peftc.compile(_spec({"a": ckpts(model, "a")}), MODELS[model](), merge=True, switchable=True)
    with pytest.raises(PeftcError, match="max_rank = 8, but adapter 'big' has r = 16"):
        peftc.compile(_spec({"big": ckpts(model, "big")}), MODELS[model](), max_rank=8)


def _no_recompile(backend: str, ckpts, steps: list) -> None:
    """torch.compile the graph once; every run-time call afterwards must not recompile (error_on_recompile)."""
    import torch._dynamo as dynamo
    model = "llama"
    dirs = {"a": ckpts(model, "a"), "b": ckpts(model, "b")}
    gm = peftc.compile(_spec(dirs), MODELS[model](), max_adapters=3, max_rank=8)
    oracle = Oracle(_peft(model, dirs, mixed=False), mixed=False)
    oracle.set(["a", "b"])
    x = inputs_for(model)
    dynamo.reset()
    fast = torch.compile(gm, backend=backend)
    with torch.no_grad():
        fast(**x)
    with dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for i, (call, mirror) in enumerate(steps):
            call(gm, ckpts)
            mirror(oracle, ckpts)
            got = fast(**x)["logits"]
            want = run_logits(oracle.pm, x)
            assert max_diff(got, want) <= 1e-4 if backend == "inductor" else TOL, f"step {i}"
    dynamo.reset()


SWAPS = [
    (lambda g, c: g.load_adapter(c("llama", "d"), adapter_name="a", hotswap=True),   # rank 6, rslora
     lambda o, c: o.swap(c("llama", "d"), "a")),
    (lambda g, c: g.set_adapter("a"), lambda o, c: o.set(["a"])),
    (lambda g, c: g.load_adapter(c("llama", "c"), adapter_name="a", hotswap=True),   # rank 2, fewer layers
     lambda o, c: o.swap(c("llama", "c"), "a")),
    (lambda g, c: g.disable_adapters(), lambda o, c: o.disable()),
    (lambda g, c: g.enable_adapters(), lambda o, c: o.enable()),
    (lambda g, c: g.load_adapter(c("llama", "a"), adapter_name="n"), lambda o, c: o.load(c("llama", "a"), "n")),
    (lambda g, c: g.set_adapter(["n", "b"]), lambda o, c: o.set(["n", "b"])),
]


def test_hot_swap_under_torch_compile_does_not_recompile(ckpts):
    _no_recompile("aot_eager", ckpts, SWAPS)


@pytest.mark.slow
def test_hot_swap_under_inductor_does_not_recompile(ckpts):
    _no_recompile("inductor", ckpts, SWAPS[:3])


def test_dora_hot_swap_under_torch_compile_refreshes_its_frozen_norm(ckpts):
    """An inference compile stores DoRA's weight norm as a constant (pass freeze_detached); a hot swap under
    torch.compile, where no eager staleness check runs, must recompute it: outputs are the new checkpoint's."""
    import torch._dynamo as dynamo
    model = "llama"
    gm = peftc.compile(_spec({"i": ckpts(model, "o")}), MODELS[model](), switchable=True)
    assert gm.peftc.frozen, "the DoRA norm should be a stored constant in an inference compile"
    x = inputs_for(model)
    dynamo.reset()
    fast = torch.compile(gm, backend="aot_eager")
    with torch.no_grad():
        first = fast(**x)["logits"]
    want_first = run_logits(peft.PeftModel.from_pretrained(MODELS[model](), str(ckpts(model, "o"))).eval(), x)
    assert max_diff(first, want_first) <= TOL
    with dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        gm.load_adapter(ckpts(model, "o2"), adapter_name="i", hotswap=True)
        got = fast(**x)["logits"]
    want = run_logits(peft.PeftModel.from_pretrained(MODELS[model](), str(ckpts(model, "o2"))).eval(), x)
    assert max_diff(got, want) <= TOL and max_diff(want, want_first) > CHANGED
    dynamo.reset()


def test_add_adapter_and_auto_hotswap_like_transformers(ckpts):
    """transformers' `add_adapter(config, name)`: a fresh adapter in a free slot, initialized as peft
    initializes it (LoRA's default init: B = 0, the base model's function) and made active; with random init
    its tensors, put into a peft model, give peft's outputs. `enable_peft_hotswap` then makes
    `load_adapter(..., hotswap="auto")` (the default) a hot swap; without it "auto" loads into a new slot."""
    model = "llama"
    x = inputs_for(model)
    base = run_logits(MODELS[model](), x)
    gm = peftc.compile(_spec({"a": ckpts(model, "a")}), MODELS[model](), max_adapters=3, max_rank=8)
    gm.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[model]), adapter_name="fresh")
    assert gm.active_adapters() == ["fresh"]
    assert max_diff(run_logits(gm, x), base) <= TOL                      # B = 0
    sd = gm.get_adapter_state_dict("fresh")
    assert sd and all(float(t.abs().max()) == 0.0 for k, t in sd.items() if "lora_B" in k)
    assert all(float(t.abs().max()) > 0.0 for k, t in sd.items() if "lora_A" in k)
    cfg = _lora(model, r=4, lora_alpha=8)                                # init_lora_weights=False: B random too
    gm.add_adapter(cfg.to_dict(), adapter_name="rand")
    pm = peft.get_peft_model(MODELS[model](), cfg).eval()
    peft.set_peft_model_state_dict(pm, gm.get_adapter_state_dict("rand"))
    want = run_logits(pm, x)
    assert max_diff(run_logits(gm, x), want) <= TOL < max_diff(want, base)
    with pytest.raises(PeftcError, match="add_adapter: an adapter named 'rand' exists already"):
        gm.add_adapter(cfg, adapter_name="rand")
    with pytest.raises(PeftcError, match="add_adapter: no free slot for 'more'"):
        gm.add_adapter(cfg, adapter_name="more")
    # hotswap="auto": off until enable_peft_hotswap, then a hot swap of the named adapter
    gm.delete_adapter("fresh")
    gm.set_adapter("a")
    gm.load_adapter(ckpts(model, "b"), adapter_name="b")                # auto, not enabled: a new slot
    assert gm.active_adapters() == ["a"] and "b" in gm.peftc.adapters
    with pytest.warns(peftc.PeftcWarning, match="compiled at rank 8.*max_rank=128"):
        gm.enable_peft_hotswap()                                         # transformers' default target_rank 128
    gm.load_adapter(ckpts(model, "d"), adapter_name="a")                # auto: hot swap 'a' in place
    ref = peft.PeftModel.from_pretrained(MODELS[model](), str(ckpts(model, "d"))).eval()
    assert max_diff(run_logits(gm, x), run_logits(ref, x)) <= TOL
    with pytest.raises(PeftcError, match="no adapter named 'zz'"):
        gm.load_adapter(ckpts(model, "d"), adapter_name="zz")            # auto: hot swap needs the name
    with pytest.raises(PeftcError, match="hotswap must be True, False or"):
        gm.load_adapter(ckpts(model, "d"), adapter_name="a", hotswap="yes")


def test_misfit_advice_names_what_would_help(ckpts):
    """A checkpoint whose options change the method's factors (LoKr at r=2 stores w2 as w2_a @ w2_b; the slot,
    compiled at r=8, holds a full w2) is not helped by a larger max_rank, and the error says what is; a
    tensor larger than the slot's is, and that error says so."""
    model = "llama"
    gm = peftc.compile(_spec({"a": ckpts(model, "kr4")}), MODELS[model](), max_rank=8)
    with pytest.raises(PeftcError, match=r"no 'w2' in the checkpoint.*change the method's factors\); compile with a "
                                         r"spec that declares an adapter like this checkpoint") as e:
        gm.load_adapter(ckpts(model, "kr2"), adapter_name="a", hotswap=True)
    assert "max_rank" not in str(e.value)
    lora = peftc.compile(_spec({"a": ckpts(model, "a")}), MODELS[model](), max_rank=8)
    with pytest.raises(PeftcError, match=r"larger than the compiled.*compile with a larger max_rank"):
        lora.load_adapter(ckpts(model, "big"), adapter_name="a", hotswap=True)


def test_per_row_choice_with_run_time_slots_matches_peft(ckpts):
    """adapter_ids with max_adapters / max_rank (a serving graph: many adapters, each row choosing one, loaded
    and hot-swapped while it runs): each state gives peft's `adapter_names=[...]` rows; `adapter_index` gives
    the id of an adapter loaded into a spare slot; disabling gives the base model on every row."""
    model = "llama"
    x = inputs_for(model)
    gm = peftc.compile(_spec({"a": ckpts(model, "a"), "b": ckpts(model, "b")}), MODELS[model](), adapter_ids=True,
                       max_adapters=3, max_rank=8)
    pm = _peft(model, {"a": ckpts(model, "a"), "b": ckpts(model, "b"), "c": ckpts(model, "c")}, mixed=False)

    def same(ids: list[int], names: list[str], what: str) -> None:
        got = run_logits(lambda **k: gm(**k, adapter_ids=torch.tensor(ids)), x)
        with torch.no_grad():
            want = pm(**x, adapter_names=names).logits
        assert max_diff(got, want) <= TOL, what

    same([0, 1, -1], ["a", "b", "__base__"], "as compiled")
    same([2, 0, 1], ["__base__", "a", "b"], "an empty slot runs the base model")
    gm.load_adapter(ckpts(model, "c"), adapter_name="c")
    assert gm.adapter_index("c") == 2 and gm.active_adapters() == ["a", "b", "c"]
    same([2, 0, 1], ["c", "a", "b"], "c loaded into the spare slot")
    gm.load_adapter(ckpts(model, "d"), adapter_name="a", hotswap=True)      # rsLoRA r=6 into the r=8 slot
    pm.delete_adapter("a")
    pm.load_adapter(str(ckpts(model, "d")), adapter_name="a")
    same([0, 2, 0], ["a", "c", "a"], "a hot-swapped")
    gm.disable_adapters()
    same([0, 1, 2], ["__base__"] * 3, "disabled")
    gm.enable_adapters()
    gm.delete_adapter("b")
    same([1, 0, 2], ["__base__", "a", "c"], "b deleted: its id runs the base model")
    with pytest.raises(PeftcError, match="set_adapter: this graph chooses adapters per row"):
        gm.set_adapter("a")
    with pytest.raises(PeftcError, match="adapter_index: no adapter named 'b'"):
        gm.adapter_index("b")
    plain = peftc.compile(_spec({"a": ckpts(model, "a")}), MODELS[model](), max_adapters=2)
    with pytest.raises(PeftcError, match="compiled without adapter_ids"):
        plain.adapter_index("a")
