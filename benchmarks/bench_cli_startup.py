"""How fast the `peftc` command answers when it has no real work to do: `--help`, `--version`, a spec with a
syntax error, and `peftc import` of a PEFT checkpoint. None of these may import torch (which alone takes
several seconds on a busy machine); a plain `python -c "import torch"` is timed beside them for scale.

    .venv/bin/python benchmarks/bench_cli_startup.py              # 10 rounds
    .venv/bin/python benchmarks/bench_cli_startup.py --rounds 20

Each command runs in a fresh subprocess (the way a user runs it), rounds interleaved; the table gives the
median and min-max wall time, and whether torch ended up imported (checked in a separate run per command).
Writes benchmarks/results/cli_startup.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PROBE = """
import sys
from peftc.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("TORCH" if "torch" in sys.modules else "NO-TORCH", file=sys.stderr)
"""


def peftc_command() -> list[str]:
    """The console script beside this interpreter if there is one (what a user types), else `python -m`."""
    exe = Path(sys.executable).parent / "peftc"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "peftc.cli"]


def run(argv: list[str], cwd: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, cwd=cwd, env=env, capture_output=True, timeout=600)
    return time.perf_counter() - t0


def imports_torch(args: list[str], cwd: Path, env: dict[str, str]) -> bool:
    r = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=600)
    return r.stderr.strip().splitlines()[-1] == "TORCH"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    opts = ap.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("CI", None)
    work = Path(tempfile.mkdtemp(prefix="peftc-bench-cli-"))
    try:
        (work / "bad.peft").write_text("adapter a: lora(r = 4 {\n    targets q_proj\n}\n")
        setup = subprocess.run([*peftc_command(), "save", str(ROOT / "examples" / "lora.peft"), "tiny-llama",
                                "-o", "ckpt", "-q"], cwd=work, env=env, capture_output=True, text=True)
        if setup.returncode != 0:
            print(setup.stdout, setup.stderr, file=sys.stderr)
            return 1
        cases = {
            "peftc --help": ["--help"],
            "peftc --version": ["--version"],
            "peftc compile (syntax error in the spec)": ["compile", "bad.peft", "tiny-llama", "-o", "x.pt2"],
            "peftc import CHECKPOINT -o spec.peft": ["import", "ckpt", "-o", "spec.peft"],
        }
        reference = {'python -c "import torch" (for scale)': [sys.executable, "-c", "import torch"]}
        times: dict[str, list[float]] = {name: [] for name in [*cases, *reference]}
        for _ in range(opts.rounds):
            for name, args in cases.items():
                times[name].append(run([*peftc_command(), *args], work, env))
            for name, cmd in reference.items():
                times[name].append(run(cmd, work, env))
        torch_used = {name: imports_torch(args, work, env) for name, args in cases.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [f"`python benchmarks/bench_cli_startup.py --rounds {opts.rounds}` — each command in a fresh "
             "subprocess, rounds interleaved.  ",
             f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cpus, "
             f"load average (1 min) after: {load:.2f}; command: `{' '.join(Path(c).name for c in peftc_command())}`.",
             "", "| command | median s | min–max s | imports torch |", "|---|---:|---:|:---:|"]
    for name, ts in times.items():
        flag = ("yes" if torch_used[name] else "no") if name in torch_used else "yes"
        lines.append(f"| {name} | {statistics.median(ts):.2f} | {min(ts):.2f}–{max(ts):.2f} | {flag} |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cli_startup.md").write_text(text)
    return 0 if not any(torch_used.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
