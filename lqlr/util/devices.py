"""Which device the matrix decompositions run on: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
from __future__ import annotations

import re

import torch

DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device(spec: str) -> None:
    """One-line error for a device string that is not auto, cpu, cuda, cuda:N or mps."""
    if not isinstance(spec, str) or not DEVICE_PATTERN.fullmatch(spec):
        raise ValueError(f"device={spec!r}: choose auto (CUDA when present, else CPU), cpu, cuda, cuda:N or mps")


def resolve_device(spec: str = "auto") -> torch.device:
    """The torch device ``spec`` names; ``auto`` is the first CUDA GPU when one is present, else the CPU.
    A device that is named but absent is a one-line error (never a silent CPU fallback)."""
    check_device(spec)
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={spec!r} but torch sees no CUDA GPU (torch {torch.__version__}, CUDA build: "
                             f"{torch.version.cuda or 'no'}): use device=cpu or device=auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={spec!r} but torch sees {torch.cuda.device_count()} CUDA GPU(s): "
                             f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device={spec!r} but this torch has no usable MPS backend: use device=cpu or device=auto")
    return device


def is_out_of_memory(err: BaseException) -> bool:
    """True for a GPU out-of-memory error (torch.OutOfMemoryError, or its older CUDA-only name)."""
    kinds = tuple(k for k in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if k)
    return isinstance(err, kinds) or "out of memory" in str(err).lower() and isinstance(err, RuntimeError)
