"""The corrupt-input matrix: every kind of bad checkpoint, model folder and output location gives one located
message and a non-zero exit; no output appears; every input file is left byte for byte as it was; a run killed
while it writes (SIGINT, SIGTERM) leaves nothing behind.

The table in docs/corrupt-inputs.md is this matrix's result (input, message, exit code); a test checks it is
current (`PEFTC_UPDATE_DOCS=1 python -m pytest tests/test_corrupt_inputs.py` rewrites it).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftc.cli

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "corrupt-inputs.md"
SPEC = 'adapter a: lora(r = 4, init = "random") { targets q_proj, v_proj, embed_tokens }\n'
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
EMB_A = "base_model.model.model.embed_tokens.lora_embedding_A"


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo this-must-never-run",))


@dataclass(frozen=True)
class Case:
    id: str
    what: str                      # the input, as the docs table says it


CASES = [
    Case("missing-tensor", "a tensor missing from adapter_model.safetensors"),
    Case("extra-tensor", "an extra tensor no targeted layer uses"),
    Case("misshapen-tensor", "a tensor of the wrong shape"),
    Case("wrong-dtype", "an integer tensor where a float is expected"),
    Case("truncated", "a truncated safetensors file"),
    Case("garbage", "a safetensors file of random bytes"),
    Case("invalid-json", "adapter_config.json that is not valid JSON"),
    Case("unknown-peft-type", "an unknown peft_type"),
    Case("no-peft-type", "adapter_config.json without peft_type"),
    Case("other-hidden-size", "an adapter trained on a model with another hidden size"),
    Case("other-vocabulary", "an adapter whose embedding has another vocabulary size"),
    Case("other-layer-names", "an adapter for a model with other layer names (GPT-2's)"),
    Case("no-checkpoint", "a checkpoint folder that does not exist"),
    Case("no-weights-file", "a checkpoint folder without a weights file"),
    Case("bin-with-code", "a .bin checkpoint that runs code when unpickled"),
    Case("bin-not-a-state-dict", "a .bin checkpoint that holds no state dict"),
    Case("model-without-weights", "a model folder with config.json but no weights"),
    Case("unwritable-output", "an output location that cannot be written"),
    Case("full-output", "an output location that runs out of space while writing"),
]


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A good LoRA checkpoint (q_proj, v_proj, the embedding) saved by peftc."""
    d = tmp_path_factory.mktemp("good")
    (d / "s.peft").write_text(SPEC)
    assert peftc.cli.main(["-q", "save", str(d / "s.peft"), "tiny-llama", "-o", str(d / "ckpt")]) == 0
    return d / "ckpt"


def _make(case: str, good: Path, inputs: Path) -> tuple[list[str], dict]:
    """Write the bad input under `inputs`; return the command line (without -o) and extra subprocess settings."""
    ck = inputs / "ckpt"
    shutil.copytree(good, ck)
    tensors = load_file(str(ck / "adapter_model.safetensors"))
    config = json.loads((ck / "adapter_config.json").read_text())

    def put(t: dict | None = None, cfg: dict | None = None) -> None:
        if t is not None:
            save_file(t, str(ck / "adapter_model.safetensors"))
        if cfg is not None:
            (ck / "adapter_config.json").write_text(json.dumps(cfg))

    raw = (ck / "adapter_model.safetensors").read_bytes()
    if case == "missing-tensor":
        put({k: v for k, v in tensors.items() if k != Q_B})
    elif case == "extra-tensor":
        put({**tensors, "base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight": torch.zeros(2, 2)})
    elif case == "misshapen-tensor":
        put({**tensors, Q_B: torch.zeros(3, 3)})
    elif case == "wrong-dtype":
        put({**tensors, Q_B: tensors[Q_B].to(torch.int64)})
    elif case == "truncated":
        (ck / "adapter_model.safetensors").write_bytes(raw[: len(raw) // 2])
    elif case == "garbage":
        (ck / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 3)
    elif case == "invalid-json":
        (ck / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,')
    elif case == "unknown-peft-type":
        put(cfg={**config, "peft_type": "LORAX"})
    elif case == "no-peft-type":
        put(cfg={k: v for k, v in config.items() if k != "peft_type"})
    elif case == "other-hidden-size":
        put({k: ((v[:, :32] if ".lora_A." in k else v[:32]) if "embed" not in k else v).contiguous()
             for k, v in tensors.items()})
    elif case == "other-vocabulary":
        put({**tensors, EMB_A: torch.zeros(4, 400)})
    elif case == "other-layer-names":
        put({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(4, 48),
             "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": torch.zeros(144, 4)},
            {**config, "target_modules": ["c_attn"], "fan_in_fan_out": True})
    elif case == "no-checkpoint":
        shutil.rmtree(ck)
    elif case == "no-weights-file":
        (ck / "adapter_model.safetensors").unlink()
    elif case == "bin-with-code":
        (ck / "adapter_model.safetensors").unlink()
        (ck / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Evil()}))
    elif case == "bin-not-a-state-dict":
        (ck / "adapter_model.safetensors").unlink()
        torch.save([1, 2, 3], str(ck / "adapter_model.bin"))
    spec = inputs / "s.peft"
    spec.write_text(f'adapter a: import "{ck.name}"\n')
    model = "tiny-llama"
    if case == "model-without-weights":
        from transformers import LlamaConfig
        LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=320,
                    architectures=["LlamaForCausalLM"]).save_pretrained(str(inputs / "model"))
        model = str(inputs / "model")
    return ["save", str(spec), model], {}


def _output(case: str, tmp: Path) -> Path:
    if case == "unwritable-output":
        return Path("/proc/peftc-none/out")
    return tmp / "out" / "ckpt"


def _run(case: str, argv: list[str], out: Path) -> tuple[int, str]:
    """In process, or (for a full disk) in a child with a small file-size limit."""
    if case != "full-output":
        import contextlib
        import io
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = peftc.cli.main(["-q", *argv, "-o", str(out)])
        return rc, err.getvalue()
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000)); import peftc.cli; "
            f"sys.exit(peftc.cli.main(['-q', *{argv!r}, '-o', {str(out)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    return r.returncode, r.stderr


def _shown(message: str, tmp: Path) -> str:
    first = message.strip().splitlines()[0] if message.strip() else ""
    first = first.replace(str(tmp), "<dir>")
    return re.sub(r"^peftc: error: ", "", first)


RESULTS: dict[str, tuple[str, str, int]] = {}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_located_message(case, good, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    argv, _ = _make(case.id, good, inputs)
    before = _hashes(inputs)
    out = _output(case.id, tmp_path)
    rc, err = _run(case.id, argv, out)
    assert rc == 1, err
    lines = [ln for ln in err.splitlines() if ln.startswith("peftc: ")]
    assert len(lines) == 1 and lines[0].startswith("peftc: error: "), err
    assert "Traceback" not in err and "this-must-never-run" not in err
    message = lines[0]
    # located: the file, the tensor key or the config it is about
    assert re.search(r"(\.peft:\d+:\d+|adapter_model\.(safetensors|bin)|adapter_config\.json|config\.json|"
                     r"/out|ckpt)", message), message
    assert not out.exists() and not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert not [p for p in tmp_path.rglob(".*") if p.name.endswith(".tmp")]
    assert _hashes(inputs) == before
    RESULTS[case.id] = (case.what, _shown(err, tmp_path), rc)


def _table() -> str:
    rows = ["| input | message (first line) | exit code |", "|---|---|---|"]
    for c in CASES:
        what, message, rc = RESULTS[c.id]
        rows.append(f"| {what} | `{message.replace('|', '/')}` | {rc} |")
    return "\n".join(rows)


def test_docs_table_is_current():
    if len(RESULTS) != len(CASES):
        pytest.skip("runs after the matrix (run the whole file)")
    head = DOC.read_text().split("<!-- matrix -->")[0] if DOC.exists() else ""
    text = head + "<!-- matrix -->\n" + _table() + "\n"
    if os.environ.get("PEFTC_UPDATE_DOCS"):
        DOC.write_text(text)
    assert DOC.read_text() == text, "docs/corrupt-inputs.md is stale: rerun with PEFTC_UPDATE_DOCS=1"


# ---------------------------------------------------------------- interrupted runs
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_run_killed_while_writing_leaves_nothing(sig, good, tmp_path):
    """The child pauses inside the write (a patched os.replace sleeps once the output is complete in its
    temporary folder); the parent signals it there."""
    spec = tmp_path / "s.peft"
    spec.write_text(f'adapter a: import "{good}"\n')
    out = tmp_path / "out" / "ckpt"
    flag = tmp_path / "writing"
    code = ("import os, sys, time, pathlib, peftc.atomic as a\n"
            "real = os.replace\n"
            "def slow(src, dst):\n"
            f"    pathlib.Path({str(flag)!r}).write_text('x'); time.sleep(60); real(src, dst)\n"
            "a.os.replace = slow\n"
            "import peftc.cli\n"
            f"sys.exit(peftc.cli.main(['-q', 'save', {str(spec)!r}, 'tiny-llama', '-o', {str(out)!r}]))\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 240
    while not flag.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert flag.exists(), child.communicate()
    assert [p for p in (tmp_path / "out").iterdir()], "the temporary output exists while writing"
    child.send_signal(sig)
    _, err = child.communicate(timeout=60)
    assert child.returncode == (130 if sig == signal.SIGINT else 143), err
    assert "unfinished outputs removed" in err and "Traceback" not in err
    assert not out.exists() and not list((tmp_path / "out").iterdir())
