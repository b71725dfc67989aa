import pytest
import torch

from lqlr.core.grids import (
    NormalFloatGrid,
    QuantizedTensor,
    UniformGrid,
    group_slices,
    normal_float_levels,
    quantize_rtn,
)

# QLoRA's published NF4 table (Dettmers et al. 2023, Appendix E / bitsandbytes)
NF4_REFERENCE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                 -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def test_nf4_levels_match_qlora_table():
    assert torch.allclose(normal_float_levels(4), torch.tensor(NF4_REFERENCE), atol=2e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nf_levels_shape(bits):
    lv = normal_float_levels(bits)
    assert lv.numel() == 2**bits and lv.min() == -1 and lv.max() == 1 and (lv == 0).sum() == 1
    assert torch.all(lv[1:] > lv[:-1])


def _brute_force_nearest(x, levels_per_row):
    """Nearest of the given candidate values, per entry (levels_per_row: (rows, n_levels))."""
    d = (x[:, :, None] - levels_per_row[:, None, :]).abs()
    return levels_per_row.gather(1, d.argmin(-1))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("clip", [False, True])
def test_uniform_rtn_is_nearest_grid_point(bits, clip):
    gen = torch.Generator().manual_seed(bits)
    W = torch.randn(16, 128, generator=gen)
    grid = UniformGrid(bits, 32, clip_search=clip)
    qt = quantize_rtn(W, grid)
    Q = qt.dequantize()
    for j, sl in enumerate(group_slices(128, 32)):
        codes = torch.arange(2**bits, dtype=torch.float32)
        levels = (codes[None, :] - qt.zero[:, j : j + 1]) * qt.scale[:, j : j + 1]
        assert torch.allclose(Q[:, sl], _brute_force_nearest(W[:, sl], levels), atol=1e-6)
    # the stored scale is exactly an fp16 number and the zero point an integer code
    assert torch.equal(qt.scale, qt.scale.half().float())
    assert torch.equal(qt.zero, qt.zero.round()) and qt.zero.min() >= 0 and qt.zero.max() <= 2**bits - 1


def test_clip_search_never_worse():
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) ** 3  # heavy tails
    for bits in (2, 3):
        plain = (quantize_rtn(W, UniformGrid(bits, 64, clip_search=False)).dequantize() - W).pow(2)
        clipped = (quantize_rtn(W, UniformGrid(bits, 64, clip_search=True)).dequantize() - W).pow(2)
        per_group = lambda e: e.reshape(64, 4, 64).sum(-1)  # noqa: E731  (row, group) errors
        assert torch.all(per_group(clipped) <= per_group(plain) * (1 + 1e-6))  # full range is a candidate
        assert clipped.sum() < 0.95 * plain.sum()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nf_rtn_is_nearest_level(bits):
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    grid = NormalFloatGrid(bits, 64)
    qt = quantize_rtn(W, grid)
    levels = grid.levels[None, :] * qt.scale[:, :1]
    assert torch.allclose(qt.dequantize(), _brute_force_nearest(W, levels), atol=1e-6)
    assert torch.allclose(qt.scale[:, 0], W.abs().max(1).values, rtol=1e-3)


@pytest.mark.parametrize("grid", [UniformGrid(3, 64), NormalFloatGrid(2, 32), UniformGrid(2, 48)])
def test_packed_round_trip_exact(grid):
    W = torch.randn(24, 200, generator=torch.Generator().manual_seed(5))  # 200 = ragged last group
    qt = quantize_rtn(W, grid)
    back = QuantizedTensor.from_packed(qt.packed(), qt.shape, grid)
    assert torch.equal(back.codes, qt.codes)
    assert torch.equal(back.dequantize(), qt.dequantize())


def test_storage_bits_by_hand():
    # 100 x 200, 3 bits, groups of 64 -> 4 groups per row (last one 8 wide), 16-bit scale + 3-bit zero
    assert UniformGrid(3, 64).storage_bits(100, 200) == 100 * 200 * 3 + 100 * 4 * 19
    assert NormalFloatGrid(4, 64).storage_bits(100, 200) == 100 * 200 * 4 + 100 * 4 * 16
