"""Numerical guards for the layer Hessian H (in × in): damping, dead inputs, Cholesky factors.

All of lqlr's factorisations of H go through :func:`regularize`, so the ridge and the
dead-input rule are the same everywhere (docs/design.md §1: add δ·mean(diag H)·I before factorising).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DampedHessian:
    """H + D, with D = diag(ridge) the diagonal that was added (dead inputs get 1 + ridge)."""

    H: torch.Tensor  # (in, in) damped Hessian
    added: torch.Tensor  # (in,) the diagonal D added to the raw H
    dead: torch.Tensor  # (in,) bool, inputs that were never active (H_ii = 0)


def check_hessian(H: torch.Tensor, n_in: int) -> None:
    """One-line errors for a Hessian of the wrong shape or with NaN/Inf."""
    if H.ndim != 2 or H.shape[0] != H.shape[1] or H.shape[0] != n_in:
        raise ValueError(f"H has shape {tuple(H.shape)}, expected ({n_in}, {n_in}) = (in, in) of W")
    if not torch.isfinite(H).all():
        raise ValueError("H contains NaN or Inf: recompute the Hessian from finite activations")


def regularize(H: torch.Tensor, damp: float) -> DampedHessian:
    """Damped H: dead inputs (H_ii = 0) get H_ii = 1, then δ·mean(diag H) is added to the diagonal."""
    H = H.to(torch.float32).clone()
    diag = torch.diagonal(H)
    if (diag < 0).any():
        raise ValueError(f"H has {int((diag < 0).sum())} negative diagonal entries, so it is not an input second moment "
                         "X Xᵀ/n: recompute it from the layer's inputs")
    dead = diag == 0
    live_mean = diag[~dead].mean() if (~dead).any() else torch.tensor(1.0, device=H.device)
    ridge = float(damp) * float(live_mean)
    added = torch.full_like(diag, ridge)
    added[dead] += 1.0
    H[dead, :] = 0.0
    H[:, dead] = 0.0
    H.diagonal().add_(added)
    return DampedHessian(H=H, added=added, dead=dead)


def cholesky(H: torch.Tensor, what: str = "H") -> torch.Tensor:
    """Lower Cholesky factor C (H = C Cᵀ); retries with a growing ridge if H is not positive definite."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        return L
    scale = float(torch.diagonal(H).abs().mean().clamp_min(1e-12))
    for ridge in (1e-6, 1e-4, 1e-2, 1e-1):
        L, info = torch.linalg.cholesky_ex(H + ridge * scale * torch.eye(H.shape[0], device=H.device))
        if int(info) == 0:
            return L
    raise ValueError(f"{what} is not positive definite even after damping: raise `damp` (e.g. 0.1) or check the calibration data")


def inverse_cholesky_upper(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of H⁻¹ (H⁻¹ = Uᵀ U), the error-feedback matrix of LDLQ/GPTQ."""
    Hinv = torch.cholesky_inverse(cholesky(H))
    return torch.linalg.cholesky(Hinv, upper=True)


def h_weighted_error(E: torch.Tensor, H: torch.Tensor | None) -> float:
    """tr(E H Eᵀ), summed in float64 (Frobenius ‖E‖² when H is None)."""
    E = E.to(torch.float32)
    if H is None:
        return float(E.double().pow(2).sum())
    return float(((E @ H.to(torch.float32)).double() * E.double()).sum())
