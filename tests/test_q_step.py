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


@pytest.mark.parametrize("rows,cols,g,block,dead", [(16, 576, 64, 128, False), (300, 200, 64, 32, True),
                                                    (33, 100, 30, 64, False), (130, 96, 96, 256, True)])
def test_compiled_column_loop_equals_torch_loop(rows, cols, g, block, dead):
    from lqlr.core.ldlq import _extension

    if _extension() is None:
        pytest.skip("the C++ extension cannot be built here (no compiler or ninja)")
    gen = torch.Generator().manual_seed(rows)
    T = torch.randn(rows, cols, generator=gen)
    H = correlated_hessian(cols, seed=2)
    if dead:  # inputs that are never active: zero rows and columns of H
        H[:3], H[:, :3] = 0, 0
    plan = ldlq_plan(regularize(H, 0.01))
    grid = UniformGrid(3, g)
    fast = ldlq_round(T, plan, grid, block_size=block, compiled=True)
    ref = ldlq_round(T, plan, grid, block_size=block, compiled=False)
    assert torch.equal(fast.Q, ref.Q) and torch.equal(fast.qt.codes, ref.qt.codes)
    assert torch.equal(fast.qt.scale, ref.qt.scale) and fast.damped_error == pytest.approx(ref.damped_error, rel=1e-6)


def test_range_search_is_the_best_shrink_of_every_row():
    # brute force: every shrink factor's fp16 range and rounding written out per row, the first least error kept
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(37, 48, generator=gen) * torch.rand(37, 1, generator=gen) * 4
    x[:5] = x[:5].abs()  # rows without negative values: the range is clamped to hold 0
    grid = UniformGrid(3, 48)
    grid.FIT_BATCH = 37 * 48 * 3  # three candidates per batch: the batched search across batches
    p = grid.fit(x)
    for r in range(x.shape[0]):
        best = None
        for f in torch.linspace(1.0, grid.clip_min, grid.clip_grid).tolist():
            lo, hi = min(float(x[r].min()) * f, 0.0), max(float(x[r].max()) * f, 0.0)
            s = max(float(torch.tensor((hi - lo) / grid.maxq).half().float()), float(torch.finfo(torch.float16).tiny))
            z = min(max(round(-lo / s), 0), grid.maxq)
            q = (torch.clamp(torch.round(x[r] / s) + z, 0, grid.maxq) - z) * s
            err = float((q - x[r]).double().pow(2).sum())
            if best is None or err < best[0] * (1 - 1e-6):
                best = (err, s, z)
        got = (grid.round(x[r : r + 1], type(p)(scale=p.scale[r : r + 1], zero=p.zero[r : r + 1])) - x[r]).pow(2).sum()
        assert float(got) == pytest.approx(best[0], rel=1e-5)
