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


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(path: Path) -> None:
    """Fail now, before any work, if `path` (a file, or a folder to create) could not be written: its nearest
    existing folder must take a new file (tried for real, then removed; nothing is created on the way)."""
    folder = _nearest_existing(path.parent if not path.exists() or not path.is_dir() else path)
    if not folder.is_dir():
        raise PeftcError(f"cannot write {path}: {folder} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".peftc-probe.", dir=folder)
    except OSError as e:
        raise PeftcError(f"cannot write {path}: {folder} is not writable ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path in the target's folder (its name ending in `suffix`); on success it is renamed
    to `path`. Failing to write is an error naming `path`, never the temporary file."""
    path = Path(path)
    check_file_target(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as e:
        raise PeftcError(f"cannot write {path}: {e.strerror}") from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        raise PeftcError(f"cannot write {path}: {e.strerror}") from None
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


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path` to write a whole output folder into; on success it becomes
    `path` (a rename when `path` does not exist yet; else its files replace those in `path` one by one, each
    by a rename, and other files there stay). On failure or interruption the temporary folder is removed and
    `path` is as it was: a new output folder never appears half-written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PeftcError(f"output path {path} exists and is not a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except (FileExistsError, NotADirectoryError):
        raise PeftcError(f"cannot create output directory {path}: a file is in the way") from None
    except OSError as e:
        raise PeftcError(f"cannot create output directory {path}: {e.strerror}") from None
    try:
        yield tmp
        mode = 0o777 & ~_umask()
        if not path.exists():
            os.chmod(tmp, mode)
            os.replace(tmp, path)
            return
        for src in sorted(tmp.rglob("*")):
            dst = path / src.relative_to(tmp)
            if src.is_dir():
                dst.mkdir(exist_ok=True)
                os.chmod(dst, mode)
            else:
                os.replace(src, dst)
    except OSError as e:
        raise PeftcError(f"cannot write {path}: {e.strerror}") from None
    finally:
        if tmp.exists():
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)


def check_new_dir(out: Path, source: Path | None = None) -> None:
    """A whole output directory written in one piece (`peftc merge`): it must be new (or an empty folder), not
    the input `source`, and its parent writable."""
    if source is not None and out.resolve() == Path(source).resolve():
        raise PeftcError(f"output {out} is the input model directory; inputs are never modified: give another folder")
    if out.exists() and not out.is_dir():
        raise PeftcError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise PeftcError(f"output directory {out} exists and is not empty; give a new folder (or remove it)")
    check_writable(out)
