"""The LR step: a rank-k fit of A = W − Q under H, with L and R on low-bit grids (LPLR).

Closed form (no quantization): min_{rank M ≤ k} ‖(A − M) C‖_F with H = C Cᵀ is
M = [A C]_k C⁻¹ (truncated SVD); L = U√S, R = √S Vᵀ C⁻¹ split the singular values evenly.
Low-bit factors then alternate (docs/design.md §2):
  L ← A H Rᵀ (R H Rᵀ)⁻¹, rounded with Hessian R H Rᵀ (the rows of L see inputs R x);
  R ← (Lᵀ L)⁻¹ Lᵀ A, rounded with Hessian H.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lqlr.config import FLOAT_BITS
from lqlr.core.grids import Grid, QuantizedTensor, make_grid
from lqlr.core.hessian import regularize
from lqlr.core.ldlq import LDLQPlan, ldlq_plan, ldlq_round

EXACT_SVD_MAX_DIM = 1024  # "auto": exact SVD up to this min(out, in), randomized above


def exact_svd(method: str, m: int, n: int) -> bool:
    """Whether ``svd=method`` decomposes an m × n matrix exactly (else by a randomized range finder)."""
    return method == "exact" or (method == "auto" and min(m, n) <= EXACT_SVD_MAX_DIM)


def _top_svd(apply, apply_t, m: int, n: int, k: int, exact_matrix, method: str, seed: int,
             device: torch.device):
    """Top-k SVD (U, S, Vh) of an implicit m × n matrix B given products B·X and Bᵀ·Y."""
    if exact_svd(method, m, n):
        U, S, Vh = torch.linalg.svd(exact_matrix(), full_matrices=False)
        return U[:, :k], S[:k], Vh[:k]
    # randomized range finder with power iterations (Halko, Martinsson & Tropp 2011)
    q = min(k + 16, m, n)
    # the test matrix is drawn on the host (the same omega for a seed on every device), then moved to the data
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, q, generator=gen, dtype=torch.float32, device="cpu").to(device)  # (n, q)
    Y = apply(omega)  # (m, q)
    for _ in range(4):
        Y = torch.linalg.qr(Y).Q
        Z = torch.linalg.qr(apply_t(Y)).Q  # (n, q)
        Y = apply(Z)
    Qy = torch.linalg.qr(Y).Q  # (m, q) orthonormal basis of the range of B
    Us, S, Vh = torch.linalg.svd(apply_t(Qy).T, full_matrices=False)  # Qyᵀ B = (q, n)
    return (Qy @ Us)[:, :k], S[:k], Vh[:k]


def weighted_svd(A: torch.Tensor, C: torch.Tensor | None, k: int, method: str = "auto",
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k SVD (U, S, Vh) of A C (C = None: of A), exact or randomized as ``method`` says."""
    m, n = A.shape
    k = min(k, m, n)
    if C is None:
        apply, apply_t = (lambda X: A @ X), (lambda Y: A.T @ Y)
        exact = lambda: A  # noqa: E731
    else:
        apply, apply_t = (lambda X: A @ (C @ X)), (lambda Y: C.T @ (A.T @ Y))
        exact = lambda: A @ C  # noqa: E731
    return _top_svd(apply, apply_t, m, n, k, exact, method, seed, A.device)


def rank_k_fit(A: torch.Tensor, C: torch.Tensor | None, k: int, method: str = "auto",
               seed: int = 0, svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """min over L (m, k), R (k, n) of ‖(A − L R) C‖_F, with C the lower Cholesky factor of H.

    C = None means H = I. Returns L = U√S (m, k) and R = √S Vᵀ C⁻¹ (k, n). ``svd``: this A C's
    :func:`weighted_svd` with at least k triplets, computed once for several ranks (else computed here).
    """
    m, n = A.shape
    k = min(k, m, n)
    if svd is not None and svd[1].shape[0] < k:
        raise ValueError(f"rank_k_fit: the given SVD has {svd[1].shape[0]} singular values, rank {k} needs {k}")
    U, S, Vh = svd if svd is not None else weighted_svd(A, C, k, method, seed)
    U, S, Vh = U[:, :k], S[:k], Vh[:k]
    root = S.clamp_min(0).sqrt()
    L = U * root  # (m, k)
    Rc = root[:, None] * Vh  # (k, n) = √S Vᵀ in the C basis
    if C is None:
        return L, Rc
    R = torch.linalg.solve_triangular(C.T, Rc.T, upper=True).T  # R C = Rc
    return L, R


def solve_psd(M: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """X with M X = B for a symmetric PSD M; tiny ridge if singular, pinv if that fails."""
    scale = float(torch.diagonal(M).abs().mean().clamp_min(1e-30))
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    for ridge in (0.0, 1e-7, 1e-5, 1e-3):
        C, info = torch.linalg.cholesky_ex(M + ridge * scale * eye)
        if int(info) == 0:
            X = torch.cholesky_solve(B, C)
            if torch.isfinite(X).all():
                return X
    return torch.linalg.pinv(M) @ B


@dataclass
class Factors:
    """L (out, k) and R (k, in) as dense float32 values, with their grid storage (None = fp16)."""

    L: torch.Tensor
    R: torch.Tensor
    qL: QuantizedTensor | None
    qR: QuantizedTensor | None


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def lr_objective(A: torch.Tensor, H: torch.Tensor | None, L: torch.Tensor, R: torch.Tensor) -> float:
    """tr((A − L R) H (A − L R)ᵀ) − tr(A H Aᵀ), in O(k·n²) instead of O(m·n²)."""
    HRt = R.T if H is None else H @ R.T  # (n, k)
    cross = (L * (A @ HRt)).sum()  # tr(Lᵀ A H Rᵀ)
    quad = ((L.T @ L) * (R @ HRt)).sum()  # tr(L R H Rᵀ Lᵀ)
    return float(quad - 2 * cross)


def lr_step(A: torch.Tensor, plan: LDLQPlan | None, C: torch.Tensor | None, k: int, bl: int, br: int,
            group_size: int, grid: str = "uniform", lr_iters: int = 3, damp: float = 0.01,
            block_size: int = 128, clip_search: bool = True, svd: str = "auto", seed: int = 0,
            start: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> Factors:
    """min over L, R on their grids of tr((A − L R) H (A − L R)ᵀ), by LPLR from the closed form.

    ``plan`` holds the damped H (None: H = I) and ``C`` its lower Cholesky factor. Factors with
    16 bits are kept as fp16 values. The alternation keeps its best iterate and stops as soon as
    the objective stops falling. ``start``: A C's :func:`weighted_svd` (≥ k triplets), shared by several ranks.
    """
    L, R = rank_k_fit(A, C, k, method=svd, seed=seed, svd=start)
    k = L.shape[1]
    if bl == FLOAT_BITS and br == FLOAT_BITS:
        return Factors(L=_fp16(L), R=_fp16(R), qL=None, qR=None)
    grid_L = make_grid(grid, bl, min(group_size, k), clip_search) if bl != FLOAT_BITS else None
    grid_R = make_grid(grid, br, group_size, clip_search) if br != FLOAT_BITS else None
    return alternate_factors(A, plan, L, R, grid_L, grid_R, lr_iters, damp, block_size)


def alternate_factors(A: torch.Tensor, plan: LDLQPlan | None, L: torch.Tensor, R: torch.Tensor,
                      grid_L: Grid | None, grid_R: Grid | None, lr_iters: int = 3, damp: float = 0.01,
                      block_size: int = 128) -> Factors:
    """min over L, R on ``grid_L``, ``grid_R`` (None: fp16) of tr((A − L R) H (A − L R)ᵀ), alternating
    from the real-valued start (L, R): each factor refit in closed form with the other fixed, then
    rounded by LDLQ under the Hessian its rows see. ``plan`` holds the damped H (None: H = I).
    Keeps the best iterate; stops as soon as the objective stops falling."""
    H = None if plan is None else plan.damped.H
    best: Factors | None = None
    best_obj = float("inf")
    for _ in range(max(1, lr_iters)):
        # L ← argmin_L tr((A − L R) H (A − L R)ᵀ) = A H Rᵀ (R H Rᵀ)⁻¹, rounded with Hessian R H Rᵀ
        HRt = R.T if H is None else H @ R.T  # (n, k)
        RHRt = R @ HRt  # (k, k)
        Lstar = solve_psd(RHRt, (A @ HRt).T).T  # (m, k)
        if grid_L is None:
            L, qL = _fp16(Lstar), None
        else:
            rl = ldlq_round(Lstar, ldlq_plan(regularize(RHRt, damp)) if H is not None else None, grid_L, block_size)
            L, qL = rl.Q, rl.qt
        # R ← argmin_R tr((A − L R) H (A − L R)ᵀ) = (Lᵀ L)⁻¹ Lᵀ A, rounded with Hessian H
        Rstar = solve_psd(L.T @ L, L.T @ A)  # (k, n)
        if grid_R is None:
            R, qR = _fp16(Rstar), None
        else:
            rr = ldlq_round(Rstar, plan, grid_R, block_size)
            R, qR = rr.Q, rr.qt
        obj = lr_objective(A, H, L, R)
        if best is None or obj < best_obj - 1e-4 * abs(best_obj):
            best_obj, best = obj, Factors(L=L, R=R, qL=qL, qR=qR)
        else:
            break
    assert best is not None
    return best
