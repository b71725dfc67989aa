"""The allocator's shared cost estimate (lqlr.core.estimate) against one decomposition per option."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from scipy.stats import spearmanr

from lqlr.config import Menu, QLRConfig
from lqlr.core.decompose import decompose, prepare
from lqlr.core.estimate import (
    option_costs,
    rotated_row_weights,
    sensitivity_weighted_error,
)
from lqlr.core.incoherence import Incoherence


def _problem(out_f: int, in_f: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2048, in_f, generator=g) @ (torch.randn(in_f, in_f, generator=g) / in_f**0.5 + torch.eye(in_f))
    X[:, 3] = 0.0  # one dead input
    H = X.T @ X / X.shape[0]  # anisotropic
    W = torch.randn(out_f, in_f, generator=g) * 0.02
    W[5] *= 8  # an outlier row
    s = torch.rand(out_f, generator=g) + 0.05
    return W, H, s


def _reference(W, H, opts, s, under="same"):
    """One full decomposition per option, its error measured in the original basis."""
    Hd = H if under == "same" else under
    return [sensitivity_weighted_error(decompose(W, Hd, c).weight() - W, H, s) for c in opts]


@pytest.mark.parametrize("incoherence", [False, True])
def test_exact_costs_equal_one_decomposition_per_option(incoherence):
    W, H, s = _problem(96, 80)
    base = QLRConfig(bq=3, rank=8, bl=4, br=4, group_size=16, iters=5, lr_iters=3, incoherence=incoherence)
    opts = Menu(bq=[2, 3, 4], rank=[0, 4, 8], group_size=[16, 80], iters=1).options(base, *W.shape)
    opts += [replace(base, iters=2), replace(base, iters=1, q2n=True), replace(base, iters=1, order="q_first"),
             replace(base, iters=1, damp=0.05, seed=3)]  # not one-pass, a q2n grid, Q first, another preparation
    got = option_costs(W, H, opts, s)
    want = _reference(W, H, opts, s)
    assert got == pytest.approx(want, rel=1e-5)
    # decomposed under H = I, measured under H
    assert option_costs(W, H, opts[:6], s, decompose_under=None) == pytest.approx(_reference(W, H, opts[:6], s, None),
                                                                                  rel=1e-5)


def test_sampled_rows_rank_options_like_the_exact_costs():
    W, H, s = _problem(192, 64, seed=1)
    base = QLRConfig(bq=3, rank=8, bl=4, br=4, group_size=16, incoherence=True)
    opts = Menu(bq=[2, 3, 4], rank=[0, 4, 16], group_size=[16, 64]).options(base, *W.shape)
    exact = option_costs(W, H, opts, s)
    sampled = option_costs(W, H, opts, s, rows=64, seed=0)
    assert spearmanr(sampled, exact)[0] > 0.97
    assert sampled == pytest.approx(exact, rel=0.15)
    # an estimate, not a copy: another sample gives other numbers, and all rows give the exact ones
    assert option_costs(W, H, opts, s, rows=64, seed=1) != sampled
    assert option_costs(W, H, opts, s, rows=10_000) == pytest.approx(exact, rel=1e-9)


def test_sampled_rows_are_unbiased_without_rotation():
    W, H, s = _problem(64, 32, seed=2)
    opts = [QLRConfig(bq=2, rank=0, group_size=16, incoherence=False)]
    exact = option_costs(W, H, opts, s)[0]
    mean = sum(option_costs(W, H, opts, s, rows=16, seed=i)[0] for i in range(200)) / 200
    assert mean == pytest.approx(exact, rel=0.05)


def test_rotated_row_weights_are_the_diagonal_of_u_diag_s_ut():
    s = torch.rand(24) + 0.1  # 24 = 3 · 8: a random orthogonal odd part and a Hadamard part
    U = Incoherence.for_shape(24, 16, seed=4).U
    Um = U.matrix()  # dense U, independent of the chunked computation
    assert rotated_row_weights(U, s, chunk=5) == pytest.approx(torch.diagonal(Um @ torch.diag(s) @ Um.T).double(),
                                                                rel=1e-5)


def test_prepared_is_reused_exactly_and_checked():
    W, H, _ = _problem(48, 32)
    cfg = QLRConfig(bq=2, rank=4, group_size=16, iters=3, incoherence=True)
    prep = prepare(W, H, cfg)
    a, b = decompose(W, H, cfg), decompose(W, H, replace(cfg, bq=3), prepared=prep)
    assert torch.equal(decompose(W, H, cfg, prepared=prep).weight(), a.weight())
    assert b.config.bq == 3 and b.error < a.error
    with pytest.raises(ValueError, match="prepare"):
        decompose(W, H, replace(cfg, seed=1), prepared=prep)
