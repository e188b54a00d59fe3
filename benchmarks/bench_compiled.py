"""torch.compile (inductor) of peftc's unmerged graph vs compiled peft vs the compiled base (issue 10, item 4).

small-llama (hidden 512, intermediate 1376, 4 layers, vocab 8000); LoRA and DoRA, r=16 alpha=32 on q/k/v/o
(random weights, saved by peft). In one process, each variant compiled with `torch.compile` (inductor, default
mode, static shapes, inductor's caches off so every compile is cold) and run under `torch.no_grad()`:

- base compiled; peft LoRA / DoRA compiled (`torch.compile(PeftModel)`); peftc LoRA / DoRA compiled
  (`torch.compile(peftc.compile(...))`, an inference compile: DoRA's weight norm is a stored constant);
- the same four adapters eager, for the DoRA-vs-LoRA comparison without a compiler.

Each round times every variant once, in a fresh random order. Ratios are medians over rounds of paired ratios
(time / the compiled base's time in that round; DoRA / LoRA of the same library in that round).

Compile time is what a user waits for: the first call's wall time (dynamo + inductor) of `torch.compile(model)` in
a fresh Python process that compiles only that model, with an empty inductor cache directory (so every kernel
is generated and built by the C++ compiler; a throw-away compile of a tiny model first takes inductor's one-time
costs), the median of `--compile-runs` processes per variant, run alternately. (Compiling five models one
after another in one process charges each later one for dynamo state the earlier ones left; the in-process first-call
times are kept in compiled.json as `in_process_compile_s`.) peftc's own compile (tracing and passes) is listed beside.

Targets: peftc compiled LoRA / compiled base <= 1.03; peftc's torch.compile time <= peft's; DoRA / LoRA
(compiled, peftc) <= 1.10. Outputs are checked against peft before timing.

    python benchmarks/bench_compiled.py            # 4x128 tokens, 15 rounds, 2 threads
    python benchmarks/bench_compiled.py --quick    # 2x64 tokens, 5 rounds, 1 fresh-process compile per variant

Writes benchmarks/results/compiled.md and compiled.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")    # cold compiles: no cache hit from an earlier run
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")
warnings.filterwarnings("ignore")

import peft  # noqa: E402
import torch  # noqa: E402

import peftc  # noqa: E402
from peftc.builtin_models import BUILTINS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import logits_of, randomize_adapter_, versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _compiled(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> tuple[object, float]:
    """torch.compile(model) and the wall time of its first (compiling) call (no dynamo reset: the models compiled
    before keep their compiled code)."""
    fn = torch.compile(model, dynamic=False)
    t0 = time.perf_counter()
    fn(**x)
    return fn, time.perf_counter() - t0


VARIANTS = ("base", "peft lora", "peftc lora", "peft dora", "peftc dora")


def _child(variant: str, adapter_dir: str, batch: int, seq: int, threads: int) -> None:
    """Runs in a fresh process: build one variant, compile it, print the first call's wall time as JSON."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    base = BUILTINS["small-llama"][0]().eval()
    ids = torch.randint(3, 8000, (batch, seq), generator=torch.Generator().manual_seed(1))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        _compiled(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()), {"input": torch.randn(2, 8)})
        t0 = time.perf_counter()
        if variant == "base":
            model = base
        elif variant.startswith("peftc "):
            model = peftc.compile(f'adapter default: import "{adapter_dir}"', base)
        else:
            model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
        prepare = time.perf_counter() - t0
        _, seconds = _compiled(model, x)
    print(json.dumps({"variant": variant, "compile_s": seconds, "prepare_s": prepare}))


def _fresh_compile_times(dirs: dict[str, str], args: argparse.Namespace) -> tuple[dict[str, list[float]],
                                                                                 dict[str, list[float]]]:
    """Each variant compiled in its own fresh process, `args.compile_runs` times, variants alternating: the
    torch.compile first-call times, and the times to get the model to compile (peft's `from_pretrained`, peftc's
    `compile`)."""
    out: dict[str, list[float]] = {v: [] for v in VARIANTS}
    prep: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for run in range(args.compile_runs):
        order = list(VARIANTS) if run % 2 == 0 else list(VARIANTS)[::-1]
        for v in order:
            cmd = [sys.executable, __file__, "--child", v, "--child-adapter", dirs.get(v.split()[-1], ""),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)]
            with tempfile.TemporaryDirectory() as cache:   # inductor's on-disk caches (compiled kernels) start empty
                env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
                res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            got = json.loads(res.stdout.strip().splitlines()[-1])
            out[v].append(got["compile_s"])
            prep[v].append(got["prepare_s"])
            print(f"fresh-process compile {run + 1}/{args.compile_runs}: {v} {out[v][-1]:.1f}s", file=sys.stderr)
    return out, prep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile-runs", type=int, default=3, help="fresh processes per variant for compile time")
    ap.add_argument("--quick", action="store_true", help="2x64 tokens, 5 rounds, 1 compile run")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-adapter", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.child_adapter, args.batch, args.seq, args.threads)
        return
    if args.quick:
        args.batch, args.seq, args.rounds, args.compile_runs = 2, 64, 5, 1
    torch.set_num_threads(args.threads)
    torch._dynamo.config.cache_size_limit = 64   # several models share LlamaForCausalLM.forward's cache
    torch.manual_seed(0)
    base = BUILTINS["small-llama"][0]().eval()
    ids = torch.randint(3, 8000, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    runs: dict[str, object] = {}
    diffs: dict[str, float] = {}
    compile_s: dict[str, float] = {}   # in-process first calls (informational)
    peftc_s: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        # one-time costs (inductor's imports, worker pool, codecache) go to a throw-away compile, not the first row
        _compiled(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()), {"input": torch.randn(2, 8)})
        fn, compile_s["base"] = _compiled(base, x)
        runs["base compiled"] = (lambda fn=fn: fn(**x))
        for method, dora in (("lora", False), ("dora", True)):
            cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False,
                                  use_dora=dora)
            pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
            randomize_adapter_(pm, seed=100, scale=0.02)
            pm.save_pretrained(str(Path(tmp) / method))
            t0 = time.perf_counter()
            gm = peftc.compile(f'adapter default: import "{Path(tmp) / method}"', copy.deepcopy(base))
            peftc_s[method] = time.perf_counter() - t0
            ref = logits_of(pm(**x))
            pairs = [("peft", pm), ("peftc", gm)]
            for lib, model in (pairs if method == "lora" else pairs[::-1]):   # neither library always goes first
                runs[f"{lib} {method} eager"] = (lambda m=model: m(**x))
                fn, compile_s[f"{lib} {method}"] = _compiled(model, x)
                runs[f"{lib} {method} compiled"] = (lambda fn=fn: fn(**x))
                diffs[f"{lib} {method} compiled"] = (logits_of(fn(**x)) - ref).abs().max().item()
                print(f"{lib} {method}: torch.compile {compile_s[f'{lib} {method}']:.1f}s, "
                      f"diff vs peft eager {diffs[f'{lib} {method} compiled']:.1e}", file=sys.stderr)
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
        fresh, prep = _fresh_compile_times({m: str(Path(tmp) / m) for m in ("lora", "dora")}, args)
    fresh_s = {v: statistics.median(ts) for v, ts in fresh.items()}
    prep_s = {v: statistics.median(ts) for v, ts in prep.items()}

    def ratio(k: str, ref: str = "base compiled") -> float:
        return statistics.median(t / b for t, b in zip(times[k], times[ref]))

    rows = []
    for lib in ("peft", "peftc"):
        lora_c, dora_c = ratio(f"{lib} lora compiled"), ratio(f"{lib} dora compiled")
        rows.append({"library": lib, "lora_vs_base": lora_c, "dora_vs_base": dora_c,
                     "dora_vs_lora_compiled": ratio(f"{lib} dora compiled", f"{lib} lora compiled"),
                     "dora_vs_lora_eager": ratio(f"{lib} dora eager", f"{lib} lora eager"),
                     "compile_lora_s": fresh_s[f"{lib} lora"], "compile_dora_s": fresh_s[f"{lib} dora"]})
    ours = rows[1]
    met = {"lora <= 1.03 x base": ours["lora_vs_base"] <= 1.03,
           "torch.compile time <= peft's": ours["compile_lora_s"] <= rows[0]["compile_lora_s"]
           and ours["compile_dora_s"] <= rows[0]["compile_dora_s"],
           "dora / lora <= 1.10": ours["dora_vs_lora_compiled"] <= 1.10}
    env = versions()
    cmd = "python benchmarks/bench_compiled.py " + " ".join(sys.argv[1:])
    lines = [f"`{cmd.strip()}` — small-llama, {args.batch}x{args.seq} tokens, LoRA / DoRA r=16 on q/k/v/o, "
             f"torch.compile (inductor, cold), {args.rounds} interleaved rounds; compile times: median of "
             f"{args.compile_runs} fresh processes per variant, {args.threads} threads; ratios are "
             "medians of per-round paired ratios.  ",
             f"{', '.join(f'{k} {v}' for k, v in env.items())}; load average (1 min) before/after timing: "
             f"{load_before:.2f} / {load_after:.2f}.", "",
             "| library | LoRA / base (compiled) | DoRA / base (compiled) | DoRA / LoRA (compiled) | "
             "DoRA / LoRA (eager) | torch.compile LoRA | torch.compile DoRA |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['library']} | {row['lora_vs_base']:.3f} | {row['dora_vs_base']:.3f} | "
                     f"{row['dora_vs_lora_compiled']:.3f} | {row['dora_vs_lora_eager']:.3f} | "
                     f"{row['compile_lora_s']:.1f} s | {row['compile_dora_s']:.1f} s |")
    lines.append("")
    lines.append(f"Compiled base: torch.compile {fresh_s['base']:.1f} s. Each process's time: "
                 + "; ".join(f"{v} " + ", ".join(f"{t:.1f}" for t in ts) for v, ts in fresh.items()) + ".  ")
    lines.append("Getting the model to compile, in the same processes (peft `PeftModel.from_pretrained`, peftc "
                 "`peftc.compile`), median: " + ", ".join(f"{v} {prep_s[v]:.1f} s" for v in VARIANTS if v != "base")
                 + "; with torch.compile: " + ", ".join(f"{v} {prep_s[v] + fresh_s[v]:.1f} s" for v in VARIANTS
                                                        if v != "base") + ".  ")
    lines.append("In one process, one after another (not the target's measure): "
                 + ", ".join(f"{k} {v:.1f} s" for k, v in compile_s.items()) + ".  ")
    lines.append("peftc's own compile (trace + passes): "
                 + ", ".join(f"{k} {v:.1f} s" for k, v in peftc_s.items()) + ".  ")
    lines.append("Targets: " + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in met.items()) + ".  ")
    lines.append("max abs diff vs peft (eager): " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()) + ".")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compiled.md").write_text(text)
    (RESULTS / "compiled.json").write_text(json.dumps(
        {"args": vars(args), "env": env, "load": [load_before, load_after], "rows": rows, "targets_met": met,
         "compile_s": fresh_s, "compile_runs_s": fresh,
         "prepare_s": prep_s,
         "in_process_compile_s": compile_s, "peftc_compile_s": peftc_s, "max_abs_diff_vs_peft": diffs,
         "median_ms": {k: 1000 * statistics.median(v) for k, v in times.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
