"""A QLRLinear's packed buffers as a compiled-kernel plan (no copy of the codes).

The plan holds references to the module's own buffers (packed Q codes, fp16 scales, packed zero
points, packed or fp16 L and R) plus the rotation's random signs and odd-part orthogonal factor,
so the only memory it adds is O(in + out) per layer.
"""
from __future__ import annotations

from types import ModuleType

import torch

from lqlr.core.e8p import source_points
from lqlr.core.grids import normal_float_levels
from lqlr.core.trellis import gaussian_code
from lqlr.core.incoherence import Rotation, rotation_parts

# at most this many rows of x go through the packed GEMV; more rows (prefill) dequantize a tile
# of the matrix and use a dense GEMM
GEMV_MAX_ROWS = 8


PACKED_KINDS = ("fp16", "uniform", "nf", "e8p", "trellis")  # grid kinds the compiled kernel reads (not the GGUF formats yet)


def unpacked_kinds(layer) -> list[str]:
    """The grid kinds of ``layer``'s stored matrices that the compiled kernel cannot read."""
    prefixes = ("q", "l", "r") if layer.rank > 0 else ("q",)
    return [layer.spec[p]["kind"] + ("" if layer.spec[p]["kind"] != "e8p" else f"{layer.spec[p]['bits']}")
            for p in prefixes if layer.spec[p]["kind"] not in PACKED_KINDS
            or (layer.spec[p]["kind"] == "e8p" and int(layer.spec[p]["bits"]) != 2)]  # E8P with a residual: not yet


def packed_matrix(ext: ModuleType, layer, prefix: str, rows: int, cols: int):
    """The kernel's view of one stored matrix (``prefix`` "q", "l" or "r") of ``layer``."""
    spec = layer.spec[prefix]
    if spec["kind"] == "fp16":
        w = getattr(layer, f"{prefix}_weight")
        return ext.Packed(w.to(torch.float16).contiguous(), torch.empty(0, dtype=torch.float16, device=w.device), None, None,
                          rows, cols, 16, cols)
    bits, group = int(spec["bits"]), int(spec["group_size"])
    scale = getattr(layer, f"{prefix}_scale")
    book = trellis = None
    if spec["kind"] == "uniform":
        zero, lut = getattr(layer, f"{prefix}_zero"), None
    elif spec["kind"] == "nf":
        zero, lut = None, normal_float_levels(bits)
    elif spec["kind"] == "e8p":
        zero, lut, book = None, None, source_points()  # (256, 8): the codebook is computed, not stored
    elif spec["kind"] == "trellis":
        zero, lut, trellis = None, None, gaussian_code(int(spec["state_bits"]))  # (2^L,): computed, not stored
    else:
        raise ValueError(f"grid kind {spec['kind']!r} has no packed kernel")
    return ext.Packed(getattr(layer, f"{prefix}_codes"), scale.to(torch.float16).contiguous(), zero, lut,
                      rows, cols, bits, group, book, trellis)


def rotation(ext: ModuleType, rot: Rotation):
    """The kernel's view of a rotation V of size n = m·p."""
    signs, Om = rotation_parts(rot.n, rot.m, int(rot.seed))
    return ext.Rot(signs, Om if rot.m > 1 else None, rot.n, rot.p, rot.m)


def build_plan(ext: ModuleType, layer, gemv_max_rows: int = GEMV_MAX_ROWS):
    """A compiled ``Plan`` computing ``layer``'s forward (x Vᵀ, Q' and L'R' products, y U, bias)."""
    out_f, in_f = layer.out_features, layer.in_features
    Q = packed_matrix(ext, layer, "q", out_f, in_f)
    L = R = None
    if layer.rank > 0:
        L = packed_matrix(ext, layer, "l", out_f, layer.rank)
        R = packed_matrix(ext, layer, "r", layer.rank, in_f)
    rot = layer.incoherence
    V = rotation(ext, rot.V) if rot else None
    U = rotation(ext, rot.U) if rot else None
    bias = layer.bias.detach() if layer.bias is not None else None
    return ext.Plan(Q, L, R, V, U, bias, gemv_max_rows)
