"""Switching adapters at run time, peftc vs peft (issue 9's benchmark, torch part).

small-llama (hidden 512, 4 layers), LoRA r=16 alpha=32 on every linear layer (peft's all-linear), saved peft
checkpoints with random weights. Each operation is timed `--rounds` times (median, milliseconds):

- set_adapter: switch the active adapter between two loaded ones (peft: `base_model.set_adapter`; peftc: the
  compiled module's `set_adapter`, which writes gate buffers);
- hot swap: replace the active adapter's weights with another checkpoint (peft: `peft.utils.hotswap.hotswap_adapter`;
  peftc: `load_adapter(..., hotswap=True)`, which reads, plans and checks the checkpoint, then copies in place);
  and (peftc only) a checkpoint of another rank and alpha, which peftc checks layer by layer on the dense update;
- load: a new adapter from its checkpoint folder (peft: `load_adapter`; peftc: `load_adapter` into a spare slot),
  then deleted again (not timed);
- the first forward after a hot swap under `torch.compile` (peftc; no recompilation), next to a steady forward.

Outputs are checked against peft after each kind of switch. (Re-creating an onnxruntime session for another
adapter is measured with the ONNX adapter files, in the onnxruntime part of this benchmark.)

    python benchmarks/bench_runtime.py            # 10 rounds
    python benchmarks/bench_runtime.py --quick    # 3 rounds, no torch.compile

Writes benchmarks/results/runtime.md and runtime.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
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
from peft.utils.hotswap import hotswap_adapter  # noqa: E402

import peftc  # noqa: E402
from peftc.builtin_models import BUILTINS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import logits_of, randomize_adapter_, versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _ms(fn, rounds: int, before=None) -> float:
    times = []
    for i in range(rounds):
        if before is not None:
            before(i)
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="3 rounds, no torch.compile")
    args = ap.parse_args()
    rounds = 3 if args.quick else args.rounds
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = BUILTINS["small-llama"][0]().eval()
    ids = torch.randint(3, 8000, (2, 64), generator=torch.Generator().manual_seed(1))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    rows: dict[str, tuple[float, float | None]] = {}
    diffs: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        tmp = Path(tmp)
        dirs = []
        for i in range(4):   # a3: another rank and alpha (zero-padded into the rank-16 slot; scale in its gates)
            r, alpha = (16, 32) if i < 3 else (8, 4)
            cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", init_lora_weights=False)
            pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
            randomize_adapter_(pm, seed=100 + i, scale=0.02)
            pm.save_pretrained(str(tmp / f"a{i}"))
            dirs.append(tmp / f"a{i}")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[0]), adapter_name="a").eval()
        pm.load_adapter(str(dirs[1]), adapter_name="b")
        t0 = time.perf_counter()
        gm = peftc.compile(f'adapter a: import "{dirs[0]}"\nadapter b: import "{dirs[1]}"\nactive a\n', base,
                           max_adapters=3, max_rank=16)
        compile_s = time.perf_counter() - t0

        def check(label: str) -> None:
            diffs[label] = (logits_of(gm(**x)) - logits_of(pm(**x))).abs().max().item()
            print(f"{label}: max abs diff vs peft {diffs[label]:.1e}", file=sys.stderr)

        check("start")
        names = ["a", "b"]
        rows["set_adapter"] = (_ms(lambda i: pm.base_model.set_adapter(names[i % 2]), rounds),
                               _ms(lambda i: gm.set_adapter(names[i % 2]), rounds))
        pm.base_model.set_adapter("a")
        gm.set_adapter("a")
        check("set_adapter")
        rows["hot swap"] = (_ms(lambda i: hotswap_adapter(pm, str(dirs[2 - i % 2]), adapter_name="a"), rounds),
                            _ms(lambda i: gm.load_adapter(dirs[2 - i % 2], adapter_name="a", hotswap=True), rounds))
        check("hot swap")
        rows["hot swap, another rank and alpha (checked dense, fp64)"] = (
            None, _ms(lambda i: gm.load_adapter(dirs[3 - i % 2], adapter_name="a", hotswap=True), rounds))
        gm.load_adapter(dirs[2], adapter_name="a", hotswap=True)

        def drop(i: int) -> None:
            if "n" in pm.peft_config:
                pm.delete_adapter("n")
                pm.base_model.set_adapter("a")
            if "n" in gm.active_adapters() or "n" in gm.peftc.adapters:
                gm.delete_adapter("n")

        rows["load a new adapter"] = (_ms(lambda i: pm.load_adapter(str(dirs[2]), adapter_name="n"), rounds, drop),
                                      _ms(lambda i: gm.load_adapter(dirs[2], adapter_name="n"), rounds, drop))
        pm.base_model.set_adapter("n")
        gm.set_adapter("n")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[2]), adapter_name="n").eval()
        check("load")   # against a fresh peft model of that checkpoint
        compiled: dict[str, float] = {}
        if not args.quick:
            import torch._dynamo as dynamo
            fast = torch.compile(gm)
            fast(**x)
            with dynamo.config.patch(error_on_recompile=True):
                compiled["steady forward"] = _ms(lambda i: fast(**x), rounds)

                def swap(i: int) -> None:
                    gm.load_adapter(dirs[i % 2], adapter_name="n", hotswap=True)
                compiled["first forward after a hot swap"] = _ms(lambda i: fast(**x), rounds, swap)
    meta = versions()
    lines = ["# Switching adapters at run time (`benchmarks/bench_runtime.py`)", "",
             f"small-llama, LoRA r=16 on every linear layer; median of {rounds} rounds; peftc compile "
             f"(max_adapters=3, max_rank=16) {compile_s:.1f}s. Outputs vs peft after each switch: max abs diff "
             f"{max(diffs.values()):.1e}.", "",
             "| operation | peft (ms) | peftc (ms) |", "|---|---:|---:|"]
    lines += [f"| {k} | {'-' if p is None else f'{p:.2f}'} | {c:.2f} |" for k, (p, c) in rows.items()]
    if compiled:
        lines += ["", "| peftc under torch.compile (inductor), no recompilation | ms |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in compiled.items()]
    lines += ["", f"{meta['machine']}; torch {meta['torch']}, peft {meta['peft']}."]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "runtime.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "runtime.json").write_text(json.dumps({"rounds": rounds, "compile_s": compile_s, "diffs": diffs,
                                                     "ms": {k: {"peft": p, "peftc": c} for k, (p, c) in rows.items()},
                                                     "compiled_ms": compiled, "versions": meta}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
