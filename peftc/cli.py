"""The `peftc` command line (argparse: in the standard library, and enough for a handful of subcommands).

    peftc compile SPEC MODEL -o OUT.pt2 [--merge] [--train] [--adapter-ids] [--dump-after PASS] [--dtype DTYPE]
    peftc export  SPEC MODEL -o OUT.onnx [--merge] [--no-check] [--adapter-ids] [--adapters-as-inputs] [--dtype DTYPE]
    peftc export  SPEC MODEL --with-past -o OUT_DIR [--merge | --adapters-as-inputs]  (KV cache; onnxruntime-genai)
    peftc export-adapter ADAPTER_DIR --like MODEL.onnx -o OUT.onnx_adapter   (a file for a switchable model)
    peftc save    SPEC MODEL -o DIR            (PEFT checkpoint of the spec's adapters)
    peftc check   SPEC MODEL
    peftc inspect MODEL
    peftc import  ADAPTER_DIR... -o SPEC
    peftc combine ADAPTER_DIR... --weights W,... --type TYPE -o DIR   (peft's add_weighted_adapter)
    peftc fmt     SPEC... [--check]           (the canonical form of specs)
    peftc graph   SPEC MODEL --layer NAME -o OUT.svg   (one layer's subgraph before and after the passes)
    peftc merge   SPEC MODEL_DIR -o OUT_DIR     (merged HF model directory, streamed shard by shard)
    peftc lower   SPEC MODEL --rank R|auto -o DIR   (any mergeable adapter -> a plain LoRA checkpoint)

Bad input prints one message (file:line:col where known) and exits 1, with no traceback. It fails early:
the output path (extension, writability) is checked first, then the spec is parsed (lark only); torch and
the compiler are imported only after that, so `--help`, `--version`, syntax errors and `import` answer at
once. Results go to stdout; progress, notes and warnings to stderr (-q silences progress and notes).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

from peftc import __version__
from peftc.errors import PeftcError

if TYPE_CHECKING:
    from peftc.plan import AdapterPlan, Plan
    from peftc.spec.model import Spec

T0 = time.perf_counter()  # as early as peftc can know: the total printed is the wall time the user waited
# pipeline.PASSES, without importing torch
PASS_NAMES = ("strip", "insert", "fold", "factor", "gate", "stack", "rejoin", "cse", "freeze", "choose", "addbmm",
              "fuse", "cache", "dce")
OUTPUT_SUFFIX = {"compile": ".pt2", "export": ".onnx", "import": ".peft", "export-adapter": ".onnx_adapter"}
GRAPH_SUFFIXES = (".svg", ".dot")
FILE_SUFFIXES = {".pt2", ".onnx", ".peft", ".safetensors", ".json", ".bin", ".pt", ".pth"}


def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("torch", "torch.export", "torch.onnx", "torch._dynamo", "onnxscript", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _quiet_transformers() -> None:
    """peftc shows its own progress (on a terminal only); transformers' bars would reach pipes and CI logs.
    Called only before a model is loaded: importing transformers takes most of a second."""
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--example-input", action="append", metavar="NAME=SHAPE[:DTYPE]",
                   help="example input for tracing, repeatable (e.g. x=9x10:float32, input_ids=2x16:int64)")


def _dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16", "float64"),
                   help="cast the model to DTYPE before compiling (adapters are folded in float32 from its exact "
                        "weights and cast once); e.g. a bfloat16 model exported as float16 for onnxruntime on CPU")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="peftc", description="Compile parameter-efficient fine-tuning adapters.")
    ap.add_argument("--quiet", "-q", action="store_true", help="no progress or notes (results still print)")
    ap.add_argument("--version", action="version", version=f"peftc {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def spec_model(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("spec", help=".peft spec file")
        p.add_argument("model", help="HF model directory, file.py:callable, package.module:callable, or a built-in "
                                     "name (peftc inspect --builtins)")
        _model_args(p)
        p.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help="no progress output")
        return p

    p = spec_model("compile", "compile a spec onto a model and write a .pt2 (torch.export) file")
    p.add_argument("-o", "--output", required=True, help="output .pt2 path")
    p.add_argument("--merge", action="store_true", help="fold every active adapter into the base weights")
    p.add_argument("--train", action="store_true", help="compile for training (adapter dropout active)")
    p.add_argument("--adapter-ids", action="store_true",
                   help="one more input, adapter_ids (int64, [batch]): row b runs the spec's adapter_ids[b]-th adapter "
                        "(declaration order), -1 the base model")
    p.add_argument("--dump-after", metavar="PASS", choices=PASS_NAMES,
                   help="print the graph after PASS: " + ", ".join(PASS_NAMES))
    _dtype_arg(p)

    p = spec_model("export", "compile a spec onto a model and write ONNX, checked in onnxruntime")
    p.add_argument("-o", "--output", required=True, help="output .onnx path (with --with-past: an output directory)")
    p.add_argument("--with-past", action="store_true",
                   help="generation-ready decoder: write OUT_DIR with model.onnx taking input_ids, attention_mask, "
                        "position_ids and past_key_values.N.key/.value and returning logits and present.N.key/.value "
                        "(optimum's names, dynamic batch/sequence/past length), config.json, generation_config.json, "
                        "the model directory's tokenizer files and genai_config.json (onnxruntime-genai runs OUT_DIR); "
                        "adapters merged (--merge), live in the graph, or switchable (--adapters-as-inputs: "
                        "OUT_DIR/<adapter>.onnx_adapter for onnxruntime_genai.Adapters)")
    p.add_argument("--merge", action="store_true", help="fold every active adapter into the base weights")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")
    p.add_argument("--adapter-ids", action="store_true",
                   help="one more input, adapter_ids (int64, [batch]): row b runs the spec's adapter_ids[b]-th adapter "
                        "(declaration order), -1 the base model")
    p.add_argument("--adapters-as-inputs", action="store_true",
                   help="switchable adapters (onnxruntime's adapter convention): each adapter tensor is a graph input "
                        "whose default (rank 0) gives the base model, and <adapter>.onnx_adapter files are written "
                        "beside OUT.onnx (with --with-past: in OUT_DIR), one per adapter of the spec, for "
                        "onnxruntime.LoraAdapter and RunOptions.add_active_adapter (onnxruntime-genai: og.Adapters); "
                        "additive methods only (LoRA, LoHa, LoKr, AdaLoRA, ...)")
    p.add_argument("--tol", type=float, default=None,
                   help="max abs diff allowed between onnxruntime and torch (default 1e-4; 1e-2 for float16 models)")
    p.add_argument("--dump-after", metavar="PASS", choices=PASS_NAMES, help="print the graph after PASS")
    _dtype_arg(p)

    p = spec_model("save", "write the spec's adapters as a PEFT checkpoint (adapter_config.json + safetensors)")
    p.add_argument("-o", "--output", required=True, help="output directory")

    p = spec_model("check", "show what each adapter matches and its parameter counts; write nothing")
    p.add_argument("--json", action="store_true", help="print the report (or the error) as JSON, for scripts")

    p = spec_model("graph", "draw one adapted layer's subgraph as inserted and after the passes (.svg or .dot)")
    p.add_argument("--layer", required=True, metavar="NAME", help="the layer (module name) to draw")
    p.add_argument("-o", "--output", required=True, help="output .svg (or .dot) path")
    p.add_argument("--merge", action="store_true", help="merge every active adapter first")

    p = sub.add_parser("inspect", help="list a model's targetable layers")
    p.add_argument("model", nargs="?", help="model reference (omit with --builtins)")
    p.add_argument("--builtins", action="store_true", help="list the built-in models")
    p.add_argument("--json", action="store_true", help="print the layers (or the error) as JSON, for scripts")
    _model_args(p)
    p.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS)

    p = sub.add_parser("import", help="write a spec that loads PEFT checkpoint directories")
    p.add_argument("adapters", nargs="+", help="PEFT checkpoint directories")
    p.add_argument("-o", "--output", required=True, help="output .peft spec")
    p.add_argument("--merge", action="store_true", help="mark the imported adapters as merged")
    p.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS)

    p = sub.add_parser("fmt", help="rewrite .peft specs in their canonical form",
                       description="Rewrite each spec in its canonical form (layout, spacing, aligned end-of-line "
                                   "comments; comments are kept). The formatted spec means exactly what it did.")
    p.add_argument("specs", nargs="+", metavar="SPEC", help=".peft spec files")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a spec is not in canonical form")
    p.add_argument("--stdout", action="store_true", help="print the canonical form instead of rewriting the file")
    p.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS)

    p = sub.add_parser("combine", help="combine LoRA (or IA3) checkpoints into one, as peft's add_weighted_adapter",
                       description="Combine PEFT LoRA checkpoints (weighted) into one PEFT checkpoint, with the "
                                   "semantics of peft's add_weighted_adapter; IA3 checkpoints combine with 'linear'.")
    p.add_argument("adapters", nargs="+", help="PEFT checkpoint directories")
    p.add_argument("--weights", required=True, metavar="W,...", help="one weight per adapter, comma-separated")
    p.add_argument("--type", required=True, metavar="TYPE",
                   help="exact (the weighted sum of the deltas; cat for LoRA), linear, cat, svd, ties, "
                   "ties_svd, magnitude_prune, "
                   "magnitude_prune_svd, dare_linear, dare_linear_svd, dare_ties, dare_ties_svd")
    p.add_argument("--density", type=float, help="fraction of values kept (ties, magnitude_prune, dare_* types)")
    p.add_argument("--majority-sign-method", choices=("total", "frequency"), default="total",
                   help="sign election of ties / dare_ties (default total)")
    p.add_argument("--svd-rank", type=int, help="rank of the result of the *svd types (default: the largest rank)")
    p.add_argument("--svd-clamp", type=float, help="quantile at which the *svd types clamp the factors")
    p.add_argument("--seed", type=int, help="random seed of the dare_* types (default 0)")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS)

    desc = ("Fold the spec's active adapters into a Hugging Face model directory and write the merged model "
            "directory: the same safetensors shards, index and dtypes, with config, generation config and tokenizer "
            "files copied. Streams one tensor at a time (fp32 folds, cast once), with no tracing: memory stays about "
            "one layer's fold, whatever the model's size. An adapted weight tied to another module (an embedding "
            "tied to the output head) is untied, so the merged model computes what the unmerged adapter does. "
            "Every active adapter must be mergeable.")
    p = sub.add_parser("merge", help="merge a spec's adapters into a Hugging Face model directory (streaming)",
                       description=desc)
    p.add_argument("spec", help=".peft spec file")
    p.add_argument("model", help="Hugging Face model directory (config.json + model.safetensors or sharded "
                                 "model-*.safetensors with model.safetensors.index.json)")
    p.add_argument("-o", "--output", required=True, help="output model directory (new, or an empty folder)")
    p.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS)

    desc = ("Lower the spec's active adapters (any mergeable method: LoHa, LoKr, DoRA, ...; several active adapters "
            "are summed into one) to a plain PEFT LoRA checkpoint, by a truncated SVD of each layer's update W' - W. "
            "Prints each layer's rank and relative error ||delta - B A|| / ||delta|| (Frobenius, measured on the saved "
            "factors). Layers: Linear, GPT-2 Conv1D, Embedding, ungrouped Conv1d/2d/3d.")
    p = spec_model("lower", desc)
    p.add_argument("--rank", required=True, metavar="R|auto",
                   help="LoRA rank of every layer (capped at the layer's smaller dimension), or 'auto': the smallest "
                        "rank per layer that meets --max-error (rank_pattern / alpha_pattern in the config)")
    p.add_argument("--max-error", type=float, metavar="E",
                   help="largest relative error allowed per layer (needed with --rank auto; with a fixed rank, a "
                        "layer above it is an error)")
    p.add_argument("-o", "--output", required=True, help="output directory (PEFT checkpoint)")

    desc = ("Turn a PEFT checkpoint into an .onnx_adapter file for a model written by `peftc export "
            "--adapters-as-inputs`: the checkpoint is compiled onto the MODEL the ONNX model records (or --model) and "
            "must have the model's method, targets among its adapter inputs, and the same shapes except the free "
            "dims (the rank may differ; scalings go into the file). The file is checked in onnxruntime against "
            "the checkpoint in torch.")
    p = sub.add_parser("export-adapter", help="write an .onnx_adapter file for a switchable ONNX model",
                       description=desc)
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="PEFT checkpoint directory")
    p.add_argument("--like", required=True, metavar="MODEL.onnx",
                   help="the ONNX model written by `peftc export ... --adapters-as-inputs` (with --with-past: "
                        "OUT_DIR/model.onnx; the file is then checked on a first and a later decoding step)")
    p.add_argument("-o", "--output", required=True, help="output .onnx_adapter path")
    p.add_argument("--adapter", metavar="NAME", help="which of the model's adapters this file fills (needed when "
                                                    "its spec declared several)")
    p.add_argument("--model", metavar="MODEL", help="the model to compile the checkpoint onto (default: the one the "
                                                   "ONNX model records)")
    _model_args(p)
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")
    p.add_argument("--tol", type=float, default=1e-4, help="max abs diff allowed between onnxruntime and torch")
    p.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS)
    return ap


def _note(quiet: bool, text: str) -> None:
    """Progress and notes go to stderr (silenced by -q); results go to stdout."""
    if not quiet:
        print(text, file=sys.stderr)


def _result(text: str) -> None:
    print(text, flush=True)


def _json(data: object) -> None:
    import json
    print(json.dumps(data, indent=2), flush=True)


def _json_error(e: PeftcError) -> None:
    """`--json`: the error as JSON on stdout too (the message still goes to stderr)."""
    _json({"ok": False, "error": {"message": e.message, "file": e.file, "line": e.line, "column": e.column}})


def _warn(text: str) -> None:
    print(f"peftc: warning: {text}", file=sys.stderr)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _check_output(args: argparse.Namespace) -> None:
    """Refuse an unusable output path before any work is done: the wrong extension for the command, a
    directory where a file is wanted (or the reverse), or a location that cannot be written."""
    from pathlib import Path

    from peftc.atomic import check_writable
    out = getattr(args, "output", None)
    if out is None:
        return
    p = Path(out)
    if args.cmd == "graph" and p.suffix.lower() not in GRAPH_SUFFIXES:
        raise PeftcError(f"output {p}: `peftc graph` writes a .svg or .dot file")
    want = OUTPUT_SUFFIX.get(args.cmd)
    if args.cmd == "export" and getattr(args, "with_past", False):
        if p.suffix.lower() in FILE_SUFFIXES:
            raise PeftcError(f"output {p}: `peftc export --with-past` writes a model directory (model.onnx, "
                             "genai_config.json, config and tokenizer files); give a folder name, e.g. -o out/model")
        from peftc.atomic import check_new_dir
        check_new_dir(p, Path(args.model) if Path(args.model).is_dir() else None)
        want = None
    if want is not None and p.suffix.lower() != want:
        other = [c for c, suf in OUTPUT_SUFFIX.items() if suf == p.suffix.lower()]
        hint = f" (`peftc {other[0]}` writes {p.suffix} files)" if other else ""
        raise PeftcError(f"output {p}: `peftc {args.cmd}` writes a {want} file; give a name ending in {want}{hint}")
    if args.cmd in ("save", "combine", "merge", "lower"):
        if p.suffix.lower() in FILE_SUFFIXES:
            what = ("a model directory (config.json + safetensors)" if args.cmd == "merge" else
                    "a PEFT checkpoint directory (adapter_config.json + adapter_model.safetensors)")
            raise PeftcError(f"output {p}: `peftc {args.cmd}` writes {what}; give a folder name")
        if p.exists() and not p.is_dir():
            raise PeftcError(f"output path {p} exists and is not a directory")
    elif p.is_dir():
        raise PeftcError(f"output path {p} is a directory; give a file name")
    if args.cmd == "merge":
        from peftc.atomic import check_new_dir
        check_new_dir(p, Path(args.model) if Path(args.model).is_dir() else None)
    check_writable(p)


def _states(plan: Plan) -> str:
    """'assistant: merged; chat: live; old: inactive' for the summary line."""
    parts = []
    for name, ap in plan.adapters.items():
        state = "merged" if ap.merge else ("live" if ap.active else "inactive")
        parts.append(f"{name}: {state}")
    return "; ".join(parts)


def _summary(plan: Plan) -> str:
    n_layers = len(plan.sites)
    n = len(plan.adapters)
    return f"{_plural(n, 'adapter')} on {_plural(n_layers, 'layer')} ({_states(plan)})"


def _training_notes(plan: Plan, quiet: bool) -> None:
    """What training through peftc leaves out for a method (training-loop machinery such as AdaLoRA's rank
    allocator), as its method file declares: said by `check` and by `compile --train`."""
    for name, ap in plan.adapters.items():
        if ap.method.training_note and ap.active and not ap.merge and _note_applies(ap):
            _note(quiet, f"note: adapter '{name}' ({ap.method.name}): {ap.method.training_note}")


def _note_applies(ap: AdapterPlan) -> bool:
    """Whether a method's training note holds for these options (`training "..." if COND`)."""
    if ap.method.training_if is None:
        return True
    from peftc.lang.evaluate import evaluate
    return bool(evaluate(ap.method.training_if, ap.options))


def _warnings(plan: Plan) -> None:
    for w in plan.warnings:
        _warn(w)


def _weights(text: str) -> list[float]:
    import math
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise PeftcError(f"--weights {text!r}: expected comma-separated numbers, e.g. 0.7,0.3") from None
    if not all(math.isfinite(w) for w in weights):
        raise PeftcError(f"--weights {text!r}: every weight must be a finite number")
    return weights


def _combine(args: argparse.Namespace) -> int:
    from pathlib import Path

    from peftc.combine import ALL_TYPES, TYPES, Options
    weights = _weights(args.weights)
    out = Path(args.output).resolve()
    for d in args.adapters:
        if Path(d).resolve() == out:
            raise PeftcError(f"output {args.output} is one of the input checkpoints ({d}); inputs are never "
                             "overwritten: give another folder")
    if args.type not in ALL_TYPES:
        from peftc.errors import did_you_mean
        raise PeftcError(f"--type {args.type!r}: unknown combination type{did_you_mean(args.type, ALL_TYPES)}; "
                         "choose one of " + ", ".join(ALL_TYPES))
    if args.seed is not None and not TYPES.get(args.type, ("",))[0].startswith("dare"):
        raise PeftcError(f"--seed is only used by the dare_* types, not --type {args.type}")
    opts = Options(args.type, weights, density=args.density, majority_sign_method=args.majority_sign_method,
                   svd_rank=args.svd_rank, svd_clamp=args.svd_clamp, seed=0 if args.seed is None else args.seed)
    from peftc.combine import combine_checkpoints, write_combined
    from peftc.progress import step
    with step("Combining adapters"):
        done = combine_checkpoints(args.adapters, opts)
    for note in done.notes:
        _note(args.quiet, f"note: {note}")
    write_combined(done, args.output)
    rank = f", rank {done.rank}" if done.rank else ""
    _result(f"wrote {args.output}: {_plural(len(args.adapters), 'adapter')} combined ({done.type}) on "
            f"{_plural(done.layers, 'layer')}{rank}")
    return 0


def _fmt(args: argparse.Namespace) -> int:
    """`peftc fmt`: each spec formatted (in place, atomically, its permissions kept), or checked."""
    import stat
    from pathlib import Path

    from peftc.atomic import atomic_write_bytes
    from peftc.spec.format import format_spec
    from peftc.spec.parse import read_spec
    todo = []
    for name in args.specs:
        read_spec(name)                       # a missing file, a directory, a syntax error: located, before any write
        text = Path(name).read_text()
        todo.append((Path(name), text, format_spec(text, name)))
    changed = 0
    for path, text, done in todo:
        if args.stdout:
            sys.stdout.write(done)
        elif done == text:
            _note(args.quiet, f"{path}: already formatted")
        elif args.check:
            _result(f"would reformat {path}")
            changed += 1
        else:
            mode = stat.S_IMODE(path.stat().st_mode)
            atomic_write_bytes(path, done.encode())
            path.chmod(mode)
            _result(f"reformatted {path}")
            changed += 1
    return 1 if args.check and changed else 0


def _rank_args(args: argparse.Namespace) -> tuple[int | None, float | None]:
    """--rank R|auto and --max-error E of `peftc lower`, checked before anything is loaded."""
    import math
    e = args.max_error
    if e is not None and (not math.isfinite(e) or e < 0):
        raise PeftcError(f"--max-error {e}: give a relative error >= 0, e.g. 0.01")
    if args.rank == "auto":
        if e is None:
            raise PeftcError("--rank auto needs --max-error E (the largest relative error allowed per layer)")
        return None, e
    try:
        rank = int(args.rank)
    except ValueError:
        raise PeftcError(f"--rank {args.rank!r}: give a positive integer or 'auto'") from None
    if rank < 1:
        raise PeftcError(f"--rank {rank}: the rank must be at least 1")
    return rank, e


def _merge(args: argparse.Namespace, spec: Spec) -> int:
    from peftc.stream_merge import merge_model
    done = merge_model(spec, args.model, args.output)
    _warnings(done.plan)
    for name, ap in done.plan.adapters.items():
        if not ap.active:
            _note(args.quiet, f"note: adapter '{name}' is inactive: not merged")
    if done.skipped:
        _note(args.quiet, f"note: not copied (weights in another format, unmerged): {', '.join(done.skipped)}")
    merged = [n for n, ap in done.plan.adapters.items() if ap.active]
    _result(f"wrote {args.output}: {_plural(len(merged), 'adapter')} ({', '.join(merged)}) merged into "
            f"{_plural(len(done.layers), 'layer')}, {_plural(done.shards, 'shard')} ({done.dtype}) "
            f"(total {time.perf_counter() - T0:.1f}s)")
    if done.untied:
        _result(f"untied {', '.join(done.untied)}: each has its own tensor now and config.json says "
                "tie_word_embeddings: false, so the merged model computes what the unmerged adapter does")
    return 0


def _lower(args: argparse.Namespace, spec: Spec, rank: int | None, max_error: float | None) -> int:
    from peftc.lower import lower_to_lora
    low = lower_to_lora(spec, args.model, rank=rank, max_error=max_error, output=args.output,
                        example_inputs=args.example_input)
    _warnings(low.plan)
    width = max(len(l.name) for l in low.layers)
    lines = [f"{'layer':{width}s}  {'kind':9s}  {'rank':>4s}  rel. error"]
    lines += [f"{l.name:{width}s}  {l.kind:9s}  {l.rank:4d}  {l.error:.2e}" for l in low.layers]
    _result("\n".join(lines))
    worst = max(low.layers, key=lambda l: l.error)
    active = [n for n, ap in low.plan.adapters.items() if ap.active]
    ranks = sorted({l.rank for l in low.layers})
    rank_s = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    _result(f"wrote {low.path}: LoRA of {', '.join(active)} on {_plural(len(low.layers), 'layer')}, {rank_s}; "
            f"max relative error {worst.error:.2e} ({worst.name}) (total {time.perf_counter() - T0:.1f}s)")
    return 0


def _run(args: argparse.Namespace) -> int:
    from peftc.progress import set_quiet
    set_quiet(args.quiet)
    if args.cmd == "fmt":
        return _fmt(args)
    _check_output(args)
    if args.cmd == "import":
        from peftc.importer import import_spec
        done = import_spec(args.adapters, args.output, merge=args.merge)
        for note in done.notes:
            _note(args.quiet, f"note: {note}")
        _result(f"wrote {args.output} ({_plural(len(done.names), 'adapter')}: {', '.join(done.names)})")
        return 0
    if args.cmd == "combine":
        return _combine(args)
    if args.cmd == "inspect":
        if args.builtins or not args.model:
            from peftc.builtin_models import BUILTINS
            if args.json:
                _json({"builtins": [{"name": n, "description": d} for n, (_, d) in BUILTINS.items()]})
                return 0
            for name, (_, desc) in BUILTINS.items():
                _result(f"{name:12s} {desc}")
            return 0
        from peftc.models import load_model
        from peftc.report import inspect_data, inspect_report
        _quiet_transformers()
        module = load_model(args.model, args.example_input).module
        if args.json:
            _json(inspect_data(module))
        else:
            _result(inspect_report(module))
        return 0
    if args.cmd == "export-adapter":
        return _export_adapter(args)
    # every other command reads a spec: parse it (lark only, no torch) before anything slow happens
    if args.cmd == "lower":
        rank, max_error = _rank_args(args)
    from peftc.spec.parse import read_spec
    spec = read_spec(args.spec)
    from peftc.progress import step
    with step("Loading torch and the compiler"):
        import peftc.pipeline  # noqa: F401 - a few seconds of imports, shown as a step of their own
        _quiet_transformers()
    if args.cmd == "merge":
        return _merge(args, spec)
    if args.cmd == "lower":
        return _lower(args, spec, rank, max_error)
    if args.cmd in ("check", "save"):
        from peftc.models import load_model
        from peftc.pipeline import base_model_name, check_spec
        from peftc.plan import build_plan
        from peftc.spec.combinations import expand_combinations
        spec = expand_combinations(spec)
        check_spec(spec)
        with step("Loading model"):
            loaded = load_model(args.model, args.example_input)
            from peftc.replicate import with_replication
            loaded.module = with_replication(spec, loaded.module)
        with step("Planning adapters"):
            plan = build_plan(spec, loaded.module)
        _warnings(plan)
        if args.cmd == "check":
            from peftc.report import check_data, check_report
            _training_notes(plan, args.quiet)
            if args.json:
                _json({"ok": True, **check_data(plan, loaded.module)})
                return 0
            _result(check_report(plan, loaded.module))
            _result("ok: no errors")
            return 0
        from peftc.emit.checkpoint import save_plan
        from peftc.manifest import unsavable
        for name, ap in plan.adapters.items():
            if unsavable(name, ap) and any(not unsavable(n, a) for n, a in plan.adapters.items()):
                _warn(f"not saved: {unsavable(name, ap)}")
        with step("Writing PEFT checkpoint"):
            dirs = save_plan(plan, args.output, base_model_name_or_path=base_model_name(loaded))
        _result(f"wrote {', '.join(str(d) for d in dirs)}: {_summary(plan)} (total {time.perf_counter() - T0:.1f}s)")
        return 0
    if args.cmd == "graph":
        return _graph(spec, args)
    from peftc.pipeline import compile_model
    t0 = time.perf_counter()
    merge = getattr(args, "merge", False)
    from peftc.low_precision import DTYPES
    dtype = DTYPES[args.dtype] if getattr(args, "dtype", None) else None
    with_past = getattr(args, "with_past", False)
    compiled = compile_model(spec, args.model, merge=merge, train=getattr(args, "train", False),
                             example_inputs=args.example_input, dump_after=getattr(args, "dump_after", None),
                             adapter_ids=getattr(args, "adapter_ids", False), with_past=with_past,
                             adapters_as_inputs=getattr(args, "adapters_as_inputs", False), dtype=dtype)
    t_compile = time.perf_counter() - t0
    gm = compiled.gm
    _warnings(compiled.plan)
    if getattr(args, "train", False):
        _training_notes(compiled.plan, args.quiet)
    if compiled.dense_layers:
        dense = compiled.dense_layers
        names = ", ".join(dense[:3]) + (", ..." if len(dense) > 3 else "")
        _note(args.quiet, f"note: no factoring rule fits {len(dense)} layer(s) ({names}): "
                          "their adapted weight is rebuilt on every forward (correct, slower; --merge avoids it)")
    summary = _summary(compiled.plan)
    if getattr(args, "adapter_ids", False):
        order = ", ".join(f"{i} = {a}" for i, a in enumerate(compiled.plan.adapters))
        summary += f"; input adapter_ids chooses per row: {order}, -1 = base"
    if args.cmd == "compile":
        from peftc.emit.pt2 import save_pt2
        save_pt2(gm, args.output)
        _result(f"wrote {args.output}: {summary} (compile {t_compile:.1f}s, total {time.perf_counter() - T0:.1f}s)")
        return 0
    if args.cmd == "export" and with_past:
        from pathlib import Path

        from peftc.emit.generation import export_generation
        done = export_generation(gm, args.output, compiled.model.config, source=args.model,
                                 check=not args.no_check, tol=args.tol, adapters_as_inputs=args.adapters_as_inputs)
        files = sorted(f.name for f in Path(args.output).iterdir())
        if done.switch is not None:
            summary += f"; {len(done.switch.inputs)} adapter inputs"
        _result(f"wrote {args.output} ({', '.join(files)}): {summary}; key/value cache of "
                f"{_plural(done.layout.num_layers, 'layer')} (compile {t_compile:.1f}s, "
                f"total {time.perf_counter() - T0:.1f}s)")
        steps = "a first step with an empty past and a later step with a filled one"
        if done.check is not None:
            _result(f"onnxruntime check: max abs diff {done.check.max_abs_diff:.2e} vs torch ({steps})")
        if done.switch is not None and done.switch.check is not None:
            _switch_check(done.switch, steps)
        return 0
    if args.cmd == "export" and args.adapters_as_inputs:
        return _export_switchable(args, gm, summary, t_compile)
    if args.cmd == "export":
        from peftc.emit.onnx import export_onnx
        result = export_onnx(gm, args.output, check=not args.no_check, tol=args.tol)
        _result(f"wrote {args.output}: {summary} (compile {t_compile:.1f}s, total {time.perf_counter() - T0:.1f}s)")
        if result is not None:
            shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in result.input_shapes.items())
            _result(f"onnxruntime check: max abs diff {result.max_abs_diff:.2e} vs torch ({shapes})")
        return 0
    raise AssertionError(args.cmd)


def _export_switchable(args: argparse.Namespace, gm: object, summary: str, t_compile: float) -> int:
    """`peftc export --adapters-as-inputs`: the model, one .onnx_adapter per adapter, checked in one session."""
    from peftc.emit.onnx_adapters import export_switchable
    done = export_switchable(gm, args.output, check=not args.no_check, tol=args.tol)
    files = ", ".join(str(f) for f in done.adapters.values())
    _result(f"wrote {args.output}: {summary}; {len(done.inputs)} adapter inputs; wrote {files} "
            f"(compile {t_compile:.1f}s, total {time.perf_counter() - T0:.1f}s)")
    if done.check is not None:
        shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in done.check.input_shapes.items())
        _switch_check(done, shapes)
    return 0


def _switch_check(done: object, where: str) -> None:
    """The lines of an adapters-as-inputs check (a SwitchExport's): no file, then each file."""
    c = done.check
    _result(f"onnxruntime check, one session ({where}): no adapter file: max abs diff {c.base_diff:.2e} vs "
            "the base model")
    for name, d in c.adapter_diffs.items():
        _result(f"onnxruntime check, one session: {done.adapters[name].name}: max abs diff {d:.2e} vs torch")


def _export_adapter(args: argparse.Namespace) -> int:
    """`peftc export-adapter DIR --like MODEL.onnx -o OUT.onnx_adapter`."""
    from pathlib import Path

    from peftc.progress import step
    with step("Loading torch and the compiler"):
        import peftc.pipeline  # noqa: F401
        _quiet_transformers()
    from peftc.emit.onnx_adapters import export_adapter
    done = export_adapter(args.adapter_dir, args.like, args.output, model=args.model, adapter=args.adapter,
                          check=not args.no_check, tol=args.tol, example_inputs=args.example_input)
    if done["missing"]:
        names = done["missing"]
        _note(args.quiet, f"note: the checkpoint has no tensor for {len(names)} of the model's adapter inputs "
                          f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): with this file, those stay at "
                          "their defaults (no adapter on those layers)")
    _result(f"wrote {args.output}: {done['inputs']} adapter tensors for {args.like} "
            f"(total {time.perf_counter() - T0:.1f}s)")
    if done["diff"] is not None:
        _result(f"onnxruntime check: {args.like} with {Path(args.output).name}: max abs diff {done['diff']:.2e} vs "
                "the checkpoint in torch")
    return 0


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that unfinished outputs are cleaned up on the way out."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def _graph(spec: object, args: argparse.Namespace) -> int:
    """`peftc graph`: the layer's subgraph after `insert` and after the last pass, side by side."""
    from peftc.atomic import atomic_write_bytes
    from peftc.graph_view import first_seen, render, snapshot
    from peftc.pipeline import PASSES, compile_model
    shots = []
    made_by: dict[str, str] = {}

    def observe(name: str, gm: object) -> None:
        first_seen(gm, args.layer, name, made_by)
        if name == "insert":
            shots.append(snapshot(gm, args.layer, "as inserted (the declared weight transform)"))
        if name == PASSES[-1]:
            shots.append(snapshot(gm, args.layer, f"after every pass ({', '.join(PASSES[2:])})", made_by))

    compiled = compile_model(spec, args.model, merge=args.merge, example_inputs=args.example_input, observe=observe)
    adapted = sorted(compiled.plan.sites)
    if args.layer not in adapted:
        from peftc.errors import did_you_mean
        raise PeftcError(f"--layer {args.layer}: no adapter of the spec is on that layer"
                         f"{did_you_mean(args.layer, adapted)}; adapted layers: {', '.join(adapted[:8])}"
                         + (f" and {len(adapted) - 8} more" if len(adapted) > 8 else ""))
    atomic_write_bytes(args.output, render(shots, args.layer, args.output).encode())
    nodes = [sum(k == "peftc" for k in s.kinds.values()) for s in shots]
    _result(f"wrote {args.output}: {args.layer}, {nodes[0]} adapter nodes as inserted, {nodes[-1]} after the passes")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_libraries()
    import signal
    import threading
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return _run(args)
    except PeftcError as e:
        print(f"peftc: error: {e}", file=sys.stderr)
        if getattr(args, "json", False):
            _json_error(e)
        return 1
    except KeyboardInterrupt:
        print("peftc: interrupted (unfinished outputs removed)", file=sys.stderr)
        return 130
    except Terminated:
        print("peftc: terminated (unfinished outputs removed)", file=sys.stderr)
        return 143
    except BrokenPipeError:   # the reader went away (`peftc inspect m | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:  # noqa: BLE001 - last line of defence: a message, not a traceback
        if os.environ.get("PEFTC_DEBUG"):
            raise
        print(f"peftc: internal error: {type(e).__name__}: {e}\n(set PEFTC_DEBUG=1 for a traceback, and please "
              "report it)", file=sys.stderr)
        return 2
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
