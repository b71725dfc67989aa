"""Quantization grids with per-group parameters, and a quantized-matrix container.

A *grid* maps a group of weights (rows × g columns, one group per row) to integer codes and
back. Its parameters are fitted per row and per group of ``group_size`` input columns:

* :class:`UniformGrid` — asymmetric uniform: ``x ≈ (c − z)·s`` with an fp16 scale ``s`` and an
  integer zero point ``z`` stored in ``bits`` bits; optional MSE search over clipping ranges.
* :class:`NormalFloatGrid` — NF2/NF3/NF4 (QLoRA): ``x ≈ level[c]·s``, levels at quantiles of
  N(0, 1) scaled to [−1, 1] with an exact zero, ``s`` the group's fp16 absmax.
* llama.cpp's block formats Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL (:mod:`lqlr.core.gguf_grids`).
* QuIP#'s E8P lattice codebook (:mod:`lqlr.core.e8p`): ``dim = 8`` consecutive columns per
  codeword, and QTIP's bitshift trellis (:mod:`lqlr.core.trellis`): 16 × 16 tiles, ``dim = 16``;
  LDLQ (:mod:`lqlr.core.ldlq`) rounds such grids ``dim`` columns at a time.

Storage is ``bits`` per weight plus ``overhead_bits`` per (row, group), the one formula
b + b₀/B₀ of docs/design.md §3.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from lqlr.core.packing import pack, unpack


@dataclass
class GroupParams:
    """Per-row parameters of one group: ``scale`` (rows, 1), and ``zero`` (rows, 1) or None."""

    scale: torch.Tensor
    zero: torch.Tensor | None = None


def fp16_round(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest float16 value (what is stored), kept as float32 for the math."""
    return x.to(torch.float16).to(torch.float32)


class Grid(ABC):
    """A scalar quantization grid with per-row, per-group parameters."""

    kind: str = ""
    dim: int = 1  # columns encoded jointly (1 = scalar grid)
    params_per_group: int = 1  # columns of scale/zero per group (a k-quant super-block: d and its sub-block codes)
    float_zero: bool = False  # zero is an fp16 offset (x = q·s + m, GGUF Q4_1/Q5_1), not an integer code
    # encode/decode of a vector grid's few columns take ``start=`` (their place in the group: a super-block's
    # sub-block scales), which block LDLQ passes
    column_offsets: bool = False

    def __init__(self, bits: int, group_size: int) -> None:
        self.bits = int(bits)
        self.group_size = int(group_size)

    @property
    @abstractmethod
    def overhead_bits(self) -> int:
        """Bits of parameters stored per row and group."""

    @property
    def code_bits(self) -> int:
        """Bits of one code as lqlr packs it (``bits`` but for IQ2_S, whose 18-bit words take 3-bit codes)."""
        return self.bits

    @abstractmethod
    def fit(self, x: torch.Tensor) -> GroupParams:
        """Parameters for the group ``x`` (rows, g)."""

    @abstractmethod
    def encode(self, x: torch.Tensor, p: GroupParams) -> torch.Tensor:
        """Integer codes (uint8, same shape as x) of x under parameters p."""

    @abstractmethod
    def decode(self, codes: torch.Tensor, p: GroupParams) -> torch.Tensor:
        """Float32 values of codes under parameters p."""

    def round(self, x: torch.Tensor, p: GroupParams) -> torch.Tensor:
        """Nearest grid values of x (dequantized, float32); ``encode`` of them gives back the codes."""
        return self.decode(self.encode(x, p), p)

    def storage_bits(self, rows: int, cols: int) -> int:
        """All-in bits of a rows × cols matrix on this grid (codes + group parameters)."""
        return rows * cols * self.bits + rows * n_groups(cols, self.group_size) * self.overhead_bits

    def spec(self) -> dict:
        return {"kind": self.kind, "bits": self.bits, "group_size": self.group_size}


class UniformGrid(Grid):
    """Asymmetric uniform grid: x ≈ (c − z)·s, c ∈ [0, 2^b − 1], fp16 s, b-bit integer z."""

    kind = "uniform"
    FIT_BATCH = 1 << 18  # values per batch of the range search's candidates (larger batches leave the cache)

    def __init__(self, bits: int, group_size: int, clip_search: bool = True,
                 clip_grid: int = 16, clip_min: float = 0.5) -> None:
        super().__init__(bits, group_size)
        self.maxq = 2**self.bits - 1
        self.clip_search = clip_search
        self.clip_grid = clip_grid
        self.clip_min = clip_min

    @property
    def overhead_bits(self) -> int:
        return 16 + self.bits  # fp16 scale + b-bit zero point

    def _params(self, xmin: torch.Tensor, xmax: torch.Tensor) -> GroupParams:
        xmin = torch.minimum(xmin, torch.zeros_like(xmin))  # the range holds 0 so z is a code
        xmax = torch.maximum(xmax, torch.zeros_like(xmax))
        flat = (xmax - xmin) <= 0
        xmin = torch.where(flat, xmin - 1e-8, xmin)
        xmax = torch.where(flat, xmax + 1e-8, xmax)
        scale = fp16_round((xmax - xmin) / self.maxq).clamp_min(torch.finfo(torch.float16).tiny)
        zero = torch.round(-xmin / scale).clamp(0, self.maxq)
        return GroupParams(scale=scale, zero=zero)

    def fit(self, x: torch.Tensor) -> GroupParams:
        xmin = x.min(dim=1, keepdim=True).values
        xmax = x.max(dim=1, keepdim=True).values
        best = self._params(xmin, xmax)
        if not self.clip_search:
            return best
        # min over shrink factors p of ||x − round_p(x)||² per row (GPTQ's "mse" range search), the candidates in
        # batches of (rows, P, g) values; the first least error wins (p = 1 first: the unshrunk range)
        shrink = torch.linspace(1.0, self.clip_min, self.clip_grid, device="cpu").to(x.device)  # (P,)
        cand = self._params(xmin * shrink, xmax * shrink)  # scale, zero (rows, P)
        rows, g = x.shape
        step = max(1, self.FIT_BATCH // max(1, rows * g))
        best_err, best_k = None, None
        for j in range(0, len(shrink), step):
            s3, z3 = cand.scale[:, j : j + step, None], cand.zero[:, j : j + step, None]
            xq = torch.clamp(torch.round(x[:, None, :] / s3) + z3, 0, self.maxq).sub_(z3).mul_(s3)  # (rows, P', g)
            err, k = (xq - x[:, None, :]).pow_(2).sum(dim=2).min(dim=1, keepdim=True)  # (rows, 1)
            k = k + j
            if best_err is None:
                best_err, best_k = err, k
            else:
                better = err < best_err
                best_err, best_k = torch.where(better, err, best_err), torch.where(better, k, best_k)
        return GroupParams(scale=cand.scale.gather(1, best_k), zero=cand.zero.gather(1, best_k))

    def encode(self, x: torch.Tensor, p: GroupParams) -> torch.Tensor:
        return torch.clamp(torch.round(x / p.scale) + p.zero, 0, self.maxq).to(torch.uint8)

    def decode(self, codes: torch.Tensor, p: GroupParams) -> torch.Tensor:
        return (codes.to(torch.float32) - p.zero) * p.scale

    def round(self, x: torch.Tensor, p: GroupParams) -> torch.Tensor:
        # same arithmetic as decode(encode(x)), without the uint8 round trip (LDLQ's hot loop)
        return torch.clamp(torch.round(x / p.scale) + p.zero, 0, self.maxq).sub_(p.zero).mul_(p.scale)


def normal_float_levels(bits: int, offset: float | None = None) -> torch.Tensor:
    """NormalFloat levels (QLoRA): 2^(b−1) positive and 2^(b−1) − 1 negative N(0,1) quantiles
    plus an exact 0, scaled to [−1, 1]. ``offset`` is the outermost quantile (QLoRA: 0.9677)."""
    from scipy.stats import norm

    offset = 0.9677083 if offset is None else offset
    half = 2 ** (bits - 1)
    pos = norm.ppf(torch.linspace(offset, 0.5, half + 1, device="cpu")[:-1].double().numpy()).tolist()
    neg = (-norm.ppf(torch.linspace(offset, 0.5, half, device="cpu")[:-1].double().numpy())).tolist()
    levels = torch.tensor(sorted(pos + [0.0] + neg), dtype=torch.float64, device="cpu")  # moved to the data's device on use
    return (levels / levels.abs().max()).to(torch.float32)


class NormalFloatGrid(Grid):
    """NF2/NF3/NF4: x ≈ level[c]·s with s the group's fp16 absmax."""

    kind = "nf"

    def __init__(self, bits: int, group_size: int) -> None:
        if not 2 <= bits <= 4:
            raise ValueError(f"NormalFloat grids exist for 2-4 bits, got {bits}")
        super().__init__(bits, group_size)
        self.levels = normal_float_levels(self.bits)
        self.midpoints = (self.levels[1:] + self.levels[:-1]) / 2

    @property
    def overhead_bits(self) -> int:
        return 16  # fp16 absmax

    def fit(self, x: torch.Tensor) -> GroupParams:
        absmax = x.abs().max(dim=1, keepdim=True).values
        return GroupParams(scale=fp16_round(absmax).clamp_min(torch.finfo(torch.float16).tiny))

    def encode(self, x: torch.Tensor, p: GroupParams) -> torch.Tensor:
        return torch.bucketize((x / p.scale).contiguous(), self.midpoints.to(x.device)).to(torch.uint8)

    def decode(self, codes: torch.Tensor, p: GroupParams) -> torch.Tensor:
        return self.levels.to(codes.device)[codes.long()] * p.scale


def make_grid(kind: str, bits: int, group_size: int, clip_search: bool = True, state_bits: int | None = None) -> Grid:
    """Grid by name: ``"uniform"``, ``"nf"``, ``"e8p"``, ``"trellis"`` (``state_bits``: its L, None for the
    default) or a GGUF type (``"q4_0"``, ``"q4_1"``, ``"q5_0"``, ``"q5_1"``, ``"q8_0"``, ``"iq4_nl"``, the
    k-quants; ``bits`` and ``group_size`` must be the type's own)."""
    # gguf_grids imports this module, so its registry is looked up at call time
    from lqlr.core.gguf_grids import GGUF_GRIDS

    if kind == "uniform":
        return UniformGrid(bits, group_size, clip_search=clip_search)
    if kind == "nf":
        return NormalFloatGrid(bits, group_size)
    if kind in GGUF_GRIDS:
        return GGUF_GRIDS[kind](bits, group_size)
    if kind == "e8p":
        from lqlr.core.e8p import E8PGrid

        return E8PGrid(bits, group_size)
    if kind == "trellis":
        from lqlr.core.trellis import DEFAULT_STATE_BITS, TrellisGrid

        return TrellisGrid(bits, group_size, DEFAULT_STATE_BITS if state_bits is None else state_bits)
    raise ValueError(f"unknown grid {kind!r}: choose 'uniform', 'nf', 'e8p', 'trellis' or one of {', '.join(map(repr, GGUF_GRIDS))}")


def n_groups(cols: int, group_size: int) -> int:
    """Number of column groups (the last one may be shorter)."""
    return math.ceil(cols / group_size)


def group_slices(cols: int, group_size: int) -> list[slice]:
    """Column slices of the groups of a matrix with ``cols`` columns."""
    return [slice(j, min(j + group_size, cols)) for j in range(0, cols, group_size)]


@dataclass
class QuantizedTensor:
    """A (rows, cols) matrix on a grid: codes (rows, cols) uint8 and per-(row, group) params.

    ``scale`` and ``zero`` have shape (rows, n_groups · grid.params_per_group); ``zero`` is None for grids
    without one.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    grid: Grid

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def group_params(self, j: int) -> GroupParams:
        w = self.grid.params_per_group
        zero = None if self.zero is None else self.zero[:, j * w : (j + 1) * w]
        return GroupParams(scale=self.scale[:, j * w : (j + 1) * w], zero=zero)

    def dequantize(self) -> torch.Tensor:
        """Dense float32 (rows, cols)."""
        rows, cols = self.shape
        out = torch.empty(rows, cols, dtype=torch.float32, device=self.codes.device)
        for j, sl in enumerate(group_slices(cols, self.grid.group_size)):
            out[:, sl] = self.grid.decode(self.codes[:, sl], self.group_params(j))
        return out

    def storage_bits(self) -> int:
        return self.grid.storage_bits(*self.shape)

    def packed(self) -> dict[str, torch.Tensor]:
        """Tensors as stored on disk: bit-packed codes and zeros, fp16 scales (and fp16 zeros
        where the grid's zero is an offset, ``grid.float_zero``)."""
        out = {"codes": pack(self.codes, self.grid.code_bits), "scale": self.scale.to(torch.float16)}
        if self.zero is not None:
            out["zero"] = (self.zero.to(torch.float16) if self.grid.float_zero
                           else pack(self.zero.to(torch.uint8), self.grid.bits))
        return out

    @classmethod
    def from_packed(cls, tensors: dict[str, torch.Tensor], shape: tuple[int, int], grid: Grid) -> "QuantizedTensor":
        rows, cols = shape
        codes = unpack(tensors["codes"], grid.code_bits, rows * cols).reshape(rows, cols)
        scale = tensors["scale"].to(torch.float32)
        zero = None
        if "zero" in tensors and grid.float_zero:
            zero = tensors["zero"].to(torch.float32).reshape(scale.shape)
        elif "zero" in tensors:
            zero = unpack(tensors["zero"], grid.bits, scale.numel()).reshape(scale.shape).to(torch.float32)
        return cls(codes=codes, scale=scale, zero=zero, grid=grid)


def encode_groups(Q: torch.Tensor, grid: Grid, params: list[GroupParams]) -> torch.Tensor:
    """Codes (uint8) of a matrix whose entries already lie on the grid of each group."""
    codes = torch.empty(Q.shape, dtype=torch.uint8, device=Q.device)
    for sl, p in zip(group_slices(Q.shape[1], grid.group_size), params):
        codes[:, sl] = grid.encode(Q[:, sl], p)
    return codes


def quantize_rtn(W: torch.Tensor, grid: Grid) -> QuantizedTensor:
    """Round-to-nearest of every group of W (rows, cols): min Σ ||w_g − q_g||² group by group."""
    W = W.to(torch.float32)
    rows, cols = W.shape
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=W.device)
    scales, zeros = [], []
    for sl in group_slices(cols, grid.group_size):
        p = grid.fit(W[:, sl])
        codes[:, sl] = grid.encode(W[:, sl], p)
        scales.append(p.scale)
        zeros.append(p.zero)
    zero = None if zeros[0] is None else torch.cat(zeros, dim=1)
    return QuantizedTensor(codes=codes, scale=torch.cat(scales, dim=1), zero=zero, grid=grid)
