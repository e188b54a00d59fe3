"""ONNX and .pt2 emission, end to end against peft: for each model family a real peft adapter is saved,
imported by a spec, compiled merged and unmerged, exported to ONNX (dynamic batch/sequence axes) and .pt2,
and run on an input of another batch size and length than the trace. Each (model, merge) pair costs one
ONNX export (~10 s), so every check on that export lives in one test."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import MODELS, example_inputs_for, inputs_for, logits_of, peft_adapter

import peftc
from peftc import PeftcError

pytestmark = pytest.mark.slow

TOL = 1e-4


def _configs():
    from peft import IA3Config, LoraConfig
    return {
        "llama-lora": ("llama", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False)),
        "gpt2-lora-conv1d": ("gpt2", LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                fan_in_fan_out=True, init_lora_weights=False)),
        "bert-cls-ia3": ("bert-cls", IA3Config(task_type="SEQ_CLS", target_modules=["key", "value", "output.dense"],
                                               feedforward_modules=["output.dense"], init_ia3_weights=False)),
        "convnet-lora-conv2d": ("convnet", LoraConfig(r=2, lora_alpha=4, target_modules=["conv1", "conv2", "fc1"],
                                                      init_lora_weights=False)),
    }


CASES = ["llama-lora", "gpt2-lora-conv1d", "bert-cls-ia3", "convnet-lora-conv2d"]


def test_inputs(model: str) -> dict[str, torch.Tensor]:
    """Batch 4 x length 11 (images: batch 5): neither the trace's 2 x 16 nor peftc's own check's 3 x 19."""
    if model == "convnet":
        return inputs_for(model, batch=5, seed=11)
    return inputs_for(model, batch=4, seq=11, seed=11)


test_inputs.__test__ = False  # a helper, not a test


def ort_run(path, inputs: dict[str, torch.Tensor]) -> tuple[list[np.ndarray], list]:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {}
    for i in sess.get_inputs():
        assert i.name in inputs, f"ONNX input {i.name!r} is not one of the model's inputs {list(inputs)}"
        feed[i.name] = inputs[i.name].numpy()
    return sess.run(None, feed), sess.get_inputs()


def max_diff(a, b) -> float:
    a = torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a
    b = torch.as_tensor(np.asarray(b)) if not isinstance(b, torch.Tensor) else b
    assert tuple(a.shape) == tuple(b.shape), f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """case -> (model name, adapter dir, {False: peft output, True: peft merged output}, inputs). Built lazily."""
    cache: dict[str, tuple] = {}

    def get(case: str):
        if case not in cache:
            model, cfg = _configs()[case]
            base, pm, d = peft_adapter(model, cfg, tmp_path_factory.mktemp(case))
            inp = test_inputs(model)
            with torch.no_grad():
                ref = logits_of(pm(**inp))
                merged = logits_of(copy.deepcopy(pm).merge_and_unload()(**inp))
                assert max_diff(ref, logits_of(base(**inp))) > 1e-3, "the adapter must change the output"
            cache[case] = (model, d, {False: ref, True: merged}, inp)
        return cache[case]
    return get


@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("case", CASES)
def test_onnx_and_pt2_match_the_graph_and_peft(adapters, case, merge, tmp_path):
    model, adapter_dir, refs, inp = adapters(case)
    want_peft = refs[merge]
    gm = peftc.compile(f'adapter default: import "{adapter_dir}"\n', MODELS[model](), merge=merge,
                       example_inputs=example_inputs_for(model))
    with torch.no_grad():
        want = logits_of(gm(**inp))
    assert max_diff(want, want_peft) <= TOL, "the compiled graph disagrees with peft"

    # ONNX: peftc's own onnxruntime check passes, then ours on other shapes, by input name
    out = tmp_path / "out"
    onnx_path = out / f"{case}.onnx"
    check = peftc.export_onnx(gm, onnx_path)
    assert check is not None and check.max_abs_diff <= TOL
    assert sorted(p.name for p in out.iterdir()) == [onnx_path.name], "temp files left beside the .onnx"
    outs, ort_inputs = ort_run(onnx_path, inp)
    assert {i.name for i in ort_inputs} <= set(inp)
    for i in ort_inputs:  # batch (and sequence) axes are symbolic, not the trace's sizes
        assert not isinstance(i.shape[0], int), f"{i.name}: static batch axis {i.shape}"
        if model != "convnet":
            assert not isinstance(i.shape[1], int), f"{i.name}: static sequence axis {i.shape}"
    got = outs[0]
    assert max_diff(got, want) <= TOL, "onnxruntime disagrees with the peftc graph"
    assert max_diff(got, want_peft) <= TOL, "onnxruntime disagrees with peft"
    if merge:
        import onnx
        names = [t.name for t in onnx.load(str(onnx_path)).graph.initializer]
        adapter_names = [n for n in names if "lora" in n.lower() or "ia3" in n.lower()]
        assert not adapter_names, f"merged ONNX still holds adapter tensors: {adapter_names[:5]}"

    # .pt2: torch.export.load(...).module() is the same function as the GraphModule
    pt2 = out / f"{case}.pt2"
    assert peftc.save_pt2(gm, pt2) == pt2
    assert sorted(p.name for p in out.iterdir()) == sorted([onnx_path.name, pt2.name])
    loaded = torch.export.load(str(pt2)).module()
    with torch.no_grad():
        got_pt2 = logits_of(loaded(**inp))
    assert max_diff(got_pt2, want) <= 1e-6
    if merge:
        names = [n for n, _ in loaded.named_parameters()] + [n for n, _ in loaded.named_buffers()]
        assert not [n for n in names if "lora" in n.lower() or "ia3" in n.lower()], names


@pytest.fixture(scope="module")
def conv_gm():
    return peftc.compile('adapter a: lora(r = 2, alpha = 4, init = "random") { targets conv1, conv2, fc1 }',
                         MODELS["convnet"](), example_inputs=example_inputs_for("convnet"))


def test_export_onnx_writes_nothing_when_the_check_fails(conv_gm, tmp_path):
    (tmp_path / "keep.txt").write_text("unrelated\n")
    path = tmp_path / "model.onnx"
    with pytest.raises(PeftcError, match=r"onnxruntime disagrees with torch: max abs diff .* > "):
        peftc.export_onnx(conv_gm, path, tol=1e-30)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"], "output or temp files left behind"


def test_export_onnx_without_check(conv_gm, tmp_path):
    path = tmp_path / "sub" / "model.onnx"
    assert peftc.export_onnx(conv_gm, path, check=False) is None
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]
    x = test_inputs("convnet")
    outs, _ = ort_run(path, x)
    with torch.no_grad():
        assert max_diff(outs[0], conv_gm(**x)) <= TOL


def test_save_pt2_overwrites_atomically(conv_gm, tmp_path):
    path = tmp_path / "m.pt2"
    path.write_bytes(b"old contents")
    peftc.save_pt2(conv_gm, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2"]
    x = test_inputs("convnet")
    with torch.no_grad():
        assert max_diff(torch.export.load(str(path)).module()(**x), conv_gm(**x)) <= 1e-6
