"""`peftc import`: PEFT checkpoint directories -> a .peft spec that loads them."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from peftc.atomic import atomic_write_bytes
from peftc.checkpoint import read_adapter_config, read_adapter_tensors
from peftc.errors import PeftcError
from peftc.library import library


def _adapter_name(path: Path, taken: set[str], single: bool) -> str:
    if single:
        return "default"
    base = re.sub(r"[^A-Za-z0-9_]", "_", path.resolve().name) or "adapter"
    if base[0].isdigit():
        base = "a_" + base
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def import_spec(dirs: list[str], out: str | Path, merge: bool = False) -> str:
    """Write a spec importing each PEFT checkpoint directory; returns the spec text."""
    out = Path(out)
    lib = library()
    lines = ["# Written by `peftc import`: each adapter is loaded whole (method, options, targets, weights)",
             "# from its PEFT checkpoint directory. Paths are relative to this file.", ""]
    taken: set[str] = set()
    for d in dirs:
        p = Path(d)
        cfg = read_adapter_config(p)
        method = lib.method_for_config(cfg)
        if method is None:
            raise PeftcError(f"{p / 'adapter_config.json'}: unsupported peft_type {cfg.get('peft_type')!r} "
                             f"(peftc supports {', '.join(lib.peft_types())})")
        read_adapter_tensors(p)  # fail now on a missing or corrupt weights file
        name = _adapter_name(p, taken, len(dirs) == 1)
        taken.add(name)
        rel = os.path.relpath(p.resolve(), out.resolve().parent)
        summary = {k: cfg.get(k) for k in ("r", "lora_alpha", "target_modules", "feedforward_modules") if cfg.get(k)}
        lines.append(f"# {method.name}: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
        body = " { merge }" if merge else ""
        lines.append(f"adapter {name}: import {json.dumps(rel)}{body}")
        lines.append("")
    text = "\n".join(lines)
    atomic_write_bytes(out, text.encode())
    return text
