"""How QLRLinear layers compute their forward: the kernel choice.

Kinds (``lqlr.load(path, kernel=...)`` or :func:`set_kernel`):

* ``"packed"`` — the compiled CPU kernel (``qlr_cpu.cpp``): a GEMV that reads the packed codes
  directly for a few rows of input (decode), dequantize-a-tile + GEMM for many (prefill); the
  low-rank term as two skinny packed products, the rotations as fast Walsh–Hadamard transforms.
  Memory stays the packed size. Needs the extension (built once on first use: a C++ compiler
  and ninja).
* ``"reference"`` — pure torch: dequantize Q (and L, R) on every call, then ``F.linear``. Slow,
  always available, the oracle the packed kernel is tested against.
* ``"dense-fp32"``, ``"dense-fp16"``, ``"dense-bf16"`` — dequantize once: the effective weight
  W = Q + L·R in the original basis is materialised in that dtype and used by ``F.linear``
  (trades memory for speed; fp16/bf16 round the weight and compute in that dtype).
* ``"auto"`` — ``"packed"`` where the extension is available (CPU tensors) and reads the layer's
  grids (not the GGUF formats yet), else ``"reference"``.

The kernel is used for inference only: when autograd must see the layer (grad enabled and the
input or bias requires grad, e.g. LoRA training on the packed base), the reference path runs.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from lqlr.nn.kernels.build import extension
from lqlr.nn.kernels.plan import build_plan, unpacked_kinds

KERNELS = ("auto", "packed", "reference", "dense-fp32", "dense-fp16", "dense-bf16")
_DENSE_DTYPES = {"dense-fp32": torch.float32, "dense-fp16": torch.float16, "dense-bf16": torch.bfloat16}


def check_kernel(kind: str) -> str:
    """``kind`` if it names a kernel, else a one-line error listing the choices."""
    if kind not in KERNELS:
        raise ValueError(f"kernel={kind!r} is not a kernel: choose one of {', '.join(KERNELS)}")
    return kind


def packed_available() -> bool:
    """Whether the compiled packed kernel can run here (built on first call)."""
    return extension() is not None


def resolve(kind: str, layer=None) -> str:
    """The concrete kernel for ``kind``: ``"auto"`` becomes ``"packed"`` or ``"reference"``."""
    check_kernel(kind)
    on_cpu = layer is None or layer.q_scale.device.type == "cpu"
    missing = unpacked_kinds(layer) if layer is not None else []
    if kind == "auto":
        return "packed" if on_cpu and not missing and packed_available() else "reference"
    if kind == "packed":
        if missing:
            raise ValueError(f"kernel='packed' cannot read grid {missing[0]!r} yet; use kernel='auto' (the reference "
                             "path for such layers) or a dense-* kernel")
        if not on_cpu:
            raise ValueError("kernel='packed' runs on CPU only; use kernel='reference' or a dense-* kernel on "
                             f"{layer.q_scale.device}")
        if not packed_available():
            raise RuntimeError("kernel='packed' needs the compiled extension, which could not be built (no C++ "
                               "compiler or ninja, or LQLR_NO_EXTENSION is set); use kernel='auto' or 'reference'")
    return kind


def make_fast(layer, kind: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The forward function of ``layer`` for a concrete kernel (None for ``"reference"``)."""
    if kind == "reference":
        return None
    if kind == "packed":
        return build_plan(extension(), layer).forward
    dtype = _DENSE_DTYPES[kind]
    W = layer.dequantize().to(dtype)  # (out, in): Q + L·R in the original basis, materialised once
    b = layer.bias.detach().to(dtype) if layer.bias is not None else None

    def dense(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(dtype), W, b).to(x.dtype)

    dense.weight = W  # type: ignore[attr-defined]  (kept reachable for memory accounting)
    return dense


__all__ = ["KERNELS", "check_kernel", "packed_available", "resolve", "make_fast", "extension"]
