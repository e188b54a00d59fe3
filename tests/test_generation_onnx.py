"""Generation-ready ONNX (`peftc export --with-past`): a decoder with its key/value cache as inputs and outputs.

Per family (Llama, Qwen2, Mistral, Gemma, Phi-3, Gemma 2 with a sliding window; tiny configs, fixed seeds,
grouped-query attention): a real peft LoRA checkpoint is exported merged with peftc, and 20 greedy tokens from a
plain onnxruntime loop over the cache (first step with an empty past) equal `transformers` `generate` on peft's
`merge_and_unload()` of the same checkpoint. The same through onnxruntime-genai (`og.Model(OUT_DIR)`) for Llama
(exported unmerged, with the CLI, from a model directory with a tokenizer), Qwen2 and Gemma. Negative controls show
the comparison can fail: the base model, or a loop that drops the past, gives other tokens.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import VOCAB, randomize_
from torch import nn

from peftc.cli import main

pytestmark = pytest.mark.slow
NEW = 20          # tokens generated
PROMPT = 6
EOS = 2           # a token none of the reference generations below produces: genai runs all 20 steps

_DECODER = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, use_cache=False, eos_token_id=EOS,
                bos_token_id=1, tie_word_embeddings=False)
# family -> (model class, config class, extra config, LoRA targets)
FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}, ["q_proj", "v_proj", "down_proj"]),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {}, ["q_proj", "k_proj", "o_proj"]),
    "mistral": ("MistralForCausalLM", "MistralConfig", {"sliding_window": 64}, ["q_proj", "v_proj", "up_proj"]),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", {"head_dim": 16}, ["q_proj", "v_proj", "gate_proj"]),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {"pad_token_id": 0}, ["qkv_proj", "o_proj", "gate_up_proj"]),
    # sliding-window attention (window 8 < the 26 tokens generated): the exported cache keeps every token and the
    # model's mask applies the window
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", {"head_dim": 16, "sliding_window": 8}, ["q_proj", "o_proj"]),
}


def build(family: str) -> nn.Module:
    import transformers as T
    cls, cfg, extra, _ = FAMILIES[family]
    torch.manual_seed(0)
    return getattr(T, cls)(getattr(T, cfg)(**_DECODER, **extra)).eval()


def prompt() -> torch.Tensor:
    return torch.randint(10, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(3))


def hf_greedy(model: nn.Module, ids: torch.Tensor, n: int = NEW) -> list[int]:
    """transformers' greedy generate, never stopping early (so every step is the plain argmax)."""
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                             use_cache=True)
    return out[0, ids.shape[1]:].tolist()


def ort_greedy(out_dir: Path, ids: torch.Tensor, n: int = NEW, keep_past: bool = True) -> list[int]:
    """A plain onnxruntime loop over the key/value cache (first step: an empty past of length 0)."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(out_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    past = {i.name: i for i in sess.get_inputs() if i.name.startswith("past_key_values.")}
    empty = {name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for name, i in past.items()}
    outputs = [o.name for o in sess.get_outputs()]
    tokens = ids.numpy()
    feeds = {"input_ids": tokens, "attention_mask": np.ones_like(tokens),
             "position_ids": np.arange(tokens.shape[1])[None], **empty}
    got: list[int] = []
    for _ in range(n):
        res = dict(zip(outputs, sess.run(None, feeds)))
        tok = int(res["logits"][0, -1].argmax())
        got.append(tok)
        tokens = np.concatenate([tokens, [[tok]]], axis=1)
        if keep_past:
            cache = {name: res[name.replace("past_key_values.", "present.")] for name in past}
            total = cache[next(iter(past))].shape[2] + 1
            feeds = {"input_ids": np.array([[tok]]), "attention_mask": np.ones((1, total), np.int64),
                     "position_ids": np.array([[total - 1]]), **cache}
        else:   # negative control: the new token alone, its past forgotten
            feeds = {"input_ids": np.array([[tok]]), "attention_mask": np.ones((1, 1), np.int64),
                     "position_ids": np.array([[tokens.shape[1] - 1]]), **empty}
    return got


def genai_greedy(out_dir: Path, ids: torch.Tensor, n: int = NEW) -> list[int]:
    """onnxruntime-genai on OUT_DIR as written (greedy; it stops at the end token)."""
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(out_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids.numpy().astype(np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)][ids.shape[1]:]


def until_eos(tokens: list[int]) -> list[int]:
    """What genai returns of a generation: the tokens before the end token (it stops there)."""
    return tokens[:tokens.index(EOS)] if EOS in tokens else tokens


@dataclass
class Exported:
    out_dir: Path
    base: nn.Module
    merged: nn.Module      # peft's merge_and_unload() of the same checkpoint


def _peft_checkpoint(family: str, d: Path) -> tuple[nn.Module, nn.Module]:
    from peft import LoraConfig, get_peft_model
    base = build(family)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=FAMILIES[family][3],
                                                        init_lora_weights=False)).eval()
    randomize_(pm, seed=1, scale=0.3)
    pm.save_pretrained(str(d))
    return base, pm.merge_and_unload().eval()


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """family -> Exported: merged exports through the Python API, one per family, made on first use."""
    from peftc.emit.generation import export_generation
    from peftc.pipeline import compile_model
    cache: dict[str, Exported] = {}

    def get(family: str) -> Exported:
        if family not in cache:
            root = tmp_path_factory.mktemp(f"gen-{family}")
            base, merged = _peft_checkpoint(family, root / "adapter")
            compiled = compile_model(f'adapter default: import "{root / "adapter"}"\n', copy.deepcopy(base),
                                     merge=True, with_past=True)
            export_generation(compiled.gm, root / "out", base.config)
            cache[family] = Exported(root / "out", base, merged)
        return cache[family]
    return get


def _tokenizer_dir(d: Path) -> None:
    """A tiny character-level tokenizer, built offline: token i is the character chr(48 + i) ('0' is 0)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE({chr(48 + i): i for i in range(VOCAB)}, merges=[]))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=chr(49), eos_token=chr(48 + EOS),
                            pad_token=chr(48)).save_pretrained(str(d))


@pytest.fixture(scope="session")
def cli_llama(tmp_path_factory):
    """Llama exported by the CLI, adapter live (unmerged), from a model directory with a tokenizer."""
    root = tmp_path_factory.mktemp("gen-cli")
    base, merged = _peft_checkpoint("llama", root / "adapter")
    base.save_pretrained(str(root / "model"))
    _tokenizer_dir(root / "model")
    spec = root / "live.peft"
    spec.write_text(f'adapter default: import "{root / "adapter"}"\n')
    rc = main(["-q", "export", str(spec), str(root / "model"), "--with-past", "-o", str(root / "out")])
    assert rc == 0
    return Exported(root / "out", base, merged)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_onnxruntime_greedy_equals_transformers_generate(exported, family):
    e = exported(family)
    want = hf_greedy(e.merged, prompt())
    assert len(set(want)) >= 4, f"degenerate reference {want}: the comparison would prove little"
    assert ort_greedy(e.out_dir, prompt()) == want
    assert hf_greedy(e.base, prompt()) != want           # the adapter matters


def test_dropping_the_past_changes_the_tokens(exported):
    """The loop above really uses the cache: without it the tokens differ (so its equality is no accident)."""
    e = exported("llama")
    assert ort_greedy(e.out_dir, prompt(), keep_past=False) != hf_greedy(e.merged, prompt())


@pytest.mark.parametrize("family", ["qwen2", "gemma"])
def test_onnxruntime_genai_runs_the_folder(exported, family):
    e = exported(family)
    got = genai_greedy(e.out_dir, prompt())
    assert got == until_eos(hf_greedy(e.merged, prompt())) and len(got) == NEW


def test_cli_live_adapter_onnxruntime_and_genai(cli_llama):
    want = hf_greedy(cli_llama.merged, prompt())
    assert ort_greedy(cli_llama.out_dir, prompt()) == want
    assert genai_greedy(cli_llama.out_dir, prompt()) == until_eos(want) == want


def test_cli_folder_files_and_genai_tokenizer(cli_llama):
    out = cli_llama.out_dir
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "config.json", "generation_config.json", "genai_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert not any(n.endswith(".safetensors") for n in names)
    cfg = json.loads((out / "genai_config.json").read_text())
    assert cfg["model"]["type"] == "llama" and cfg["model"]["eos_token_id"] == EOS
    assert cfg["model"]["decoder"]["num_key_value_heads"] == 2 and cfg["model"]["decoder"]["head_size"] == 16
    og = pytest.importorskip("onnxruntime_genai")
    from transformers import AutoTokenizer
    tok = og.Tokenizer(og.Model(str(out)))
    assert list(tok.encode("5a~")) == AutoTokenizer.from_pretrained(str(out)).encode("5a~") == [5, 49, 78]
    assert tok.decode([5, 49, 78]) == "5a~"


def test_input_output_names_and_shapes(exported):
    import onnxruntime as ort
    e = exported("llama")
    sess = ort.InferenceSession(str(e.out_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    ins = {i.name: i for i in sess.get_inputs()}
    outs = {o.name: o for o in sess.get_outputs()}
    past = [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert list(ins) == ["input_ids", "attention_mask", "position_ids", *past]
    assert list(outs) == ["logits"] + [p.replace("past_key_values", "present") for p in past]
    assert ins["input_ids"].type == ins["attention_mask"].type == ins["position_ids"].type == "tensor(int64)"
    assert ins["input_ids"].shape == ["batch_size", "sequence_length"]
    assert ins["position_ids"].shape == ["batch_size", "sequence_length"]
    assert ins["attention_mask"].shape == ["batch_size", "total_sequence_length"]
    for p in past:
        assert ins[p].shape == ["batch_size", 2, "past_sequence_length", 16]
        assert ins[p].type == "tensor(float)"
        present = outs[p.replace("past_key_values", "present")].shape
        assert present == ["batch_size", 2, "past_sequence_length + sequence_length", 16]
    assert outs["logits"].shape == ["batch_size", "sequence_length", VOCAB]
    # a batch of 3, 2 new tokens after a past of 5: every output has the shape its axes say
    feeds = {"input_ids": np.zeros((3, 2), np.int64), "attention_mask": np.ones((3, 7), np.int64),
             "position_ids": np.tile(np.arange(5, 7), (3, 1)), **{p: np.zeros((3, 2, 5, 16), np.float32) for p in past}}
    res = dict(zip(outs, sess.run(None, feeds)))
    assert res["logits"].shape == (3, 2, VOCAB)
    assert all(res[p.replace("past_key_values", "present")].shape == (3, 2, 7, 16) for p in past)


def test_not_a_decoder_is_a_clear_error(tmp_path, capsys):
    spec = tmp_path / "s.peft"
    spec.write_text("adapter a: lora(r = 2) {\n    targets query\n}\n")
    assert main(["-q", "export", str(spec), "tiny-bert", "--with-past", "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "--with-past" in err and "not a decoder-only language model" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_with_past_needs_an_output_directory(tmp_path, capsys):
    spec = tmp_path / "s.peft"
    spec.write_text("adapter a: lora(r = 2) {\n    targets q_proj\n}\n")
    assert main(["-q", "export", str(spec), "tiny-llama", "--with-past", "-o", str(tmp_path / "m.onnx")]) == 1
    err = capsys.readouterr().err
    assert "--with-past` writes a model directory" in err and "give a folder name" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main(["-q", "export", str(spec), "tiny-llama", "--with-past", "-o", str(tmp_path / "full")]) == 1
    assert "not empty" in capsys.readouterr().err


@pytest.mark.parametrize("flag, message", [
    (["--adapter-ids"], "--with-past and --adapter-ids together are not supported"),
    (["--example-input", "input_ids=2x5:int64"], "--example-input does not apply with --with-past")])
def test_with_past_refuses_flags_it_cannot_honour(tmp_path, capsys, flag, message):
    spec = tmp_path / "s.peft"
    spec.write_text("adapter a: lora(r = 2) {\n    targets q_proj\n}\n")
    assert main(["-q", "export", str(spec), "tiny-llama", "--with-past", *flag, "-o", str(tmp_path / "out")]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
