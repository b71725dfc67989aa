import pytest
import torch
from conftest import correlated_hessian

from lqlr.core.grids import NormalFloatGrid, UniformGrid, quantize_rtn
from lqlr.core.hessian import h_weighted_error, regularize
from lqlr.core.ldlq import ldlq_plan, ldlq_round


def naive_ldlq(T, H, grid):
    """Reference: un-blocked OBQ/GPTQ with an explicit Schur-complement update of H⁻¹ per column."""
    W = T.clone().double()
    Hinv = torch.linalg.inv(H.double())
    Q = torch.zeros_like(W)
    g = grid.group_size
    p = None
    for i in range(W.shape[1]):
        if i % g == 0:
            p = grid.fit(W[:, i : i + g].float())
        q = grid.round(W[:, i : i + 1].float(), p)[:, 0].double()
        Q[:, i] = q
        err = (W[:, i] - q) / Hinv[i, i]
        W[:, i:] -= err[:, None] * Hinv[i, i:][None, :]
        Hinv = Hinv - Hinv[:, i : i + 1] @ Hinv[i : i + 1, :] / Hinv[i, i]  # remove column i
    return Q.float()


@pytest.mark.parametrize("grid", [UniformGrid(2, 32), UniformGrid(4, 16, clip_search=False), NormalFloatGrid(3, 32)])
def test_blocked_ldlq_equals_naive_reference(grid):
    gen = torch.Generator().manual_seed(0)
    T = torch.randn(24, 96, generator=gen)
    Hd = regularize(correlated_hessian(96, seed=1), 0.01)
    fast = ldlq_round(T, ldlq_plan(Hd), grid, block_size=32)
    ref = naive_ldlq(T, Hd.H, grid)
    assert (fast.Q == ref).float().mean() > 0.995  # rare float ties aside, identical roundings
    e_fast, e_ref = h_weighted_error(T - fast.Q, Hd.H), h_weighted_error(T - ref, Hd.H)
    assert e_fast == pytest.approx(e_ref, rel=1e-3)


@pytest.mark.parametrize("act_order", [False, True])
def test_ldlq_equals_rtn_for_diagonal_H(act_order):
    gen = torch.Generator().manual_seed(1)
    T = torch.randn(32, 128, generator=gen)
    H = torch.diag(torch.rand(128, generator=gen) + 0.1)
    grid = UniformGrid(3, 32)
    r = ldlq_round(T, ldlq_plan(regularize(H, 0.01), act_order=act_order), grid)
    rtn = quantize_rtn(T, grid)
    assert torch.equal(r.qt.codes, rtn.codes)
    assert torch.equal(r.Q, rtn.dequantize())


@pytest.mark.parametrize("act_order", [False, True])
def test_ldlq_beats_rtn_on_correlated_H(act_order):
    gen = torch.Generator().manual_seed(2)
    T = torch.randn(64, 256, generator=gen)
    H = correlated_hessian(256, seed=3)
    grid = UniformGrid(2, 64)
    ldlq = ldlq_round(T, ldlq_plan(regularize(H, 0.01), act_order=act_order), grid).Q
    rtn = quantize_rtn(T, grid).dequantize()
    assert h_weighted_error(T - ldlq, H) < 0.8 * h_weighted_error(T - rtn, H)


def test_ldl_identity_gives_the_damped_error():
    gen = torch.Generator().manual_seed(4)
    T = torch.randn(40, 192, generator=gen)
    Hd = regularize(correlated_hessian(192, seed=5), 0.01)
    r = ldlq_round(T, ldlq_plan(Hd), UniformGrid(2, 64))
    assert r.damped_error == pytest.approx(h_weighted_error(T - r.Q, Hd.H), rel=1e-4)


def test_codes_reproduce_values_and_dead_inputs():
    gen = torch.Generator().manual_seed(6)
    T = torch.randn(16, 64, generator=gen)
    H = correlated_hessian(64, seed=7)
    H[5, :] = 0
    H[:, 5] = 0  # input 5 never active
    r = ldlq_round(T, ldlq_plan(regularize(H, 0.01)), UniformGrid(3, 32))
    assert torch.equal(r.qt.dequantize(), r.Q)
    assert torch.isfinite(r.Q).all()
