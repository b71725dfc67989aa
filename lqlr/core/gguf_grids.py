"""llama.cpp's 32-weight block formats as lqlr grids: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and IQ4_NL.

Each ggml block holds 32 consecutive weights of a row (one group, ``group_size = 32``) and one or
two fp16 parameters. With c the stored code and q = level[c] its integer level, a block decodes as

* symmetric (Q4_0, Q5_0, Q8_0, IQ4_NL):  x = q·d,       d fp16
* affine    (Q4_1, Q5_1):                x = q·d + m,   d, m fp16

where level[c] = c − 8 (Q4_0), c − 16 (Q5_0), c − 128 (Q8_0, c the int8 byte + 128), c (Q4_1,
Q5_1), or IQ4_NL's fixed non-uniform table ``IQ4_NL_LEVELS[c]``. :meth:`GGUFGrid.decode` is that
float32 arithmetic (one product, then one sum), so it equals ggml's dequantization bit for bit.

Fitting d (and m) is lqlr's: min over candidates of Σ_j (x_j − x̂_j)², the block's squared error
after the fp16 rounding of the parameters and nearest-level codes under the rounded values. The
candidates are llama.cpp's reference choice (Q4_0: d = max/−8, Q4_1: d = (max − min)/15, m = min,
...), a grid of shrunk and widened scales around it, and the least-squares refit of each
(d = Σ q x / Σ q², or the 2 × 2 normal equations for (d, m)), so a block is never worse than the
reference quantizer.

Storage is the format's real bytes: b = 4, 5 or 8 code bits per weight plus 16 (d) or 32 (d, m)
bits per block, e.g. Q4_0: 4 + 16/32 = 4.5 bits (18 bytes per block). The ggml byte layout of a
block (nibble order, Q5's high-bit word) lives in :mod:`lqlr.io.gguf`.
"""
from __future__ import annotations

import torch

from lqlr.config import GGUF_BITS, GGUF_BLOCK, fixed_values_error
from lqlr.core.grids import Grid, GroupParams, fp16_round

BLOCK = GGUF_BLOCK  # weights per ggml block (QK4_0 = QK4_1 = QK5_0 = QK5_1 = QK8_0 = QK4_NL = 32)
FP16_MAX = float(torch.finfo(torch.float16).max)

# kvalues_iq4nl of ggml-common.h: the 16 levels of IQ4_NL, ascending
IQ4_NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


class GGUFGrid(Grid):
    """A ggml block format: codes c with levels q = level[c], x = q·d (+ m), one block per group.

    Subclasses fix ``kind``, ``bits_fixed`` (code bits b), ``levels`` (level of each code), ``code_min``
    (lowest code the encoder writes) and ``affine`` (whether the block has the offset m). The
    ``bits`` and ``group_size`` arguments are checked against the format's fixed values.
    """

    bits_fixed: int = 0
    levels: tuple[int, ...] = ()
    code_min: int = 0
    affine: bool = False
    uniform: bool = True  # levels are consecutive integers (all but IQ4_NL)
    # fit: scale candidates d = d_ref / f for f in linspace(SHRINK, WIDEN, CANDIDATES) (f = 1 is d_ref)
    CANDIDATES = 24
    SHRINK = 0.55
    WIDEN = 1.15

    def __init__(self, bits: int | None = None, group_size: int | None = None) -> None:
        message = fixed_values_error(self.kind, bits, group_size)
        if message:
            raise ValueError(message)
        super().__init__(self.bits_fixed, BLOCK)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @property
    def float_zero(self) -> bool:  # type: ignore[override]
        return self.affine  # m is an fp16 offset, not an integer code

    @property
    def overhead_bits(self) -> int:
        return 32 if self.affine else 16  # fp16 d (+ fp16 m)

    # ----- levels on the data's device -----------------------------------------------------
    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(level of every code (2^b,) float32, nearest-code table), made once per device.

        The table (non-uniform levels only) maps k = ⌊2t⌋ to the code of the level nearest t: the
        levels are integers, so every midpoint between two is a multiple of ½ and no interval
        [k/2, (k+1)/2) straddles one; k is clamped to [2·lowest, 2·highest − 1]."""
        key = str(device)
        if key not in self._cache:
            lv = torch.tensor(self.levels, dtype=torch.float32, device="cpu")  # moved to `device` below
            table = None
            if not self.uniform:
                enc = lv[self.code_min:]  # (levels the encoder writes,)
                k = torch.arange(2 * int(enc[0]), 2 * int(enc[-1]), device="cpu")
                t = k / 2 + 0.25  # inside [k/2, (k+1)/2), never equidistant from two integers
                table = ((t[:, None] - enc[None, :]).abs().argmin(dim=1) + self.code_min).to(torch.uint8)
                table = table.to(device)
            self._cache[key] = (lv.to(device), table)
        return self._cache[key]

    # ----- the grid interface ---------------------------------------------------------------
    def encode(self, x: torch.Tensor, p: GroupParams) -> torch.Tensor:
        """Nearest level: c = argmin_c |x − (level[c]·d + m)|, i.e. the level nearest t = (x − m)/d
        (t = 0 where d = 0: the block is all m, or all zero)."""
        t = x - p.zero if self.affine else x
        d = p.scale
        t = torch.where(d != 0, t / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(t))
        lo, hi = self.levels[self.code_min], self.levels[-1]
        if self.uniform:  # consecutive integer levels: round, then clamp to the encodable codes
            return torch.round(t).clamp_(lo, hi).sub_(self.levels[0]).to(torch.uint8)
        _, table = self._tables(x.device)
        k = torch.floor(t.mul_(2)).clamp_(2 * lo, 2 * hi - 1).long().sub_(2 * lo)
        return table[k]

    def decode(self, codes: torch.Tensor, p: GroupParams) -> torch.Tensor:
        x = self._tables(codes.device)[0][codes.long()] * p.scale  # q·d in float32, as ggml does
        return x + p.zero if self.affine else x

    def fit(self, x: torch.Tensor) -> GroupParams:
        """fp16 d (and m) per row of the block x (rows, ≤ 32): of the candidates (see the module
        docstring), the one with the least Σ_j (x_j − x̂_j)², x̂ decoded from the stored values."""
        x = x.to(torch.float32)
        cands = self._affine_candidates(x) if self.affine else self._symmetric_candidates(x)
        best_err, best = None, None
        for d, m in cands:  # each (rows, K): K candidates per row
            for refit in (False, True):
                if refit:
                    d, m = self._least_squares(x, d, m)
                d, m = _fp16_param(d), (None if m is None else _fp16_param(m))
                err = self._errors(x, d, m)  # (rows, K)
                e, k = err.min(dim=1, keepdim=True)
                dk = d.gather(1, k)
                mk = None if m is None else m.gather(1, k)
                if best_err is None:
                    best_err, best = e, (dk, mk)
                else:
                    better = e < best_err  # ties keep the earlier candidate (the reference comes first)
                    best_err = torch.where(better, e, best_err)
                    best = (torch.where(better, dk, best[0]),
                            None if mk is None else torch.where(better, mk, best[1]))
        return GroupParams(scale=best[0], zero=best[1])

    # ----- fitting helpers -------------------------------------------------------------------
    def _factors(self, device: torch.device) -> torch.Tensor:
        """Candidate factors f, (K,): 1 (the reference) first, then the shrink/widen grid."""
        grid = torch.linspace(self.SHRINK, self.WIDEN, self.CANDIDATES, device=device)
        return torch.cat([torch.ones(1, device=device), grid])

    def _symmetric_candidates(self, x: torch.Tensor) -> list[tuple[torch.Tensor, None]]:
        """d = max / (level_end · f): the block's signed absmax on the lowest or highest level.

        llama.cpp puts the absmax x_max on the lowest level (Q4_0: d = x_max/−8, Q5_0: /−16,
        IQ4_NL: /−127; Q8_0: |d| = |x_max|/127); mapping it to the highest level is tried too.
        """
        f = self._factors(x.device)  # (K,)
        amax, idx = x.abs().max(dim=1, keepdim=True)
        xmax = x.gather(1, idx)  # (rows, 1) signed absmax
        lo, hi = self.levels[self.code_min], self.levels[-1]
        if self.code_min > 0:  # Q8_0: levels symmetric about 0, llama.cpp's d = amax/127 > 0
            return [(amax / hi / f, None)]
        return [(xmax / lo / f, None), (xmax / hi / f, None)]

    def _affine_candidates(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """d = (max − min)/(n·f) with m anchored at min (llama.cpp's Q4_1/Q5_1: f = 1), at max, or
        centred, n = 2^b − 1."""
        f = self._factors(x.device)  # (K,)
        n = float(len(self.levels) - 1)
        xmin = x.min(dim=1, keepdim=True).values
        xmax = x.max(dim=1, keepdim=True).values
        d = (xmax - xmin) / (n * f)  # (rows, K)
        return [(d, xmin.expand_as(d)), (d, xmax - n * d), (d, (xmax + xmin - n * d) / 2)]

    def _codes_k(self, x: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        """Codes of x (rows, g) under each of K candidates d, m (rows, K): (rows, K, g)."""
        p = GroupParams(scale=d[:, :, None], zero=None if m is None else m[:, :, None])
        return self.encode(x[:, None, :], p)

    def _errors(self, x: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        """Σ_j (x_j − x̂_j)² per row and candidate, (rows, K), with x̂ decoded exactly."""
        p = GroupParams(scale=d[:, :, None], zero=None if m is None else m[:, :, None])
        xhat = self.decode(self._codes_k(x, d, m), p)
        return (xhat - x[:, None, :]).pow(2).sum(dim=2)

    def _least_squares(self, x: torch.Tensor, d: torch.Tensor,
                       m: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Refit on each candidate's codes (under its stored d, m): min_d Σ (x − q d)², or
        min_{d,m} Σ (x − q d − m)²."""
        q = self._tables(x.device)[0][self._codes_k(x, d, m).long()]  # (rows, K, g) levels
        xs = x[:, None, :]  # (rows, 1, g)
        if m is None:
            sqx, sqq = (q * xs).sum(dim=2), (q * q).sum(dim=2)
            return torch.where(sqq > 0, sqx / sqq.clamp_min(1e-30), d), None
        g = x.shape[1]
        sq, sx = q.sum(dim=2), xs.sum(dim=2).expand_as(d)
        sqq, sqx = (q * q).sum(dim=2), (q * xs).sum(dim=2)
        det = g * sqq - sq * sq
        ok = det > 0
        d_ls = torch.where(ok, (g * sqx - sq * sx) / torch.where(ok, det, torch.ones_like(det)), torch.zeros_like(d))
        return d_ls, (sx - d_ls * sq) / g  # all codes equal (det = 0): d = 0, m = mean


def _fp16_param(t: torch.Tensor) -> torch.Tensor:
    """A block parameter as stored: the nearest fp16 value, clamped to fp16's finite range."""
    return fp16_round(t.clamp(-FP16_MAX, FP16_MAX))


class Q4_0Grid(GGUFGrid):
    """Q4_0: x = (c − 8)·d, c ∈ [0, 15]; 18 bytes per 32 weights (4.5 bits)."""

    kind = "q4_0"
    bits_fixed = 4
    levels = tuple(range(-8, 8))


class Q4_1Grid(GGUFGrid):
    """Q4_1: x = c·d + m, c ∈ [0, 15]; 20 bytes per 32 weights (5.0 bits)."""

    kind = "q4_1"
    bits_fixed = 4
    levels = tuple(range(16))
    affine = True


class Q5_0Grid(GGUFGrid):
    """Q5_0: x = (c − 16)·d, c ∈ [0, 31]; 22 bytes per 32 weights (5.5 bits)."""

    kind = "q5_0"
    bits_fixed = 5
    levels = tuple(range(-16, 16))


class Q5_1Grid(GGUFGrid):
    """Q5_1: x = c·d + m, c ∈ [0, 31]; 24 bytes per 32 weights (6.0 bits)."""

    kind = "q5_1"
    bits_fixed = 5
    levels = tuple(range(32))
    affine = True


class Q8_0Grid(GGUFGrid):
    """Q8_0: x = q·d with q the int8 byte (code c = q + 128); 34 bytes per 32 weights (8.5 bits).

    The encoder writes q ∈ [−127, 127] as llama.cpp does (its SIMD dot products negate int8
    values, which −128 would overflow); decode takes any byte, −128 included."""

    kind = "q8_0"
    bits_fixed = 8
    levels = tuple(range(-128, 128))
    code_min = 1
    CANDIDATES = 8  # 255 levels: the rounding error is tiny, a short search suffices
    SHRINK = 0.9
    WIDEN = 1.02


class IQ4_NLGrid(GGUFGrid):
    """IQ4_NL: x = IQ4_NL_LEVELS[c]·d, c ∈ [0, 15]; 18 bytes per 32 weights (4.5 bits)."""

    kind = "iq4_nl"
    bits_fixed = 4
    levels = IQ4_NL_LEVELS
    uniform = False


GGUF_GRIDS: dict[str, type[GGUFGrid]] = {g.kind: g for g in (Q4_0Grid, Q4_1Grid, Q5_0Grid, Q5_1Grid, Q8_0Grid, IQ4_NLGrid)}

assert {k: g.bits_fixed for k, g in GGUF_GRIDS.items()} == GGUF_BITS, "lqlr.config.GGUF_BITS and the grids disagree"
