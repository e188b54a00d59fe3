"""HRA, RoAd and OSF against the real peft (the Case machinery and the differential tests of
test_additive_methods, imported and run here on these methods' cases):

* a peft-saved adapter imported whole: peftc unmerged == peft unmerged, peftc merged == peft merged;
* a fresh adapter written in a spec, saved by peftc, loads in peft with identical outputs (and after training);
* unmerged and merged ONNX checked in onnxruntime (HRA's chain and Gram-Schmidt, RoAd, and OSF whose SVD runs
  at compile time, never in the graph);
* the cheap unmerged forms (HRA as thin matmuls on the input, RoAd elementwise on the output, OSF a constant
  top part plus a low-rank branch) and located errors for bad checkpoints and unsupported layers.
"""
from __future__ import annotations

import copy

import peft
import pytest
import test_additive_methods as additive
import torch
from conftest import CHANGED, MODELS, TOL, compile_on, max_diff, peft_adapter, run_logits
from test_additive_methods import (  # noqa: F401 - the shared differential tests run on this module's `prepared`
    Case,
    Prepared,
    _compile,
    _inputs,
    _models,
    _tamper,
    test_adapter_changes_the_output,
    test_import_merged_matches_peft_merge,
    test_import_unmerged_matches_peft,
)

import peftc

QVD = ["q_proj", "v_proj", "down_proj"]
CASES = [
    # ---- HRA: even r (peft's paired init), odd r, Gram-Schmidt; Linear and Conv2d (stride 2 too)
    Case("llama-hra", "llama", lambda: peft.HRAConfig(r=4, target_modules=QVD),
         'hra(r = 3, init = "random") { targets q_proj, down_proj }'),
    Case("llama-hra-odd", "llama", lambda: peft.HRAConfig(r=5, target_modules=["q_proj", "down_proj"],
                                                          init_weights=False)),
    Case("llama-hra-gs", "llama", lambda: peft.HRAConfig(r=4, apply_GS=True, target_modules=QVD),
         'hra(r = 4, apply_GS = true, init = "random") { targets q_proj, down_proj }'),
    Case("convnet-hra", "convnet", lambda: peft.HRAConfig(r=3, target_modules=["conv1", "conv2", "fc1"]),
         'hra(r = 2, init = "random") { targets conv1, conv2, fc1 }'),
    Case("convnet-hra-gs", "convnet", lambda: peft.HRAConfig(r=4, apply_GS=True, target_modules=["conv1", "conv2"])),
    # ---- RoAd: the three variants, group sizes, a layer with a bias (rotated too)
    Case("llama-road1", "llama", lambda: peft.RoadConfig(group_size=8, target_modules=QVD),
         'road(group_size = 16, init = "random") { targets q_proj, down_proj }'),
    Case("llama-road2", "llama", lambda: peft.RoadConfig(variant="road_2", group_size=16, target_modules=QVD),
         'road(variant = "road_2", group_size = 4, init = "random") { targets v_proj }'),
    Case("llama-road4", "llama", lambda: peft.RoadConfig(variant="road_4", group_size=4, target_modules=QVD),
         'road(variant = "road_4", group_size = 8, init = "random") { targets q_proj, down_proj }'),
    Case("mlp-road-bias", "token-mlp", lambda: peft.RoadConfig(variant="road_4", group_size=4,
                                                               target_modules=["lin0", "lin1"]),
         'road(variant = "road_1", group_size = 4, init = "random") { targets lin0, lin1 }'),
    # ---- OSF: default rank (half the smaller dim), an absolute rank, per-pattern values (found anywhere in the name,
    #      as OSF's re.search does; a float is a fraction of the smaller dim)
    Case("llama-osf", "llama", lambda: peft.OSFConfig(target_modules=QVD),
         'osf(effective_rank = 6, init = "random") { targets q_proj, down_proj }'),
    Case("llama-osf-rank", "llama", lambda: peft.OSFConfig(effective_rank=5, target_modules=["q_proj", "down_proj"],
                                                           rank_pattern={"layers.0.self": 3, "down_proj": 0.25})),
    Case("mlp-osf-bias", "token-mlp", lambda: peft.OSFConfig(effective_rank=1, target_modules=["lin0", "lin1"])),
]
FRESH = [c for c in CASES if c.fresh]


@pytest.fixture(scope="module", params=CASES, ids=[c.id for c in CASES])
def prepared(request, tmp_path_factory) -> Prepared:
    case: Case = request.param
    base, pm, d = peft_adapter(case.model, case.config(), tmp_path_factory.mktemp(case.id), base=_models(case.model))
    x = _inputs(case.model)
    merged_out = run_logits(copy.deepcopy(pm).merge_and_unload(), x)
    return Prepared(case, str(d), x, run_logits(base, x), run_logits(pm, x), merged_out)


@pytest.mark.parametrize("case", FRESH, ids=[c.id for c in FRESH])
def test_fresh_saves_for_peft(case, tmp_path):
    additive.test_fresh_adapter_saves_for_peft(case, tmp_path)


@pytest.mark.parametrize("case", FRESH[:1] + [c for c in FRESH if c.id in ("llama-road4", "llama-osf")],
                         ids=lambda c: c.id)
def test_trains_and_loads_in_peft(case, tmp_path):
    additive.test_trains_through_the_graph_and_loads_in_peft(case, tmp_path)


def test_osf_identity_init_keeps_the_model():
    """A fresh OSF adapter starts from the base weight's own SVD: the output is the base model's."""
    x = _inputs("token-mlp")
    gm = _compile("adapter a: osf(effective_rank = 1) { targets lin0, lin1 }", "token-mlp")
    assert max_diff(run_logits(gm, x), run_logits(_models("token-mlp"), x)) <= TOL


ONNX = {
    "hra": 'hra(r = 3, init = "random")',
    "hra-gs": 'hra(r = 4, apply_GS = true, init = "random")',
    "road": 'road(variant = "road_2", group_size = 4, init = "random")',
}


@pytest.mark.slow
@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("method", sorted(ONNX) + ["osf"])
def test_onnx_export_checks_in_onnxruntime(method, merge, tmp_path):
    import onnx
    if method == "osf":   # peft's identity init plus noise (normal() factors make outputs too large for 1e-4)
        _, _, d = peft_adapter("token-mlp", peft.OSFConfig(target_modules=["lin0", "lin1"]), tmp_path)
        spec = f'adapter a: import "{d}"'
    else:
        spec = f"adapter a: {ONNX[method]} {{ targets lin0, lin1 }}"
    gm = _compile(spec, "token-mlp", merge=merge)
    x = _inputs("token-mlp")
    assert max_diff(run_logits(gm, x), run_logits(_models("token-mlp"), x)) > CHANGED
    result = peftc.export_onnx(gm, tmp_path / "m.onnx")
    assert result.max_abs_diff <= 1e-4
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert not ops & {"Svd", "Einsum", "Loop", "If"}, ops


# the cheap unmerged form of each: (model, spec, rules that must fire)
FORMS = {
    "hra": ("llama", "hra(r = 3) { targets q_proj, down_proj }", {"low_rank", "split_diff", "identity_weight"}),
    "hra-gs": ("llama", "hra(r = 4, apply_GS = true) { targets q_proj }", {"low_rank", "identity_weight"}),
    "hra-conv": ("convnet", "hra(r = 2) { targets conv1, conv2 }", {"conv_low_rank", "conv_split_diff"}),
    "road-bias": ("token-mlp", 'road(group_size = 4, init = "random") { targets lin0, lin1 }', {"output_rotation"}),
    "road": ("llama", 'road(variant = "road_4", group_size = 8) { targets q_proj }', {"output_rotation_nobias"}),
    "osf": ("llama", "osf() { targets q_proj, down_proj }", {"split_sum", "low_rank"}),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_unmerged_forms_are_cheap(form):
    """HRA: x -> x H^T as thin matmuls, never the (in, in) H; RoAd: elementwise on the base output (one base
    matmul per layer); OSF: the constant top part plus a low-rank branch, with no SVD in the graph."""
    from conftest import CUSTOM_MODELS, example_inputs_for

    from peftc.pipeline import compile_model
    model, spec, rules = FORMS[form]
    kw = {"example_inputs": example_inputs_for(model)} if model in CUSTOM_MODELS else {}
    c = compile_model(f"adapter a: {spec}", MODELS[model](), **kw)
    assert rules <= set(c.rule_hits), c.rule_hits
    assert c.dense_layers == []
    from peftc.rewrite.explain import _meta_value
    from peftc.rewrite.graph_tools import TAG
    ins = {n: int(layer.dims["in"]) for n, layer in c.plan.layers.items()}
    nodes = [n for n in c.gm.graph.nodes if n.op == "call_function"]
    assert not {n.target for n in nodes} & {torch.ops.aten._linalg_svd.default, torch.ops.aten.linalg_qr.default}
    memo: dict = {}
    square = [n.name for n in nodes if TAG in n.meta and (v := _meta_value(c.gm, n, memo)) is not None
              and tuple(v.shape) == (ins[n.meta[TAG]],) * 2]
    assert not square, square   # no (in, in) rotation matrix is ever built


def test_hra_and_osf_say_what_training_leaves_out(tmp_path):
    import subprocess
    import sys

    from peftc.library import library
    assert "orthogonality regulariser" in library().method("hra").training_note
    assert "gradient projection" in library().method("osf").training_note
    assert library().method("road").training_note is None
    spec = tmp_path / "osf.peft"
    spec.write_text("adapter a: osf() { targets q_proj }\n")
    r = subprocess.run([sys.executable, "-m", "peftc.cli", "check", str(spec), "tiny-llama"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert "note: adapter 'a' (osf): OSF's gradient projection" in r.stderr


def _drop(suffix):
    return lambda sd, cfg: ({k: v for k, v in sd.items() if not k.endswith(suffix)}, cfg)


BAD = {
    "hra-misshapen": (lambda: peft.HRAConfig(r=4, target_modules=["q_proj"]),
                      lambda sd, cfg: ({k: v[:, :3].contiguous() for k, v in sd.items()}, cfg),
                      r"hra_u' has shape \[64, 3\], expected \[64, 4\]"),
    "road-variant": (lambda: peft.RoadConfig(group_size=8, target_modules=["q_proj"]),
                     lambda sd, cfg: (sd, {**cfg, "variant": "road_3"}), "variant must be"),
    "road-group": (lambda: peft.RoadConfig(group_size=8, target_modules=["q_proj"]),
                   lambda sd, cfg: (sd, {**cfg, "group_size": 6}), "group_size must"),
    "osf-missing": (lambda: peft.OSFConfig(target_modules=["q_proj"]), _drop("q_proj.osf_svd_params.S_low"),
                    r"missing tensor '.*q_proj.osf_svd_params.S_low'"),
    "osf-rank": (lambda: peft.OSFConfig(target_modules=["q_proj"]),
                 lambda sd, cfg: (sd, {**cfg, "effective_rank": "half"}), "effective_rank expects a number"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_checkpoint_is_a_located_error(kind, tmp_path):
    config, edit, message = BAD[kind]
    _, _, d = peft_adapter("llama", config(), tmp_path)
    bad = _tamper(d, tmp_path / "bad", edit)
    with pytest.raises(peftc.PeftcError, match=message):
        compile_on(f'adapter a: import "{bad}"', "llama")


@pytest.mark.parametrize("spec, model, message", [
    ("road(group_size = 5) { targets q_proj }", "llama", "group_size must be a positive even number"),
    ("road(group_size = 48) { targets q_proj }", "llama", "group_size must divide"),
    ("road() { targets conv1 }", "convnet", "road does not support layer 'conv1'"),
    ("osf() { targets c_attn }", "gpt2", "osf does not support layer"),
    ("hra(r = 0) { targets q_proj }", "llama", "r must be a positive integer"),
    ("osf(effective_rank = 0) { targets q_proj }", "llama", "effective_rank must be positive"),
], ids=["road-odd-group", "road-group-divides", "road-conv", "osf-conv1d_hf", "hra-r0", "osf-rank0"])
def test_unsupported_is_refused_at_the_spec(spec, model, message):
    with pytest.raises(peftc.PeftcError, match=message):
        compile_on(f"adapter a: {spec}", model)


def test_peftc_import_writes_a_spec_that_compiles(prepared, tmp_path):
    """`peftc import DIR` on each peft save: the spec it writes compiles to peft's outputs."""
    from peftc.importer import import_spec
    if prepared.case.id not in ("llama-hra-gs", "mlp-road-bias", "llama-osf-rank"):
        pytest.skip("one case per method")
    import_spec([prepared.dir], tmp_path / "imported.peft")
    gm = _compile(tmp_path / "imported.peft", prepared.case.model)
    assert max_diff(run_logits(gm, prepared.inputs), prepared.peft_out) <= TOL
