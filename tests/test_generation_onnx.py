"""Generation-ready ONNX (`peftc export --with-past`): a decoder with its key/value cache as inputs and outputs.

Per family (Llama, Qwen2, Mistral, Gemma, Phi-3, Gemma 2 with a sliding window; tiny configs, fixed seeds,
grouped-query attention): a real peft LoRA checkpoint is exported merged with peftc, and 20 greedy tokens from a
plain onnxruntime loop over the cache (first step with an empty past) equal `transformers` `generate` on peft's
`merge_and_unload()` of the same checkpoint. The same through onnxruntime-genai (`og.Model(OUT_DIR)`) for Llama
(exported unmerged, with the CLI, from a model directory with a tokenizer), Qwen2 and Gemma. Negative controls show
the comparison can fail: the base model, or a loop that drops the past, gives other tokens.

Switchable (`--with-past --adapters-as-inputs`, one export of Llama with two LoRA adapters, plus a third checkpoint
of another rank turned into a file by `peftc export-adapter`): onnxruntime-genai with each `.onnx_adapter` active
(`og.Adapters`, `set_active_adapter`) and with none, and a plain onnxruntime loop with `RunOptions`, give the
tokens of `generate` on peft's `merge_and_unload()` of that adapter (the base model for none).
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


def ort_greedy(out_dir: Path, ids: torch.Tensor, n: int = NEW, keep_past: bool = True,
               adapter: Path | None = None) -> list[int]:
    """A plain onnxruntime loop over the key/value cache (first step: an empty past of length 0); `adapter`: an
    .onnx_adapter file active in every run (RunOptions.add_active_adapter)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3    # an adapter input is also an initializer: onnxruntime warns once per tensor
    sess = ort.InferenceSession(str(out_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])
    ro = ort.RunOptions()
    if adapter is not None:
        loaded = ort.LoraAdapter()
        loaded.Load(str(adapter))
        ro.add_active_adapter(loaded)
    past = {i.name: i for i in sess.get_inputs() if i.name.startswith("past_key_values.")}
    empty = {name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for name, i in past.items()}
    outputs = [o.name for o in sess.get_outputs()]
    tokens = ids.numpy()
    feeds = {"input_ids": tokens, "attention_mask": np.ones_like(tokens),
             "position_ids": np.arange(tokens.shape[1])[None], **empty}
    got: list[int] = []
    for _ in range(n):
        res = dict(zip(outputs, sess.run(None, feeds, ro)))
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


def genai_greedy(out_dir: Path, ids: torch.Tensor, n: int = NEW, adapters: dict[str, Path] | None = None,
                 active: str | list[str] | None = None) -> list[int]:
    """onnxruntime-genai on OUT_DIR as written (greedy; it stops at the end token). `adapters`: name -> file, loaded
    with og.Adapters; `active`: the one (or ones) set active on the generator (None: no adapter)."""
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(out_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + n, do_sample=False)
    gen = og.Generator(model, params)
    if adapters:
        loaded = og.Adapters(model)
        for name, f in adapters.items():
            loaded.load(str(f), name)
        for name in [active] if isinstance(active, str) else active or []:
            gen.set_active_adapter(loaded, name)
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


def _peft_checkpoint(family: str, d: Path, seed: int = 1, r: int = 4, targets: list[str] | None = None
                     ) -> tuple[nn.Module, nn.Module]:
    from peft import LoraConfig, get_peft_model
    base = build(family)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets or
                                                        FAMILIES[family][3], init_lora_weights=False)).eval()
    randomize_(pm, seed=seed, scale=0.3)
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


# the switchable export: adapter -> (seed, rank, targets); `chat` and `code` are in the spec, `chat2` (another rank)
# fills chat's inputs through `peftc export-adapter`
SWITCH = {"chat": (4, 4, ["q_proj", "v_proj"]), "code": (4, 4, ["q_proj", "o_proj", "down_proj"]),
          "chat2": (5, 2, ["q_proj", "v_proj"])}
SWITCH_NEW = 12


@dataclass
class Switchable:
    out_dir: Path
    root: Path                        # the PEFT checkpoints, root / <adapter>
    files: dict[str, Path]            # adapter -> its .onnx_adapter file in out_dir
    merged: dict[str | None, nn.Module]   # adapter -> peft's merge_and_unload() of it; None -> the base model


@pytest.fixture(scope="session")
def switch_llama(tmp_path_factory):
    """Llama exported by the CLI with --with-past --adapters-as-inputs (adapters chat and code), plus chat2.onnx_adapter
    written into the folder by `peftc export-adapter --adapter chat`."""
    root = tmp_path_factory.mktemp("gen-switch")
    merged: dict[str | None, nn.Module] = {}
    for name, (seed, r, targets) in SWITCH.items():
        merged[None], merged[name] = _peft_checkpoint("llama", root / name, seed=seed, r=r, targets=targets)
    merged[None].save_pretrained(str(root / "model"))
    spec = root / "two.peft"
    spec.write_text(f'adapter chat: import "{root / "chat"}"\nadapter code: import "{root / "code"}"\n')
    out = root / "out"
    assert main(["-q", "export", str(spec), str(root / "model"), "--with-past", "--adapters-as-inputs",
                 "-o", str(out)]) == 0
    assert main(["-q", "export-adapter", str(root / "chat2"), "--like", str(out / "model.onnx"), "--adapter", "chat",
                 "-o", str(out / "chat2.onnx_adapter")]) == 0
    return Switchable(out, root, {name: out / f"{name}.onnx_adapter" for name in SWITCH}, merged)


def test_switchable_folder_files_and_inputs(switch_llama):
    import onnx
    out = switch_llama.out_dir
    assert {"model.onnx", "config.json", "generation_config.json", "genai_config.json", "chat.onnx_adapter",
            "code.onnx_adapter"} <= {p.name for p in out.iterdir()}
    model = onnx.load(str(out / "model.onnx"))
    graph = model.graph
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["peftc.with_past"] == "1" and json.loads(meta["peftc.adapters"]) == {"chat": "lora", "code": "lora"}
    names = [i.name for i in graph.input]
    past = [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert names[:7] == ["input_ids", "attention_mask", "position_ids", *past]
    adapter_inputs = names[7:]
    # each adapter input has a "no adapter" default (an initializer of the same name) with its rank 0
    defaults = {t.name: list(t.dims) for t in graph.initializer if t.name in adapter_inputs}
    assert defaults["model.layers.0.self_attn.q_proj.lora_A.chat.weight"] == [0, 64]
    assert defaults["model.layers.0.self_attn.q_proj.lora_B.chat.weight"] == [64, 0]
    assert set(defaults) == set(adapter_inputs)
    # peft's in-memory names, one set per adapter (q_proj has inputs for both)
    assert "model.layers.0.self_attn.q_proj.lora_A.chat.weight" in adapter_inputs
    assert "model.layers.0.self_attn.q_proj.lora_A.code.weight" in adapter_inputs
    assert len(adapter_inputs) == 2 * 2 * (2 + 3)    # layers x (A, B) x (chat's + code's targets)


@pytest.mark.parametrize("active", [None, "chat", "code", "chat2"])
def test_genai_switches_adapters_like_peft(switch_llama, active):
    """onnxruntime-genai, all files loaded, one active (or none): the tokens of peft's merged adapter (or the base)."""
    want = hf_greedy(switch_llama.merged[active], prompt(), SWITCH_NEW)
    assert len(set(want)) >= 4, f"degenerate reference {want}: the comparison would prove little"
    others = [hf_greedy(switch_llama.merged[a], prompt(), SWITCH_NEW) for a in [None, *SWITCH] if a != active]
    assert all(o != want for o in others)    # each adapter (and none) generates its own tokens
    got = genai_greedy(switch_llama.out_dir, prompt(), SWITCH_NEW, adapters=switch_llama.files, active=active)
    assert got == until_eos(want) and len(got) == SWITCH_NEW


@pytest.mark.parametrize("active", [None, "code", "chat2"])
def test_onnxruntime_loop_with_run_options_like_peft(switch_llama, active):
    want = hf_greedy(switch_llama.merged[active], prompt(), SWITCH_NEW)
    adapter = switch_llama.files[active] if active else None
    assert ort_greedy(switch_llama.out_dir, prompt(), SWITCH_NEW, adapter=adapter) == want


def test_genai_two_active_adapters_add_up_like_peft(switch_llama):
    """Both spec adapters active on one generator: peft's unmerged model with both active (their deltas add up)."""
    from peft import PeftModel
    pm = PeftModel.from_pretrained(copy.deepcopy(switch_llama.merged[None]), str(switch_llama.root / "chat"),
                                   adapter_name="chat")
    pm.load_adapter(str(switch_llama.root / "code"), adapter_name="code")
    pm.base_model.set_adapter(["chat", "code"])
    want = hf_greedy(pm.eval(), prompt(), SWITCH_NEW)
    assert want not in [hf_greedy(switch_llama.merged[a], prompt(), SWITCH_NEW) for a in ("chat", "code")]
    got = genai_greedy(switch_llama.out_dir, prompt(), SWITCH_NEW, adapters=switch_llama.files, active=["chat", "code"])
    assert got == until_eos(want)


def test_export_adapter_for_a_decoder_refuses_example_input(switch_llama, tmp_path, capsys):
    out = tmp_path / "x.onnx_adapter"
    assert main(["-q", "export-adapter", str(switch_llama.root / "chat2"), "--like",
                 str(switch_llama.out_dir / "model.onnx"), "--adapter", "chat",
                 "--example-input", "input_ids=2x5:int64", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--example-input does not apply" in err and "generation-ready decoder" in err and "Traceback" not in err
    assert not out.exists()
