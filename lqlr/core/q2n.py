"""Q2N error reshaping (seed 003, docs/design.md §2), part (a): a per-row rescale of Q under H.

Each row q_i of the rounded Q is scaled by
    α_i = (t_i H q_iᵀ + λ_i) / (q_i H q_iᵀ + λ_i),   λ_i = ρ · q_i H q_iᵀ,
the minimiser of (t_i − α q_i) H (t_i − α q_i)ᵀ + λ_i (α − 1)² — the H-optimal row gain,
shrunk toward 1 by ρ. The gain is folded into the row's group scales, so it costs no bits.
"""
from __future__ import annotations

import torch

from lqlr.core.grids import QuantizedTensor


def q2n_rescale(T: torch.Tensor, qt: QuantizedTensor, H: torch.Tensor | None, rho: float = 0.2) -> QuantizedTensor:
    """Q with each row rescaled toward its target row of T under H (H = None: Frobenius)."""
    Q = qt.dequantize()
    QH = Q if H is None else Q @ H  # (rows, in)
    tHq = (T * QH).sum(dim=1)
    qHq = (Q * QH).sum(dim=1)
    lam = rho * qHq
    denom = qHq + lam
    alpha = torch.where(denom > 0, (tHq + lam) / denom.clamp_min(1e-30), torch.ones_like(denom))
    scale = (qt.scale * alpha[:, None]).to(torch.float16).to(torch.float32)
    scale = torch.where(scale.abs() > 0, scale, qt.scale)  # never zero a scale by underflow
    zero = qt.zero
    if zero is not None and qt.grid.float_zero:  # x = q·s + m: α x = q·(α s) + α m
        zero = (zero * alpha[:, None]).to(torch.float16).to(torch.float32)
    return QuantizedTensor(codes=qt.codes, scale=scale, zero=zero, grid=qt.grid)
