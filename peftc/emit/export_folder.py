"""The shared frame of the ONNX writers (peftc.emit.onnx, peftc.emit.onnx_adapters): export into a temporary
folder beside the target, check what was written there, then move every file into place (atomically, each by a
rename); an exporter's own exception becomes one PeftcError line, never a traceback."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from torch import fx

from peftc.atomic import finish_file
from peftc.errors import PeftcError

TWO_GB = 2 * 1024**3


def first_line(e: BaseException) -> str:
    """An exception's first message line (its type's name when it has no message)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def needs_external_data(gm: fx.GraphModule) -> bool:
    """Whether `gm`'s weights (parameters and buffers) are over ONNX's 2 GB protobuf limit."""
    nbytes = sum(t.numel() * t.element_size() for t in list(gm.parameters()) + list(gm.buffers()))
    return nbytes > TWO_GB


@contextlib.contextmanager
def export_folder(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path` (the caller writes `path.name` and any side files into it and
    checks them there); when the body succeeds, every file in it is moved beside `path`. The folder is always
    removed. Failing to create or move is an error naming `path`."""
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as e:
        raise PeftcError(f"cannot write {path}: {e.strerror}") from None
    try:
        yield tmpdir
        try:
            for f in tmpdir.iterdir():
                finish_file(f, path.parent / f.name)
        except OSError as e:
            raise PeftcError(f"cannot write {path}: {e.strerror}") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


@contextlib.contextmanager
def export_errors(what: str, gm: fx.GraphModule) -> Iterator[None]:
    """Run the body (an export) with `gm` in inference mode, restored after; an exception other than a
    PeftcError becomes `PeftcError("{what} failed: Type: first line")`."""
    was = gm.training
    gm.eval()
    try:
        yield
    except PeftcError:
        raise
    except Exception as e:  # noqa: BLE001 - the exporter's own failure, reported in one line
        raise PeftcError(f"{what} failed: {type(e).__name__}: {first_line(e)}") from None
    finally:
        gm.train(was)
