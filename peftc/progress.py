"""Progress for long steps: a spinner on a terminal, silence otherwise (pipes, CI logs, --quiet)."""
from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator

_quiet = False
history: list[tuple[str, float]] = []   # every step run in this process: (label, seconds), terminal or not


def set_quiet(q: bool) -> None:
    global _quiet
    _quiet = q


def _interactive() -> bool:
    return not _quiet and sys.stderr.isatty() and not os.environ.get("CI")


@contextlib.contextmanager
def step(label: str) -> Iterator[None]:
    """Show `label` with a spinner while the block runs (on a terminal only); record it in `history`."""
    t0 = time.perf_counter()
    if not _interactive():
        yield
        history.append((label, time.perf_counter() - t0))
        return
    from rich.console import Console
    console = Console(stderr=True)
    with console.status(f"{label}..."):
        yield
    history.append((label, time.perf_counter() - t0))
    console.print(f"[green]✓[/green] {label} [dim]({time.perf_counter() - t0:.1f}s)[/dim]")
