"""Streaming merge at scale: `peftc merge` on a synthetic sharded bf16 Llama-shaped checkpoint, its peak RSS and
wall time, next to peft's load + merge_and_unload + save_pretrained on the same checkpoint.

The checkpoint (random bf16 weights, written shard by shard; never committed) has Llama's layout: hidden size,
intermediate size, vocabulary and layer count are chosen to reach --size-gb (7B-shaped: --size-gb 13.5
--hidden 4096). The adapter is a peft-format LoRA r=16 on q/k/v/o/gate/up/down_proj (random A and B), imported
by the spec. Each command runs in its own subprocess; peak RSS is that process's ru_maxrss (os.wait4), which
includes the interpreter with torch and transformers imported (measured alone as `python -c "import torch,
transformers"` for scale). peft runs only where the model fits (--peft auto: below half the free memory).

Also compares one merged q_proj weight of each tool with the fp64 merge (W + s B A in fp64): peftc folds in fp32
and casts once, peft adds in bf16.

    python benchmarks/bench_merge.py                     # ~1.5 GB, 4 shards, with peft
    python benchmarks/bench_merge.py --size-gb 13.5 --hidden 4096 --peft no  # 7B-shaped, peftc only
    ... --append                                         # add the run to results/merge.md

Writes benchmarks/results/merge.md (and prints it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from peftc.safetensors_stream import ShardWriter, read_header, read_tensor  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def shapes(hidden: int, inter: int, vocab: int, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
        out += [(p + f"self_attn.{n}.weight", (hidden, hidden)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        out += [(p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                (p + "mlp.down_proj.weight", (hidden, inter))]
    out += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return out


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def make_checkpoint(d: Path, size_gb: float, hidden: int, shard_gb: float, vocab: int = 32000) -> dict:
    """A bf16 Llama-shaped checkpoint of about size_gb, in shards of about shard_gb, written tensor by tensor."""
    import transformers as T
    inter = int(hidden * 8 / 3 / 256 + 1) * 256
    per_layer = 4 * hidden * hidden + 3 * hidden * inter
    layers = max(1, round((size_gb * 1e9 / 2 - 2 * vocab * hidden) / per_layer))
    heads = max(1, hidden // 128)
    cfg = T.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=heads, tie_word_embeddings=False,
                        max_position_embeddings=2048)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.dtype = "bfloat16"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(cfg.to_json_string())
    (d / "generation_config.json").write_text('{"bos_token_id": 1, "eos_token_id": 2}\n')
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for key, shape in shapes(hidden, inter, vocab, layers):
        nb = numel(shape) * 2
        if groups[-1] and size + nb > shard_gb * 1e9:
            groups.append([])
            size = 0
        groups[-1].append((key, shape))
        size += nb
    g = torch.Generator().manual_seed(0)
    wmap, total = {}, 0
    for i, group in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        w = ShardWriter(d / name, [(k, "BF16", s) for k, s in group], {"format": "pt"})
        for key, shape in group:
            t = torch.randn(shape, generator=g).mul_(0.02) if len(shape) > 1 else torch.ones(shape)
            w.write(key, t.to(torch.bfloat16))
            wmap[key] = name
            total += numel(shape) * 2
        w.finish()
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                "weight_map": wmap}, indent=2))
    return {"layers": layers, "hidden": hidden, "intermediate": inter, "vocab": vocab, "shards": len(groups),
            "bytes": total}


def make_adapter(d: Path, info: dict, r: int = 16, alpha: int = 32) -> None:
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(1)
    h, m = info["hidden"], info["intermediate"]
    dims = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h), "gate_proj": (h, m),
            "up_proj": (h, m), "down_proj": (m, h)}
    tensors = {}
    for i in range(info["layers"]):
        for n, (fin, fout) in dims.items():
            part = "self_attn" if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            p = f"base_model.model.model.layers.{i}.{part}.{n}."
            tensors[p + "lora_A.weight"] = torch.randn(r, fin, generator=g) / fin ** 0.5
            tensors[p + "lora_B.weight"] = torch.randn(fout, r, generator=g) * 0.01
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": TARGETS, "lora_dropout": 0.0,
           "bias": "none", "use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "task_type": None,
           "init_lora_weights": True, "inference_mode": True}
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2))


def run_measured(cmd: list[str]) -> dict:
    """Run `cmd` under a fresh wrapper so that ru_maxrss is this command's own peak."""
    wrapper = ("import os, subprocess, sys, time, json\n"
               "t = time.perf_counter(); p = subprocess.Popen(sys.argv[1:])\n"
               "_, st, ru = os.wait4(p.pid, 0)\n"
               "print(json.dumps({'wall_s': time.perf_counter() - t, 'peak_rss_mb': ru.ru_maxrss / 1024,"
               " 'rc': os.waitstatus_to_exitcode(st)}))\n")
    r = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return res


PEFT_SCRIPT = """
import sys, torch, transformers as T, peft
src, ad, out, shard = sys.argv[1:]
m = T.LlamaForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
m = peft.PeftModel.from_pretrained(m, ad).merge_and_unload()
m.save_pretrained(out, max_shard_size=shard)
"""


def fp64_error(model_dir: Path, out_dir: Path, adapter: Path, layer: int = 0, r: int = 16, alpha: int = 32) -> float:
    """Mean abs difference of one merged q_proj weight from the fp64 merge."""
    from safetensors.torch import load_file
    key = f"model.layers.{layer}.self_attn.q_proj.weight"
    src_idx = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    out_idx = json.loads((out_dir / "model.safetensors.index.json").read_text())["weight_map"]
    w = read_tensor(read_header(model_dir / src_idx[key]), key).double()
    merged = read_tensor(read_header(out_dir / out_idx[key]), key).double()
    ad = load_file(str(adapter / "adapter_model.safetensors"))
    p = f"base_model.model.model.layers.{layer}.self_attn.q_proj."
    ref = w + (alpha / r) * ad[p + "lora_B.weight"].double() @ ad[p + "lora_A.weight"].double()
    return (merged - ref).abs().mean().item()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.5, help="checkpoint size in GB (default 1.5)")
    ap.add_argument("--hidden", type=int, default=2048, help="hidden size (default 2048; 4096 for 7B-shaped)")
    ap.add_argument("--shard-gb", type=float, default=0.5, help="shard size in GB (default 0.5)")
    ap.add_argument("--peft", choices=("auto", "yes", "no"), default="auto",
                    help="also run peft's load + merge_and_unload + save_pretrained (auto: if it fits in memory)")
    ap.add_argument("--workdir", type=Path, help="where to write the checkpoints (default: a temp folder, removed)")
    ap.add_argument("--append", action="store_true", help="add this run to results/merge.md instead of replacing it")
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="peftc-bench-merge-"))
    try:
        t0 = time.perf_counter()
        info = make_checkpoint(work / "model", args.size_gb, args.hidden, args.shard_gb)
        make_adapter(work / "adapter", info)
        gen_s = time.perf_counter() - t0
        (work / "spec.peft").write_text('adapter a: import "adapter"\n')
        load0 = os.getloadavg()[0]
        base = run_measured([sys.executable, "-c", "import torch, transformers"])
        env_cmd = [sys.executable, "-m", "peftc.cli", "-q", "merge", str(work / "spec.peft"), str(work / "model"),
                   "-o", str(work / "out-peftc")]
        os.environ["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
        ours = run_measured(env_cmd)
        rows = [("python -c 'import torch, transformers' (for scale)", base, None),
                ("peftc merge", ours, fp64_error(work / "model", work / "out-peftc", work / "adapter"))]
        free = _available_bytes()
        if args.peft == "yes" or (args.peft == "auto" and info["bytes"] * 2 < free):
            theirs = run_measured([sys.executable, "-c", PEFT_SCRIPT, str(work / "model"), str(work / "adapter"),
                                   str(work / "out-peft"), f"{int(args.shard_gb * 1000)}MB"])
            rows.append(("peft load + merge_and_unload + save_pretrained", theirs,
                         fp64_error(work / "model", work / "out-peft", work / "adapter")))
        load1 = os.getloadavg()[0]
        text = report(info, rows, gen_s, load0, load1, args)
        print(text)
        RESULTS.mkdir(exist_ok=True)
        old = (RESULTS / "merge.md").read_text() if args.append and (RESULTS / "merge.md").exists() else ""
        (RESULTS / "merge.md").write_text((old + "\n" if old else "") + text + "\n")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def report(info: dict, rows: list, gen_s: float, load0: float, load1: float, args: argparse.Namespace) -> str:
    import transformers
    gb = info["bytes"] / 1e9
    largest = max(info["vocab"] * info["hidden"], info["intermediate"] * info["hidden"]) * 2 / 1e6
    lines = [f"`python benchmarks/bench_merge.py --size-gb {args.size_gb:g} --hidden {args.hidden} "
             f"--shard-gb {args.shard_gb:g}` — synthetic Llama-shaped bf16 checkpoint: {gb:.2f} GB in "
             f"{info['shards']} shards, {info['layers']} layers, hidden {info['hidden']}, intermediate "
             f"{info['intermediate']}, vocab {info['vocab']} (largest tensor {largest:.0f} MB); LoRA r=16 on "
             "q/k/v/o/gate/up/down_proj (written in "
             f"{gen_s:.0f} s).  ",
             f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}; "
             f"{platform.machine()}, {os.cpu_count()} cpus; load average (1 min) before/after: {load0:.2f} / "
             f"{load1:.2f}.", "",
             "| command | wall s | peak RSS MB | q_proj mean abs error vs fp64 merge |", "|---|---:|---:|---:|"]
    for name, r, err in rows:
        e = f"{err:.3e}" if err is not None else ""
        lines.append(f"| {name} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} | {e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
