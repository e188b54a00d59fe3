"""Run the `peftc ...` and `python SCRIPT.py` commands of the docs' console walk-throughs (test_examples.py) each in
a fresh process, forked from one server that has imported peftc's heavy dependencies once (torch, transformers,
onnx, onnxruntime, peft): each command still runs in a process of its own, in its own folder, with its own stdout,
stderr and exit status, as `subprocess.run` would run it, but without paying for those imports again (they were
most of the README walk-through's time). The server runs no tensor operation before it forks (no thread pool
exists in the parent), and a command it cannot run as argv (shell syntax) is left to the shell by the caller.

Run as a script, this file is the server: one JSON request per line on stdin, one JSON answer per line on stdout.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRELOAD = ("torch", "transformers", "safetensors.torch", "onnx", "onnxruntime", "onnxscript", "peft",
           "torch.onnx", "peftc", "peftc.cli", "peftc.pipeline", "peftc.emit.onnx", "peftc.emit.onnx_adapters")
_SHELL = set("|&;<>()$`\\\"'*?[]{}~!")


def argv_of(command: str) -> list[str] | None:
    """The argv of a plain command (`peftc ...` or `python X.py ...`), or None when the shell has to run it."""
    if any(c in _SHELL for c in command):
        return None
    argv = shlex.split(command)
    if not argv or argv[0] not in ("peftc", "python") or (argv[0] == "python" and len(argv) < 2) \
            or (argv[0] == "python" and argv[1].startswith("-")):
        return None
    return argv


class ForkRunner:
    """A server process (this file) started with `env`; `run(argv, cwd)` -> (exit status, stdout, stderr)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, text=True)
        self.dir = Path(tempfile.mkdtemp(prefix="peftc-fork-runner."))   # the commands' captured output
        ready = self.proc.stdout.readline()
        assert ready.strip() == "ready", f"the fork server did not start: {ready!r}"

    def run(self, argv: list[str], cwd: Path, timeout: float = 600) -> tuple[int, str, str]:
        out, err = self.dir / "stdout", self.dir / "stderr"
        self.proc.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd), "out": str(out), "err": str(err),
                                          "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the fork server died (exit status {self.proc.poll()}) running {argv}"
        answer = json.loads(line)
        try:
            return answer["rc"], out.read_text(), err.read_text()
        finally:
            out.unlink(missing_ok=True)
            err.unlink(missing_ok=True)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


def _child(req: dict, devnull: int) -> None:
    """In the forked process: run the command as a fresh interpreter would, then exit with its status."""
    code: object = 1
    try:
        os.chdir(req["cwd"])
        out = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(devnull, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        argv = req["argv"]
        try:
            if argv[0] == "peftc":       # `python -m peftc.cli ARGS`: sys.path[0] is the working folder
                import peftc.cli
                sys.argv = [peftc.cli.__file__, *argv[1:]]
                sys.path[0] = os.getcwd()
                code = peftc.cli.main(argv[1:])
            else:                        # `python SCRIPT ARGS`: sys.path[0] is the script's folder
                import runpy
                sys.argv = [argv[1], *argv[2:]]
                sys.path[0] = os.path.dirname(os.path.realpath(argv[1]))
                runpy.run_path(argv[1], run_name="__main__")   # sets sys.argv[0] to the path as given
                code = 0
        except SystemExit as e:
            code = e.code
        except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
            import traceback
            traceback.print_exc()
            code = 1
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    finally:
        try:
            import atexit
            atexit._run_exitfuncs()   # as the interpreter does at exit (os._exit below skips it)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


def _serve() -> None:
    answers = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)          # whatever the imports print goes nowhere
    import importlib
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - not installed: the command imports it (or fails) itself
            pass
    answers.write("ready\n")
    answers.flush()
    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(req, devnull)
        deadline = time.monotonic() + req["timeout"]
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.02)
        answers.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")
        answers.flush()


if __name__ == "__main__":
    _serve()
