"""Forward-pass latency of one LoRA, side by side in one process: eager base, peftc (merged/unmerged fx
GraphModule), peft (unmerged PeftModel / merge_and_unload) and onnxruntime (peftc's merged ONNX export).

Every variant computes the same thing: the adapter is a real peft LoRA (init_lora_weights=False, tensors
nudged further at random) saved with save_pretrained, and peftc compiles that same checkpoint through
`adapter default: import "DIR"`. Outputs are checked against peft before anything is timed.

    .venv/bin/python benchmarks/bench_forward.py                 # small-llama, 4x128 tokens, 15 rounds
    .venv/bin/python benchmarks/bench_forward.py --rounds 40 --onnx-unmerged

Timing: after a warmup, each round runs every variant once, in a fresh random order; the table gives each
variant's median and its ratio to the eager base (the median of the per-round ratios, which cancels most
of a noisy machine's drift). Writes benchmarks/results/latest.md and latest.json.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import peftc  # noqa: E402
from peftc.builtin_models import BUILTINS  # noqa: E402

for _name in ("torch", "torch.onnx", "torch.export", "torch._dynamo", "onnxscript"):
    logging.getLogger(_name).setLevel(logging.ERROR)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LOAD = "load"
RESULTS = Path(__file__).resolve().parent / "results"
# ops that torch.export's unlifted module carries and eager code does not run
OVERHEAD_OPS = ("_assert_tensor_metadata", "aten.to.", "_to_copy", "_guards_fn", "sym_size", "sym_constrain")


def logits_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return logits_of(out[0])
    if isinstance(out, dict):
        return logits_of(next(iter(out.values())))
    raise TypeError(f"cannot find logits in {type(out).__name__}")


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def randomize_adapter_(model: torch.nn.Module, seed: int, scale: float) -> int:
    """Nudge every trainable tensor (peft leaves exactly the adapter tensors trainable); returns their count."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
                n += 1
    return n


@contextlib.contextmanager
def phase_timer(into: dict[str, float]) -> Iterator[None]:
    """Record how long each step of peftc's pipeline takes (by wrapping its progress hook)."""
    import peftc.pipeline as pipeline
    original = pipeline.step

    @contextlib.contextmanager
    def step(label: str) -> Iterator[None]:
        t0 = time.perf_counter()
        with original(label):
            yield
        into[label] = into.get(label, 0.0) + time.perf_counter() - t0

    pipeline.step = step
    try:
        yield
    finally:
        pipeline.step = original


def graph_stats(gm: torch.fx.GraphModule) -> dict[str, Any]:
    counts: Counter[str] = Counter()
    for n in gm.graph.nodes:
        if n.op == "call_function":
            counts[str(n.target)] += 1
        elif n.op == "call_module":
            counts[f"call_module:{n.target}"] += 1
    overhead = {k: v for k, v in counts.items() if any(o in k for o in OVERHEAD_OPS)}
    return {"nodes": len(gm.graph.nodes), "calls": sum(counts.values()),
            "linear": counts.get("aten.linear.default", 0), "overhead_ops": dict(sorted(overhead.items()))}


def ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_runner(path: Path, inputs: dict[str, torch.Tensor], threads: int) -> Callable[[], Any]:
    sess = ort_session(path, threads)
    names = [i.name for i in sess.get_inputs()]
    feed = {n: inputs[n].numpy() for n in names}
    return lambda: torch.from_numpy(sess.run(None, feed)[0])


def versions() -> dict[str, str]:
    import onnxruntime
    import peft
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "onnxruntime": onnxruntime.__version__, "peftc": peftc.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small-llama", choices=[k for k in BUILTINS if "llama" in k])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (default 15)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls per variant first (default 3)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch and onnxruntime threads")
    ap.add_argument("--scale", type=float, default=0.02, help="std of the noise added to the adapter tensors")
    ap.add_argument("--onnx-unmerged", action="store_true", help="also time onnxruntime on the unmerged export")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for latest.md / latest.json")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from peft import LoraConfig, PeftModel, get_peft_model

    torch.set_num_threads(args.threads)
    print(f"# building {args.model} and a peft LoRA r=8 alpha=16 on {', '.join(TARGETS)}")
    base = BUILTINS[args.model][0]().eval()
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False)
    work = Path(tempfile.mkdtemp(prefix="peftc-bench-"))
    adapter_dir = work / "adapter"
    trained = get_peft_model(copy.deepcopy(base), cfg)
    n_tensors = randomize_adapter_(trained, args.seed + 1, args.scale)
    trained.save_pretrained(str(adapter_dir))
    del trained
    spec = f'adapter default: import "{adapter_dir.as_posix()}"'

    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    # -- build every variant (and time what a user waits for), after one untimed warm-up of each library
    peftc.compile('adapter w: lora(r = 2) { targets q_proj }', "tiny-llama")
    PeftModel(BUILTINS["tiny-llama"][0](), cfg)
    build: dict[str, float] = {}
    phases: dict[str, dict[str, float]] = {"merged": {}, "unmerged": {}}
    copies = [copy.deepcopy(base) for _ in range(4)]       # copied up front: deepcopy is not what we time
    peft_unmerged, build["peft load (PeftModel.from_pretrained)"] = timed(
        lambda: PeftModel.from_pretrained(copies[0], str(adapter_dir)).eval())
    peft_merged, build["peft load + merge_and_unload"] = timed(
        lambda: PeftModel.from_pretrained(copies[1], str(adapter_dir)).eval().merge_and_unload())
    with phase_timer(phases["merged"]):
        gm_merged, build["peftc compile, merged"] = timed(lambda: peftc.compile(spec, copies[2], merge=True))
    with phase_timer(phases["unmerged"]):
        gm_unmerged, build["peftc compile, unmerged"] = timed(lambda: peftc.compile(spec, copies[3]))
    onnx_merged = work / "merged.onnx"
    check, build["peftc export_onnx, merged (incl. onnxruntime check)"] = timed(
        lambda: peftc.export_onnx(gm_merged, onnx_merged))
    onnx_unmerged = work / "unmerged.onnx"
    if args.onnx_unmerged:
        _, build["peftc export_onnx, unmerged (incl. onnxruntime check)"] = timed(
            lambda: peftc.export_onnx(gm_unmerged, onnx_unmerged))

    def torch_runner(m: torch.nn.Module) -> Callable[[], torch.Tensor]:
        return lambda: logits_of(m(**inputs))

    variants: dict[str, Callable[[], torch.Tensor]] = {
        "base eager (no adapter)": torch_runner(base),
        "peftc merged (fx GraphModule)": torch_runner(gm_merged),
        "peftc unmerged (fx GraphModule)": torch_runner(gm_unmerged),
        "peft unmerged (PeftModel)": torch_runner(peft_unmerged),
        "peft merged (merge_and_unload)": torch_runner(peft_merged),
        "onnxruntime merged (peftc export)": ort_runner(onnx_merged, inputs, args.threads),
    }
    if args.onnx_unmerged:
        variants["onnxruntime unmerged (peftc export)"] = ort_runner(onnx_unmerged, inputs, args.threads)
    BASE, REF = "base eager (no adapter)", "peft unmerged (PeftModel)"

    # -- same answers first
    with torch.no_grad():
        outs = {name: run().detach().float() for name, run in variants.items()}
    diffs = {name: float((o - outs[REF]).abs().max()) for name, o in outs.items()}
    print(f"# {n_tensors} adapter tensors; max |logits - peft unmerged| per variant:")
    for name, dval in diffs.items():
        print(f"#   {name:40s} {dval:.2e}")
    if diffs[BASE] < 1e-3:
        print("error: the adapter barely changes the output; raise --scale", file=sys.stderr)
        return 1
    bad = {n: d for n, d in diffs.items() if n != BASE and d > (1e-3 if "onnx" in n else 1e-4)}
    if bad:
        print(f"error: variants disagree with peft: {bad}", file=sys.stderr)
        return 1

    # -- timing: warmup, then interleaved rounds in a fresh order each round
    load_before = os.getloadavg()[0]
    if load_before > 0.5 * (os.cpu_count() or 1):
        print(f"# warning: 1-minute load average is {load_before:.1f} on {os.cpu_count()} cpus; timings will be noisy")
    rng = random.Random(args.seed)
    times: dict[str, list[float]] = {n: [] for n in variants}
    with torch.no_grad():
        for _ in range(args.warmup):
            for run in variants.values():
                run()
        print(f"# timing {len(variants)} variants x {args.rounds} rounds at {args.batch}x{args.seq} tokens ...")
        for _ in range(args.rounds):
            order = list(variants)
            rng.shuffle(order)
            for name in order:
                t0 = time.perf_counter()
                variants[name]()
                times[name].append((time.perf_counter() - t0) * 1e3)

    load = (load_before, os.getloadavg()[0])
    rows = []
    for name, ts in times.items():
        paired = statistics.median(t / b for t, b in zip(ts, times[BASE]))
        q = np.percentile(ts, [25, 75])
        rows.append({"variant": name, "median_ms": statistics.median(ts), "p25_ms": float(q[0]), "p75_ms": float(q[1]),
                     "ratio_vs_base": paired, "max_abs_diff_vs_peft": diffs[name], "times_ms": ts})
    by = {r["variant"]: r for r in rows}
    merged_ratio = by["peftc merged (fx GraphModule)"]["ratio_vs_base"]
    unmerged_vs_peft = statistics.median(
        a / b for a, b in zip(times["peftc unmerged (fx GraphModule)"], times[REF]))
    targets = [
        ("peftc merged graph <= 1.02x base eager", f"{merged_ratio:.3f}x", merged_ratio <= 1.02),
        ("peftc unmerged <= peft unmerged", f"{unmerged_vs_peft:.3f}x", unmerged_vs_peft <= 1.0),
    ]
    stats = {"peftc merged": graph_stats(gm_merged), "peftc unmerged": graph_stats(gm_unmerged)}

    env = versions()
    cmd = "python benchmarks/bench_forward.py " + " ".join(argv if argv is not None else sys.argv[1:])
    env[LOAD] = f"{load[0]:.2f} / {load[1]:.2f}"
    md = render(args, env, cmd.strip(), rows, targets, build, stats, check, phases)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.md").write_text(md)
    (args.out / "latest.json").write_text(json.dumps({
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": cmd.strip(), "env": env,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "variants": rows, "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in targets],
        "build_seconds": build, "compile_steps_seconds": phases, "graphs": stats}, indent=1))
    print(f"wrote {args.out / 'latest.md'} and latest.json")
    return 0


def render(args: argparse.Namespace, env: dict[str, str], cmd: str, rows: list[dict], targets: list,
           build: dict[str, float], stats: dict[str, dict], check: Any, phases: dict[str, dict[str, float]]) -> str:
    lines = [f"## Forward latency: {args.model}, LoRA r=8 on {', '.join(TARGETS)}, batch {args.batch}x{args.seq}",
             "",
             f"`{cmd}` — {args.rounds} interleaved rounds, median; ratio = median of per-round ratios to the "
             "eager base.  ",
             "  ".join(f"{k} {v}" for k, v in env.items() if k not in ("machine", LOAD)) + f"; {env['machine']}; "
             f"load average (1 min) before/after timing: {env[LOAD]}.",
             "",
             "| variant | median ms | p25–p75 ms | ratio vs base eager | max abs diff vs peft |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['median_ms']:.1f} | {r['p25_ms']:.1f}–{r['p75_ms']:.1f} | "
                     f"{r['ratio_vs_base']:.3f} | {r['max_abs_diff_vs_peft']:.1e} |")
    lines += ["", "| target | measured | met |", "|---|---:|:---:|"]
    lines += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in targets]
    lines += ["", "| one-off cost | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in build.items()]
    for kind, ph in phases.items():
        lines += ["", f"peftc compile, {kind}, by step: " + ", ".join(f"{k} {v:.2f} s" for k, v in ph.items()) + "."]
    if check is not None:
        lines += ["", f"onnxruntime check inside export_onnx: max abs diff {check.max_abs_diff:.1e} "
                      f"({', '.join(f'{k} {v}' for k, v in check.input_shapes.items())})."]
    lines += ["", "| graph | nodes | call nodes | aten.linear | bookkeeping ops (asserts, casts, guards) |",
              "|---|---:|---:|---:|---|"]
    for name, s in stats.items():
        over = ", ".join(f"{k} x{v}" for k, v in s["overhead_ops"].items()) or "-"
        lines.append(f"| {name} | {s['nodes']} | {s['calls']} | {s['linear']} | {over} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
