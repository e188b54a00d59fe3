"""Outputs that stand on their own, and models as users load them:

* a `.pt2` loads and runs in a fresh process with only torch imported; outputs are plain named tensors;
* ONNX inputs and outputs carry the model's names (`input_ids`, `logits`), the same merged or not, and the
  dynamic axes are named `batch` / `sequence` (`decoder_sequence`), one symbol per name;
* the compiled module behaves like a module: optional inputs may be omitted, `.to(dtype)` runs and agrees
  with the model at that dtype, torch.export's bookkeeping nodes are gone;
* an HF model loaded the usual way (cache on) compiles and is left as it was; encoder-decoder folders go
  through the CLI; spec text is never taken for a path.
"""
from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import MODELS, inputs_for, lora, max_diff, peft_adapter, run_logits

import peftc
from peftc.builtin_models import BUILTINS
from peftc.pipeline import load_spec
from peftc.rewrite.cache_weights import WeightCache
from peftc.spec.model import Spec

LLAMA_SPEC = 'adapter a: lora(r = 4, alpha = 8, init = "random") { targets q_proj, v_proj, down_proj }'


@pytest.fixture(scope="module")
def llama_gm():
    return peftc.compile(LLAMA_SPEC, MODELS["llama"]())


# ---------------------------------------------------------------- .pt2 in a fresh process
FRESH = textwrap.dedent("""
    import sys, torch
    prog = torch.export.load(sys.argv[1])
    inputs = torch.load(sys.argv[2])
    out = prog.module()(**inputs)
    assert isinstance(out, dict) and all(isinstance(v, torch.Tensor) for v in out.values()), type(out)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "peftc", "peft"))
    assert not leaked, leaked
    torch.save(out, sys.argv[3])
""")


@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
def test_pt2_loads_and_runs_in_a_fresh_process_with_only_torch(tmp_path, merge):
    gm = peftc.compile(LLAMA_SPEC, MODELS["llama"](), merge=merge)
    peftc.save_pt2(gm, tmp_path / "m.pt2")
    x = inputs_for("llama", batch=1, seq=7)     # batch 1 and a new length: the axes are dynamic
    torch.save(x, tmp_path / "x.pt")
    r = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path / "m.pt2"), str(tmp_path / "x.pt"),
                        str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = torch.load(tmp_path / "out.pt")
    assert list(out) == ["logits"]
    with torch.no_grad():
        assert max_diff(out["logits"], gm(**x)["logits"]) <= 1e-6


def test_in_memory_outputs_are_a_plain_dict(llama_gm):
    out = llama_gm(**inputs_for("llama"))
    assert type(out) is dict and list(out) == ["logits"]


# ---------------------------------------------------------------- ONNX names
def _onnx_signature(path: Path) -> tuple[list, list]:
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return ([(i.name, i.shape) for i in sess.get_inputs()], [(o.name, o.shape) for o in sess.get_outputs()])


@pytest.mark.slow
def test_onnx_names_are_the_models_own_and_stable(tmp_path):
    sigs = {}
    for merge in (False, True):
        gm = peftc.compile(LLAMA_SPEC, MODELS["llama"](), merge=merge)
        peftc.export_onnx(gm, tmp_path / f"{merge}.onnx")
        sigs[merge] = _onnx_signature(tmp_path / f"{merge}.onnx")
    assert sigs[False] == sigs[True], "names change with --merge"
    inputs, outputs = sigs[False]
    assert inputs == [("input_ids", ["batch", "sequence"]), ("attention_mask", ["batch", "sequence"])]
    assert outputs == [("logits", ["batch", "sequence", 320])]


# ---------------------------------------------------------------- the compiled module behaves like a module
@pytest.mark.parametrize("model", ["llama", "bert-cls"])
def test_optional_inputs_may_be_omitted(model):
    gm = peftc.compile('adapter a: lora(r = 2, init = "random") { targets all-linear }', MODELS[model]())
    x = inputs_for(model, batch=2, seq=9)
    ids = x["input_ids"]
    want = run_logits(gm, x)
    with torch.no_grad():
        assert torch.equal(gm(input_ids=ids)["logits"], want)
        assert torch.equal(gm(ids)["logits"], want)
        assert torch.equal(copy.deepcopy(gm)(input_ids=ids)["logits"], want)
        # a mask that really masks is still honoured
        x["attention_mask"][:, -3:] = 0
        assert not torch.equal(gm(**x)["logits"], want)


def _cast(x: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in x.items()}


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_to_dtype_runs_and_agrees_with_the_eager_model(model, tmp_path):
    cfg = lora(target_modules=["q_proj", "v_proj"] if model == "llama" else ["c_attn", "c_fc"],
               fan_in_fan_out=model == "gpt2")
    _, pm, d = peft_adapter(model, cfg, tmp_path)
    gm = peftc.compile(f'adapter a: import "{d}"', MODELS[model]())
    x = inputs_for(model)
    want32 = run_logits(pm, x)
    assert max_diff(run_logits(gm, x), want32) <= 1e-5

    bf = copy.deepcopy(gm).to(torch.bfloat16)
    got = run_logits(bf, x)
    assert got.dtype == torch.bfloat16
    eager = run_logits(copy.deepcopy(pm).to(torch.bfloat16), x)
    # as close to peft at bf16 as bf16 allows: a few times the eager model's own bf16 error, or 2% of the scale
    tol = max(4 * max_diff(eager, want32), 0.02 * want32.abs().max().item())
    assert max_diff(got, eager) <= tol
    assert max_diff(got, want32) <= tol

    f64 = copy.deepcopy(gm).double()
    got64 = run_logits(f64, x)
    assert got64.dtype == torch.float64
    assert max_diff(got64, run_logits(copy.deepcopy(pm).double(), x)) <= 1e-5
    back = run_logits(bf.float(), x)          # back to float32 (weights keep their bf16 rounding)
    assert back.dtype == torch.float32 and max_diff(back, want32) <= tol


def test_bookkeeping_nodes_are_removed(llama_gm):
    graph = llama_gm.graph
    assert not [n for n in graph.nodes if "_assert_tensor_metadata" in str(n.target)]
    assert not [n for n in graph.nodes if n.op == "call_module"   # (peftc's weight cache, pass `cache`, is one)
                and not isinstance(llama_gm.get_submodule(n.target), WeightCache)]
    assert not hasattr(llama_gm, "_guards_fn")
    casts = [n for n in graph.nodes if n.op == "call_function" and str(n.target).startswith("aten.to.")]
    buffers = {name for name, _ in llama_gm.named_buffers()}
    for n in casts:   # what is left changes a dtype, follows the parameters at run time, or upcasts a buffer
        same = n.meta["val"].dtype == n.args[0].meta["val"].dtype
        follows = any(isinstance(a, torch.fx.Node) and a.target is getattr for a in (*n.args, *n.kwargs.values()))
        upcast = n.args[0].op == "get_attr" and n.args[0].target in buffers    # rotary inv_freq.float()
        assert not same or follows or upcast, n.format_node()
    # of torch.export's 17 casts and 17 metadata asserts: the mask to bool, positions and inv_freq to float32,
    # cos and sin back to the model's dtype
    assert len(casts) == 5, [n.format_node() for n in casts]


def test_strip_keeps_every_result(llama_gm):
    """The stripped graph computes what the model does (fp32, exactly)."""
    base = MODELS["llama"]()
    merged = peftc.compile('adapter a: lora(r = 2) { targets q_proj }', base)   # identity adapter
    x = inputs_for("llama")
    assert max_diff(run_logits(merged, x), run_logits(base, x)) <= 1e-6


# ---------------------------------------------------------------- models as users load them
def test_hf_model_loaded_the_usual_way_with_cache_on(tmp_path):
    import transformers as T
    BUILTINS["tiny-llama"][0]().save_pretrained(tmp_path / "m")
    cfg = T.AutoConfig.from_pretrained(tmp_path / "m")
    cfg.use_cache = True
    cfg.save_pretrained(tmp_path / "m")
    user = T.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert user.config.use_cache
    state = {k: v.clone() for k, v in user.state_dict().items()}
    training, flags = user.training, {n: p.requires_grad for n, p in user.named_parameters()}
    gm = peftc.compile('adapter a: lora(r = 2) { targets q_proj }', user)
    x = inputs_for("llama")
    with torch.no_grad():
        assert max_diff(gm(**x)["logits"], user(**x, use_cache=False).logits) <= 1e-6
    assert user.config.use_cache and user.training == training and "forward" not in vars(user)
    assert {n: p.requires_grad for n, p in user.named_parameters()} == flags
    assert all(torch.equal(state[k], v) for k, v in user.state_dict().items())


def _cli(*args) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "peftc.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


@pytest.mark.slow
def test_t5_folder_checks_compiles_and_exports_through_the_cli(tmp_path):
    import transformers as T
    torch.manual_seed(0)
    T.T5ForConditionalGeneration(T.T5Config(vocab_size=320, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                            num_heads=4, decoder_start_token_id=0)).save_pretrained(tmp_path / "t5")
    spec = tmp_path / "t5.peft"
    spec.write_text("adapter a: lora(r = 4, init = \"random\") {\n    targets q, v\n}\n")
    _cli("check", spec, tmp_path / "t5")
    _cli("compile", spec, tmp_path / "t5", "-o", tmp_path / "t5.pt2")
    _cli("export", spec, tmp_path / "t5", "-o", tmp_path / "t5.onnx")
    inputs, outputs = _onnx_signature(tmp_path / "t5.onnx")
    assert inputs == [("input_ids", ["batch", "sequence"]), ("attention_mask", ["batch", "sequence"]),
                      ("decoder_input_ids", ["batch", "decoder_sequence"])]
    assert outputs[0] == ("logits", ["batch", "decoder_sequence", 320])
    x = {"input_ids": torch.randint(3, 320, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long),
         "decoder_input_ids": torch.randint(3, 320, (2, 4))}
    out = torch.export.load(str(tmp_path / "t5.pt2")).module()(**x)
    assert out["logits"].shape == (2, 4, 320)


@pytest.mark.slow
def test_bart_folder_compiles_through_the_cli(tmp_path):
    import transformers as T
    torch.manual_seed(0)
    T.BartForConditionalGeneration(T.BartConfig(vocab_size=320, d_model=64, encoder_layers=2, decoder_layers=2,
                                                encoder_attention_heads=4, decoder_attention_heads=4,
                                                encoder_ffn_dim=128, decoder_ffn_dim=128,
                                                max_position_embeddings=128)).save_pretrained(tmp_path / "bart")
    _cli("compile", Path(__file__).parent.parent / "examples" / "lora.peft", tmp_path / "bart", "-o",
         tmp_path / "bart.pt2")
    x = {"input_ids": torch.randint(3, 320, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long),
         "decoder_input_ids": torch.randint(3, 320, (3, 5))}
    assert torch.export.load(str(tmp_path / "bart.pt2")).module()(**x)["logits"].shape == (3, 5, 320)


def test_spec_text_is_never_taken_for_a_path(tmp_path):
    assert isinstance(load_spec("# nothing\n"), Spec)
    assert isinstance(load_spec("# nothing"), Spec)
    assert list(load_spec("adapter a: lora() { targets q_proj }").adapters) == ["a"]
    with pytest.raises(peftc.PeftcError, match="spec file not found"):
        load_spec(str(tmp_path / "missing.peft"))
    with pytest.raises(peftc.PeftcError, match="spec file not found"):
        load_spec("examples/lora.pft")
    (tmp_path / "s.peft").write_text("adapter b: lora() { targets q_proj }\n")
    assert list(load_spec(str(tmp_path / "s.peft")).adapters) == ["b"]
    base = MODELS["llama"]()
    x = inputs_for("llama")
    assert max_diff(run_logits(peftc.compile("# nothing\n", base), x), run_logits(base, x)) <= 1e-6
