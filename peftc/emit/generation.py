"""Write a generation-ready model directory (`peftc export --with-past -o OUT_DIR`) from a graph compiled
`with_past` (peftc.generation): `model.onnx` (ONNX external data beside it when over 2 GB) with optimum's
input/output names, `config.json`, `generation_config.json`, the model directory's tokenizer files, and a
`genai_config.json` with which onnxruntime-genai runs the folder (`og.Model(OUT_DIR)`).

With `adapters_as_inputs=True` (a graph compiled with adapters_as_inputs=True) the live adapters' tensors are
graph inputs with "no adapter" defaults (onnxruntime's adapter convention, peftc.emit.onnx_adapters) and the
folder holds one `<adapter>.onnx_adapter` per adapter of the spec, which onnxruntime-genai switches
(`og.Adapters(model).load(file, name)`, `generator.set_active_adapter(adapters, name)`).

The ONNX model is checked in onnxruntime against the torch graph on two inputs: a first step (empty past,
several tokens) and a later step (a filled past, another batch size); with adapters as inputs, with no adapter
file (vs the base model) and with each file. The folder is written atomically.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import fx

from peftc.atomic import atomic_dir, check_new_dir
from peftc.emit.onnx import OnnxCheck, export_onnx
from peftc.errors import PeftcError
from peftc.generation import TOTAL, CacheLayout, check_inputs, onnx_renames
from peftc.progress import step

MODEL_FILE = "model.onnx"
# files of a model directory that describe weights (not copied: the ONNX model holds the weights)
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf", ".onnx", ".onnx_data", ".onnx_adapter",
            ".index.json")
_WRITTEN = ("config.json", "generation_config.json", "genai_config.json")
# model_type -> onnxruntime-genai's model type; others run as its generic "decoder"
GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gemma": "gemma", "phi3": "phi3"}


@dataclass
class GenerationExport:
    out_dir: Path
    check: OnnxCheck | None
    copied: list[str] = field(default_factory=list)
    layout: CacheLayout | None = None
    switch: Any = None     # with adapters as inputs: the SwitchExport (its files in out_dir, its SwitchCheck)


def _token_id(value: Any) -> Any:
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def genai_config(config: Any, gen: dict[str, Any], layout: CacheLayout) -> dict:
    """onnxruntime-genai's config for the exported decoder (its "bring your own model" format)."""
    heads = int(getattr(config, "num_attention_heads", 0) or layout.layers[0][0])
    kv_heads, head_size = layout.layers[0]
    context = int(getattr(config, "max_position_embeddings", 0) or 2048)
    eos = gen.get("eos_token_id", getattr(config, "eos_token_id", None))
    bos = gen.get("bos_token_id", getattr(config, "bos_token_id", None))
    pad = gen.get("pad_token_id", getattr(config, "pad_token_id", None))
    bos = bos if bos is not None else 0
    # genai needs an end token inside the vocabulary: a model that names none ends on its padding (or bos) token
    eos = eos if eos is not None else (pad if pad is not None else bos)
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) and eos else eos)
    model_type = getattr(config, "model_type", "")
    return {
        "model": {
            "bos_token_id": _token_id(bos),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": head_size,
                "hidden_size": int(getattr(config, "hidden_size", heads * head_size)),
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": heads,
                "num_hidden_layers": layout.num_layers,
                "num_key_value_heads": kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": _token_id(pad),
            "type": GENAI_TYPES.get(model_type, "decoder"),
            "vocab_size": int(getattr(config, "vocab_size", 0)),
        },
        "search": {"diversity_penalty": 0.0, "do_sample": bool(gen.get("do_sample", False)), "early_stopping": True,
                   "length_penalty": 1.0, "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0,
                   "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": False,
                   "repetition_penalty": 1.0, "temperature": float(gen.get("temperature", 1.0) or 1.0),
                   "top_k": int(gen.get("top_k", 50) or 50), "top_p": float(gen.get("top_p", 1.0) or 1.0)},
    }


def _generation_config(config: Any, source: Path | None) -> dict[str, Any]:
    if source is not None and (source / "generation_config.json").is_file():
        try:
            return json.loads((source / "generation_config.json").read_text())
        except json.JSONDecodeError as e:
            raise PeftcError(f"{source / 'generation_config.json'}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}"
                             ) from None
    from transformers import GenerationConfig
    return GenerationConfig.from_model_config(config).to_diff_dict()


def _copy_model_files(source: Path, tmp: Path) -> list[str]:
    """Tokenizer and other small files of the model directory (not its weights, not the configs we write)."""
    copied = []
    for p in sorted(source.iterdir()):
        if p.is_file() and p.name not in _WRITTEN and not p.name.endswith(_WEIGHTS) and not p.name.startswith("."):
            shutil.copyfile(p, tmp / p.name)
            copied.append(p.name)
    return copied


def name_mask_axis(path: Path) -> None:
    """Give the attention mask's length the name `total_sequence_length` in the ONNX file (torch.export relates it
    to past + new tokens and names it with a bare symbol such as `s53`). Weights stay where they are."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    mask = next((i for i in model.graph.input if i.name == "attention_mask"), None)
    if mask is None or len(mask.type.tensor_type.shape.dim) != 2:
        return
    old = mask.type.tensor_type.shape.dim[1].dim_param
    if not old or old == TOTAL:
        return
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == old:
                dim.dim_param = TOTAL
    onnx.save(model, str(path))


def export_generation(gm: fx.GraphModule, out_dir: str | Path, config: Any, *, source: str | Path | None = None,
                      check: bool = True, tol: float | None = 1e-4, adapters_as_inputs: bool = False
                      ) -> GenerationExport:
    """Write `out_dir` (see the module doc) from `gm`, compiled with `with_past=True`. `config`: the model's
    Hugging Face config; `source`: its model directory (configs and tokenizer files are copied from it).
    `adapters_as_inputs` (gm compiled with adapters_as_inputs=True too): switchable adapters, one
    `<adapter>.onnx_adapter` file each in `out_dir`; `.switch` of the result lists them with their check."""
    layout: CacheLayout | None = getattr(gm, "peftc_cache", None)
    if layout is None:
        raise PeftcError("a generation-ready export needs a graph compiled with --with-past (with_past=True)")
    out = Path(out_dir)
    src = Path(source) if source is not None and Path(source).is_dir() else None
    check_new_dir(out, src)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    rename = onnx_renames(gm.peftc_inputs)
    checks = check_inputs(layout, vocab)
    gen = _generation_config(config, src)
    switch = None
    with atomic_dir(out) as tmp:
        done = export_onnx(gm, tmp / MODEL_FILE, check=check, tol=tol, rename=rename, check_inputs=checks,
                           adapters_as_inputs=adapters_as_inputs)
        if adapters_as_inputs:   # a SwitchExport: the model, its adapter files and their check
            switch, done = done, None
        name_mask_axis(tmp / MODEL_FILE)
        with step("Writing config.json, generation_config.json, genai_config.json"):
            copied = _copy_model_files(src, tmp) if src is not None else []
            if src is not None and (src / "config.json").is_file():
                shutil.copyfile(src / "config.json", tmp / "config.json")
            else:
                (tmp / "config.json").write_text(config.to_json_string(use_diff=False))
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
            (tmp / "genai_config.json").write_text(json.dumps(genai_config(config, gen, layout), indent=4) + "\n")
    if switch is not None:   # the files were checked in the temporary folder; they now lie in `out`
        switch.model = out / MODEL_FILE
        switch.adapters = {name: out / f.name for name, f in switch.adapters.items()}
    return GenerationExport(out, done, copied, layout, switch)

