"""`peftc import`: PEFT checkpoint directories -> a .peft spec that loads them.

A directory saved by peft with several adapters holds the default one at its root and each other one in
a subfolder named after it (`DIR/`, `DIR/<name>/`): every one of them is imported. Nothing here imports
torch: configs are JSON, and weights files are checked (header and size) without being loaded.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from peftc.atomic import atomic_write_bytes
from peftc.checkpoint import CONFIG_NAME, check_adapter_weights, read_adapter_config
from peftc.errors import PeftcError
from peftc.library import library


@dataclass
class Imported:
    text: str
    names: list[str]
    notes: list[str] = field(default_factory=list)    # what was left out, and why


def _short(value: object) -> object:
    """A long module list as its first entry and a count, for a one-line comment."""
    if isinstance(value, list) and len(value) > 2:
        return f"[{value[0]!r}, ... {len(value)} in all]"
    return value


def _clean(name: str) -> str:
    base = re.sub(r"[^A-Za-z0-9_]", "_", name) or "adapter"
    return "a_" + base if base[0].isdigit() else base


def _unique(base: str, taken: set[str]) -> str:
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def _checkpoints(dirs: list[str]) -> list[tuple[Path, str, bool]]:
    """(directory, proposed adapter name, given explicitly) for every checkpoint in `dirs`: the directory
    itself when it has an adapter_config.json, and each subfolder that has one."""
    found: list[tuple[Path, str, bool]] = []
    for d in dirs:
        p = Path(d)
        subs = sorted(s for s in p.iterdir() if (s / CONFIG_NAME).is_file()) if p.is_dir() else []
        has_root = (p / CONFIG_NAME).is_file()
        if has_root or not subs:
            # peft names the root adapter 'default'; with several folders given, the folder's name says which
            root_name = "default" if len(dirs) == 1 else _clean(p.resolve().name)
            found.append((p, root_name, True))
        found += [(s, _clean(s.name), False) for s in subs]
    return found


def import_spec(dirs: list[str], out: str | Path, merge: bool = False) -> Imported:
    """Write a spec importing each PEFT checkpoint directory (and the adapters in its subfolders)."""
    out = Path(out)
    lib = library()
    lines = ["# Written by `peftc import`: each adapter is loaded whole (method, options, targets, weights)",
             "# from its PEFT checkpoint directory. Paths are relative to this file.", ""]
    taken: set[str] = set()
    names: list[str] = []
    notes: list[str] = []
    for p, proposed, explicit in _checkpoints(dirs):
        cfg = read_adapter_config(p)
        method = lib.method_for_config(cfg)
        if method is None:
            msg = (f"{p / CONFIG_NAME}: unsupported peft_type {cfg.get('peft_type')!r} "
                   f"(peftc supports {', '.join(lib.peft_types())})")
            if explicit:
                raise PeftcError(msg)
            notes.append(f"left out {p}: {msg.split(': ', 1)[1]}")
            continue
        check_adapter_weights(p)  # fail now on a missing or corrupt weights file
        name = _unique(proposed, taken)
        names.append(name)
        rel = os.path.relpath(p.resolve(), out.resolve().parent)
        summary = {k: _short(cfg.get(k)) for k in ("r", "lora_alpha", "target_modules", "feedforward_modules",
                                                   "target_parameters", "layer_replication") if cfg.get(k)}
        lines.append(f"# {method.name}: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
        body = " { merge }" if merge else ""
        lines.append(f"adapter {name}: import {json.dumps(rel)}{body}")
        lines.append("")
    if not names:
        raise PeftcError(f"nothing to import: {'; '.join(notes)}")
    text = "\n".join(lines)
    atomic_write_bytes(out, text.encode())
    return Imported(text, names, notes)
