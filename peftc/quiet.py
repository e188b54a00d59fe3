"""Library calls print nothing of their own: torch's exporters log notices (missing torchvision ops, temp
file names) and warn about their own deprecations; `quiet_libraries()` holds those back for one call."""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

NOISY_LOGGERS = ("torch.export", "torch.onnx", "torch._dynamo", "torch._export", "torch.fx", "onnxscript")


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence the warnings and below-error logging of torch's exporters (and onnxscript) inside the block."""
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.ERROR))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
