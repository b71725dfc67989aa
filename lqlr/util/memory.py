"""Peak resident memory of this process, resettable so that each run of an in-process Hydra multirun
reports its own peak (Linux: /proc/self/clear_refs "5" resets VmHWM; elsewhere ru_maxrss, which
only grows)."""
from __future__ import annotations

import math
import resource
from pathlib import Path


def reset_peak_rss() -> bool:
    """Reset the peak-RSS counter to the current RSS (after freeing what earlier runs left); False
    where the OS cannot."""
    import gc

    gc.collect()
    try:
        _libc().malloc_trim(0)  # hand freed heap pages back so they do not count
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def set_mmap_threshold(kib: int) -> bool:
    """Serve every heap block of ``kib`` KiB or more by mmap, so it goes back to the OS when freed
    (glibc ``mallopt(M_MMAP_THRESHOLD)``; also stops glibc raising the threshold by itself).

    Training on a packed base dequantizes each Q' into a fresh multi-MB buffer twice per step;
    glibc's default keeps such freed blocks in its heap, fragmented, and RSS grows by about the
    dense weights' size. Costs page faults (slower steps). False where the C library has no mallopt.
    """
    try:
        return bool(_libc().mallopt(-3, int(kib) * 1024))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False


def peak_rss_mb() -> float:
    """Peak resident set size since the last reset (or since the process started), in MiB."""
    hwm = _status_mb("VmHWM")
    return hwm if not math.isnan(hwm) else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Current resident set size in MiB (NaN where /proc is not available)."""
    return _status_mb("VmRSS")


def rss_parts_mb() -> dict[str, float]:
    """The current RSS in MiB split into ``anon`` (heap, tensors) and ``file`` (mapped files: code, and
    memory-mapped weights such as safetensors); NaN where /proc is not available."""
    return {"anon": _status_mb("RssAnon"), "file": _status_mb("RssFile")}


def module_memory_mb(module) -> dict[str, float]:
    """MiB held by ``module``'s tensors: ``trainable`` parameters, ``frozen`` parameters and buffers
    (shared tensors, e.g. tied embeddings, counted once)."""
    seen: set[int] = set()
    out = {"trainable": 0.0, "frozen": 0.0}
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        out["trainable" if t.requires_grad else "frozen"] += t.numel() * t.element_size() / 2**20
    return out


def _libc():
    """The C library (glibc on Linux); OSError where there is none to load."""
    import ctypes

    return ctypes.CDLL("libc.so.6")


def _status_mb(key: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
