"""Many LoRA adapters on one base, peftc vs peft, side by side in one process (issue 8's benchmark).

small-llama (hidden 512, intermediate 1376, 4 layers, vocab 8000), LoRA r=16 alpha=32 on every linear layer
(peft's all-linear), 8 saved peft adapters with random weights. Variants, each timed once per round in a fresh
random order, ratio = median over rounds of (time / the eager base's time in that round):

- base eager; for N = 1, 4, 8: peft with N adapters active (`base_model.set_adapter([...])`) and peftc's graph
  with the same N active (one stacked low-rank product per layer);
- a mixed batch (row b takes adapter b % 8): peft's `adapter_names=[...]` and peftc's graph compiled with
  `adapter_ids=True`;
- onnxruntime: peftc's export with `adapter_ids` (the mixed batch) vs peftc's merged export of one adapter;
- decode-shaped rows (batch x 1 token, `--decode-seq`; each timed call runs `--decode-reps` forwards): 1 adapter,
  8 active and the mixed batch, against the eager base at that shape (not a target: a check that the dense
  form peftc picks for long inputs does not slow short ones down).

Target: peftc's overhead over the base (ratio - 1) at most half of peft's, for N = 1, 4, 8 and the mixed batch.
Outputs are checked against peft before timing.

    python benchmarks/bench_many.py                    # 8x128 tokens, 15 rounds, 2 threads
    python benchmarks/bench_many.py --batch 4 --rounds 20
    python benchmarks/bench_many.py --quick            # 3 rounds, no onnxruntime: a minute or two

Writes benchmarks/results/many.md and many.json.
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
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import peft  # noqa: E402
import torch  # noqa: E402

import peftc  # noqa: E402
from peftc.builtin_models import BUILTINS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import logits_of, ort_session, randomize_adapter_, versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
N_ADAPTERS = 8


def _peft_with(base: torch.nn.Module, dirs: list[Path], names: list[str]) -> peft.PeftModel:
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[0]), adapter_name=names[0])
    for d, n in zip(dirs[1:], names[1:]):
        pm.load_adapter(str(d), adapter_name=n)
    pm.base_model.set_adapter(names)
    return pm.eval()


def _spec(dirs: list[Path], names: list[str]) -> str:
    return "".join(f'adapter {n}: import "{d}"\n' for n, d in zip(names, dirs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--decode-seq", type=int, default=1, help="tokens per row of the decode-shaped rows (0: none)")
    ap.add_argument("--decode-reps", type=int, default=10, help="forwards per timed call at the decode shape")
    ap.add_argument("--quick", action="store_true", help="3 rounds and no onnxruntime (a short check)")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.no_onnx = 3, True
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = BUILTINS["small-llama"][0]().eval()
    ids = torch.randint(3, 8000, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    rows = torch.arange(args.batch) % N_ADAPTERS
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    x_ids = {**x, "adapter_ids": rows}
    dec = {k: v[:, :args.decode_seq] for k, v in x.items()}
    dec_ids = {**dec, "adapter_ids": rows}
    reps = args.decode_reps

    def repeat(fn, *a, **kw):
        return lambda: [fn(*a, **kw) for _ in range(reps)]
    runs: dict[str, object] = {}
    diffs: dict[str, float] = {}
    compile_s: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        tmp = Path(tmp)
        dirs = []
        for i, n in enumerate(names):
            cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
            pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
            randomize_adapter_(pm, seed=100 + i, scale=0.02)
            pm.save_pretrained(str(tmp / n))
            dirs.append(tmp / n)
        runs["base eager"] = lambda: base(**x)
        if args.decode_seq:
            runs["base eager decode"] = repeat(base, **dec)
        for k in (1, 4, 8):
            pm = _peft_with(base, dirs[:k], names[:k])
            t0 = time.perf_counter()
            gm = peftc.compile(_spec(dirs[:k], names[:k]), base)
            compile_s[f"{k} active"] = time.perf_counter() - t0
            diffs[f"{k} active"] = (logits_of(gm(**x)) - logits_of(pm(**x))).abs().max().item()
            runs[f"peft {k} active"] = (lambda pm=pm: pm(**x))
            runs[f"peftc {k} active"] = (lambda gm=gm: gm(**x))
            if args.decode_seq and k in (1, 8):
                diffs[f"{k} active decode"] = (logits_of(gm(**dec)) - logits_of(pm(**dec))).abs().max().item()
                runs[f"peft {k} active decode"] = repeat(pm, **dec)
                runs[f"peftc {k} active decode"] = repeat(gm, **dec)
            print(f"{k} active: compiled in {compile_s[f'{k} active']:.1f}s, diff {diffs[f'{k} active']:.1e}",
                  file=sys.stderr)
        adapter_names = [names[i] for i in rows.tolist()]
        runs["peft mixed batch"] = (lambda pm=pm: pm(**x, adapter_names=adapter_names))
        t0 = time.perf_counter()
        gm_ids = peftc.compile(_spec(dirs, names), base, adapter_ids=True)
        compile_s["adapter_ids"] = time.perf_counter() - t0
        diffs["mixed batch"] = (logits_of(gm_ids(**x_ids)) - logits_of(pm(**x, adapter_names=adapter_names))
                                ).abs().max().item()
        runs["peftc mixed batch (adapter_ids)"] = lambda: gm_ids(**x_ids)
        if args.decode_seq:
            runs["peft mixed batch decode"] = repeat(pm, **dec, adapter_names=adapter_names)
            runs["peftc mixed batch decode"] = repeat(gm_ids, **dec_ids)
        print(f"adapter_ids: compiled in {compile_s['adapter_ids']:.1f}s, diff {diffs['mixed batch']:.1e}",
              file=sys.stderr)
        if not args.no_onnx:
            peftc.export_onnx(gm_ids, tmp / "ids.onnx")
            merged = peftc.compile(_spec(dirs[:1], names[:1]), base, merge=True)
            peftc.export_onnx(merged, tmp / "merged.onnx")
            for label, path, feed in (("onnxruntime merged (1 adapter)", tmp / "merged.onnx", x),
                                      ("onnxruntime adapter_ids (mixed batch)", tmp / "ids.onnx", x_ids)):
                sess = ort_session(path, args.threads)
                np_feed = {i.name: feed[i.name].numpy() for i in sess.get_inputs()}
                runs[label] = (lambda s=sess, f=np_feed: s.run(None, f))
            got = torch.from_numpy(runs["onnxruntime adapter_ids (mixed batch)"]()[0])
            want = logits_of(pm(**x, adapter_names=adapter_names))
            diffs["onnxruntime adapter_ids"] = (got - want).abs().max().item()
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

    def ratio(k: str, ref: str = "base eager") -> float:
        return statistics.median(t / b for t, b in zip(times[k], times[ref]))

    table = []
    for label, pk, ck in [("1 adapter", "peft 1 active", "peftc 1 active"),
                          ("4 active", "peft 4 active", "peftc 4 active"),
                          ("8 active", "peft 8 active", "peftc 8 active"),
                          ("mixed batch over 8", "peft mixed batch", "peftc mixed batch (adapter_ids)")]:
        p, c = ratio(pk), ratio(ck)
        share = (c - 1) / (p - 1) if p > 1 else float("nan")
        table.append({"case": label, "peft": p, "peftc": c, "overhead_share": share, "met": share <= 0.5})
    if args.decode_seq:
        shape = f"decode {args.batch}x{args.decode_seq}"
        for label, pk, ck in [(f"1 adapter, {shape}", "peft 1 active decode", "peftc 1 active decode"),
                              (f"8 active, {shape}", "peft 8 active decode", "peftc 8 active decode"),
                              (f"mixed batch, {shape}", "peft mixed batch decode", "peftc mixed batch decode")]:
            p, c = ratio(pk, "base eager decode"), ratio(ck, "base eager decode")
            share = (c - 1) / (p - 1) if p > 1 else float("nan")
            table.append({"case": label, "peft": p, "peftc": c, "overhead_share": share, "met": None})
    ort = None
    if not args.no_onnx:
        ort = ratio("onnxruntime adapter_ids (mixed batch)", "onnxruntime merged (1 adapter)")
    env = versions()
    cmd = "python benchmarks/bench_many.py " + " ".join(sys.argv[1:])
    lines = [f"`{cmd.strip()}` — small-llama, {args.batch}x{args.seq} tokens (decode rows: {args.batch}x"
             f"{args.decode_seq}), LoRA r=16 on all linear layers, "
             f"{args.rounds} interleaved rounds, {args.threads} threads; ratio = median of per-round ratios to the "
             "eager base.  ",
             f"{', '.join(f'{k} {v}' for k, v in env.items())}; load average (1 min) before/after timing: "
             f"{load_before:.2f} / {load_after:.2f}.", "",
             "| case | peft / base | peftc / base | peftc overhead / peft overhead | target <= 0.5 |",
             "|---|---:|---:|---:|:---:|"]
    for row in table:
        lines.append(f"| {row['case']} | {row['peft']:.3f} | {row['peftc']:.3f} | {row['overhead_share']:.2f} | "
                     f"{'-' if row['met'] is None else 'yes' if row['met'] else 'no'} |")
    lines.append("")
    if ort is not None:
        lines.append(f"onnxruntime, mixed batch with `adapter_ids` / onnxruntime merged (one adapter): {ort:.3f}.  ")
    lines.append("max abs diff vs peft: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()) + ".  ")
    lines.append("peftc compile: " + ", ".join(f"{k} {v:.1f} s" for k, v in compile_s.items()) + ".")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "many.md").write_text(text)
    (RESULTS / "many.json").write_text(json.dumps(
        {"args": vars(args), "env": env, "load": [load_before, load_after], "rows": table, "onnx_ids_vs_merged": ort,
         "max_abs_diff_vs_peft": diffs, "compile_s": compile_s,
         "median_ms": {k: 1000 * statistics.median(v) for k, v in times.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
