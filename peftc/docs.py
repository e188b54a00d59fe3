"""Generates docs/methods.md, the method catalogue, from passes/*.peft: per method its options (type, default,
PEFT config key, per-layer key), PEFT type and fixed config, layer kinds, when it can be merged, and the
checkpoint tensors it saves per layer kind; then the factoring rules in the order they are tried.

    python -m peftc.docs [PATH]      # writes docs/methods.md (or PATH)

tests/test_docs.py fails when the file is stale. Statements are walked generically (nested blocks, `on`
filters, conditions), so a new method needs no change here; `TENSOR_STATEMENTS` names the statement kinds
that declare saved tensors.
"""
from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from peftc.lang.expr import Call, Const, Expr, Name, Rest
from peftc.lang.methods import MethodDef, spec_repr
from peftc.lang.rules import Rule

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "docs" / "methods.md"
REGENERATE = "python -m peftc.docs"

# statement kind -> (index of the name, of the shape, of the checkpoint key) in its arguments, and where the
# tensor lives ("layer": one per adapted layer)
TENSOR_STATEMENTS: dict[str, str] = {"param": "layer", "shared": "adapter"}   # statement kind -> level

_INFIX = {"add": ("+", 5), "sub": ("-", 5), "mul": ("*", 6), "div": ("/", 6), "matmul": ("@", 6),
          "and": ("and", 2), "or": ("or", 1), "eq": ("==", 4), "ne": ("!=", 4), "lt": ("<", 4), "le": ("<=", 4),
          "gt": (">", 4), "ge": (">=", 4)}


def show(e: Any, prec: int = 0) -> str:
    """An expression as the method language writes it."""
    if isinstance(e, Const):
        return "none" if e.value is None else spec_repr(e.value)
    if isinstance(e, Name):
        return e.id
    if isinstance(e, Rest):
        return "..."
    if isinstance(e, Call):
        a = e.args
        if e.fn in _INFIX and len(a) == 2:
            op, p = _INFIX[e.fn]
            text = f"{show(a[0], p)} {op} {show(a[1], p + 1)}"
            return f"({text})" if p < prec else text
        if e.fn == "neg" and len(a) == 1:
            return f"-{show(a[0], 7)}"
        if e.fn == "not" and len(a) == 1:
            text = f"not {show(a[0], 3)}"
            return f"({text})" if 3 < prec else text
        if e.fn == "cond" and len(a) == 3:
            text = f"{show(a[0], 1)} ? {show(a[1])} : {show(a[2])}"
            return f"({text})" if prec > 0 else text
        if e.fn == "tuple":
            return "(" + ", ".join(show(x) for x in a) + ("," if len(a) == 1 else "") + ")"
        if e.fn == "unsqueeze" and len(a) == 2 and isinstance(a[1], Const) and a[1].value in (0, 1):
            return f"{show(a[0], 8)}[{':, None' if a[1].value == 1 else 'None, :'}]"
        args = [show(x) for x in a] + [f"{k} = {show(v)}" for k, v in e.kwargs]
        return f"{e.fn}({', '.join(args)})"
    if isinstance(e, Expr):   # an expression node this printer does not know yet: its fields
        fields = [show(getattr(e, f.name)) for f in dataclasses.fields(e) if f.name not in ("line", "column")]
        return f"{type(e).__name__.lower()}({', '.join(fields)})"
    if isinstance(e, (list, tuple)):
        return "[" + ", ".join(show(x) for x in e) + "]"
    return str(e)


def _parts(st: Any) -> tuple[str, list[Any]]:
    if hasattr(st, "kind") and hasattr(st, "args"):
        return st.kind, list(st.args)
    return type(st).__name__.lower(), [getattr(st, f.name) for f in dataclasses.fields(st) if f.name != "line"]


def _blocks(args: list[Any]) -> list[list[Any]]:
    return [a for a in args if isinstance(a, list) and all(not isinstance(x, (str, Expr)) for x in a)]


def tensors(body: list[Any], kind: str, when: tuple[str, ...] = ()) -> list[tuple[str, str, str, str, str]]:
    """(checkpoint key, tensor name, shape, level, condition) of every saved tensor declared for layer `kind`."""
    out = []
    for st in body:
        k, args = _parts(st)
        if k in TENSOR_STATEMENTS:
            ps = args[0]   # a ParamSyntax: name, shape, init, saved, saved_if, frozen, dtype, optional, each_layer
            if ps.saved is None:
                continue
            cond = when + ((show(ps.saved_if, 3),) if ps.saved_if is not None else ())
            shape = "[" + ", ".join(f"?{d[1]}" if isinstance(d, tuple) else show(d) for d in ps.shape) + "]"
            level = TENSOR_STATEMENTS[k]
            key = f"base_model.{ps.saved}" if level == "adapter" else ps.saved
            notes = [n for n, on in (("frozen", ps.frozen), (f"dtype {ps.dtype}", ps.dtype),
                                     ("optional", ps.optional), ("also under every layer", ps.each_layer)) if on]
            out.append((key, ps.name + (f" ({', '.join(notes)})" if notes else ""), shape, level, " and ".join(cond)))
            continue
        if k == "on":
            if kind in args[0]:
                out += tensors(args[1], kind, when)
            continue
        blocks = _blocks(args)
        cond = next((a for a in args if isinstance(a, Expr)), None)
        for i, block in enumerate(blocks):
            if cond is None:
                out += tensors(block, kind, when)
            else:
                c = show(cond, 3)
                out += tensors(block, kind, (*when, c if i == 0 else f"not {c}"))
    return out


def _cell(v: Any) -> str:
    return "" if v is None else str(v).replace("|", "\\|")


def _table(head: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return lines


def _description(m: MethodDef) -> list[str]:
    """The comment block above `method NAME(` in its file."""
    try:
        text = Path(m.file).read_text()
    except OSError:
        return []
    lines = text.splitlines()
    at = next((i for i, line in enumerate(lines) if re.match(rf"\s*method\s+{re.escape(m.name)}\s*\(", line)), None)
    if at is None:
        return []
    while at > 0 and not lines[at - 1].strip():
        at -= 1
    out = []
    for line in reversed(lines[:at]):
        if not line.strip().startswith("#"):
            break
        out.append(line.strip()[1:].removeprefix(" ").rstrip())
    return list(reversed(out))


def render_method(m: MethodDef) -> list[str]:
    out = [f"## {m.name}", ""]
    desc = _description(m)
    if desc:
        out += ["```text", *desc, "```", ""]
    out.append(f"Declared in `passes/{Path(m.file).name}`.")
    out.append("")
    facts = [("PEFT type", f"`{m.peft_type}`" if m.peft_type else "none (peftc only)")]
    if m.fixed_config:
        facts.append(("fixed PEFT config", ", ".join(f"`{k}: {spec_repr(v)}`" for k, v in m.fixed_config.items())))
    for entries, cond in m.config_if:
        facts.append((f"PEFT config when `{show(cond)}`",
                      ", ".join(f"`{k}: {spec_repr(v)}`" for k, v in entries.items())))
    facts.append(("layer kinds", ", ".join(m.kinds) or "none"))
    facts.append(("mergeable", "always" if m.mergeable is None else f"when `{show(m.mergeable)}`"))
    if m.bias_only:
        facts.append(("`bias`", f'`"none"`, `"all"` (every bias of the model trains) or `"{m.bias_only}"` (the biases '
                                "of the adapted layers), saved under peft's keys"))
    if m.default_targets:
        facts.append(("default targets (no `targets` clause)", "; ".join(
            f"{'any model' if k == '*' else k}: {', '.join(v)}" for k, v in m.default_targets.items())))
    if m.tied_follow:
        facts.append(("tied layers", "a module sharing the adapted weight (a tied output head) reads the new one too"))
    for comp, opt, prefix in m.companions:
        facts.append(("with", f"`{opt}` puts [{comp}](#{comp}) on the layers it names (a list: the input embeddings), "
                              f"saved under `<layer>.{prefix}.`"))
    out += [f"- {k}: {v}" for k, v in facts]
    out += ["", "### Options", ""]
    if m.options:
        rows = []
        for o in m.options.values():
            values = ", ".join(f"{spec_repr(k)} → {spec_repr(v)}" for k, v in o.values.items())
            rows.append((f"`{o.name}`", o.type, "" if o.default is None and o.type == "targets" else
                         f"`{spec_repr(o.default) if o.default is not None else 'none'}`",
                         f"`{o.config_key}`" if o.config_key else "", f"`{o.pattern_key}`" if o.pattern_key else "",
                         values))
        out += _table(("option", "type", "default", "PEFT key", "per-layer key", "PEFT values"), rows)
    else:
        out.append("none")
    out += ["", "### Checkpoint tensors", "",
            "Saved as `base_model.model.<layer>.<key>` in `adapter_model.safetensors`.", ""]
    rows = []
    for kind in m.kinds:
        for key, name, shape, level, cond in tensors(m.body, kind):
            rows.append((kind, f"`{key}`", f"`{name}`", f"`{shape}`", level, f"`{cond}`" if cond else ""))
    out += _table(("layer kind", "key", "tensor", "shape", "per", "when"), rows) if rows else ["none"]
    return out + [""]


def render(methods: Iterable[MethodDef], rules: Iterable[Rule]) -> str:
    """The whole catalogue as Markdown."""
    methods = sorted(methods, key=lambda m: m.name)
    out = ["# Methods", "",
           f"<!-- Generated from passes/*.peft by `{REGENERATE}`; do not edit by hand. -->", "",
           "Every adapter method peftc knows is a declaration in `passes/`. Option values go in a spec as "
           "`adapter NAME: METHOD(OPTION = VALUE, ...)`; the PEFT key is the `adapter_config.json` entry each "
           "option maps to, the per-layer key the PEFT dict of per-layer values (`OPTION at LAYER = VALUE`). "
           "Layer dimensions in shapes: `in`, `out` (nn.Linear orientation), `k`, `kh`, `kw`, `kd` (kernel).", "",
           "| method | PEFT type | layer kinds |", "|---|---|---|"]
    out += [f"| [{m.name}](#{m.name}) | {m.peft_type or ''} | {', '.join(m.kinds)} |" for m in methods]
    out.append("")
    for m in methods:
        out += render_method(m)
    rules = list(rules)
    if rules:
        out += ["## Factoring rules", "",
                "The `factor` pass rewrites live adapters with these rules, tried in this order (priority, then "
                "the more specific left side, then declaration order); the first that matches a node wins.", ""]
        out += _table(("rule", "prio", "rewrite", "where"),
                      [(f"`{r.name}`", r.priority, f"`{show(r.lhs)} => {show(r.rhs)}`",
                        f"`{show(r.where)}`" if r.where is not None else "") for r in rules])
        out.append("")
    return "\n".join(out)


def render_library() -> str:
    """The catalogue of the installed library (passes/*.peft)."""
    from peftc.library import library
    lib = library().checked()
    return render(lib.methods.values(), lib.rules)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    path = Path(args[0]) if args else DEFAULT_PATH
    from peftc.atomic import atomic_write_bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, render_library().encode())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
