"""aLoRA (activated LoRA: peft's LoraConfig(alora_invocation_tokens=[...])) against peft.

peft 0.21.2's semantics, checked here: `calculate_alora_offsets` finds the *last* occurrence of the invocation
sequence in each row of input_ids (a match must fit inside the row; padding and attention_mask play no part) and
the LoRA update then applies to that occurrence's first token and every token after it (`pos >= T - offset`); a
row without the sequence runs the base model. peft computes the offsets in its causal-LM model (task_type
CAUSAL_LM); in generation with a key/value cache they come from the prompt, so every generated token is adapted.
peftc computes the same mask in the graph from the `input_ids` input (`match_at`, `from_last`).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import CHANGED, TOL, VOCAB, llama, lora, max_diff, randomize_, run_logits

import peftc
from peftc.errors import PeftcError
from peftc.ops import from_last, match_at

INVOKE = [11, 12, 13]
T = 20


def _row(g: torch.Generator, *starts: int, tail: list[int] | None = None) -> torch.Tensor:
    """Random ids (never an invocation token) with the invocation sequence written at each start."""
    row = torch.randint(20, VOCAB, (T,), generator=g)
    for s in starts:
        row[s:s + len(INVOKE)] = torch.tensor(INVOKE)
    if tail is not None:
        row[T - len(tail):] = torch.tensor(tail)
    return row


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    rows = [_row(g, 5),                       # one occurrence
            _row(g, 2, 12),                   # two: the last one counts
            _row(g),                          # none: the base model
            _row(g, tail=INVOKE[:2]),         # the sequence cut off by the row's end: no match
            _row(g, T - len(INVOKE)),         # at the very end
            _row(g, 0),                       # at the start
            _row(g, 7)]                       # left padded (below): padding counts as positions, as in peft
    ids = torch.stack(rows)
    mask = torch.ones_like(ids)
    mask[6, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


STARTS = [5, 12, None, None, T - len(INVOKE), 0, 7]   # where each row's adapter starts (None: nowhere)


@pytest.fixture(scope="module")
def alora(tmp_path_factory):
    """(peft model, base model, peftc module compiled from peft's checkpoint, checkpoint dir)."""
    from peft import get_peft_model
    base = llama()
    cfg = lora(target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM",
               alora_invocation_tokens=INVOKE)
    pm = get_peft_model(copy.deepcopy(base), cfg).eval()
    randomize_(pm, 1, scale=0.3)
    d = tmp_path_factory.mktemp("alora") / "adapter"
    pm.save_pretrained(str(d))
    gm = peftc.compile(f'adapter default: import "{d}"', llama())
    return pm, base, gm, d


def _expected_mask(ids: torch.Tensor) -> torch.Tensor:
    """peft's own mask: calculate_alora_offsets, then pos >= T - offset (the variant's forward)."""
    from peft.tuners.lora.variants import calculate_alora_offsets

    class Cfg:
        alora_invocation_tokens = INVOKE
    offsets = calculate_alora_offsets({"a": Cfg()}, "a", ids)
    n = ids.shape[1]
    off = torch.tensor([0 if o is None else min(int(o), n) for o in offsets])
    return torch.arange(n)[None, :] >= (n - off)[:, None]


def test_mask_primitives_match_peft_offsets():
    """match_at + from_last give peft's token mask, on many short rows over a tiny vocabulary (overlapping and
    repeated occurrences, partial ones at the end)."""
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 7, 12):
        ids = torch.randint(10, 14, (64, n), generator=g)   # tokens 10..13: the sequence 11, 12, 13 shows up often
        got = from_last(match_at(ids, INVOKE))
        assert torch.equal(got, _expected_mask(ids)), n
    ids = _batch()["input_ids"]
    want = torch.stack([torch.arange(T) >= (T if s is None else s) for s in STARTS])
    assert torch.equal(from_last(match_at(ids, INVOKE)), want)
    assert torch.equal(_expected_mask(ids), want)


def test_matches_peft(alora):
    pm, base, gm, _ = alora
    x = _batch()
    want, got, plain = run_logits(pm, x), run_logits(gm, x), run_logits(base, x)
    assert max_diff(got, want) <= TOL
    for row, start in enumerate(STARTS):
        if start is None:   # no invocation: exactly the base model
            assert max_diff(got[row], plain[row]) <= TOL
            continue
        # off by one either way fails here: the token before the invocation is the base model's, its first token not
        if start > 0:
            assert max_diff(got[row, :start], plain[row, :start]) <= TOL
        assert max_diff(got[row, start], plain[row, start]) > CHANGED


def test_gpt2_conv1d_matches_peft(tmp_path):
    """GPT-2's Conv1D layers (stored transposed) take aLoRA as peft's Linear does."""
    from conftest import gpt2, peft_adapter
    cfg = lora(target_modules=["c_attn", "c_proj"], task_type="CAUSAL_LM", alora_invocation_tokens=INVOKE,
               fan_in_fan_out=True)
    base, pm, d = peft_adapter("gpt2", cfg, tmp_path)
    randomize_(pm, 2, scale=0.3)
    pm.save_pretrained(str(d))
    gm = peftc.compile(f'adapter default: import "{d}"', gpt2())
    x = {k: v.clamp(max=base.config.vocab_size - 1) for k, v in _batch().items()}
    want = run_logits(pm, x)
    assert max_diff(run_logits(gm, x), want) <= TOL
    assert max_diff(want, run_logits(base, x)) > CHANGED


def test_per_row_choice_and_switching():
    """With --adapter-ids each row runs its adapter (aLoRA's mask still per token); run-time switching works."""
    two = ('adapter a: lora(r = 4, init = "random", alora_invocation_tokens = [11, 12, 13]) { targets q_proj, '
           'down_proj }\nadapter b: lora(r = 2, init = "random") { targets q_proj, v_proj }\n')
    x = _batch()
    ra, rb = run_logits(peftc.compile(two + "active a\n", llama()), x), run_logits(peftc.compile(two + "active b\n",
                                                                                              llama()), x)
    r0 = run_logits(llama(), x)
    ids = torch.tensor([0, 1, -1, 0, 0, 1, 0])
    got = run_logits(peftc.compile(two, llama(), adapter_ids=True), {**x, "adapter_ids": ids})
    want = torch.stack([{0: ra, 1: rb, -1: r0}[int(i)][k] for k, i in enumerate(ids)])
    assert max_diff(got, want) <= TOL
    gs = peftc.compile(two, llama(), switchable=True)
    gs.set_adapter("a")
    assert max_diff(run_logits(gs, x), ra) <= TOL
    gs.disable_adapters()
    assert max_diff(run_logits(gs, x), r0) <= TOL


def test_run_time_load_needs_the_compiled_tokens(tmp_path):
    """A slot compiled for one invocation sequence takes a checkpoint with the same tokens, and refuses one with
    other tokens (or a plain LoRA): the mask is computed in the graph from the compiled tokens."""
    spec = 'adapter a: lora(r = 4, init = "random", alora_invocation_tokens = [11, 12, 13]) { targets q_proj }'
    gm = peftc.compile(spec, llama(), max_adapters=2)
    plain = spec.replace(", alora_invocation_tokens = [11, 12, 13]", "")
    for i, other in enumerate([spec.replace("[11, 12, 13]", "[11, 12]"), plain]):
        peftc.save_adapter(peftc.compile(other, llama()), tmp_path / str(i))
        with pytest.raises(PeftcError, match="alora_invocation_tokens = .*, compiled \\(11, 12, 13\\)"):
            gm.load_adapter(tmp_path / str(i), "x")
    peftc.save_adapter(peftc.compile(spec, llama(), seed=3), tmp_path / "same")
    gm.load_adapter(tmp_path / "same", "x")


def test_save_roundtrip(alora, tmp_path):
    """peftc save writes the checkpoint peft loads as the same aLoRA (task_type CAUSAL_LM, the same tokens)."""
    from peft import PeftModel
    pm, _, gm, d = alora
    out = tmp_path / "saved"
    peftc.save_adapter(gm, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["alora_invocation_tokens"] == INVOKE and cfg["task_type"] == "CAUSAL_LM"
    again = PeftModel.from_pretrained(llama(), str(out)).eval()
    assert max_diff(run_logits(again, _batch()), run_logits(pm, _batch())) <= TOL


def test_fresh_spec_saves_a_causal_lm_alora(tmp_path):
    """A spec's aLoRA (not imported) is saved with task_type CAUSAL_LM, without which peft would never find
    the invocation tokens; peft then computes what the compiled module does."""
    from peft import PeftModel
    spec = ('adapter a: lora(r = 4, alpha = 8, init = "random", alora_invocation_tokens = [11, 12, 13]) '
            '{ targets q_proj, down_proj }')
    gm = peftc.compile(spec, llama())
    peftc.save_adapter(gm, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["alora_invocation_tokens"] == INVOKE
    pm = PeftModel.from_pretrained(llama(), str(tmp_path / "a")).eval()
    x = _batch()
    assert max_diff(run_logits(gm, x), run_logits(pm, x)) <= TOL
    assert max_diff(run_logits(gm, x), run_logits(llama(), x)) > CHANGED


def test_plain_lora_config_unchanged(tmp_path):
    gm = peftc.compile('adapter a: lora(r = 2) { targets q_proj }', llama())
    peftc.save_adapter(gm, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["task_type"] is None and cfg["alora_invocation_tokens"] is None


def test_greedy_generation_matches_peft_with_cache(alora):
    """peft generates with its key/value cache (offsets from the prompt: every new token adapted); the compiled
    module recomputes the whole sequence each step (the mask from the last invocation): the same tokens."""
    pm, _, gm, _ = alora
    x = _batch()
    ids, mask = x["input_ids"][:2], x["attention_mask"][:2]
    with torch.no_grad():
        want = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=True,
                           pad_token_id=0)
    seq = ids
    for _ in range(6):
        logits = run_logits(gm, {"input_ids": seq, "attention_mask": torch.ones_like(seq)})
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(seq, want)


def test_onnx_export(alora, tmp_path):
    """The unmerged graph (its mask computed from input_ids) in onnxruntime, on the batch with the invocations
    (no padding here: a left-padded row's fully masked positions are the base model's own business)."""
    from peftc.emit.onnx import export_onnx, run_onnx
    pm, _, gm, _ = alora
    x = _batch()
    x["attention_mask"] = torch.ones_like(x["input_ids"])
    check = export_onnx(gm, tmp_path / "m.onnx", check_inputs=[x])
    assert check.max_abs_diff <= 1e-4
    got = torch.from_numpy(run_onnx(tmp_path / "m.onnx", x)[0])
    assert max_diff(got, run_logits(pm, x)) <= 1e-4


# ---------------------------------------------------------------- bad input: one clear error each
@pytest.mark.parametrize("tokens, message", [
    ('"abc"', "expects a list of integers"),
    ("[1.5, 2]", "expects a list of integers"),
    ("[]", "non-empty list of token ids"),
    ("[-1, 4]", "non-empty list of token ids"),
])
def test_bad_invocation_tokens(tokens, message):
    spec = f"adapter a: lora(alora_invocation_tokens = {tokens}) {{ targets q_proj }}"
    with pytest.raises(PeftcError, match=message):
        peftc.compile(spec, llama())


def test_merge_refused():
    spec = "adapter a: lora(alora_invocation_tokens = [11, 12]) { targets q_proj }"
    with pytest.raises(PeftcError, match="depends on the tokens"):
        peftc.compile(spec, llama(), merge=True)


def test_with_past_refused():
    """A generation-ready export feeds only the new tokens per step: a mask over the whole sequence cannot run."""
    spec = "adapter a: lora(alora_invocation_tokens = [11, 12]) { targets q_proj }"
    from peftc.pipeline import compile_model
    with pytest.raises(PeftcError, match="model input 'input_ids' over the whole sequence.*--with-past"):
        compile_model(spec, llama(), with_past=True)


def test_merge_commands_refused(tmp_path):
    """`peftc lower` (and `peftc merge`) fold without tracing: refused with the reason."""
    from peftc.lower import lower_to_lora
    spec = "adapter a: lora(alora_invocation_tokens = [11, 12]) { targets q_proj }"
    with pytest.raises(PeftcError, match="depends on the tokens.*`peftc lower`"):
        lower_to_lora(spec, llama(), rank=2, output=tmp_path / "low")


def test_lora_bias_refused():
    spec = "adapter a: lora(lora_bias = true, alora_invocation_tokens = [11, 12]) { targets q_proj }"
    with pytest.raises(PeftcError, match="lora_bias with aLoRA"):
        peftc.compile(spec, llama())


def test_dora_checkpoint_with_invocation_tokens_refused(alora, tmp_path):
    """A checkpoint whose method (DoRA here) has no aLoRA option is refused, not imported as a plain DoRA."""
    _, _, _, d = alora
    cfg = json.loads((d / "adapter_config.json").read_text())
    (tmp_path / "dora").mkdir()
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    (tmp_path / "dora" / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes())
    with pytest.raises(PeftcError, match="alora_invocation_tokens = \\[11, 12, 13\\] together with dora"):
        peftc.compile(f'adapter default: import "{tmp_path / "dora"}"', llama())


def test_non_linear_layer_refused():
    spec = "adapter a: lora(alora_invocation_tokens = [11, 12]) { targets embed_tokens }"
    with pytest.raises(PeftcError, match="linear layers only"):
        peftc.compile(spec, llama())


def test_model_without_input_ids():
    """A model whose input is not called input_ids: the method reads a model input the model lacks."""
    from conftest import MODELS
    spec = "adapter a: lora(alora_invocation_tokens = [11, 12]) { targets lin0 }"
    with pytest.raises(PeftcError, match="model input 'input_ids'.*no input of that name"):
        peftc.compile(spec, MODELS["token-mlp"](), example_inputs={"ids": torch.randint(0, 50, (2, 8))})
