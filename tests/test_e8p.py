"""The E8P codebook (lqlr.core.e8p) and block LDLQ for vector grids (lqlr.core.ldlq), checked
against lattice hand counts, brute-force search over all 65,536 codewords, and an independent LDLQ
built from a block LDLᵀ factorisation."""
from __future__ import annotations

import math

import pytest
import torch

from lqlr.core.e8p import (
    UNIT_SCALE,
    E8PGrid,
    all_codewords,
    decode_index,
    digits_to_index,
    index_to_digits,
    nearest,
    source_points,
)
from lqlr.core.grids import QuantizedTensor, quantize_rtn
from lqlr.core.hessian import regularize
from lqlr.core.ldlq import ldlq_plan, ldlq_round

from conftest import block_ldlq_reference, check_codebook_pipeline, correlated_hessian


@pytest.fixture(scope="module")
def codebook() -> torch.Tensor:
    return all_codewords()


def test_codewords_are_shifted_e8_points_with_the_right_counts(codebook: torch.Tensor) -> None:
    assert codebook.shape == (65536, 8)
    assert torch.unique(codebook, dim=0).shape[0] == 65536  # 65,536 distinct codewords
    index = torch.arange(65536)
    shift = torch.where((index & 1).bool(), 0.25, -0.25)[:, None]
    y = codebook - shift  # the unshifted points
    # E8's half-integer coset: every coordinate in Z + 1/2, an even coordinate sum
    assert torch.equal((y - 0.5).remainder(1.0), torch.zeros_like(y))
    assert torch.equal(y.sum(1).remainder(2.0), torch.zeros(65536))
    # shells: every half-integer E8 point of norm² ≤ 10 is there exactly twice (two shifts):
    # 128 (norm² 2: eight ±1/2, even minus count), 8·128 (4: one 3/2), 28·128 (6: two 3/2),
    # (56 + 8)·128 (8: three 3/2, or one 5/2), (70 + 56)·128 (10: four 3/2, or a 5/2 and a 3/2),
    # and the 29 norm-12 sources: 29·128
    norm2 = y.pow(2).sum(1).round().long()
    counts = {int(k): int(v) for k, v in zip(*torch.unique(norm2, return_counts=True))}
    assert counts == {2: 2 * 128, 4: 2 * 1024, 6: 2 * 3584, 8: 2 * 8192, 10: 2 * 16128, 12: 2 * 29 * 128}
    assert len(torch.unique(y, dim=0)) == 32768
    src = source_points()
    assert src.shape == (256, 8) and bool((src > 0).all())


@pytest.mark.parametrize("scale", [0.3, 1.0, 2.5])
def test_nearest_equals_brute_force(codebook: torch.Tensor, scale: float) -> None:
    g = torch.Generator().manual_seed(int(scale * 10))
    x = torch.randn(1500, 8, generator=g) * scale
    x[:20] *= 4  # far outside the codebook: ties with the outermost shell
    index, value = nearest(x, chunk=256)
    assert torch.equal(value, decode_index(index))
    d = (x.pow(2).sum(1, keepdim=True) - 2 * x @ codebook.T + codebook.pow(2).sum(1)[None])  # (n, 65536)
    best = d.min(1)
    got = (x - value).pow(2).sum(1)
    assert torch.allclose(got, (x - codebook[best.indices]).pow(2).sum(1), rtol=0, atol=1e-5)
    assert (index == best.indices).float().mean() > 0.999  # equal but for exact ties


def test_digits_roundtrip_and_packing() -> None:
    index = torch.randint(0, 1 << 16, (100,), generator=torch.Generator().manual_seed(0))
    digits = index_to_digits(index)
    assert digits.shape == (100, 8) and int(digits.max()) <= 3
    assert torch.equal(digits_to_index(digits), index)
    W = torch.randn(12, 64, generator=torch.Generator().manual_seed(1))
    grid = E8PGrid(2, 32)
    qt = quantize_rtn(W, grid)
    packed = qt.packed()
    assert packed["codes"].numel() == 12 * 64 * 2 // 8  # 2 bits per weight: 16 bits per codeword
    back = QuantizedTensor.from_packed(packed, (12, 64), grid)
    assert torch.equal(back.codes, qt.codes) and torch.equal(back.dequantize(), qt.dequantize())
    # decode(encode(x)) is round(x): the codes give back the nearest codewords
    p = grid.fit(W[:, :32])
    assert torch.equal(grid.decode(grid.encode(W[:, :32], p), p), grid.round(W[:, :32], p))


def test_storage_bits_hand_count() -> None:
    # 2 bits per weight (16 per codeword of 8) + one fp16 scale per (row, group)
    assert E8PGrid(2, 64).storage_bits(10, 256) == 10 * 256 * 2 + 10 * 4 * 16
    assert E8PGrid(2, 4096).storage_bits(1024, 1024) == 1024 * 1024 * 2 + 1024 * 16  # 2.0156 bits
    with pytest.raises(ValueError, match="multiple of 8"):
        E8PGrid(2, 12)
    with pytest.raises(ValueError, match="2, 3 or 4 bits"):
        E8PGrid(5, 64)


def test_unit_scale_is_the_gaussian_optimum() -> None:
    x = torch.randn(40000, 8, generator=torch.Generator().manual_seed(3))

    def mse(c: float) -> float:
        return float((x - nearest(x * c)[1] / c).pow(2).mean())

    at = mse(UNIT_SCALE)
    assert at < mse(UNIT_SCALE * 0.93) and at < mse(UNIT_SCALE * 1.07)


def test_gaussian_distortion_target() -> None:
    """Issue 18's E8P target on i.i.d. N(0, 1) (H = I): relative MSE ≤ 0.092 at ≤ 2.02 all-in bits
    (scalar 2-bit Lloyd–Max: 0.1175; the rate-distortion limit 2^(−4) = 0.0625)."""
    W = torch.randn(128, 1024, generator=torch.Generator().manual_seed(4))
    grid = E8PGrid(2, 1024)
    qt = quantize_rtn(W, grid)
    rel = float((W - qt.dequantize()).pow(2).sum() / W.pow(2).sum())
    bits = qt.storage_bits() / W.numel()
    assert bits <= 2.02
    assert rel <= 0.092, rel


def test_block_ldlq_equals_the_ldl_reference() -> None:
    g = torch.Generator().manual_seed(5)
    n = 64
    W = torch.randn(24, n, generator=g)
    Hd = regularize(correlated_hessian(n, seed=5), 0.01)
    grid = E8PGrid(2, 4096)  # one scale per row, fitted on W before any update: both sides agree on it
    got = ldlq_round(W, ldlq_plan(Hd), grid, block_size=16)
    ref = block_ldlq_reference(W, Hd.H, grid)
    assert (got.Q == ref).float().mean() > 0.99
    D = (W - got.Q).double()
    exact = float(torch.trace(D @ Hd.H.double() @ D.T))
    assert math.isclose(got.damped_error, exact, rel_tol=1e-3)


def test_block_ldlq_with_identity_is_nearest_and_helps_under_anisotropic_h() -> None:
    g = torch.Generator().manual_seed(6)
    n = 128
    W = torch.randn(32, n, generator=g)
    grid = E8PGrid(2, 64)
    eye = regularize(torch.eye(n), 0.0)
    assert torch.equal(ldlq_round(W, ldlq_plan(eye), grid).Q, quantize_rtn(W, grid).dequantize())
    Hd = regularize(correlated_hessian(n, seed=6), 0.01)
    H = Hd.H.double()

    def err(Q: torch.Tensor) -> float:
        D = (W - Q).double()
        return float(torch.trace(D @ H @ D.T))

    assert err(ldlq_round(W, ldlq_plan(Hd), grid).Q) < 0.8 * err(quantize_rtn(W, grid).dequantize())
    with pytest.raises(ValueError, match="act_order"):
        ldlq_round(W, ldlq_plan(Hd, act_order=True), grid)


def test_config_and_budget_with_the_codebook() -> None:
    from lqlr.budget.fit import fit_to_budget
    from lqlr.config import QLRConfig
    from lqlr.core.bits import bits_per_param

    with pytest.raises(ValueError, match="bq"):
        QLRConfig(grid="e8p", bq=5)
    with pytest.raises(ValueError, match="multiple of 8"):
        QLRConfig(grid="e8p", bq=2, group_size=36)
    cfg = QLRConfig(grid="e8p", bq=2, group_size=64, rank=8)
    assert cfg.for_matrix(64, 172).grid == "uniform" and cfg.for_matrix(64, 176).grid == "e8p"
    # a uniform budget keeps BQ = 2 (the codebook's only one) and fits the rank: hand count of the bits
    fit = fit_to_budget(cfg, 576, 1536, 2.5)  # Q alone: 2 + 16/64 = 2.25 bits
    assert fit.grid == "e8p" and fit.bq == 2 and fit.rank > 0
    assert bits_per_param(576, 1536, fit) <= 2.5 < bits_per_param(576, 1536, QLRConfig(**{**fit.to_dict(), "rank": fit.rank + 1}))
    q_only = fit_to_budget(QLRConfig(grid="e8p", bq=2, group_size=4096, rank=0), 1024, 1024, 2.1)
    assert q_only.bq == 2 and bits_per_param(1024, 1024, q_only) == 2 + 16 / 1024


def test_e8p_through_the_pipeline(tmp_path) -> None:
    """compress (E8P Q + 4-bit L, R; the 172-wide down_proj falls back to the uniform grid), export,
    from_pretrained = lqlr.load, and the stock PEFT adapter on the packed base."""
    check_codebook_pipeline(tmp_path / "e8", dict(grid="e8p"), "e8p")


def test_factor_group_size_is_used_and_counted() -> None:
    """L and R take ``factor_group_size`` (Q keeps ``group_size``), and the counted bits equal the
    stored decomposition's, by hand: E8P Q 2 + 16/256 per weight, R (8 × 256) and L (96 × 8) 4-bit in
    groups of 32 (L: groups of min(32, k) = 8) with a 4-bit zero and an fp16 scale each."""
    from lqlr.config import QLRConfig
    from lqlr.core.bits import bits_per_param
    from lqlr.core.decompose import decompose

    g = torch.Generator().manual_seed(7)
    W = torch.randn(96, 256, generator=g)
    cfg = QLRConfig(grid="e8p", bq=2, group_size=4096, factor_group_size=32, rank=8, iters=2)
    d = decompose(W, None, cfg)
    assert d.l_codes.grid.group_size == 8 and d.r_codes.grid.group_size == 32
    q = 96 * 256 * 2 + 96 * 16
    r = 8 * 256 * 4 + 8 * (256 // 32) * (16 + 4)
    l_ = 96 * 8 * 4 + 96 * 1 * (16 + 4)
    assert d.bits_per_param == pytest.approx((q + r + l_) / W.numel())
    assert bits_per_param(96, 256, cfg) == pytest.approx(d.bits_per_param)
    assert QLRConfig(group_size=64).factor_groups == 64


def test_residual_codebook_is_e8_roots_and_axes() -> None:
    from lqlr.core.e8p import residual_points

    book = residual_points()
    assert torch.unique(book, dim=0).shape[0] == 256
    norm2 = book.pow(2).sum(1)
    assert int((norm2 == 2).sum()) == 240 and int((norm2 == 4).sum()) == 16
    # in E8: all-integer with an even sum, or all in Z + 1/2 with an even sum
    integer = (book == book.round()).all(1)
    half = ((book - 0.5).remainder(1.0) == 0).all(1)
    assert bool((integer | half).all()) and torch.equal(book.sum(1).remainder(2.0), torch.zeros(256))


@pytest.mark.parametrize("bits", [3, 4])
def test_rvq_grids_roundtrip_count_and_beat_scalar(bits: int) -> None:
    """E8P + a residual stage: pack/unpack, decode(encode) = round, the bits by hand (b per weight +
    two fp16 scales per (row, group)), and lower Gaussian MSE than 2-bit E8P and than the scalar
    Lloyd–Max quantizer at the same code bits (3: 0.0345, 4: 0.0095)."""
    W = torch.randn(64, 1024, generator=torch.Generator().manual_seed(8))
    grid = E8PGrid(bits, 1024)
    qt = quantize_rtn(W, grid)
    assert qt.storage_bits() == 64 * 1024 * bits + 64 * 2 * 16
    back = QuantizedTensor.from_packed(qt.packed(), (64, 1024), grid)
    assert torch.equal(back.dequantize(), qt.dequantize())
    p = grid.fit(W)
    assert torch.equal(grid.decode(grid.encode(W, p), p), grid.round(W, p))
    rel = float((W - qt.dequantize()).pow(2).sum() / W.pow(2).sum())
    two = float((W - quantize_rtn(W, E8PGrid(2, 1024)).dequantize()).pow(2).sum() / W.pow(2).sum())
    assert rel < {3: 0.0345, 4: 0.0102}[bits] and rel < two / 3


def test_rvq_layer_stores_and_computes(tmp_path) -> None:
    """A 3-bit E8P Q + L·R layer: stored buffers reload into an empty layer of the same spec, its
    forward equals x (Q + L R)ᵀ, and the packed kernel (2-bit E8P only) falls back to the reference."""
    import lqlr
    from lqlr.nn.kernels import resolve
    from lqlr.nn.layer import QLRLinear

    W = torch.randn(40, 64, generator=torch.Generator().manual_seed(9))
    d = lqlr.decompose(W, None, lqlr.QLRConfig(grid="e8p", bq=3, group_size=64, rank=4, iters=2))
    layer = QLRLinear.from_decomposition(d)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ d.weight().T, rtol=1e-5, atol=1e-5)
        fresh = QLRLinear(64, 40, layer.spec)
        fresh.load_state_dict(layer.state_dict())
        assert torch.equal(fresh(x), layer(x))
    assert resolve("auto", layer) == "reference"


def test_menu_offers_the_codebook_beside_the_scalar_grid() -> None:
    from lqlr.config import Menu, QLRConfig

    menu = Menu(grid=["uniform", "e8p"], bq=[2, 3], rank=[0, 16], group_size=[64, 256])
    opts = menu.options(QLRConfig(incoherence=True), 576, 1536)
    kinds = {(o.grid, o.bq, o.group_size, o.rank) for o in opts}
    assert len(opts) == len(kinds) == 16  # 2 grids × 2 BQ × 2 groups × 2 ranks, all valid configs
    assert ("e8p", 2, 256, 16) in kinds and ("uniform", 3, 64, 0) in kinds
    narrow = menu.options(QLRConfig(), 64, 172)  # 172 is not a multiple of 8: the codebook options become uniform
    assert {o.grid for o in narrow} == {"uniform"} and len(narrow) == 8
    with pytest.raises(ValueError, match="menu.grid"):
        Menu(grid=["e8"])


def test_decompose_takes_the_uniform_grid_where_the_width_is_not_a_multiple_of_8() -> None:
    import lqlr

    W = torch.randn(64, 172, generator=torch.Generator().manual_seed(11))
    d = lqlr.decompose(W, None, lqlr.QLRConfig(grid="e8p", bq=2, group_size=64, rank=4, iters=1))
    assert d.q_codes.grid.kind == "uniform" and d.q_codes.grid.bits == 2
