"""Atomic outputs: write to a temporary file beside the target, then rename over it, so a failed or
interrupted run never leaves a half-written file. Files get the usual permissions (0666 & ~umask)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from peftc.errors import PeftcError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_file_target(path: Path) -> None:
    """A file output must not be a directory, and its folder must be creatable."""
    if path.is_dir():
        raise PeftcError(f"output path {path} is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise PeftcError(f"cannot create the folder for {path}: a file is in the way") from None
    except OSError as e:
        raise PeftcError(f"cannot create the folder for {path}: {e.strerror}") from None


def check_dir_target(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise PeftcError(f"output path {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PeftcError(f"cannot create output directory {path}: {e.strerror}") from None


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it is renamed to `path`."""
    path = Path(path)
    check_file_target(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def finish_file(tmp: Path, path: Path) -> None:
    """Give a finished temp file the usual permissions and move it into place."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
