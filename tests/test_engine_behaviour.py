"""Engine behaviours not covered elsewhere: import blocks, per-layer options, the caller's model left alone,
layers peftc must find by their readers (tied weights, custom linears), the onnxruntime check's inputs."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import MODELS, example_inputs_for, inputs_for, llama, logits_of, peft_adapter, run_logits
from peft import LoraConfig

import peftc
from peftc.errors import PeftcError
from peftc.models import fresh_like


def test_import_block_takes_only_merge_and_exclude(tmp_path):
    _, _, d = peft_adapter("llama", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), tmp_path)
    with pytest.raises(PeftcError, match="takes only `merge` and `exclude`, not `targets`"):
        peftc.compile(f'adapter a: import "{d}" {{ targets v_proj }}', "tiny-llama")
    with pytest.raises(PeftcError, match="not `r at"):
        peftc.compile(f'adapter a: import "{d}" {{ r at q_proj = 4 }}', "tiny-llama")


def test_per_layer_values_only_for_declared_options():
    with pytest.raises(PeftcError, match="no per-layer values for option 'dropout' of lora; per-layer values exist "
                                         "for: r, alpha") as e:
        peftc.compile("adapter a: lora() {\n  targets q_proj\n  dropout at q_proj = 0.2\n}", "tiny-llama")
    assert ":3:3:" in str(e.value)
    with pytest.raises(PeftcError, match="ia3 takes no per-layer values"):
        peftc.compile("adapter a: ia3() {\n  targets q_proj\n  init at q_proj = 1\n}", "tiny-llama")


def test_callers_model_is_left_alone():
    model = llama()
    for p in model.parameters():
        p.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gm = peftc.compile('adapter a: lora(r = 2, init = "random") { targets q_proj\n merge }', model)
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert not any(p.requires_grad for p in gm.parameters())


def test_tied_embedding_adapts_only_the_lookup():
    """GPT-2 ties wte to lm_head: a LoRA on wte changes the input embedding, not the output projection."""
    base = MODELS["gpt2"]()
    gm = peftc.compile('adapter a: lora(r = 2, init = "random") { targets wte }', base)
    names = [n for n, p in gm.named_parameters() if p.requires_grad]
    assert names == ["transformer.wte.lora_embedding_A.a", "transformer.wte.lora_embedding_B.a"]
    x = inputs_for("gpt2")
    assert (run_logits(gm, x) - run_logits(base, x)).abs().max() > 1e-4
    merged = peftc.compile('adapter a: lora(r = 2, init = "random") { targets wte }', base, merge=True)
    assert (run_logits(merged, x) - run_logits(gm, x)).abs().max() <= 1e-5
    # the merged lookup table is a new tensor; lm_head still reads the original tied weight
    assert torch.equal(merged.get_parameter("lm_head.weight"), base.lm_head.weight)


def test_fresh_check_inputs_stay_in_the_vocabulary():
    ex = example_inputs_for("token-mlp")
    fresh = fresh_like(ex)
    assert fresh["ids"].shape[0] == ex["ids"].shape[0] + 1
    assert int(fresh["ids"].max()) <= int(ex["ids"].max()) and int(fresh["ids"].min()) >= int(ex["ids"].min())


def test_speech_model_gets_its_features():
    """A Whisper model (main input `input_features`, encoder length fixed at 2 * max_source_positions) is traced
    with mel features and decoder ids, not token ids; the onnxruntime check's fresh input keeps the features'
    shape (only the batch grows)."""
    import transformers as T

    from peftc.models import default_input_specs, make_inputs
    torch.manual_seed(0)
    model = T.WhisperForConditionalGeneration(T.WhisperConfig(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8, max_source_positions=6,
        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)).eval()
    ex = make_inputs(default_input_specs(model, model.config), model.config)
    assert {k: tuple(v.shape) for k, v in ex.items()} == {"input_features": (2, 8, 12), "decoder_input_ids": (2, 8)}
    fresh = fresh_like(ex)
    assert fresh["input_features"].shape == (3, 8, 12) and fresh["decoder_input_ids"].shape == (3, 11)
    gm = peftc.compile('adapter a: lora(r = 2, init = "random") { targets q_proj }', model)
    out = gm(**fresh)["logits"]
    assert out.shape == (3, 11, 64)


def _seqvol_dora():
    from test_method_files import seqvol, seqvol_inputs
    return peftc.compile('adapter a: dora(r = 2, init = "random") { targets seq, vol }', seqvol(),
                         example_inputs=seqvol_inputs(batch=2, seed=3))


def test_conv1d_channels_are_not_a_dynamic_axis():
    """A (batch, channels, length) input of an nn.Conv1d: the trace specializes the channels (a SymInt that is a
    constant); they are no `sequence` axis, and the onnxruntime check's fresh input keeps them."""
    gm = _seqvol_dora()
    assert gm.peftc_axes.names == {"s": {0: "batch"}, "v": {0: "batch"}}
    fresh = fresh_like(gm.peftc_inputs, axes=gm.peftc_axes.names)
    assert fresh["s"].shape == (3, 4, 10) and fresh["v"].shape == (3, 2, 4, 6, 4)


@pytest.mark.slow
def test_onnx_of_a_conv1d_conv3d_model(tmp_path):
    assert peftc.export_onnx(_seqvol_dora(), tmp_path / "m.onnx").max_abs_diff <= 1e-4


@pytest.mark.slow
def test_onnx_of_a_custom_token_model(tmp_path):
    gm = peftc.compile('adapter a: dora(r = 2, init = "random") { targets emb, lin0 }', MODELS["token-mlp"](),
                       example_inputs=example_inputs_for("token-mlp"))
    result = peftc.export_onnx(gm, tmp_path / "m.onnx")
    assert result.max_abs_diff <= 1e-4


def test_dense_layers_reported_empty_for_supported_methods():
    c = peftc.compile_model('adapter a: dora(r = 2, init = "random") { targets q_proj }\n'
                            'adapter b: ia3(init = "random") { targets k_proj, down_proj\n feedforward down_proj }',
                            copy.deepcopy(llama()), train=True)
    assert c.dense_layers == []
    assert logits_of(c.gm(**inputs_for("llama"))).requires_grad
