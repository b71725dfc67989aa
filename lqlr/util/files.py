"""Files that are never half-written: atomic writes, sha256 of files, fingerprints of runs."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ExportWriteError(OSError):
    """Writing the export failed (e.g. the disk is full); files written before are left intact."""


def atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then fsync and rename over ``path``; on failure the temp file is removed, the
    previous ``path`` (if any) is untouched, and one ExportWriteError names the file and the fix."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise ExportWriteError(err.errno, f"writing {path} failed ({reason}): free space or choose another "
                                          "output_dir and rerun; files written before are intact") from err


def fingerprint(*parts) -> str:
    """sha256 over JSON-able parts and tensors (the identity of a compression run)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(str((p.dtype, tuple(p.shape))).encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()
