"""Decode speed: onnxruntime-genai on peftc's generation-ready export vs transformers' eager `generate`, one run.

small-llama (hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 8000) with a real peft LoRA (r=8, alpha=16
on q/k/v/o_proj, random weights) saved with save_pretrained. Variants, each generating --new tokens greedily
from the same --prompt-token prompt (batch 1):

- transformers eager `generate` on peft's `merge_and_unload()` of the checkpoint (the merged model) and on the
  unmerged PeftModel (skipped with --quick);
- onnxruntime-genai (`og.Model(OUT_DIR)`, greedy) on `peftc export --with-past --merge` of the same checkpoint,
  and on the unmerged (live adapter) export (skipped with --quick).

Decode tokens per second = (tokens - 1) / the time from the first generated token to the last (the prefill is
left out): transformers' steps are timed by a logits processor (called once per step), genai's by timing each
`generate_next_token()` after the first. Each round runs every variant once in a fresh random order; the table
gives medians over rounds and each variant's ratio to transformers eager on the merged model (median of the
per-round ratios). Tokens are checked equal (genai vs transformers) before timing.

    python benchmarks/bench_generate.py            # 64 new tokens after 32, 7 rounds, 2 threads, 4 variants
    python benchmarks/bench_generate.py --quick    # merged variants only, 32 new tokens, 3 rounds

Writes benchmarks/results/generate.md and generate.json.
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402

from peftc.builtin_models import BUILTINS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import randomize_adapter_, versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
REF = "transformers eager, merged"


class _StepClock:
    """A logits processor that records when each generation step's logits are ready (one call per step)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return scores


def hf_runner(model: torch.nn.Module, prompt: torch.Tensor, new: int) -> Callable[[], tuple[float, list[int]]]:
    from transformers import LogitsProcessorList

    def run() -> tuple[float, list[int]]:
        clock = _StepClock()
        with torch.no_grad():
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0,
                                 logits_processor=LogitsProcessorList([clock]))
        decode = clock.stamps[-1] - clock.stamps[0]
        return (len(clock.stamps) - 1) / decode, out[0, prompt.shape[1]:].tolist()
    return run


def genai_runner(out_dir: Path, prompt: torch.Tensor, new: int, threads: int
                 ) -> Callable[[], tuple[float, list[int]]]:
    import onnxruntime_genai as og
    cfg_file = out_dir / "genai_config.json"
    cfg = json.loads(cfg_file.read_text())
    opts = cfg["model"]["decoder"]["session_options"]
    opts["intra_op_num_threads"] = threads
    cfg["model"]["eos_token_id"] = cfg["model"]["vocab_size"] - 1  # as transformers here: no early stop (checked)
    cfg_file.write_text(json.dumps(cfg, indent=4))
    model = og.Model(str(out_dir))
    ids = prompt.numpy().astype(np.int32)

    def run() -> tuple[float, list[int]]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=ids.shape[1] + new, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        gen.generate_next_token()          # the prefill and the first token: not decode
        t0 = time.perf_counter()
        steps = 0
        while not gen.is_done():
            gen.generate_next_token()
            steps += 1
        decode = time.perf_counter() - t0
        return steps / decode, [int(t) for t in gen.get_sequence(0)][ids.shape[1]:]
    return run


def export(spec: str, model: torch.nn.Module, out: Path, merge: bool) -> float:
    from peftc.emit.generation import export_generation
    from peftc.pipeline import compile_model
    t0 = time.perf_counter()
    compiled = compile_model(spec, copy.deepcopy(model), merge=merge, with_past=True)
    export_generation(compiled.gm, out, model.config)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small-llama", choices=[k for k in BUILTINS if "llama" in k])
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new", type=int, default=64, help="tokens generated per run")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="merged variants only, 32 new tokens, 3 rounds")
    args = ap.parse_args(argv)
    if args.quick:
        args.new, args.rounds = min(args.new, 32), min(args.rounds, 3)
    torch.set_num_threads(args.threads)
    base = BUILTINS[args.model][0]()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, base.config.vocab_size, (1, args.prompt_tokens), generator=g)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                                        init_lora_weights=False))
        randomize_adapter_(pm, seed=1, scale=0.02)
        pm.eval().save_pretrained(str(tmp / "adapter"))
        merged = copy.deepcopy(pm).merge_and_unload().eval()
        spec = f'adapter default: import "{tmp / "adapter"}"\n'
        export_s = {"merged": export(spec, base, tmp / "merged", merge=True)}
        runs = {REF: hf_runner(merged, prompt, args.new),
                "onnxruntime-genai, peftc merged export": genai_runner(tmp / "merged", prompt, args.new, args.threads)}
        if not args.quick:
            export_s["live"] = export(spec, base, tmp / "live", merge=False)
            runs["transformers eager, peft unmerged"] = hf_runner(pm, prompt, args.new)
            runs["onnxruntime-genai, peftc live export"] = genai_runner(tmp / "live", prompt, args.new, args.threads)
        want = runs[REF]()[1]
        mismatch = {k: fn()[1] for k, fn in runs.items()}
        mismatch = {k: v for k, v in mismatch.items() if v != want}
        if mismatch:
            print(f"tokens differ from {REF}: {mismatch}", file=sys.stderr)
            return 1
        load_before = os.getloadavg()[0]
        tps: dict[str, list[float]] = {k: [] for k in runs}
        for r in range(args.rounds):
            order = list(runs)
            random.Random(r).shuffle(order)
            for k in order:
                tps[k].append(runs[k]()[0])
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
        load_after = os.getloadavg()[0]

    rows = []
    for k, v in tps.items():
        rows.append({"variant": k, "tokens_per_s": statistics.median(v),
                     "ratio_vs_transformers": statistics.median(a / b for a, b in zip(v, tps[REF]))})
    env = versions()
    cmd = "python benchmarks/bench_generate.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"`{cmd.strip()}` — {args.model}, LoRA r=8 on q/k/v/o_proj, batch 1, {args.prompt_tokens}-token prompt, "
             f"{args.new} new tokens (greedy; every variant's tokens equal), {args.rounds} interleaved rounds, "
             f"{args.threads} threads; decode tokens/s (prefill excluded), medians; ratio = median of per-round "
             f"ratios to {REF}.  ",
             f"{', '.join(f'{k} {v}' for k, v in env.items())}; load average (1 min) before/after timing: "
             f"{load_before:.2f} / {load_after:.2f}.", "",
             "| variant | decode tokens/s | vs transformers eager (merged) |", "|---|---:|---:|"]
    lines += [f"| {r['variant']} | {r['tokens_per_s']:.1f} | {r['ratio_vs_transformers']:.2f}x |" for r in rows]
    lines += ["", "peftc compile + export + onnxruntime check (`--with-past`): "
              + ", ".join(f"{k} {v:.1f} s" for k, v in export_s.items()) + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "generate.md").write_text(text)
    (RESULTS / "generate.json").write_text(json.dumps(
        {"args": vars(args), "env": env, "load": [load_before, load_after], "rows": rows, "export_s": export_s,
         "tokens_per_s": tps}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
