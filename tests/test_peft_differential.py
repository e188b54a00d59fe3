"""Differential tests: peftc against the real peft library as the oracle.

Every case builds a real peft adapter (non-identity init + random noise), saves it, and compiles the same
checkpoint with peftc twice: through `import "<dir>"` (config translated by peftc) and through a hand-written
native spec that loads the tensors with `weights "<dir>"` (the spec language's own semantics for targets,
patterns, layers, exclude, ... must select exactly the layers peft adapted). Then:

* peftc unmerged == peft unmerged, and peftc merged (merge=True) == peft merge_and_unload()  (<= 1e-5, fp32);
* the adapter really changes the output (so a no-op cannot pass).
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import (
    CHANGED,
    MODELS,
    TOL,
    compile_on,
    inputs_for,
    logits_of,
    lora,
    max_diff,
    peft_adapter,
    randomize_,
    run_logits,
)
from peft import IA3Config, PeftModel, get_peft_model

from peftc import PeftcError


def ia3(**kw) -> IA3Config:
    return IA3Config(init_ia3_weights=False, **kw)


@dataclass(frozen=True)
class Case:
    id: str
    model: str
    config: Callable[[], object]
    native: str            # the equivalent native spec; "{dir}" is replaced by the checkpoint folder
    mergeable: bool = True
    # what peftc's merged graph must equal: peft's merge_and_unload() ("merged"), or peft's unmerged forward
    # where peft's own merge changes the function (a tied embedding: peft's merge also rewrites the tied lm_head)
    merged_ref: str = "merged"
    check_native_merge: bool = False   # also compile the native spec with its `merge` clause (a few cases)


def _native(method: str, body: str) -> str:
    return f"adapter default: {method} {{\n    {body}\n    weights \"{{dir}}\"\n}}\n"


CASES = [
    # ---- LoRA on Linear (llama: no biases)
    Case("llama-lora", "llama", lambda: lora(target_modules=["q_proj", "v_proj"]),
         _native("lora(r = 4, alpha = 8)", "targets q_proj, v_proj"), check_native_merge=True),
    Case("llama-rslora", "llama", lambda: lora(r=4, lora_alpha=16, use_rslora=True,
                                               target_modules=["q_proj", "k_proj", "o_proj"]),
         _native("lora(r = 4, alpha = 16, rslora = true)", "targets q_proj, k_proj, o_proj")),
    Case("llama-lora_bias-nomerge", "llama", lambda: lora(lora_bias=True, target_modules=["q_proj", "v_proj"]),
         _native("lora(r = 4, alpha = 8, lora_bias = true)", "targets q_proj, v_proj"), mergeable=False,
         check_native_merge=True),
    # rank_pattern / alpha_pattern; keys overlap, so first-match order matters (peft writes keys sorted,
    # and 'model.layers.1...' < 'q_proj' < 'v_proj', so the order survives the save)
    Case("llama-patterns", "llama",
         lambda: lora(target_modules=["q_proj", "v_proj", "o_proj"],
                      rank_pattern={"model.layers.1.self_attn.v_proj": 2, "q_proj": 8, "v_proj": 6},
                      alpha_pattern={"o_proj": 32, "v_proj": 3}),
         _native("lora(r = 4, alpha = 8)", "targets q_proj, v_proj, o_proj\n"
                 "    r at model.layers.1.self_attn.v_proj = 2\n    r at q_proj = 8\n    r at v_proj = 6\n"
                 "    alpha at o_proj = 32\n    alpha at v_proj = 3"), check_native_merge=True),
    Case("llama-regex", "llama", lambda: lora(target_modules=r".*\.layers\.1\..*_proj"),
         _native("lora(r = 4, alpha = 8)", r"targets /.*\.layers\.1\..*_proj/")),
    Case("llama-all-linear", "llama", lambda: lora(r=2, lora_alpha=4, target_modules="all-linear"),
         _native("lora(r = 2, alpha = 4)", "targets all-linear")),
    Case("llama-layers-pattern", "llama",
         lambda: lora(target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1],
                      layers_pattern="layers"),
         _native("lora(r = 4, alpha = 8)", "targets q_proj, v_proj, down_proj\n    layers 1 in layers")),
    Case("llama-layers", "llama",
         lambda: lora(target_modules=["q_proj", "up_proj"], layers_to_transform=[0]),
         _native("lora(r = 4, alpha = 8)", "targets q_proj, up_proj\n    layers 0")),
    Case("llama-exclude", "llama",
         lambda: lora(target_modules="all-linear", exclude_modules=["down_proj", "model.layers.0.self_attn.q_proj"]),
         _native("lora(r = 4, alpha = 8)",
                 "targets all-linear\n    exclude down_proj, model.layers.0.self_attn.q_proj")),
    # peft saves the base embedding too here (save_embedding_layers="auto" and 'embed_tokens' is targeted)
    Case("llama-embedding", "llama", lambda: lora(target_modules=["embed_tokens", "q_proj"]),
         _native("lora(r = 4, alpha = 8)", "targets embed_tokens, q_proj")),
    Case("llama-modules_to_save", "llama", lambda: lora(target_modules=["v_proj"], modules_to_save=["lm_head"]),
         _native("lora(r = 4, alpha = 8)", "targets v_proj\n    save lm_head")),
    # ---- GPT-2: transformers Conv1D (fan_in_fan_out), with biases
    # a tied embedding and head: the saved copy of one of them must not change the other (merged too)
    Case("gpt2-modules_to_save-tied-head", "gpt2", lambda: lora(target_modules=["c_attn"], modules_to_save=["lm_head"]),
         _native("lora(r = 4, alpha = 8)", "targets c_attn\n    save lm_head")),
    Case("gpt2-modules_to_save-tied-embedding", "gpt2",
         lambda: lora(target_modules=["c_attn"], modules_to_save=["wte"]),
         _native("lora(r = 4, alpha = 8)", "targets c_attn\n    save wte")),
    Case("gpt2-lora", "gpt2", lambda: lora(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
         _native("lora(r = 4, alpha = 8)", "targets c_attn, c_proj"), check_native_merge=True),
    Case("gpt2-lora_bias-rslora", "gpt2",
         lambda: lora(target_modules=["c_attn", "c_fc"], lora_bias=True, use_rslora=True, fan_in_fan_out=True),
         _native("lora(r = 4, alpha = 8, lora_bias = true, rslora = true)", "targets c_attn, c_fc")),
    Case("gpt2-all-linear", "gpt2", lambda: lora(r=2, lora_alpha=6, target_modules="all-linear", fan_in_fan_out=True),
         _native("lora(r = 2, alpha = 6)", "targets all-linear")),
    Case("gpt2-exclude-regex", "gpt2",
         lambda: lora(target_modules=["c_attn", "c_fc", "c_proj"], exclude_modules=r".*\.h\.0\.mlp\..*",
                      fan_in_fan_out=True),
         _native("lora(r = 4, alpha = 8)", "targets c_attn, c_fc, c_proj\n    exclude /.*\\.h\\.0\\.mlp\\..*/")),
    # wte is tied to lm_head: peft adapts only the embedding lookup (its merge_and_unload also rewrites the tied
    # lm_head, changing the function), so the merged reference is peft's unmerged forward
    Case("gpt2-tied-embedding", "gpt2", lambda: lora(target_modules=["wte", "c_fc"], fan_in_fan_out=True),
         _native("lora(r = 4, alpha = 8)", "targets wte, c_fc"), merged_ref="unmerged"),
    # ---- BERT with a classification head
    Case("bert-lora_bias", "bert-cls", lambda: lora(target_modules=["query", "value"], lora_bias=True),
         _native("lora(r = 4, alpha = 8, lora_bias = true)", "targets query, value"), check_native_merge=True),
    Case("bert-seqcls-all-linear", "bert-cls", lambda: lora(target_modules="all-linear", task_type="SEQ_CLS"),
         _native("lora(r = 4, alpha = 8)", "targets all-linear\n    save classifier"), check_native_merge=True),
    Case("bert-modules_to_save", "bert-cls",
         lambda: lora(target_modules=["query", "key"], modules_to_save=["classifier"]),
         _native("lora(r = 4, alpha = 8)", "targets query, key\n    save classifier")),
    # ---- custom models: Conv2d, Embedding
    Case("convnet-conv2d", "convnet", lambda: lora(r=2, lora_alpha=4, target_modules=["conv1", "conv2", "fc1"]),
         _native("lora(r = 2, alpha = 4)", "targets conv1, conv2, fc1"), check_native_merge=True),
    Case("convnet-conv2d-lora_bias", "convnet",
         lambda: lora(r=2, lora_alpha=4, target_modules=["conv1", "conv2"], lora_bias=True),
         _native("lora(r = 2, alpha = 4, lora_bias = true)", "targets conv1, conv2")),
    Case("convnet-modules_to_save", "convnet", lambda: lora(target_modules=["fc1"], modules_to_save=["fc2"]),
         _native("lora(r = 4, alpha = 8)", "targets fc1\n    save fc2")),
    Case("convnet-all-linear", "convnet", lambda: lora(r=2, lora_alpha=2, target_modules="all-linear"),
         _native("lora(r = 2, alpha = 2)", "targets all-linear")),
    Case("token-mlp-embedding", "token-mlp", lambda: lora(target_modules=["emb", "lin0", "lin1"]),
         _native("lora(r = 4, alpha = 8)", "targets emb, lin0, lin1"), check_native_merge=True),
    Case("token-mlp-lora_bias", "token-mlp", lambda: lora(target_modules=["lin0", "lin1"], lora_bias=True),
         _native("lora(r = 4, alpha = 8, lora_bias = true)", "targets lin0, lin1")),
    # ---- DoRA
    Case("llama-dora", "llama", lambda: lora(target_modules=["q_proj", "v_proj"], use_dora=True),
         _native("dora(r = 4, alpha = 8)", "targets q_proj, v_proj"), check_native_merge=True),
    Case("gpt2-dora", "gpt2", lambda: lora(target_modules=["c_attn", "c_fc"], use_dora=True, fan_in_fan_out=True),
         _native("dora(r = 4, alpha = 8)", "targets c_attn, c_fc"), check_native_merge=True),
    Case("token-mlp-dora-rslora", "token-mlp",
         lambda: lora(target_modules=["lin0", "lin1"], use_dora=True, use_rslora=True),
         _native("dora(r = 4, alpha = 8, rslora = true)", "targets lin0, lin1")),
    Case("token-mlp-dora-embedding", "token-mlp", lambda: lora(target_modules=["emb"], use_dora=True),
         _native("dora(r = 4, alpha = 8)", "targets emb")),
    Case("convnet-dora-conv2d", "convnet", lambda: lora(r=2, lora_alpha=4, target_modules=["conv1", "conv2", "fc1"],
                                                       use_dora=True),
         _native("dora(r = 2, alpha = 4)", "targets conv1, conv2, fc1")),
    # ---- IA3
    Case("llama-ia3-ff", "llama",
         lambda: ia3(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
         _native("ia3()", "targets k_proj, v_proj, down_proj\n    feedforward down_proj"), check_native_merge=True),
    Case("llama-ia3-noff", "llama", lambda: ia3(target_modules=["q_proj", "up_proj"], feedforward_modules=[]),
         _native("ia3()", "targets q_proj, up_proj")),
    Case("gpt2-ia3", "gpt2",
         lambda: ia3(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True),
         _native("ia3()", "targets c_attn, mlp.c_proj\n    feedforward mlp.c_proj"), check_native_merge=True),
    Case("bert-ia3", "bert-cls",
         lambda: ia3(target_modules=["query", "value", "intermediate.dense"],
                     feedforward_modules=["intermediate.dense"]),
         _native("ia3()", "targets query, value, intermediate.dense\n    feedforward intermediate.dense")),
    Case("token-mlp-ia3", "token-mlp", lambda: ia3(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"]),
         _native("ia3()", "targets lin0, lin1\n    feedforward lin1")),
]


@dataclass
class Prepared:
    case: Case
    dir: str
    inputs: dict
    base_out: torch.Tensor
    peft_out: torch.Tensor
    merged_out: torch.Tensor | None      # what a merged peftc graph must compute
    merged_state: dict | None            # peft's merge_and_unload() state dict
    base_state: dict


@pytest.fixture(scope="module", params=CASES, ids=[c.id for c in CASES])
def prepared(request, tmp_path_factory) -> Prepared:
    case: Case = request.param
    tmp = tmp_path_factory.mktemp(case.id)
    base, pm, d = peft_adapter(case.model, case.config(), tmp)
    x = inputs_for(case.model)
    base_out, peft_out = run_logits(base, x), run_logits(pm, x)
    merged_out = merged_state = None
    if case.mergeable:
        merged = copy.deepcopy(pm).merge_and_unload()
        merged_state = {k: v.detach().clone() for k, v in merged.state_dict().items()}
        merged_out = run_logits(merged, x) if case.merged_ref == "merged" else peft_out
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    return Prepared(case, str(d), x, base_out, peft_out, merged_out, merged_state, base_state)


def _import(prepared: Prepared) -> str:
    return f'adapter default: import "{prepared.dir}"'


def _mts_modules(prepared: Prepared) -> list[str]:
    cfg = prepared.case.config()
    return list(cfg.modules_to_save or []) + (["classifier"] if cfg.task_type == "SEQ_CLS" else [])


def _in_mts(name: str, prepared: Prepared) -> bool:
    """Whether a parameter name belongs to a modules_to_save module (peft matches those names as suffixes)."""
    return any(f".{name}".startswith(f".{m}.") or f".{m}." in f".{name}" for m in _mts_modules(prepared))


def test_adapter_is_not_a_noop(prepared):
    assert max_diff(prepared.peft_out, prepared.base_out) > CHANGED


def test_import_unmerged_matches_peft(prepared):
    gm = compile_on(_import(prepared), prepared.case.model)
    out = run_logits(gm, prepared.inputs)
    assert max_diff(out, prepared.peft_out) <= TOL
    assert max_diff(out, prepared.base_out) > CHANGED


def test_native_spec_unmerged_matches_peft(prepared):
    gm = compile_on(prepared.case.native.replace("{dir}", prepared.dir), prepared.case.model)
    out = run_logits(gm, prepared.inputs)
    assert max_diff(out, prepared.peft_out) <= TOL
    assert max_diff(out, prepared.base_out) > CHANGED


def test_import_merged_matches_peft(prepared):
    case = prepared.case
    base = MODELS[case.model]()
    if not case.mergeable:
        with pytest.raises(PeftcError):
            compile_on(_import(prepared), case.model, base, merge=True)
        return
    gm = compile_on(_import(prepared), case.model, base, merge=True)
    out = run_logits(gm, prepared.inputs)
    assert max_diff(out, prepared.merged_out) <= TOL
    assert max_diff(out, prepared.base_out) > CHANGED
    # a fully merged graph has no trainable adapter tensors left
    assert not any(p.requires_grad for p in gm.parameters())
    # compiling never touches the caller's model
    after = base.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in prepared.base_state.items())
    if case.merged_ref != "merged":
        return
    # the merged graph is the base graph with new weights, under the base parameter names
    sd = gm.state_dict()
    changed = 0
    for name, ref in prepared.merged_state.items():
        if _in_mts(name, prepared) or name not in sd or torch.equal(ref, prepared.base_state[name]):
            continue
        assert max_diff(sd[name], ref) <= TOL, name
        changed += 1
    assert changed > 0


MTS_CASES = [c for c in CASES if c.mergeable and (c.config().modules_to_save or c.config().task_type == "SEQ_CLS")]


@pytest.mark.parametrize("prepared", MTS_CASES, ids=[c.id for c in MTS_CASES], indirect=True)
def test_merged_modules_to_save_under_base_names(prepared):
    """peft's merge_and_unload() puts the saved copy of a modules_to_save module in the base module's place;
    a merged peftc graph should likewise hold it under the base parameter names (a merged checkpoint)."""
    gm = compile_on(_import(prepared), prepared.case.model, merge=True)
    sd = gm.state_dict()
    names = [n for n in prepared.merged_state if _in_mts(n, prepared)]
    assert names and any(not torch.equal(prepared.merged_state[n], prepared.base_state[n]) for n in names)
    for n in names:
        assert max_diff(sd[n], prepared.merged_state[n]) <= TOL, n


NATIVE_MERGE_CASES = [c for c in CASES if c.check_native_merge]


@pytest.mark.parametrize("prepared", NATIVE_MERGE_CASES, ids=[c.id for c in NATIVE_MERGE_CASES], indirect=True)
def test_native_merge_clause_matches_peft(prepared):
    """The spec's own `merge` clause gives the same result as merge=True (on a subset of the cases)."""
    case = prepared.case
    spec = case.native.replace("{dir}", prepared.dir).replace("    weights", "    merge\n    weights")
    if not case.mergeable:
        with pytest.raises(PeftcError):
            compile_on(spec, case.model)
        return
    gm = compile_on(spec, case.model)
    assert max_diff(run_logits(gm, prepared.inputs), prepared.merged_out) <= TOL


# ---------------------------------------------------------------- several adapters at once
@pytest.fixture(scope="module")
def two_loras(tmp_path_factory):
    """Two LoRA adapters on llama (overlapping targets, different options), saved by peft, and peft's outputs
    with a alone, b alone and both active."""
    tmp = tmp_path_factory.mktemp("two_loras")
    cfg_a = lora(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    cfg_b = lora(r=2, lora_alpha=5, use_rslora=True, target_modules=["q_proj", "k_proj", "down_proj"])
    _, _, da = peft_adapter("llama", cfg_a, tmp / "a", seed=11)
    _, _, db = peft_adapter("llama", cfg_b, tmp / "b", seed=12)
    base = MODELS["llama"]()
    x = inputs_for("llama")
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(da), adapter_name="a")
    pm.load_adapter(str(db), adapter_name="b")
    pm.eval()
    outs = {"base": run_logits(base, x)}
    for active in (["a"], ["b"], ["a", "b"]):
        pm.base_model.set_adapter(active)
        outs["+".join(active)] = run_logits(pm, x)
    return {"a": str(da), "b": str(db), "x": x, "out": outs}


def _two_lora_spec(da: str, db: str, *, import_: bool = False, merge_a: bool = False, active: str = "") -> str:
    if import_:
        text = f'adapter a: import "{da}"\nadapter b: import "{db}"\n'
    else:
        text = (f'adapter a: lora(r = 4, alpha = 8) {{\n    targets q_proj, v_proj\n    weights "{da}"\n'
                f'    {"merge" if merge_a else ""}\n}}\n'
                f'adapter b: lora(r = 2, alpha = 5, rslora = true) {{\n    targets q_proj, k_proj, down_proj\n'
                f'    weights "{db}"\n}}\n')
    return text + (f"active {active}\n" if active else "")


def test_two_adapters_sanity(two_loras):
    o = two_loras["out"]
    for k in ("a", "b", "a+b"):
        assert max_diff(o[k], o["base"]) > CHANGED
    assert max_diff(o["a+b"], o["a"]) > CHANGED and max_diff(o["a+b"], o["b"]) > CHANGED


@pytest.mark.parametrize("import_", [False, True], ids=["weights", "import"])
def test_two_loras_both_active(two_loras, import_):
    gm = compile_on(_two_lora_spec(two_loras["a"], two_loras["b"], import_=import_), "llama")
    assert max_diff(run_logits(gm, two_loras["x"]), two_loras["out"]["a+b"]) <= TOL


def test_two_loras_both_merged(two_loras):
    gm = compile_on(_two_lora_spec(two_loras["a"], two_loras["b"]), "llama", merge=True)
    assert max_diff(run_logits(gm, two_loras["x"]), two_loras["out"]["a+b"]) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("active", ["a", "b"])
def test_inactive_adapter_has_no_effect(two_loras, active):
    spec = _two_lora_spec(two_loras["a"], two_loras["b"], active=active)
    gm = compile_on(spec, "llama")
    assert max_diff(run_logits(gm, two_loras["x"]), two_loras["out"][active]) <= TOL
    # merging everything still leaves the inactive one out
    gm = compile_on(spec, "llama", merge=True)
    assert max_diff(run_logits(gm, two_loras["x"]), two_loras["out"][active]) <= TOL


def test_one_merged_one_unmerged(two_loras):
    gm = compile_on(_two_lora_spec(two_loras["a"], two_loras["b"], merge_a=True), "llama")
    assert max_diff(run_logits(gm, two_loras["x"]), two_loras["out"]["a+b"]) <= TOL
    live = [n for n, p in gm.named_parameters() if p.requires_grad]
    assert live and all(".b." in n or n.endswith(".b") for n in live), live
    assert not any(".a." in n for n, _ in gm.named_parameters())


@pytest.mark.slow
def test_two_ia3_on_the_same_layers(tmp_path):
    """IA3 adapters compose multiplicatively in peft; peftc chains W' = T_b(T_a(W))."""
    cfg_a = ia3(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    cfg_b = ia3(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    _, _, da = peft_adapter("llama", cfg_a, tmp_path / "a", seed=3)
    _, _, db = peft_adapter("llama", cfg_b, tmp_path / "b", seed=4)
    base = MODELS["llama"]()
    x = inputs_for("llama")
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(da), adapter_name="a")
    pm.load_adapter(str(db), adapter_name="b")
    pm.eval()
    pm.base_model.set_adapter(["a", "b"])
    ref = run_logits(pm, x)
    pm.base_model.set_adapter("a")
    assert max_diff(ref, run_logits(pm, x)) > CHANGED
    spec = f'adapter a: import "{da}"\nadapter b: import "{db}"\n'
    assert max_diff(run_logits(compile_on(spec, "llama"), x), ref) <= TOL
    assert max_diff(run_logits(compile_on(spec, "llama", merge=True), x), ref) <= TOL


@pytest.fixture(scope="module")
def lora_and_dora(tmp_path_factory):
    """A LoRA and a DoRA adapter sharing layers. In peft the order of the active adapters matters: DoRA rescales
    the output accumulated so far (base + the adapters before it), normalising by ||W0 + s B A||."""
    tmp = tmp_path_factory.mktemp("lora_dora")
    cfg_a = lora(target_modules=["q_proj", "v_proj", "up_proj"])
    cfg_b = lora(r=2, lora_alpha=4, target_modules=["v_proj", "up_proj", "down_proj"], use_dora=True)
    _, _, da = peft_adapter("llama", cfg_a, tmp / "a", seed=5)
    _, _, db = peft_adapter("llama", cfg_b, tmp / "b", seed=6)
    x = inputs_for("llama")
    pm = PeftModel.from_pretrained(MODELS["llama"](), str(da), adapter_name="a")
    pm.load_adapter(str(db), adapter_name="b")
    pm.eval()
    out = {}
    for order in (["a", "b"], ["b", "a"]):
        pm.base_model.set_adapter(order)
        out["+".join(order)] = run_logits(pm, x)
    assert max_diff(out["a+b"], out["b+a"]) > CHANGED  # the order really matters
    spec = (f'adapter a: lora(r = 4, alpha = 8) {{\n    targets q_proj, v_proj, up_proj\n    weights "{da}"\n}}\n'
            f'adapter b: dora(r = 2, alpha = 4) {{\n    targets v_proj, up_proj, down_proj\n    weights "{db}"\n}}\n')
    return {"spec": spec, "x": x, "out": out}


@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
def test_lora_then_dora_on_shared_layers(lora_and_dora, merge):
    gm = compile_on(lora_and_dora["spec"], "llama", merge=merge)
    assert max_diff(run_logits(gm, lora_and_dora["x"]), lora_and_dora["out"]["a+b"]) <= TOL


def test_active_order_decides_the_application_order(lora_and_dora):
    """`active b, a` applies b first, as peft's set_adapter(["b", "a"]) does."""
    gm = compile_on(lora_and_dora["spec"] + "active b, a\n", "llama")
    assert max_diff(run_logits(gm, lora_and_dora["x"]), lora_and_dora["out"]["b+a"]) <= TOL


# ---------------------------------------------------------------- refusals
def test_lora_bias_without_base_bias_refuses_merge(tmp_path):
    """peft cannot merge lora_bias into a layer without a bias; peftc must refuse too (not silently drop it)."""
    _, pm, d = peft_adapter("llama", lora(lora_bias=True, target_modules=["q_proj"]), tmp_path)
    with pytest.raises(Exception, match="(?i)bias"):
        copy.deepcopy(pm).merge_and_unload()
    with pytest.raises(PeftcError):
        compile_on(f'adapter default: import "{d}"', "llama", merge=True)
    with pytest.raises(PeftcError):
        compile_on('adapter default: lora(r = 4, alpha = 8, lora_bias = true) { targets q_proj\n merge }',
                   "llama")


# ---------------------------------------------------------------- gradients
def test_lora_gradients_match_peft(tmp_path):
    _, pm, d = peft_adapter("llama", lora(target_modules=["q_proj", "v_proj", "down_proj"]), tmp_path)
    x = inputs_for("llama")
    gm = compile_on(f'adapter default: import "{d}"', "llama")
    target = torch.randn(run_logits(pm, x).shape, generator=torch.Generator().manual_seed(0))

    def loss_of(model):
        return (logits_of(model(**x)) - target).square().mean()

    loss_of(pm).backward()
    loss_of(gm).backward()
    peft_grads = {n.removeprefix("base_model.model."): p.grad for n, p in pm.named_parameters() if p.requires_grad}
    ours = {n: p.grad for n, p in gm.named_parameters() if p.requires_grad}
    assert set(ours) == set(peft_grads)
    assert len(ours) == 2 * 3 * 2  # A and B, 3 targets, 2 layers
    for n, g in ours.items():
        assert g is not None, n
        assert peft_grads[n].abs().max() > 0, n
        assert max_diff(g, peft_grads[n]) <= TOL, n
    assert all(p.grad is None for p in gm.parameters() if not p.requires_grad)


# ---------------------------------------------------------------- a fresh adapter, trained in peft, imported
def test_peft_trained_modules_to_save_differs_from_base(tmp_path):
    """A SEQ_CLS adapter whose classifier copy was changed: peftc must use the saved copy, not the base head."""
    base = MODELS["bert-cls"]()
    pm = get_peft_model(copy.deepcopy(base), lora(target_modules=["query"], task_type="SEQ_CLS")).eval()
    randomize_(pm, seed=9, scale=0.2)
    pm.save_pretrained(str(tmp_path / "ad"))
    x = inputs_for("bert-cls")
    ref = run_logits(pm, x)
    gm = compile_on(f'adapter default: import "{tmp_path / "ad"}"', "bert-cls")
    assert max_diff(run_logits(gm, x), ref) <= TOL
