"""Unmerged forward overhead of every additive and rotation method, peftc vs peft, side by side in one process.

For each method a real peft adapter (non-identity weights) on small-llama's attention projections is saved with
save_pretrained; peftc compiles that same checkpoint (`import "DIR"`, unmerged). Outputs are checked against peft
before timing. Each round runs eager base, peft and peftc once per method in a fresh random order; a variant's
ratio is the median over rounds of (its time / the base time of that round). Overhead = ratio - 1.

Also counts each method file's lines next to the lines of peft's implementation of the same method (its tuner
package: config, layer, model).

    .venv/bin/python benchmarks/bench_methods.py                      # all methods, 4x128 tokens, 10 rounds
    .venv/bin/python benchmarks/bench_methods.py --methods lora vera --rounds 20

Writes benchmarks/results/methods.md and methods.json.
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
from bench_forward import logits_of  # noqa: E402

from peftc.resources import data_dir  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]

# method -> (peft config, peft tuner package holding its implementation)
CONFIGS = {
    "lora": (lambda: peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False), "lora"),
    "dora": (lambda: peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, use_dora=True,
                                     init_lora_weights=False), "lora"),
    "ia3": (lambda: peft.IA3Config(target_modules=TARGETS, feedforward_modules=[], init_ia3_weights=False), "ia3"),
    "adalora": (lambda: peft.AdaLoraConfig(init_r=16, target_r=8, total_step=100, target_modules=TARGETS), "adalora"),
    "loha": (lambda: peft.LoHaConfig(r=8, alpha=16, target_modules=TARGETS, init_weights=False), "loha"),
    "lokr": (lambda: peft.LoKrConfig(r=8, alpha=16, target_modules=TARGETS, init_weights=False), "lokr"),
    "vera": (lambda: peft.VeraConfig(r=256, target_modules=TARGETS), "vera"),
    "delora": (lambda: peft.DeloraConfig(r=16, target_modules=TARGETS, init_weights=False), "delora"),
    "miss": (lambda: peft.MissConfig(r=64, target_modules=TARGETS, init_weights=False), "miss"),
    "fourierft": (lambda: peft.FourierFTConfig(n_frequency=1000, target_modules=TARGETS), "fourierft"),
    "c3a": (lambda: peft.C3AConfig(block_size=64, target_modules=TARGETS), "c3a"),
    "shira": (lambda: peft.ShiraConfig(r=16, target_modules=TARGETS, init_weights=False), "shira"),
    "vblora": (lambda: peft.VBLoRAConfig(r=4, num_vectors=64, vector_length=64, topk=2, target_modules=TARGETS),
               "vblora"),
    "randlora": (lambda: peft.RandLoraConfig(r=32, target_modules=TARGETS), "randlora"),
    "waveft": (lambda: peft.WaveFTConfig(n_frequency=2592, target_modules=TARGETS, init_weights=False), "waveft"),
    "oft": (lambda: peft.OFTConfig(oft_block_size=32, target_modules=TARGETS, init_weights=False), "oft"),
    "boft": (lambda: peft.BOFTConfig(boft_block_size=8, target_modules=TARGETS, init_weights=False), "boft"),
    "hra": (lambda: peft.HRAConfig(r=8, target_modules=TARGETS), "hra"),
    "road": (lambda: peft.RoadConfig(variant="road_2", group_size=64, target_modules=TARGETS), "road"),
    "osf": (lambda: peft.OSFConfig(target_modules=TARGETS), "osf"),
}


def _peft_lines(package: str) -> int:
    root = Path(peft.__file__).parent / "tuners" / package
    return sum(len(p.read_text().splitlines()) for p in root.glob("*.py"))


def _method_lines(method: str) -> int:
    f = data_dir("passes") / f"{'lora' if method == 'dora' else method}.peft"
    return len(f.read_text().splitlines())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="*", default=list(CONFIGS))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    build = BUILTINS["small-llama"][0]
    torch.manual_seed(0)
    base = build().eval()
    ids = torch.randint(3, 8000, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    variants: dict[str, object] = {"base": base}
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for m in args.methods:
            make, package = CONFIGS[m]
            torch.manual_seed(1)
            pm = peft.get_peft_model(copy.deepcopy(base), make()).eval()
            g = torch.Generator().manual_seed(2)
            for p in pm.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
            d = Path(tmp) / m
            pm.save_pretrained(str(d))
            t0 = time.perf_counter()
            gm = peftc.compile(f'adapter default: import "{d}"', base)
            compile_s = time.perf_counter() - t0
            diff = (logits_of(gm(**x)) - logits_of(pm(**x))).abs().max().item()
            variants[f"peft {m}"], variants[f"peftc {m}"] = pm, gm
            rows.append({"method": m, "max_abs_diff_vs_peft": diff, "compile_s": compile_s,
                         "method_file_lines": _method_lines(m), "peft_lines": _peft_lines(package)})
            print(f"{m}: compiled in {compile_s:.1f}s, max abs diff vs peft {diff:.1e}", file=sys.stderr)
        for v in variants.values():   # warm up
            v(**x)
        times: dict[str, list[float]] = {k: [] for k in variants}
        for r in range(args.rounds):
            order = list(variants)
            random.Random(r).shuffle(order)
            for k in order:
                t0 = time.perf_counter()
                variants[k](**x)
                times[k].append(time.perf_counter() - t0)
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
    for row in rows:
        m = row["method"]
        for who in ("peft", "peftc"):
            ratios = [t / b for t, b in zip(times[f"{who} {m}"], times["base"])]
            row[f"{who}_ratio"] = statistics.median(ratios)
        row["overhead_ratio"] = (row["peftc_ratio"] - 1) / max(row["peft_ratio"] - 1, 1e-9)
    lines = [f"# Unmerged forward overhead per method (small-llama, {args.batch}x{args.seq} tokens, "
             f"{args.rounds} rounds, {args.threads} threads; median of per-round ratios to the eager base)", "",
             "| method | peft / base | peftc / base | peftc overhead / peft overhead | max diff vs peft | "
             "method file lines | peft lines |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['peft_ratio']:.3f} | {row['peftc_ratio']:.3f} | "
                     f"{row['overhead_ratio']:.2f} | {row['max_abs_diff_vs_peft']:.1e} | {row['method_file_lines']} | "
                     f"{row['peft_lines']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "methods.md").write_text(text)
    (RESULTS / "methods.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
