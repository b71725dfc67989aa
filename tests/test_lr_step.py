import pytest
import torch
from conftest import correlated_hessian

from lqlr.core.grids import UniformGrid, quantize_rtn
from lqlr.core.hessian import cholesky, h_weighted_error, regularize
from lqlr.core.ldlq import ldlq_plan
from lqlr.core.lowrank import lr_objective, lr_step, rank_k_fit


def reference_rank_k(A, H, k):
    """Second implementation: symmetric square root, M = [A H^½]_k H^-½ in float64."""
    evals, V = torch.linalg.eigh(H.double())
    sqrt = V @ torch.diag(evals.sqrt()) @ V.T
    isqrt = V @ torch.diag(evals.rsqrt()) @ V.T
    U, S, Vh = torch.linalg.svd(A.double() @ sqrt)
    return (U[:, :k] * S[:k]) @ Vh[:k] @ isqrt


@pytest.mark.parametrize("k", [1, 8, 20])
def test_closed_form_matches_reference(k):
    gen = torch.Generator().manual_seed(k)
    A = torch.randn(60, 80, generator=gen)
    H = correlated_hessian(80, seed=k)
    L, R = rank_k_fit(A, cholesky(H), k, method="exact")
    assert L.shape == (60, k) and R.shape == (k, 80)
    M = reference_rank_k(A, H, k)
    assert torch.allclose((L @ R).double(), M, atol=1e-3 * M.abs().max())
    # and it is optimal: random rank-k perturbations of it never do better
    best = h_weighted_error(A - L @ R, H)
    for s in range(5):
        g = torch.Generator().manual_seed(100 + s)
        Lp = L + 0.01 * torch.randn(L.shape, generator=g)
        Rp = R + 0.01 * torch.randn(R.shape, generator=g)
        assert h_weighted_error(A - Lp @ Rp, H) >= best * (1 - 1e-6)


def test_randomized_svd_matches_exact_on_decaying_spectrum():
    gen = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(300, 300, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(200, 200, generator=gen))
    A = (U[:, :200] * torch.logspace(1, -3, 200)) @ V.T
    H = correlated_hessian(200, seed=1)
    C = cholesky(H)
    exact = h_weighted_error(A - (lambda L, R: L @ R)(*rank_k_fit(A, C, 16, "exact")), H)
    rand = h_weighted_error(A - (lambda L, R: L @ R)(*rank_k_fit(A, C, 16, "randomized")), H)
    assert rand == pytest.approx(exact, rel=1e-3)


def test_lr_objective_is_error_minus_constant():
    gen = torch.Generator().manual_seed(3)
    A, L, R = torch.randn(30, 50, generator=gen), torch.randn(30, 4, generator=gen), torch.randn(4, 50, generator=gen)
    H = correlated_hessian(50, seed=4)
    direct = h_weighted_error(A - L @ R, H) - h_weighted_error(A, H)
    assert lr_objective(A, H, L, R) == pytest.approx(direct, rel=1e-4)


def test_low_bit_factors_beat_rounding_the_closed_form():
    gen = torch.Generator().manual_seed(5)
    A = torch.randn(64, 8, generator=gen) @ torch.randn(8, 128, generator=gen) + 0.1 * torch.randn(64, 128, generator=gen)
    H = correlated_hessian(128, seed=6)
    Hd = regularize(H, 0.01)
    f = lr_step(A, ldlq_plan(Hd), cholesky(Hd.H), 8, bl=3, br=3, group_size=64, lr_iters=5)
    L0, R0 = rank_k_fit(A, cholesky(Hd.H), 8)
    naive = quantize_rtn(L0, UniformGrid(3, 8)).dequantize() @ quantize_rtn(R0, UniformGrid(3, 64)).dequantize()
    assert h_weighted_error(A - f.L @ f.R, H) < 0.8 * h_weighted_error(A - naive, H)
    assert torch.equal(f.qL.dequantize(), f.L) and torch.equal(f.qR.dequantize(), f.R)


def test_fp16_factors():
    A = torch.randn(20, 40, generator=torch.Generator().manual_seed(7))
    f = lr_step(A, None, None, 5, bl=16, br=16, group_size=64)
    assert f.qL is None and f.qR is None
    assert torch.equal(f.L, f.L.half().float())
    U, S, Vh = torch.linalg.svd(A)
    best = (S[5:] ** 2).sum()  # Eckart–Young
    assert h_weighted_error(A - f.L @ f.R, None) == pytest.approx(float(best), rel=1e-2)


def test_one_svd_serves_every_smaller_rank():
    from lqlr.core.lowrank import weighted_svd

    gen = torch.Generator().manual_seed(5)
    A = torch.randn(48, 64, generator=gen)
    C = cholesky(regularize(correlated_hessian(64, seed=4), 0.01).H)
    shared = weighted_svd(A, C, 24, "exact")
    for k in (4, 24):
        L, R = rank_k_fit(A, C, k, method="exact", svd=shared)
        L0, R0 = rank_k_fit(A, C, k, method="exact")
        assert torch.equal(L, L0) and torch.equal(R, R0)
    with pytest.raises(ValueError, match="rank 32 needs 32"):
        rank_k_fit(A, C, 32, svd=shared)
