"""The `peftc` command line, run in subprocesses: the happy paths (inspect, check, import -> compile,
save, custom models, --dump-after, --quiet) and bad input, where each case must exit 1 with one clear
message and no traceback, leave no output (or temp) file behind, and leave its input files unchanged."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MODELS, inputs_for, logits_of, peft_adapter

import peftc

TIMEOUT = 300
NET_PY = '''
import torch
from torch import nn


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def build():
    torch.manual_seed(0)
    return ConvNet().eval()
'''
EXAMPLE_INPUTS = '''

def example_inputs():
    return {"x": torch.randn(2, 3, 8, 8)}
'''
CONV_SPEC = 'adapter a: lora(r = 2, alpha = 4, init = "random") {\n    targets conv1, fc1\n}\n'


# ---------------------------------------------------------------- helpers
def peftc_cli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PEFTC_DEBUG", "CI")}
    return subprocess.run([sys.executable, "-m", "peftc.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=cwd, env=env)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"rc={r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert "Traceback" not in r.stderr
    return r


def hashes(*paths: Path) -> dict[str, str]:
    out = {}
    for p in paths:
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    assert out, f"nothing to hash in {paths}"
    return out


def listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def assert_fails_cleanly(r: subprocess.CompletedProcess, expect: list[str], out_dir: Path,
                         before: list[str], inputs: dict[str, str]) -> str:
    err = r.stderr
    assert r.returncode == 1, f"rc={r.returncode}\nstderr:\n{err}"
    assert "Traceback" not in err and "Traceback" not in r.stdout, err
    assert "internal error" not in err, err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("peftc: error: "), f"want one error line:\n{err}"
    for e in expect:
        assert e in err, f"{e!r} not in:\n{err}"
    assert r.stdout == "", r.stdout
    assert listing(out_dir) == before, f"left behind in the output folder: {listing(out_dir)}"
    assert hashes(*map(Path, inputs)) == inputs, "an input file changed"
    return err


def load_pt2(path: Path) -> torch.nn.Module:
    return torch.export.load(str(path)).module()


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A Hugging Face model folder, a peft LoRA checkpoint for it, and broken copies of that checkpoint."""
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("cli")
    base, pm, adapter = peft_adapter("llama", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False), root)
    base.save_pretrained(str(root / "model"))
    inp = inputs_for("llama")
    with torch.no_grad():
        ref = logits_of(pm(**inp))
        merged_ref = logits_of(copy.deepcopy(pm).merge_and_unload()(**inp))
        assert (ref - logits_of(base(**inp))).abs().max() > 1e-3
    trainable, total = pm.get_nb_trainable_parameters()

    st = "adapter_model.safetensors"
    sd = load_file(str(adapter / st))
    key_q0_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    extra_key = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    assert key_q0_a in sd and tuple(sd[key_q0_a].shape) == (4, 64)

    def variant(name: str, tensors: dict | None = None) -> Path:
        d = root / name
        shutil.copytree(adapter, d)
        if tensors is not None:
            save_file(tensors, str(d / st), metadata={"format": "pt"})
        return d

    variant("missing", {k: v for k, v in sd.items() if k != key_q0_a})
    variant("extra", {**sd, extra_key: torch.zeros(4, 64)})
    variant("shape", {**sd, key_q0_a: torch.zeros(5, 64)})
    unknown = variant("unsupported")
    cfg = json.loads((unknown / "adapter_config.json").read_text())
    cfg["peft_type"] = "FANCY_NEW_METHOD"
    (unknown / "adapter_config.json").write_text(json.dumps(cfg))
    data = (adapter / st).read_bytes()
    (variant("truncated") / st).write_bytes(data[: len(data) // 2])
    (variant("garbage") / st).write_bytes(b"\x07\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}" + b"\x00" * 64)

    _, _, bias_dir = peft_adapter("llama", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      lora_bias=True, init_lora_weights=False), root / "bias")
    return {"root": root, "model": root / "model", "adapter": adapter, "bias": bias_dir, "inputs": inp,
            "ref": ref, "merged_ref": merged_ref, "trainable": trainable, "total": total,
            "key": key_q0_a, "extra_key": extra_key}


@pytest.fixture(scope="module")
def imported(work, tmp_path_factory):
    """`peftc import` into a spec in another folder, then `peftc compile` of that spec onto the model dir."""
    root = tmp_path_factory.mktemp("imported")
    (root / "specs").mkdir()
    (root / "out").mkdir()
    shutil.copytree(work["adapter"], root / "adapter")
    before = hashes(root / "adapter", work["model"])
    r_import = peftc_cli("import", "adapter", "-o", "specs/spec.peft", cwd=root)
    r_compile = peftc_cli("compile", "specs/spec.peft", work["model"], "-o", "out/unmerged.pt2", cwd=root)
    return {"root": root, "spec": root / "specs" / "spec.peft", "pt2": root / "out" / "unmerged.pt2",
            "import": r_import, "compile": r_compile, "before": before}


# ---------------------------------------------------------------- inspect
def test_inspect_builtin(work):
    r = ok(peftc_cli("inspect", "tiny-gpt2"))
    out = r.stdout
    assert re.search(r"^transformer\.h\.0\.attn\.c_attn\s+conv1d_hf\s+48x144\b", out, re.M), out
    assert re.search(r"^lm_head\s+linear\s+320x48\b", out, re.M), out
    model = MODELS["gpt2"]()
    n = sum(1 for name, m in model.named_modules()
            if name and (type(m).__name__ == "Conv1D" or isinstance(m, (torch.nn.Linear, torch.nn.Embedding,
                                                                          torch.nn.LayerNorm))))
    total = sum(p.numel() for p in model.parameters())
    assert f"{n} targetable layers" in out and f"{total:,} parameters in all" in out, out


def test_inspect_hf_model_dir(work):
    r = ok(peftc_cli("inspect", work["model"]))
    out = r.stdout
    for layer in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"):
        assert re.search(rf"^{re.escape(layer)}\s+linear\s", out, re.M), out
    assert re.search(r"^model\.embed_tokens\s+embedding\s+320x64\b", out, re.M), out
    assert "21 targetable layers (1 embedding, 15 linear, 5 norm)" in out, out


def test_console_script_lists_builtins():
    exe = Path(sys.executable).parent / "peftc"
    if not exe.exists():
        pytest.skip("no peftc console script beside this interpreter")
    r = ok(subprocess.run([str(exe), "inspect", "--builtins"], capture_output=True, text=True, timeout=TIMEOUT))
    names = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    assert {"tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-vit"} <= set(names), r.stdout


# ---------------------------------------------------------------- check
def test_check_prints_layers_and_parameter_counts(work, tmp_path):
    spec = tmp_path / "s.peft"
    spec.write_text(f'adapter default: import "{work["adapter"]}"\n')
    before = listing(tmp_path)
    r = ok(peftc_cli("check", spec, work["model"]))
    out = r.stdout
    assert "adapter default: lora(" in out and "r=4" in out, out
    assert "matches 4 layers (4 linear)" in out, out
    for i in (0, 1):
        for p in ("q_proj", "v_proj"):
            assert f"model.layers.{i}.self_attn.{p}" in out, out
    t, n = work["trainable"], work["total"]
    want = f"trainable params: {t:,} || all params: {n:,} || trainable%: {100 * t / n:.4f}"
    assert want in out, f"want peft's numbers {want!r} in:\n{out}"
    assert listing(tmp_path) == before, "check must write nothing"


# ---------------------------------------------------------------- import, compile
def test_import_writes_a_spec_with_relative_paths(imported):
    r = ok(imported["import"])
    text = imported["spec"].read_text()
    assert 'adapter default: import "../adapter"' in text, text
    spec = peftc.read_spec(imported["spec"])
    assert list(spec.adapters) == ["default"] and spec.adapters["default"].import_dir == "../adapter"
    assert r.stdout == "wrote specs/spec.peft (1 adapter: default)\n" and r.stderr == "", r


def test_compiled_pt2_gives_peft_logits(work, imported):
    ok(imported["compile"])
    inp = work["inputs"]  # batch 3 x 19: another shape than the trace's
    with torch.no_grad():
        got = logits_of(load_pt2(imported["pt2"])(**inp))
    assert got.shape == work["ref"].shape
    assert (got - work["ref"]).abs().max().item() <= 1e-4


def test_compile_leaves_inputs_unchanged_and_no_temp_files(work, imported):
    ok(imported["compile"])
    assert hashes(imported["root"] / "adapter", work["model"]) == imported["before"]
    assert listing(imported["root"] / "out") == ["unmerged.pt2"]
    assert listing(imported["root"] / "specs") == ["spec.peft"]


def test_written_files_get_ordinary_permissions(imported):
    """Output files are created with the umask's permissions (like `open(..., 'w')`), not 0600 temp-file ones."""
    ok(imported["compile"])
    umask = os.umask(0)
    os.umask(umask)
    want = 0o666 & ~umask
    for f in (imported["spec"], imported["pt2"]):
        assert f.stat().st_mode & 0o777 == want, f"{f.name}: mode {oct(f.stat().st_mode & 0o777)}, want {oct(want)}"


def test_piped_runs_show_no_spinner_or_progress_bars(imported):
    """stderr is a pipe here, not a terminal: no spinner or progress redraws; the result ('wrote ...', with
    each adapter's state) is the one line on stdout."""
    for r in (imported["import"], imported["compile"]):
        ok(r)
        assert r.stderr == "", repr(r.stderr)
        assert "\r" not in r.stdout and "\x1b[" not in r.stdout, repr(r.stdout)
        lines = r.stdout.splitlines()
        assert len(lines) == 1 and lines[0].startswith("wrote "), repr(r.stdout)
    out = imported["compile"].stdout
    assert re.fullmatch(r"wrote out/unmerged\.pt2: 1 adapter on 4 layers \(default: live\) "
                        r"\(compile \d+\.\ds, total \d+\.\ds\)\n", out), out


def test_compile_merge(work, imported, tmp_path):
    out = tmp_path / "merged.pt2"
    r = ok(peftc_cli("compile", imported["spec"], work["model"], "-o", out, "--merge"))
    assert "(default: merged)" in r.stdout, r.stdout
    m = load_pt2(out)
    with torch.no_grad():
        got = logits_of(m(**work["inputs"]))
    assert (got - work["merged_ref"]).abs().max().item() <= 1e-4
    names = {n for n, _ in m.named_parameters()} | {n for n, _ in m.named_buffers()}
    assert not any("lora" in n.lower() for n in names), sorted(n for n in names if "lora" in n.lower())


# ---------------------------------------------------------------- save
def test_save_writes_a_checkpoint_peft_loads(work, tmp_path):
    from peft import PeftModel
    spec = tmp_path / "fresh.peft"
    spec.write_text('adapter default: lora(r = 4, alpha = 16, rslora = true, init = "random") {\n'
                    '    targets q_proj, v_proj\n'
                    '    r at v_proj = 2\n'
                    '}\n')
    out = tmp_path / "out"
    out.mkdir()
    r = ok(peftc_cli("save", spec, work["model"], "-o", out / "ckpt"))
    assert r.stdout.startswith(f"wrote {out / 'ckpt'}: 1 adapter on 4 layers (default: live)"), r.stdout
    assert listing(out) == ["ckpt", "ckpt/adapter_config.json", "ckpt/adapter_model.safetensors"]
    cfg = json.loads((out / "ckpt" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["use_rslora"] is True

    pm = PeftModel.from_pretrained(MODELS["llama"](), str(out / "ckpt")).eval()
    v = pm.base_model.model.model.layers[0].self_attn.v_proj
    assert v.lora_A["default"].weight.shape == (2, 64)
    gm = peftc.compile(str(spec), MODELS["llama"]())
    inp = work["inputs"]
    with torch.no_grad():
        want = logits_of(gm(**inp))
        got = logits_of(pm(**inp))
        base = logits_of(MODELS["llama"]()(**inp))
    assert (want - base).abs().max() > 1e-4, "the adapter must change the output for this test to mean anything"
    assert (got - want).abs().max().item() <= 1e-4


# ---------------------------------------------------------------- custom models
def test_custom_model_file_with_example_input(tmp_path):
    (tmp_path / "net.py").write_text(NET_PY)
    (tmp_path / "conv.peft").write_text(CONV_SPEC)
    (tmp_path / "out").mkdir()
    r = ok(peftc_cli("compile", "conv.peft", "net.py:build", "--example-input", "x=2x3x8x8:float32",
                     "-o", "out/conv.pt2", cwd=tmp_path))
    assert "wrote out/conv.pt2: 1 adapter on 2 layers (a: live)" in r.stdout, r.stdout
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    gm = peftc.compile(str(tmp_path / "conv.peft"), f"{tmp_path / 'net.py'}:build", example_inputs=["x=2x3x8x8"])
    with torch.no_grad():
        got = load_pt2(tmp_path / "out" / "conv.pt2")(x=x)
        want = gm(x=x)
        torch.manual_seed(0)
        base = MODELS["convnet"]()(x)
    assert got.shape == (5, 5)
    assert (want - base).abs().max() > 1e-4
    assert (got - want).abs().max().item() <= 1e-5


def test_custom_model_module_with_example_inputs_and_dump_after(tmp_path):
    (tmp_path / "netmod.py").write_text(NET_PY + EXAMPLE_INPUTS)
    (tmp_path / "conv.peft").write_text(CONV_SPEC)
    r = ok(peftc_cli("compile", "conv.peft", "netmod:build", "-o", "conv.pt2", "--dump-after", "factor",
                     cwd=tmp_path))
    out = r.stdout
    assert "graph after pass 'factor'" in out and "graph():" in out, out
    assert "placeholder[target=x]" in out, out
    assert "lora" in out.lower(), out
    assert "conv" in out and "linear" in out, out
    assert (tmp_path / "conv.pt2").is_file()
    with torch.no_grad():
        y = load_pt2(tmp_path / "conv.pt2")(x=torch.randn(3, 3, 8, 8))
    assert y.shape == (3, 5)


# ---------------------------------------------------------------- --quiet
def test_quiet_before_the_command_prints_only_the_result(work, tmp_path):
    """-q silences progress and notes (stderr); the result line stays on stdout."""
    spec = tmp_path / "s.peft"
    spec.write_text(f'adapter default: import "{work["adapter"]}"\n')
    r = ok(peftc_cli("--quiet", "compile", spec, work["model"], "-o", tmp_path / "q.pt2"))
    assert (tmp_path / "q.pt2").is_file()
    assert r.stderr == "", repr(r.stderr)
    assert r.stdout.startswith(f"wrote {tmp_path / 'q.pt2'}: ") and r.stdout.count("\n") == 1, r.stdout


def test_quiet_after_the_command_prints_only_the_result(work, tmp_path):
    spec = tmp_path / "s.peft"
    spec.write_text(f'adapter default: import "{work["adapter"]}"\n')
    r = ok(peftc_cli("save", spec, work["model"], "-o", tmp_path / "ckpt", "-q"))
    assert (tmp_path / "ckpt" / "adapter_model.safetensors").is_file()
    assert r.stderr == "", repr(r.stderr)
    assert r.stdout.startswith(f"wrote {tmp_path / 'ckpt'}: ") and r.stdout.count("\n") == 1, r.stdout


# ---------------------------------------------------------------- bad input
def _spec(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "in" / "spec.peft"
    p.parent.mkdir(exist_ok=True)
    p.write_text(text)
    return p


def _import_spec(tmp_path: Path, d: Path) -> Path:
    return _spec(tmp_path, f'adapter a: import "{d}"\n')


def case_syntax_error(w, t, out):
    s = _spec(t, "adapter a: lora(r = 4 {\n    targets q_proj\n}\n")
    return ["compile", s, w["model"], "-o", out / "x.pt2"], [s], [f"{s}:1:23: syntax error", "\n    " + " " * 22 + "^"]


def case_unknown_option(w, t, out):
    s = _spec(t, "adapter a: lora(r = 4, alpah = 8) {\n    targets q_proj\n}\n")
    return (["compile", s, w["model"], "-o", out / "x.pt2"], [s, w["model"]],
            [f"{s}:1:24: unknown option 'alpah'", "did you mean 'alpha'"])


def case_target_matches_nothing(w, t, out):
    s = _spec(t, "adapter a: lora() {\n    targets q_prj\n}\n")
    return (["export", s, w["model"], "-o", out / "x.onnx"], [s, w["model"]],
            [f"{s}:2:13: adapter 'a': targets q_prj match no layer", "q_proj"])


def case_missing_tensor(w, t, out):
    d = w["root"] / "missing"
    s = _import_spec(t, d)
    return (["compile", s, w["model"], "-o", out / "x.pt2"], [s, d, w["model"]],
            [f"missing tensor '{w['key']}'", "[4, 64]", str(d / "adapter_model.safetensors")])


def case_extra_tensor(w, t, out):
    d = w["root"] / "extra"
    s = _import_spec(t, d)
    return (["save", s, w["model"], "-o", out / "ckpt"], [s, d, w["model"]],
            [f"unexpected tensor '{w['extra_key']}'", str(d / "adapter_model.safetensors")])


def case_wrong_shape(w, t, out):
    d = w["root"] / "shape"
    s = _import_spec(t, d)
    return (["compile", s, w["model"], "-o", out / "x.pt2"], [s, d, w["model"]],
            [f"tensor '{w['key']}' has shape [5, 64], expected [4, 64]"])


def case_unsupported_peft_type(w, t, out):
    d = w["root"] / "unsupported"
    return ["import", d, "-o", out / "s.peft"], [d], ["unsupported peft_type 'FANCY_NEW_METHOD'",
                                                      str(d / "adapter_config.json")]


def case_truncated_safetensors(w, t, out):
    d = w["root"] / "truncated"
    s = _import_spec(t, d)
    return (["compile", s, w["model"], "-o", out / "x.pt2"], [s, d, w["model"]],
            [str(d / "adapter_model.safetensors"), "corrupt or truncated"])


def case_corrupt_safetensors_import(w, t, out):
    d = w["root"] / "garbage"
    return (["import", d, "-o", out / "s.peft"], [d],
            [str(d / "adapter_model.safetensors"), "corrupt"])


def case_model_path_missing(w, t, out):
    s = _import_spec(t, w["adapter"])
    missing = t / "no_such_model"
    return (["compile", s, missing, "-o", out / "x.pt2"], [s, w["adapter"]],
            ["model not found", str(missing)])


def case_not_mergeable(w, t, out):
    s = _import_spec(t, w["bias"])
    return (["compile", s, w["model"], "-o", out / "x.pt2", "--merge"], [s, w["bias"], w["model"]],
            ["cannot be merged", "model.layers.0.self_attn.q_proj"])


def case_output_is_a_directory_import(w, t, out):
    target = out / "taken"
    target.mkdir()
    return ["import", w["adapter"], "-o", target], [w["adapter"]], [str(target)]


def case_output_is_a_directory_compile(w, t, out):
    s = _import_spec(t, w["adapter"])
    target = out / "taken.pt2"
    target.mkdir()
    return ["compile", s, w["model"], "-o", target], [s, w["adapter"], w["model"]], [str(target)]


def case_save_onto_an_existing_file(w, t, out):
    s = _import_spec(t, w["adapter"])
    target = out / "taken"
    target.write_text("not a folder\n")
    return ["save", s, w["model"], "-o", target], [s, w["adapter"], target], [str(target)]


def case_compile_to_onnx_name(w, t, out):
    s = _import_spec(t, w["adapter"])
    return (["compile", s, w["model"], "-o", out / "model.onnx"], [s, w["adapter"], w["model"]],
            ["`peftc compile` writes a .pt2 file", "`peftc export` writes .onnx files"])


def case_export_to_pt2_name(w, t, out):
    s = _import_spec(t, w["adapter"])
    return (["export", s, w["model"], "-o", out / "model.pt2"], [s, w["adapter"], w["model"]],
            ["`peftc export` writes a .onnx file"])


def case_import_to_a_non_spec_name(w, t, out):
    return ["import", w["adapter"], "-o", out / "spec.txt"], [w["adapter"]], ["`peftc import` writes a .peft file"]


def case_save_to_a_file_name(w, t, out):
    s = _import_spec(t, w["adapter"])
    return (["save", s, w["model"], "-o", out / "adapter.safetensors"], [s, w["adapter"], w["model"]],
            ["`peftc save` writes a PEFT checkpoint directory"])


def case_unwritable_location(w, t, out):
    s = _import_spec(t, w["adapter"])
    target = Path("/proc/peftc-no-such-dir/model.pt2")  # /proc takes no new files, even as root
    return (["compile", s, w["model"], "-o", target], [s, w["adapter"], w["model"]],
            [f"cannot write {target}", "/proc is not writable"])


def case_misspelled_targets_clause(w, t, out):
    s = _spec(t, "adapter a: lora(r = 4) {\n    tragets q_proj\n}\n")
    return (["check", s, w["model"]], [s, w["model"]],
            [f"{s}:2:5: unknown clause 'tragets' for lora (did you mean 'targets'?)", "\n        ^"])


def case_bare_misspelled_merge(w, t, out):
    s = _spec(t, "adapter a: lora(r = 4) {\n    targets q_proj\n    mrege\n}\n")
    return (["compile", s, w["model"], "-o", out / "x.pt2"], [s, w["model"]],
            [f"{s}:3:5: syntax error: unknown clause 'mrege' (did you mean 'merge'?)"])


def case_layers_beyond_the_model(w, t, out):
    s = _spec(t, "adapter a: lora(r = 4) {\n    targets q_proj\n    layers 5\n}\n")
    return (["save", s, w["model"], "-o", out / "ckpt"], [s, w["model"]],
            [f"{s}:3:5: adapter 'a': `layers 5` selects none of the 2 layers its targets match"])


def case_option_disagrees_with_the_checkpoint(w, t, out):
    s = _spec(t, f'adapter a: lora(r = 4, alpha = 32) {{\n    targets q_proj, v_proj\n'
                 f'    weights "{w["adapter"]}"\n}}\n')
    return (["compile", s, w["model"], "-o", out / "x.pt2"], [s, w["adapter"], w["model"]],
            [f"{s}:1:24: adapter 'a': alpha = 32 but its weights were saved with lora_alpha = 8"])


BAD = [case_syntax_error, case_unknown_option, case_target_matches_nothing, case_missing_tensor, case_extra_tensor,
       case_wrong_shape, case_unsupported_peft_type, case_truncated_safetensors, case_corrupt_safetensors_import,
       case_model_path_missing, case_not_mergeable, case_output_is_a_directory_import,
       case_output_is_a_directory_compile, case_save_onto_an_existing_file, case_compile_to_onnx_name,
       case_export_to_pt2_name, case_import_to_a_non_spec_name, case_save_to_a_file_name, case_unwritable_location,
       case_misspelled_targets_clause, case_bare_misspelled_merge, case_layers_beyond_the_model,
       case_option_disagrees_with_the_checkpoint]


@pytest.mark.parametrize("case", BAD, ids=[c.__name__[5:] for c in BAD])
def test_bad_input_fails_cleanly(work, tmp_path, case):
    out = tmp_path / "out"
    out.mkdir()
    argv, inputs, expect = case(work, tmp_path, out)
    (out / "keep.txt").write_text("an unrelated file in the output folder\n")
    before = listing(out)
    inputs_before = hashes(*inputs)
    r = peftc_cli(*argv)
    assert_fails_cleanly(r, expect, out, before, inputs_before)


# ---------------------------------------------------------------- a fast start, and failing early
LIGHT = """
import sys
from peftc.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
print("torch imported" if "torch" in sys.modules else "torch not imported", rc, file=sys.stderr)
"""


def light_run(*args: str | Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PEFTC_DEBUG", "CI")}
    return subprocess.run([sys.executable, "-c", LIGHT, *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env)


def test_import_peftc_does_not_import_torch_but_the_api_is_there():
    code = ("import sys, peftc, peftc.cli; light = 'torch' not in sys.modules; f = peftc.compile; "
            "print(light, peftc.__version__, f.__module__, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.stdout.split() == ["True", peftc.__version__, "peftc.pipeline", "True"], r.stdout + r.stderr


def test_version():
    r = ok(peftc_cli("--version"))
    assert r.stdout == f"peftc {peftc.__version__}\n"


@pytest.mark.parametrize("what", ["help", "version", "syntax error", "clause typo", "import", "wrong extension",
                                  "unwritable", "combine output", "combine options", "fmt"])
def test_quick_paths_do_not_import_torch(work, tmp_path, what):
    """--help, --version, a spec's syntax errors, `import`, output problems and `combine`'s option checks answer
    without importing torch (4-7 s): they are found before any work. benchmarks/bench_cli_startup.py times them."""
    bad = tmp_path / "bad.peft"
    bad.write_text("adapter a: lora(r = 4 {\n    targets q_proj\n}\n")
    typo = tmp_path / "typo.peft"
    typo.write_text("adapter a: lora(r = 4) {\n    targets q_proj\n    mrege\n}\n")
    argv, rc = {
        "help": (["--help"], 0),
        "version": (["--version"], 0),
        "syntax error": (["compile", bad, work["model"], "-o", tmp_path / "x.pt2"], 1),
        "clause typo": (["check", typo, "tiny-llama"], 1),
        "import": (["import", work["adapter"], "-o", tmp_path / "s.peft"], 0),
        "wrong extension": (["export", work["root"] / "no-such.peft", "tiny-llama", "-o", tmp_path / "m.pt2"], 1),
        "unwritable": (["save", bad, "tiny-llama", "-o", "/proc/peftc-none/ckpt"], 1),
        "combine output": (["combine", work["adapter"], "--weights", "1", "--type", "linear", "-o",
                            tmp_path / "c.safetensors"], 1),
        "combine options": (["combine", work["adapter"], work["adapter"], "--weights", "1,1", "--type", "ties", "-o",
                             tmp_path / "c"], 1),
        "fmt": (["fmt", "--check", typo, bad], 1),
    }[what]
    r = light_run(*argv)
    assert r.stderr.splitlines()[-1] == f"torch not imported {rc}", r.stderr
    assert "Traceback" not in r.stderr


def test_save_does_not_trace(work, tmp_path, monkeypatch, capsys):
    """`peftc save` writes the checkpoint from the plan: no torch.export."""
    import peftc.cli
    import peftc.pipeline
    import peftc.trace

    def no_trace(*a, **k):
        raise AssertionError("save must not trace the model")

    monkeypatch.setattr(peftc.trace, "trace", no_trace)
    monkeypatch.setattr(peftc.pipeline, "trace", no_trace)
    spec = tmp_path / "s.peft"
    spec.write_text(f'adapter default: import "{work["adapter"]}"\n')
    assert peftc.cli.main(["save", str(spec), str(work["model"]), "-o", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr()
    assert out.out.startswith(f"wrote {tmp_path / 'ckpt'}: 1 adapter on 4 layers (default: live)"), out
    saved = load_file_(tmp_path / "ckpt" / "adapter_model.safetensors")
    theirs = load_file_(work["adapter"] / "adapter_model.safetensors")
    assert set(saved) == set(theirs) and all(torch.equal(saved[k], theirs[k]) for k in saved)


def load_file_(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path))


def test_summary_line_tells_each_adapters_state(work, tmp_path):
    spec = tmp_path / "multi.peft"
    spec.write_text("adapter style: lora(r = 8) { targets q_proj, v_proj\n merge }\n"
                    "adapter task: lora(r = 4) { targets v_proj, o_proj }\n"
                    "adapter draft: ia3() { targets k_proj }\n"
                    "active style, task\n")
    r = ok(peftc_cli("save", spec, work["model"], "-o", tmp_path / "ckpt"))
    want = (f"wrote {tmp_path / 'ckpt' / 'style'}, {tmp_path / 'ckpt' / 'task'}, {tmp_path / 'ckpt' / 'draft'}: "
            "3 adapters on 8 layers (style: merged; task: live; draft: inactive) (total ")
    assert r.stdout.startswith(want) and r.stdout.count("\n") == 1, r.stdout
    assert r.stderr == "", r.stderr


def test_warnings_go_to_stderr_and_results_to_stdout(work, tmp_path):
    spec = tmp_path / "w.peft"
    spec.write_text("adapter a: lora(r = 4) {\n    targets q_proj\n    r at k_proj = 2\n}\n")
    r = ok(peftc_cli("check", spec, work["model"], "-q"))
    assert r.stderr == (f"peftc: warning: {spec}:3:5: adapter 'a': `r at k_proj = 2` matches none of its 2 "
                        "targeted layers, so it changes nothing\n"), r.stderr
    assert "adapter a: lora(" in r.stdout and r.stdout.endswith("ok: no errors\n"), r.stdout


def test_import_takes_every_adapter_of_a_multi_adapter_save(work, tmp_path):
    """peft saves the default adapter at the root and the others in subfolders named after them."""
    d = tmp_path / "multi"
    shutil.copytree(work["adapter"], d)
    shutil.copytree(work["adapter"], d / "second")
    shutil.copytree(work["root"] / "unsupported", d / "third")   # a peft_type peftc does not support: left out
    (tmp_path / "specs").mkdir()
    r = ok(peftc_cli("import", d, "-o", tmp_path / "specs" / "all.peft"))
    assert r.stdout == f"wrote {tmp_path / 'specs' / 'all.peft'} (2 adapters: default, second)\n", r.stdout
    assert r.stderr.startswith(f"note: left out {d / 'third'}: unsupported peft_type 'FANCY_NEW_METHOD'"), r.stderr
    spec = peftc.read_spec(tmp_path / "specs" / "all.peft")
    assert {n: a.import_dir for n, a in spec.adapters.items()} == {"default": "../multi", "second": "../multi/second"}
    only_subfolders = tmp_path / "subs"
    shutil.copytree(d / "second", only_subfolders / "one")
    shutil.copytree(d / "second", only_subfolders / "two")
    r = ok(peftc_cli("import", only_subfolders, "-o", tmp_path / "subs.peft"))
    assert "(2 adapters: one, two)" in r.stdout, r.stdout


def test_library_calls_print_nothing_and_onnx_export_shows_its_steps(tmp_path, capfd):
    """save_pt2 / export_onnx print no torch notices (temp file names, torchvision) and warn nothing; the ONNX
    export and its onnxruntime check are several progress steps."""
    import warnings

    from peftc import progress
    gm = peftc.compile("adapter a: lora(r = 2) { targets q_proj }", "tiny-llama")
    capfd.readouterr()
    del progress.history[:]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peftc.save_pt2(gm, tmp_path / "m.pt2")
        peftc.export_onnx(gm, tmp_path / "m.onnx")
    out = capfd.readouterr()
    assert out.out == "" and out.err == "", out
    assert [str(w.message) for w in caught] == []
    labels = [label for label, _ in progress.history]
    assert labels == ["Re-exporting the adapted graph (torch.export)", "Writing .pt2",
                      "Exporting to ONNX (torch.onnx, dynamo)", "Writing .onnx",
                      "onnxruntime check: the torch graph on a fresh input",
                      "onnxruntime check: loading and running the ONNX model"], labels
