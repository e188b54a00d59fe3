"""Switching adapters without recompiling (issue 9's benchmark), side by side in one process.

small-llama (hidden 512, 4 layers, vocab 8000), two saved peft LoRA adapters (r=16 and r=8, all linear layers,
random weights). Each switch is timed once per round, rounds interleaved in random order, medians reported:

- peft `load_adapter` (a checkpoint into a PeftModel that already holds one; deleted again after each round) and
  `set_adapter` (between two loaded adapters);
- peftc in place: the compiled module's own `load_adapter` / `set_adapter` (see `peftc_inplace_switch`; "n/a"
  while the compiled module has no such methods);
- onnxruntime, merged exports: switching means creating a new InferenceSession on the other adapter's model;
- onnxruntime, one model with adapters as inputs (`peftc export --adapters-as-inputs`): a RunOptions with the
  other, preloaded `LoraAdapter` (`add_active_adapter`), no session reload; loading an `.onnx_adapter` file
  (`LoraAdapter.Load`) is timed too.

Then one forward at BATCHxSEQ tokens: onnxruntime with adapters as inputs (a file active, and none) vs the merged
export of the same adapter, interleaved, median ms and ratio. Outputs are checked against peft first.

    python benchmarks/bench_switch.py               # 4x128 tokens, 15 rounds, 2 threads
    python benchmarks/bench_switch.py --quick       # 1x32 tokens, 3 rounds (a smoke run)

Writes benchmarks/results/switch.md and switch.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402

import peftc  # noqa: E402
from peftc.builtin_models import BUILTINS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import ort_session, randomize_adapter_, versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RANKS = {"a0": 16, "a1": 8}


# ---------------------------------------------------------------------------------------------------------------
# peftc in-place switch: the compiled module's own adapter methods (peftc.runtime), on a module compiled with a
# spare slot at rank 16 (`max_adapters=2, max_rank=16`), so the r=8 checkpoint loads zero-padded, with no retrace.
def peftc_inplace_switch(gm: Any, adapter_dir: Path, name: str, other: str) -> dict[str, Callable[[], Any]] | None:
    """{'load_adapter': fn, 'set_adapter': fn} timing peftc's in-place switch on the compiled module `gm` (holding
    adapter `other`), or None when `gm` has no `load_adapter` method."""
    if not hasattr(gm, "load_adapter"):
        return None
    state = {"loaded": False}

    def load() -> Any:
        if state["loaded"] and hasattr(gm, "delete_adapter"):
            gm.delete_adapter(name)
        gm.load_adapter(str(adapter_dir), adapter_name=name)
        state["loaded"] = True

    def switch() -> Any:
        if not state["loaded"]:
            load()
        current = gm.active_adapters() if hasattr(gm, "active_adapters") else None
        gm.set_adapter(other if current in ([name], name) else name)

    return {"load_adapter": load, "set_adapter": switch}
# ---------------------------------------------------------------------------------------------------------------


def _median_ms(xs: list[float]) -> float:
    return 1000 * statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1x32 tokens, 3 rounds: a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.batch, args.seq = 3, 1, 32
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import onnxruntime as ort

    from peftc.emit.onnx_adapters import adapter_session
    base = BUILTINS["small-llama"][0]().eval()
    ids = torch.randint(3, 8000, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    feed = {k: v.numpy() for k, v in x.items()}
    diffs: dict[str, float] = {}
    one_off: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        tmp = Path(tmp)
        dirs = {}
        for i, (n, r) in enumerate(RANKS.items()):
            cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False)
            pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
            randomize_adapter_(pm, seed=200 + i, scale=0.02)
            pm.save_pretrained(str(tmp / n))
            dirs[n] = tmp / n
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(dirs["a0"]), adapter_name="a0").eval()
        pm.load_adapter(str(dirs["a1"]), adapter_name="a1")
        want = {}
        for n in RANKS:
            pm.set_adapter(n)
            want[n] = pm(**x).logits.numpy()

        # onnxruntime: merged exports (one model per adapter) and one model with adapters as inputs
        merged = {}
        for n in RANKS:
            t0 = time.perf_counter()
            gm = peftc.compile(f'adapter {n}: import "{dirs[n]}"\n', base, merge=True)
            peftc.export_onnx(gm, tmp / f"merged_{n}.onnx")
            one_off[f"peftc export, merged ({n})"] = time.perf_counter() - t0
            merged[n] = tmp / f"merged_{n}.onnx"
        t0 = time.perf_counter()
        gm = peftc.compile(f'adapter a0: import "{dirs["a0"]}"\n', base, adapters_as_inputs=True)
        done = peftc.export_onnx(gm, tmp / "switch.onnx", adapters_as_inputs=True)
        one_off["peftc export --adapters-as-inputs (a0, incl. check)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        peftc.export_adapter(dirs["a1"], done.model, tmp / "a1.onnx_adapter", model=base)
        one_off["peftc export-adapter (a1, incl. compile and check)"] = time.perf_counter() - t0
        files = {"a0": done.adapters["a0"], "a1": tmp / "a1.onnx_adapter"}
        sess_sw = adapter_session(done.model)
        lora = {}
        for n, f in files.items():
            lora[n] = ort.LoraAdapter()
            lora[n].Load(str(f))
        opts = {}
        for n in RANKS:
            opts[n] = ort.RunOptions()
            opts[n].add_active_adapter(lora[n])
        for n in RANKS:
            diffs[f"onnxruntime adapters as inputs, {n}"] = float(np.abs(sess_sw.run(None, feed, opts[n])[0]
                                                                         - want[n]).max())
            s = ort_session(merged[n], args.threads)
            diffs[f"onnxruntime merged, {n}"] = float(np.abs(s.run(None, feed)[0] - want[n]).max())
        with pm.disable_adapter():
            base_logits = pm(**x).logits.numpy()
        diffs["onnxruntime adapters as inputs, no adapter vs base"] = float(np.abs(sess_sw.run(None, feed)[0]
                                                                              - base_logits).max())
        print("max abs diff vs peft: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()), file=sys.stderr)

        # switches (each timed once per round)
        state = {"peft": "a1"}

        def peft_load() -> None:
            if "a2" in pm.peft_config:
                pm.delete_adapter("a2")
            pm.load_adapter(str(dirs["a1"]), adapter_name="a2")

        def peft_set() -> None:
            state["peft"] = "a0" if state["peft"] == "a1" else "a1"
            pm.set_adapter(state["peft"])

        def ort_new_session() -> None:
            ort_session(merged["a1"], args.threads)

        def ort_switch() -> None:
            ro = ort.RunOptions()
            ro.add_active_adapter(lora["a1"])

        def ort_load_file() -> None:
            ad = ort.LoraAdapter()
            ad.Load(str(files["a1"]))

        switches: dict[str, Callable[[], Any] | None] = {
            "peft load_adapter (a checkpoint, into a loaded PeftModel)": peft_load,
            "peft set_adapter (between two loaded adapters)": peft_set,
        }
        live = peftc.compile(f'adapter a0: import "{dirs["a0"]}"\n', base, max_adapters=2, max_rank=16)
        inplace = peftc_inplace_switch(live, dirs["a1"], "a1", "a0")
        switches["peftc load_adapter in place (compiled module)"] = inplace["load_adapter"] if inplace else None
        switches["peftc set_adapter in place (compiled module)"] = inplace["set_adapter"] if inplace else None
        switches["onnxruntime: a new InferenceSession (merged model of the other adapter)"] = ort_new_session
        switches["onnxruntime: LoraAdapter.Load (an .onnx_adapter file)"] = ort_load_file
        switches["onnxruntime: RunOptions.add_active_adapter (preloaded LoraAdapter), no reload"] = ort_switch

        # forwards
        sess_merged = ort_session(merged["a0"], args.threads)
        sess_sw = adapter_session(done.model)
        forwards = {
            "onnxruntime merged (a0)": lambda: sess_merged.run(None, feed),
            "onnxruntime adapters as inputs, a0 active": lambda: sess_sw.run(None, feed, opts["a0"]),
            "onnxruntime adapters as inputs, no adapter": lambda: sess_sw.run(None, feed),
        }
        runs = {**{k: v for k, v in switches.items() if v is not None}, **forwards}
        for fn in runs.values():   # warm up
            fn()
        load_before = os.getloadavg()[0]
        times: dict[str, list[float]] = {k: [] for k in runs}
        for r in range(args.rounds):
            order = list(runs)
            random.Random(r).shuffle(order)
            for k in order:
                t0 = time.perf_counter()
                runs[k]()
                times[k].append(time.perf_counter() - t0)
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
        load_after = os.getloadavg()[0]

    ref = "onnxruntime merged (a0)"
    env = versions()
    cmd = "python benchmarks/bench_switch.py " + " ".join(sys.argv[1:])
    lines = [f"`{cmd.strip()}` — small-llama, LoRA on all linear layers (a0: r=16, a1: r=8), {args.rounds} "
             f"interleaved rounds, {args.threads} threads, median.  ",
             f"{', '.join(f'{k} {v}' for k, v in env.items())}; load average (1 min) before/after timing: "
             f"{load_before:.2f} / {load_after:.2f}.", "",
             "| switching to another adapter | median ms |", "|---|---:|"]
    for k, fn in switches.items():
        lines.append(f"| {k} | {_median_ms(times[k]):.3f} |" if fn is not None else f"| {k} | n/a |")
    lines += ["", f"| forward, {args.batch}x{args.seq} tokens | median ms | ratio vs merged |", "|---|---:|---:|"]
    for k in forwards:
        ratio = statistics.median(t / b for t, b in zip(times[k], times[ref]))
        lines.append(f"| {k} | {_median_ms(times[k]):.1f} | {ratio:.3f} |")
    lines += ["", "max abs diff vs peft: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()) + ".  ",
              "one-off: " + ", ".join(f"{k} {v:.1f} s" for k, v in one_off.items()) + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "switch.md").write_text(text)
    (RESULTS / "switch.json").write_text(json.dumps(
        {"args": vars(args), "env": env, "load": [load_before, load_after], "max_abs_diff_vs_peft": diffs,
         "one_off_s": one_off,
         "median_ms": {k: (_median_ms(times[k]) if k in times else None) for k in [*switches, *forwards]}},
        indent=2) + "\n")


if __name__ == "__main__":
    main()
