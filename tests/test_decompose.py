import pytest
import torch
from conftest import correlated_hessian

import lqlr
from lqlr.core.grids import UniformGrid, quantize_rtn
from lqlr.core.hessian import h_weighted_error, regularize
from lqlr.core.ldlq import ldlq_plan, ldlq_round


def test_rank0_without_H_is_rtn(W_H):
    W, _ = W_H
    d = lqlr.decompose(W, None, lqlr.QLRConfig(bq=3, rank=0, group_size=32))
    assert torch.equal(d.Q, quantize_rtn(W, UniformGrid(3, 32)).dequantize())
    assert d.L.shape == (96, 0) and torch.equal(d.weight(), d.Q)
    assert d.error == pytest.approx(float((d.Q - W).pow(2).sum() / W.pow(2).sum()), rel=1e-5)


def test_rank0_with_H_is_ldlq(W_H):
    W, H = W_H
    d = lqlr.decompose(W, H, lqlr.QLRConfig(bq=2, rank=0, group_size=32))
    ref = ldlq_round(W, ldlq_plan(regularize(H, 0.01)), UniformGrid(2, 32)).Q
    assert torch.equal(d.Q, ref)
    assert d.error == pytest.approx(h_weighted_error(W - ref, H) / h_weighted_error(W, H), rel=1e-5)


@pytest.mark.parametrize("opts", [{}, {"incoherence": True}, {"order": "q_first"}, {"bl": 16, "br": 16},
                                  {"grid": "nf", "factor_grid": "nf"}, {"act_order": True}, {"q2n": True}])
def test_alternating_keeps_best_iterate(W_H, opts):
    W, H = W_H
    cfg = lqlr.QLRConfig(bq=2, rank=8, group_size=32, iters=4, **opts)
    d = lqlr.decompose(W, H, cfg)
    assert len(d.history) == 4
    assert d.error <= d.history[0] * (1 + 1e-4)  # never worse than the first iterate
    assert d.error == pytest.approx(min(d.history), rel=1e-3)  # reported error is the kept iterate's
    assert d.error == pytest.approx(h_weighted_error(d.weight() - W, H) / h_weighted_error(W, H), rel=1e-5)
    assert (d.L @ d.R).shape == W.shape
    rank0 = lqlr.decompose(W, H, lqlr.QLRConfig(bq=2, rank=0, group_size=32, **{k: v for k, v in opts.items() if k in ("grid", "incoherence", "act_order")}))
    assert d.error < rank0.error  # the low-rank term pays for itself


def test_stored_codes_reproduce_the_dense_tensors(W_H):
    W, H = W_H
    d = lqlr.decompose(W, H, lqlr.QLRConfig(bq=3, rank=8, group_size=32, iters=2, incoherence=True))
    inc = d.incoherence
    assert torch.allclose(inc.unrotate_weight(d.q_codes.dequantize()), d.Q, atol=1e-5)
    assert torch.equal(d.l_codes.dequantize(), d.L_stored) and torch.equal(d.r_codes.dequantize(), d.R_stored)
    assert torch.allclose(inc.unrotate_left(d.L_stored) @ inc.unrotate_right(d.R_stored), d.L @ d.R, atol=1e-5)


def test_same_seed_same_bits(W_H):
    W, H = W_H
    cfg = lqlr.QLRConfig(bq=2, rank=8, group_size=32, iters=3, incoherence=True, seed=7)
    a, b = lqlr.decompose(W, H, cfg), lqlr.decompose(W, H, cfg)
    for x, y in [(a.q_codes.codes, b.q_codes.codes), (a.q_codes.scale, b.q_codes.scale),
                 (a.l_codes.codes, b.l_codes.codes), (a.r_codes.codes, b.r_codes.codes), (a.Q, b.Q)]:
        assert torch.equal(x, y)
    assert a.history == b.history
    c = lqlr.decompose(W, H, lqlr.QLRConfig(bq=2, rank=8, group_size=32, iters=3, incoherence=True, seed=8))
    assert not torch.equal(a.q_codes.codes, c.q_codes.codes)


def test_bits_per_param_by_hand():
    W = torch.randn(128, 256)
    d = lqlr.decompose(W, None, lqlr.QLRConfig(bq=2, rank=16, bl=4, br=4, group_size=64, iters=1))
    q = 128 * 256 * 2 + 128 * 4 * (16 + 2)  # codes + (fp16 scale + 2-bit zero) per group of 64
    l = 128 * 16 * 4 + 128 * 1 * (16 + 4)  # L: groups of min(64, k) = 16 along k
    r = 16 * 256 * 4 + 16 * 4 * (16 + 4)
    assert d.bits_per_param == (q + l + r) / (128 * 256) == 3.1484375
    f16 = lqlr.decompose(W, None, lqlr.QLRConfig(bq=4, rank=16, bl=16, br=16, group_size=128, grid="nf", iters=1))
    assert f16.bits_per_param == (128 * 256 * 4 + 128 * 2 * 16 + 16 * (128 + 256) * 16) / (128 * 256)
    assert d.breakdown.q_bits_per_param == q / (128 * 256)


def test_incoherence_helps_with_outliers():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(128, 256, generator=gen)
    W[torch.rand(W.shape, generator=gen) < 0.01] *= 25  # 1% large outliers, as in LLM weights
    H = correlated_hessian(256, seed=1)
    plain = lqlr.decompose(W, H, lqlr.QLRConfig(bq=2, rank=0))
    inc = lqlr.decompose(W, H, lqlr.QLRConfig(bq=2, rank=0, incoherence=True))
    assert inc.error < 0.9 * plain.error


def test_q2n_row_gain_never_hurts_the_q_step():
    from lqlr.core.q2n import q2n_rescale
    gen = torch.Generator().manual_seed(3)
    T = torch.randn(64, 128, generator=gen)
    H = correlated_hessian(128, seed=4)
    r = ldlq_round(T, ldlq_plan(regularize(H, 0.01)), UniformGrid(2, 32))
    shaped = q2n_rescale(T, r.qt, H, rho=0.0).dequantize()  # ρ = 0: the H-optimal gain per row
    assert h_weighted_error(T - shaped, H) <= h_weighted_error(T - r.Q, H) * (1 + 1e-3)


@pytest.mark.parametrize("bad, message", [
    (dict(bq=1), "bq=1"), (dict(bl=12), "bl=12"), (dict(rank=-1), "rank=-1"), (dict(grid="e8"), "grid='e8'"),
    (dict(group_size=0), "group_size=0"), (dict(order="x"), "order='x'"), (dict(grid="nf", bq=8), "nf"),
])
def test_config_errors_name_the_value(bad, message):
    with pytest.raises(ValueError, match=message):
        lqlr.QLRConfig(**bad)


def test_input_errors():
    with pytest.raises(ValueError, match="NaN or Inf"):
        lqlr.decompose(torch.tensor([[float("nan"), 1.0]]), None)
    with pytest.raises(ValueError, match="expected \\(2, 2\\)"):
        lqlr.decompose(torch.randn(3, 2), torch.eye(3))
    with pytest.raises(ValueError, match="2-D"):
        lqlr.decompose(torch.randn(3), None)
