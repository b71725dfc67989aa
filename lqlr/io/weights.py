"""Read a safetensors file into memory the process owns, with no file mapping left behind.

``safetensors.torch.load_file`` and ``safe_open`` memory-map the file: tensors come back as views of
the mapping, every page read stays resident (and counted in the process's RSS) for as long as one
view lives, and a tensor converted to another dtype exists twice (the mapped source pages and the
copy). :func:`read_tensors` reads each tensor with plain file reads instead, straight into its final
buffer when the dtype is kept, and through a bounded staging buffer (``chunk_bytes``) when it is
converted, so that reading a file costs the bytes of the tensors it returns plus one chunk.

:func:`lqlr.load` and the transformers quantizer (:mod:`lqlr.io.hf`) load exports through it.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lqlr.io.export import IntegrityError

# safetensors' dtype names -> torch dtypes (the ones an lqlr export or a transformers checkpoint uses)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
CHUNK_BYTES = 4 << 20  # staging buffer of a dtype conversion: 4 MiB of source bytes at a time


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict[str, Any]], int]:
    """The tensor entries of a safetensors file's header (``{name: {dtype, shape, data_offsets}}``,
    ``__metadata__`` dropped) and the byte offset where the data starts; IntegrityError, one line, when
    the file is not a readable safetensors file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise IntegrityError(f"{path} is {size} bytes, too short for a safetensors file: re-export or restore it")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise IntegrityError(f"{path}: its header claims {n} bytes of a {size}-byte file; the file is truncated or "
                                 "not a safetensors file: re-export or restore it")
        try:
            header = json.loads(f.read(n))
        except ValueError as err:
            raise IntegrityError(f"{path}: its header is not JSON ({err}); the file is corrupt: re-export or restore it") from err
    header.pop("__metadata__", None)
    start = 8 + n
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        if entry["dtype"] not in DTYPES:
            raise IntegrityError(f"{path}: tensor {name} has dtype {entry['dtype']}, which lqlr does not read")
        numel = 1
        for d in entry["shape"]:
            numel *= d
        if end - begin != numel * _itemsize(DTYPES[entry["dtype"]]) or start + end > size:
            raise IntegrityError(f"{path}: tensor {name} ({entry['dtype']} {entry['shape']}) does not fit its bytes "
                                 f"{begin}..{end} of the data; the file is truncated or corrupt: re-export or restore it")
    return header, start


def read_tensors(path: str | os.PathLike, dtype: Callable[[str, torch.dtype], torch.dtype] | None = None,
                 names: set[str] | None = None, chunk_bytes: int = CHUNK_BYTES) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file at ``path`` (or those in ``names``), each in its own CPU
    memory, none a view of a file mapping.

    ``dtype(name, stored_dtype)`` gives the dtype a tensor is returned in (default: as stored). A
    kept dtype is read straight into the returned tensor; a converted one goes through a staging
    buffer of ``chunk_bytes`` source bytes, so the peak memory is the returned bytes plus one chunk.
    """
    header, start = read_header(path)
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb", buffering=0) as f:
        for name, entry in header.items():
            if names is not None and name not in names:
                continue
            stored = DTYPES[entry["dtype"]]
            want = dtype(name, stored) if dtype is not None else stored
            begin, end = entry["data_offsets"]
            shape = tuple(entry["shape"])
            f.seek(start + begin)
            if want == stored:
                tensor = torch.empty(shape, dtype=stored)
                _read_into(f, _bytes_of(tensor), path, name)
            else:
                tensor = torch.empty(shape, dtype=want)
                _read_converted(f, tensor.view(-1), stored, end - begin, chunk_bytes, path, name)
            out[name] = tensor
    return out


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (any dtype, bfloat16 included)."""
    flat = tensor.view(-1)
    if flat.numel() == 0:
        return memoryview(bytearray())
    return memoryview(flat.view(torch.uint8).numpy())


def _read_into(f, buffer: memoryview, path, name: str) -> None:
    done = 0
    while done < len(buffer):
        n = f.readinto(buffer[done:])
        if not n:
            raise IntegrityError(f"{path}: tensor {name} ends after {done} of {len(buffer)} bytes; the file is "
                                 "truncated: re-export or restore it")
        done += n


def _read_converted(f, flat: torch.Tensor, stored: torch.dtype, nbytes: int, chunk_bytes: int, path, name: str) -> None:
    """Fill ``flat`` (the returned tensor, flattened) from ``nbytes`` stored as ``stored``, ``chunk_bytes``
    (rounded down to whole elements) at a time."""
    item = _itemsize(stored)
    per_chunk = max(1, chunk_bytes // item)
    staging = torch.empty(min(per_chunk, flat.numel()), dtype=stored)
    view = _bytes_of(staging)
    for i in range(0, flat.numel(), per_chunk):
        n = min(per_chunk, flat.numel() - i)
        _read_into(f, view[: n * item], path, name)
        flat[i: i + n].copy_(staging[:n])  # the conversion: stored dtype -> the returned dtype
