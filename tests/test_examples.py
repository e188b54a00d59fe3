"""The examples/ a new user starts from keep working: every examples/*.peft compiles on the model its own
`peftc check` line names and runs a forward pass, and examples/train_lora.py trains (loss goes down) and
writes a checkpoint that the real peft library loads to the same outputs."""
from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest
import torch

import peftc

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SPECS = sorted(EXAMPLES.glob("*.peft"))


def model_of(spec: Path) -> str:
    """The MODEL an example is meant for, from its '# Try:  peftc check examples/X.peft MODEL' line."""
    m = re.search(rf"peftc check\s+examples/{re.escape(spec.name)}\s+(\S+)", spec.read_text())
    assert m, f"{spec.name}: add a '# Try:  peftc check examples/{spec.name} MODEL' comment"
    model = m.group(1)
    return str(EXAMPLES.parent / model) if model.startswith("examples/") else model


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def logits(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out["logits"] if isinstance(out, dict) else out.logits


def test_examples_exist():
    names = {p.name for p in SPECS}
    assert {"lora.peft", "dora.peft", "ia3.peft", "multi.peft", "custom.peft"} <= names
    assert (EXAMPLES / "train_lora.py").exists() and (EXAMPLES / "custom_model.py").exists()


@pytest.mark.parametrize("spec", SPECS, ids=[p.stem for p in SPECS])
def test_example_spec_compiles_and_runs(spec: Path):
    compiled = peftc.compile_model(spec, model_of(spec))
    gm = compiled.gm
    assert not gm.training
    with torch.no_grad():
        out = logits(gm(**gm.peftc_inputs))
    assert torch.isfinite(out).all()
    live = [n for n, p in gm.named_parameters() if p.requires_grad]
    assert live, f"{spec.name}: no trainable adapter tensors"


def test_multi_example_states():
    gm = peftc.compile(EXAMPLES / "multi.peft", "tiny-llama")
    recs = gm.peftc.adapters
    assert set(recs) == {"style", "task", "draft"}
    assert recs["style"].merged and recs["style"].active
    assert not recs["task"].merged and recs["task"].active
    assert not recs["draft"].active


def test_train_lora_example_does_not_import_peft():
    tree = ast.parse((EXAMPLES / "train_lora.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in imported if m == "peft" or m.startswith("peft.")}


def test_custom_model_matches_its_declaration():
    mod = load_example("custom_model")
    model = mod.build()
    out = model(**mod.example_inputs())
    assert out.shape == (2, 4)


def test_train_lora_example_loss_falls_and_peft_loads_it(tmp_path):
    from peft import PeftModel

    from peftc.builtin_models import BUILTINS

    ex = load_example("train_lora")
    gm, losses = ex.train(steps=8, log=lambda *_: None)
    assert losses[-1] < losses[0]
    assert not gm.training
    folder = peftc.save_adapter(gm, tmp_path / "trained")[0]
    assert (folder / "adapter_config.json").exists() and (folder / "adapter_model.safetensors").exists()

    pm = PeftModel.from_pretrained(BUILTINS["tiny-llama"][0](), str(folder)).eval()
    ids = torch.randint(0, 320, (3, 21), generator=torch.Generator().manual_seed(5))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        diff = (logits(gm(**inputs)) - pm(**inputs).logits).abs().max().item()
    assert diff <= 1e-5


def test_train_lora_example_main(tmp_path, capsys):
    ex = load_example("train_lora")
    assert ex.main([str(tmp_path / "out"), "--steps", "3"]) == 0
    text = capsys.readouterr().out
    assert "PeftModel.from_pretrained" in text
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


# ---------------------------------------------------------------- the README's console examples
README = EXAMPLES.parent / "README.md"
_TIMES = re.compile(r"\d+(\.\d+)?s\b")
_DIFF = re.compile(r"max abs diff \S+ vs")


def console_sessions(text: str) -> list[list[tuple[str, list[str]]]]:
    """Each ```console block of the README as [(command, expected output lines)]."""
    sessions = []
    for block in re.findall(r"```console\n(.*?)```", text, re.S):
        steps: list[tuple[str, list[str]]] = []
        for line in block.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            elif steps:
                steps[-1][1].append(line)
        sessions.append(steps)
    return sessions


def _norm(line: str) -> str:
    return _DIFF.sub("max abs diff X vs", _TIMES.sub("Ns", line.rstrip()))


def output_matches(want: list[str], got: list[str]) -> bool:
    """Lines equal up to timings and measured differences; a line `...` in the README stands for any lines
    (the README abridges long listings)."""
    want = [_norm(w) for w in want if w.strip()]
    got = [_norm(g) for g in got if g.strip()]

    def match(i: int, j: int) -> bool:
        if i == len(want):
            return j == len(got)
        if want[i] == "...":
            return any(match(i + 1, k) for k in range(j, len(got) + 1))
        return j < len(got) and want[i] == got[j] and match(i + 1, j + 1)

    return match(0, 0)


def test_output_matching_rules():
    assert output_matches(["a 1.5s", "...", "z"], ["a 2.25s", "b", "c", "z"])
    assert not output_matches(["a", "z"], ["a", "b", "z"])
    assert not output_matches(["a"], ["b"])


@pytest.fixture(scope="module")
def doc_env() -> dict[str, str]:
    import os
    env = {k: v for k, v in os.environ.items() if k not in ("PEFTC_DEBUG", "CI")}
    env["PYTHONPATH"] = str(EXAMPLES.parent) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def fork_runner(doc_env):
    """One server for the walk-throughs' `peftc` and `python` commands (tests/_fork_runner.py): each command runs
    in a process of its own, forked after torch & co. are imported once."""
    import os

    from _fork_runner import ForkRunner
    if not hasattr(os, "fork"):
        yield None
        return
    runner = ForkRunner(doc_env)
    yield runner
    runner.close()


@pytest.mark.slow
@pytest.mark.parametrize("doc", [README, EXAMPLES.parent / "docs" / "tutorial.md"], ids=["README", "tutorial"])
def test_readme_console_examples_are_true(doc, tmp_path, doc_env, fork_runner):
    """Every `$ peftc ...` (and `$ cat`, `$ ls`, `$ python`) in the console blocks of the README and the tutorial,
    run in order in a scratch folder with examples/: the output must be what the document shows. A `$ cat FILE`
    of a file that does not exist yet creates it from the document (the typo examples, the tutorial's scripts).
    `peftc` and `python SCRIPT` commands run in processes forked from `fork_runner` (the others in a shell)."""
    import shutil
    import subprocess
    import sys

    from _fork_runner import argv_of

    shutil.copytree(EXAMPLES, tmp_path / "examples")
    peftc_cmd = f"{sys.executable} -m peftc.cli"
    for steps in console_sessions(doc.read_text()):
        for command, want in steps:
            cmd = command.split("#")[0].strip() if "peftc" in command else command
            if cmd.startswith("cat ") and not (tmp_path / cmd[4:].strip()).exists():
                (tmp_path / cmd[4:].strip()).write_text("\n".join(want) + "\n")
                continue
            argv = argv_of(cmd) if fork_runner is not None else None
            if argv is not None:
                _, out, err = fork_runner.run(argv, tmp_path)
            else:
                run = re.sub(r"^python ", sys.executable + " ", re.sub(r"^peftc ", peftc_cmd + " ", cmd))
                r = subprocess.run(run, shell=True, cwd=tmp_path, env=doc_env, capture_output=True, text=True,
                                   timeout=600)
                out, err = r.stdout, r.stderr
            got = (out + err).splitlines()
            assert output_matches(want, got), f"$ {command}\n--- {doc.name}:\n" + "\n".join(want) + \
                "\n--- got:\n" + "\n".join(got)
