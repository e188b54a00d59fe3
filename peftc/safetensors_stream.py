"""Read and write safetensors files one tensor at a time, in bounded memory.

`safetensors.torch.save_file` needs every tensor of a file in memory at once, and a memory-mapped read
keeps the pages it touched resident; a streaming merge of a multi-GB shard wants neither. The format is
simple (an 8-byte little-endian header length, a JSON header of dtype / shape / byte offsets, then the raw
little-endian data), so this module reads one tensor's bytes with `readinto`, copies untouched tensors
byte for byte in chunks, and writes a file whose header is known up front (a merge keeps every shape and
dtype) tensor by tensor. Every problem is a PeftcError naming the file (and the tensor key).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from peftc.errors import PeftcError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}
_CHUNK = 64 << 20


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int              # byte offsets into the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class Header:
    file: Path
    tensors: dict[str, TensorInfo]        # in the file's order
    metadata: dict[str, str] | None
    data_start: int                       # 8 + header length


def read_header(path: str | Path) -> Header:
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise PeftcError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                raise PeftcError(f"{path}: not a safetensors file (header length {n} does not fit the file)")
            text = f.read(n)
    except OSError as e:
        raise PeftcError(f"{path}: cannot read: {e.strerror}") from None
    try:
        head = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PeftcError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(head, dict):
        raise PeftcError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = head.pop("__metadata__", None)
    tensors: dict[str, TensorInfo] = {}
    for key, ent in head.items():
        try:
            start, end = (int(x) for x in ent["data_offsets"])
            info = TensorInfo(str(ent["dtype"]), tuple(int(d) for d in ent["shape"]), start, end)
        except (KeyError, TypeError, ValueError):
            raise PeftcError(f"{path}: corrupt safetensors header entry for tensor '{key}'") from None
        if 8 + n + end > size:
            raise PeftcError(f"{path}: tensor '{key}' ends at byte {8 + n + end}, past the end of the file "
                             f"({size} bytes): the file is truncated")
        tensors[key] = info
    tensors = dict(sorted(tensors.items(), key=lambda kv: kv[1].start))
    return Header(path, tensors, meta, 8 + n)


def read_tensor(header: Header, key: str) -> torch.Tensor:
    """One tensor of a file, read with one `readinto` (no memory map)."""
    info = header.tensors[key]
    if info.dtype not in DTYPES:
        raise PeftcError(f"{header.file}: tensor '{key}' has dtype {info.dtype}, which peftc cannot read")
    dtype = DTYPES[info.dtype]
    numel = 1
    for d in info.shape:
        numel *= d
    if numel * torch.empty((), dtype=dtype).element_size() != info.nbytes:
        raise PeftcError(f"{header.file}: tensor '{key}' has {info.nbytes} bytes, not what shape "
                         f"{list(info.shape)} {info.dtype} needs")
    out = torch.empty(info.shape, dtype=dtype)
    buf = out.view(-1).view(torch.uint8).numpy() if numel else None
    if buf is not None:
        with open(header.file, "rb") as f:
            f.seek(header.data_start + info.start)
            if f.readinto(buf) != info.nbytes:
                raise PeftcError(f"{header.file}: tensor '{key}' is truncated")
    return out


class ShardWriter:
    """Write one safetensors file whose tensors (key, dtype, shape) are known up front, tensor by tensor in
    that order: `write(key, tensor)` or `copy(key, header)` (the bytes of the same key in another file)."""

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None) -> None:
        head: dict[str, Any] = {}
        if metadata is not None:
            head["__metadata__"] = metadata
        offset = 0
        self.order: list[tuple[str, int]] = []
        for key, dtype, shape in entries:
            numel = 1
            for d in shape:
                numel *= d
            nbytes = numel * torch.empty((), dtype=DTYPES[dtype]).element_size()
            head[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.order.append((key, nbytes))
            offset += nbytes
        text = json.dumps(head, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.path = path
        self.f: BinaryIO = open(path, "wb")
        self.f.write(struct.pack("<Q", len(text)) + text)
        self.next = 0
        self.size = offset

    def _expect(self, key: str) -> int:
        want, nbytes = self.order[self.next]
        assert key == want, (key, want)
        self.next += 1
        return nbytes

    def write(self, key: str, t: torch.Tensor) -> None:
        nbytes = self._expect(key)
        data = t.detach().contiguous().view(-1).view(torch.uint8).numpy() if t.numel() else b""
        assert len(data) == nbytes, (key, len(data), nbytes)
        self.f.write(data)

    def copy(self, key: str, src: Header, src_key: str | None = None) -> None:
        nbytes = self._expect(key)
        info = src.tensors[src_key or key]
        assert info.nbytes == nbytes
        with open(src.file, "rb") as f:
            f.seek(src.data_start + info.start)
            left = nbytes
            while left:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    raise PeftcError(f"{src.file}: tensor '{src_key or key}' is truncated")
                self.f.write(chunk)
                left -= len(chunk)

    def close(self) -> None:
        self.f.close()

    def finish(self) -> None:
        """Close the file, checking that every tensor of the header was written."""
        self.close()
        if self.next != len(self.order):
            raise PeftcError(f"{self.path}: internal error: {len(self.order) - self.next} tensors not written")
