"""llama.cpp's block formats as lqlr grids: the 32-weight blocks Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and IQ4_NL,
and the k-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and the i-quants IQ4_XS, IQ3_XXS and IQ2_XS (the last two lattice
codebooks of 8 weights per codeword, :class:`LatticeGrid`) on super-blocks of 256 (:class:`KQuantGrid`, at the end).

Each ggml block holds 32 consecutive weights of a row (one group, ``group_size = 32``) and one or
two fp16 parameters. With c the stored code and q = level[c] its integer level, a block decodes as

* symmetric (Q4_0, Q5_0, Q8_0, IQ4_NL):  x = q·d,       d fp16
* affine    (Q4_1, Q5_1):                x = q·d + m,   d, m fp16

where level[c] = c − 8 (Q4_0), c − 16 (Q5_0), c − 128 (Q8_0, c the int8 byte + 128), c (Q4_1,
Q5_1), or IQ4_NL's fixed non-uniform table ``IQ4_NL_LEVELS[c]``. :meth:`GGUFGrid.decode` is that
float32 arithmetic (one product, then one sum), so it equals ggml's dequantization bit for bit.

Fitting d (and m) is lqlr's: min over candidates of Σ_j w_j (x_j − x̂_j)², the block's weighted
squared error after the fp16 rounding of the parameters and nearest-level codes under the rounded
values, with importances w_j (all 1 unless given; LDLQ gives its LDL pivots, llama.cpp's imatrix
plays that role there). The candidates are llama.cpp's reference choice (Q4_0: d = max/−8, Q4_1:
d = (max − min)/15, m = min, ...), a grid of shrunk and widened scales around it, llama.cpp's
imatrix search steps (symmetric blocks), and the weighted least-squares refit of each (d = Σ w q x /
Σ w q², or the 2 × 2 normal equations for (d, m)), so a block is never worse than the reference
quantizer, nor (same weights) than llama.cpp's imatrix quantizer of Q4_0 / Q5_0.

Storage is the format's real bytes: b = 4, 5 or 8 code bits per weight plus 16 (d) or 32 (d, m)
bits per block, e.g. Q4_0: 4 + 16/32 = 4.5 bits (18 bytes per block). The ggml byte layout of a
block (nibble order, Q5's high-bit word) lives in :mod:`lqlr.io.gguf`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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

    group_block = BLOCK  # weights per ggml block (the group)
    bits_fixed: int = 0
    levels: tuple[int, ...] = ()
    code_min: int = 0
    affine: bool = False
    uniform: bool = True  # levels are consecutive integers (all but IQ4_NL)
    weighted_fit = True  # fit takes per-weight importances (LDLQ passes its LDL pivots)
    # fit: scale candidates d = d_ref / f for f in linspace(SHRINK, WIDEN, CANDIDATES) (f = 1 is d_ref)
    CANDIDATES = 24
    SHRINK = 0.55
    WIDEN = 1.15
    SEARCH_STEPS = 9  # ... and llama.cpp's 2 × 9 steps around the reference (0: none)

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

    def fit(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> GroupParams:
        """fp16 d (and m) per row of the block x (rows, ≤ 32): of the candidates (see the module
        docstring), the one with the least Σ_j w_j (x_j − x̂_j)², x̂ decoded from the stored values.

        ``weights`` w ≥ 0, (g,) for every row or (rows, g): the importance of each weight (LDLQ passes
        diag H of the block's columns, the error's weight in tr(E H Eᵀ) without the cross terms, as
        llama.cpp's imatrix does); None: all 1. The least-squares refits use the same weights."""
        x = x.to(torch.float32)
        w = _block_weights(x, weights)
        cands = self._affine_candidates(x) if self.affine else self._symmetric_candidates(x)
        best_err, best = None, None
        for d, m in cands:  # each (rows, K): K candidates per row
            for refit in (False, True):
                if refit:
                    d, m = self._least_squares(x, d, m, w)
                d, m = _fp16_param(d), (None if m is None else _fp16_param(m))
                err = self._errors(x, d, m, w)  # (rows, K)
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
        """Candidate factors f, (K,): 1 (the reference) first, then the shrink/widen grid, then (symmetric blocks)
        llama.cpp's imatrix search steps f = (n + i/10)/n, i = ±1 … ±9 (``make_qx_quants``' iscale = −(n + i/10)/max,
        n = |lowest level|), so that its choice under the same weights is among the refits' starts."""
        one = torch.ones(1, device=device)
        grid = torch.linspace(self.SHRINK, self.WIDEN, self.CANDIDATES, device=device)
        if self.affine:  # Q4_1, Q5_1: llama.cpp searches (d, m) otherwise (make_qkx3_quants); the grid only
            return torch.cat([one, grid])
        n = float(-self.levels[self.code_min])
        steps = (n + 0.1 * torch.arange(-self.SEARCH_STEPS, self.SEARCH_STEPS + 1, device=device)) / n
        return torch.cat([one, grid, steps[steps != 1]])

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

    def _errors(self, x: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor:
        """Σ_j w_j (x_j − x̂_j)² per row and candidate, (rows, K), with x̂ decoded exactly; w (rows, g)."""
        p = GroupParams(scale=d[:, :, None], zero=None if m is None else m[:, :, None])
        xhat = self.decode(self._codes_k(x, d, m), p)
        return ((xhat - x[:, None, :]).pow(2) * w[:, None, :]).sum(dim=2)

    def _least_squares(self, x: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None,
                       w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Refit on each candidate's codes (under its stored d, m): min_d Σ w (x − q d)², or
        min_{d,m} Σ w (x − q d − m)²; w (rows, g)."""
        q = self._tables(x.device)[0][self._codes_k(x, d, m).long()]  # (rows, K, g) levels
        xs, ws = x[:, None, :], w[:, None, :]  # (rows, 1, g)
        wq = ws * q  # (rows, K, g)
        if m is None:
            sqx, sqq = (wq * xs).sum(dim=2), (wq * q).sum(dim=2)
            return torch.where(sqq > 0, sqx / sqq.clamp_min(1e-30), d), None
        sw = ws.sum(dim=2).expand_as(d)
        sq, sx = wq.sum(dim=2), (ws * xs).sum(dim=2).expand_as(d)
        sqq, sqx = (wq * q).sum(dim=2), (wq * xs).sum(dim=2)
        det = sw * sqq - sq * sq
        ok = det > 0
        d_ls = torch.where(ok, (sw * sqx - sq * sx) / torch.where(ok, det, torch.ones_like(det)), torch.zeros_like(d))
        m_ls = torch.where(sw > 0, (sx - d_ls * sq) / torch.where(sw > 0, sw, torch.ones_like(sw)), m)
        return d_ls, m_ls  # all codes equal (det = 0): d = 0, m = the weighted mean


def _block_weights(x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The fit's weights as (rows, g) float32 on x's device: all 1 for None, else ``weights`` ((g,) or (rows, g),
    finite, ≥ 0) broadcast and divided by each row's largest (equal weights are exactly the unweighted fit; a row
    of zeros counts as unweighted); one-line ValueError for a bad shape or value."""
    if weights is None:
        return torch.ones_like(x)
    w = weights.to(device=x.device, dtype=torch.float32)
    if w.shape not in ((x.shape[1],), tuple(x.shape)):
        raise ValueError(f"weights have shape {tuple(w.shape)}: expected ({x.shape[1]},) or {tuple(x.shape)} "
                         "(one per column of the block, or per weight)")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("weights must be finite and >= 0 (e.g. diag H of the block's columns)")
    w = w.expand_as(x)
    top = w.max(dim=1, keepdim=True).values
    return torch.where(top > 0, w / torch.where(top > 0, top, torch.ones_like(top)), torch.ones_like(w))


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


GGUF_GRIDS: dict[str, type[Grid]] = {g.kind: g for g in (Q4_0Grid, Q4_1Grid, Q5_0Grid, Q5_1Grid, Q8_0Grid, IQ4_NLGrid)}



# ----- k-quants: super-blocks of 256 weights ---------------------------------------------------
QK_K = 256  # weights per k-quant super-block (ggml's QK_K)
GROUP_MAX_EPS = 1e-15  # ggml-quants.c: a sub-block whose absmax is below this is all zero


@dataclass
class SuperBlockParams(GroupParams):
    """A k-quant super-block's stored values: ``scale`` (rows, 1 + n_sub) = [d, sc_0, …] (fp16 d, then the
    integer sub-block scale codes), ``zero`` (rows, 1 + n_sub) = [dmin, m_0, …] or None (Q6_K).

    ``width`` is the number of columns :meth:`KQuantGrid.fit` saw; ``col`` is a cursor for LDLQ, which rounds a
    group one column at a time with the same parameters: :meth:`KQuantGrid.round` of a slice narrower than
    ``width`` takes the next columns of the super-block (so the columns must come in order, as LDLQ without
    act-order visits them)."""

    width: int = QK_K
    col: int = 0


class KQuantGrid(Grid):
    """A ggml k-quant: a super-block of 256 weights (one group), n_sub sub-blocks of ``sub`` weights.

    Sub-block j has the effective scale s_j = d·sc_j (fp16 d, integer code sc_j) and, for the affine types,
    the effective min μ_j = dmin·m_j; a weight with level q decodes as s_j·q − μ_j (Q2_K, Q4_K, Q5_K: q = c ∈
    [0, 2^b − 1], sc_j, m_j 4- or 6-bit) or s_j·q (Q3_K: q = c − 4, sc_j 6-bit signed; Q6_K: q = c − 32, sc_j
    int8), the float32 arithmetic of ggml's ``dequantize_row_q*_K`` (every product there is exact in float32, so
    its order or an FMA cannot change it).

    Fitting (min Σ (x − x̂)² per super-block, x̂ decoded from the stored values): sub-block targets (s_j, μ_j)
    from llama.cpp's reference search (``make_qkx2_quants`` with its weights, ``make_q3_quants`` or
    ``make_qx_quants``, ported float32 operation by operation) and from the same search unweighted; d (and dmin) from the largest target (llama.cpp's choice) and a few smaller
    ones, the codes sc_j, m_j rounded (llama.cpp's ``nearest_int(63/max · s_j)`` for its own d); then each
    sub-block's codes move by ±1 where that lowers its error (given d, dmin the sub-blocks are independent).
    llama.cpp's reference result is one of the candidates, so a super-block is never worse than it.
    """

    group_block = QK_K
    bits_fixed = 4
    sub = 32  # weights per sub-block
    affine = True
    code_lo, code_hi = 0, 63  # range of the sub-block scale (and min) codes
    SCALE_BITS = 6  # bits of each sub-block scale (and min) code
    offset = 0  # level q = c − offset
    weighted_fit = True  # fit takes per-weight importances (LDLQ passes its LDL pivots)
    # llama.cpp's make_qkx2_quants search (rmin, rdelta, nstep)
    QKX2 = (-1.0, 0.1, 20)
    D_FACTORS = (1.0, 0.97, 0.94, 0.9)  # d = f · largest target / code_hi
    TARGET_WEIGHTS = (True, False)  # the symmetric types' target scales: under llama.cpp's weights, then all 1

    def __init__(self, bits: int | None = None, group_size: int | None = None) -> None:
        message = fixed_values_error(self.kind, bits, group_size)
        if message:
            raise ValueError(message)
        super().__init__(self.bits_fixed, QK_K)
        self._table_cache: dict[str, tuple[torch.Tensor, ...]] = {}

    @property
    def n_sub(self) -> int:
        return QK_K // self.sub

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The grid's constant tables (:meth:`_make_tables`) on ``device``, made once per device."""
        key = str(device)
        if key not in self._table_cache:
            self._table_cache[key] = self._make_tables(torch.device(device))
        return self._table_cache[key]

    def _make_tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The level or codebook tables of the i-quants."""
        raise NotImplementedError

    @property
    def params_per_group(self) -> int:  # type: ignore[override]
        return 1 + self.n_sub

    @property
    def float_zero(self) -> bool:  # type: ignore[override]
        return self.affine  # zero holds fp16 dmin and the min codes, stored as fp16 values

    @property
    def scale_bits(self) -> int:
        return self.SCALE_BITS

    @property
    def overhead_bits(self) -> int:
        per_sub = 2 * self.scale_bits if self.affine else self.scale_bits
        return (32 if self.affine else 16) + self.n_sub * per_sub  # Q4_K, Q5_K: 128; Q6_K: 144

    @property
    def q_lo(self) -> int:
        return -self.offset

    @property
    def q_hi(self) -> int:
        return 2**self.bits - 1 - self.offset

    # ----- effective parameters --------------------------------------------------------------
    def _effective(self, p: GroupParams, start: int, width: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-column s (rows, width) and μ (or None) of columns [start, start + width) of the super-block."""
        sub = torch.arange(start, start + width, device=p.scale.device) // self.sub
        s = (p.scale[:, :1] * p.scale[:, 1:])[:, sub]  # d·sc_j, exact in float32
        mu = None if p.zero is None else (p.zero[:, :1] * p.zero[:, 1:])[:, sub]
        return s, mu

    def _levels(self, x: torch.Tensor, s: torch.Tensor, mu: torch.Tensor | None) -> torch.Tensor:
        """Nearest level q of x under s, μ: round((x + μ)/s) clamped (llama.cpp's encoder); q = 0 where s = 0."""
        t = x + mu if mu is not None else x
        t = torch.where(s != 0, t / torch.where(s != 0, s, torch.ones_like(s)), torch.zeros_like(t))
        return torch.round(t).clamp_(self.q_lo, self.q_hi).add_(0.0)  # + 0: no −0 level (decode's c − offset is +0)

    @staticmethod
    def _values(q: torch.Tensor, s: torch.Tensor, mu: torch.Tensor | None) -> torch.Tensor:
        x = s * q  # exact
        return x - mu if mu is not None else x

    # ----- the grid interface ---------------------------------------------------------------
    def encode(self, x: torch.Tensor, p: GroupParams, start: int = 0) -> torch.Tensor:
        s, mu = self._effective(p, start, x.shape[1])
        return (self._levels(x.to(torch.float32), s, mu) + self.offset).to(torch.uint8)

    def decode(self, codes: torch.Tensor, p: GroupParams, start: int = 0) -> torch.Tensor:
        s, mu = self._effective(p, start, codes.shape[1])
        return self._values(codes.to(torch.float32) - self.offset, s, mu)

    def _next_columns(self, p: GroupParams, width: int) -> int:
        """Where ``width`` columns rounded under p start in their super-block: 0 for the whole group; LDLQ, rounding
        a group a few columns at a time, gets the next ones (p.col, the cursor, moves on)."""
        if not isinstance(p, SuperBlockParams) or width == p.width:
            return 0
        start, p.col = p.col, p.col + width
        if p.col > p.width:
            raise ValueError(f"{self.kind}: rounded {p.col} columns of a super-block fitted on {p.width}")
        return start

    def round(self, x: torch.Tensor, p: GroupParams) -> torch.Tensor:
        start = self._next_columns(p, x.shape[1])
        s, mu = self._effective(p, start, x.shape[1])
        return self._values(self._levels(x.to(torch.float32), s, mu), s, mu)

    def fit(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> SuperBlockParams:
        """d, the sub-block codes (and dmin, min codes) of each row of the super-block x (rows, ≤ 256): of the
        candidates (see the class docstring), the one with the least Σ_j w_j (x_j − x̂_j)² (``weights`` w as in
        :meth:`GGUFGrid.fit`: (width,) or (rows, width), None = all 1; the candidates' own targets keep
        llama.cpp's weights)."""
        x = x.to(torch.float32)
        rows, width = x.shape
        if width > QK_K:
            raise ValueError(f"{self.kind}: a super-block holds {QK_K} weights, got {width} columns")
        mask = _block_weights(x, weights)  # (rows, width): the error's weight of each weight
        if width < QK_K:  # a short last group: zero-padded, the padding counts for no error
            x = torch.nn.functional.pad(x, (0, QK_K - width))
            mask = torch.nn.functional.pad(mask, (0, QK_K - width))
        X = x.reshape(rows, self.n_sub, self.sub)
        M = mask.reshape(rows, self.n_sub, self.sub)
        best_err, best = None, None
        for k, (d, sc, dmin, m) in enumerate(self._candidates(X)):
            sc, m = self._polish(X, M, d, sc, dmin, m)
            err = self._sub_errors(X, M, d, sc, dmin, m).sum(dim=1)  # (rows,)
            if best_err is None:
                best_err, best = err, (d, sc, dmin, m)
                continue
            better = err < best_err  # ties keep the earlier candidate (llama.cpp's comes first)
            best_err = torch.where(better, err, best_err)
            b = better[:, None]
            best = tuple(None if o is None else torch.where(b, n, o) for n, o in zip((d, sc, dmin, m), best))
        d, sc, dmin, m = best
        sc = sc + 0.0  # integer codes: no −0 (a GGUF byte has none; d·(−0) would flip the sign of zeros)
        zero = None if dmin is None else torch.cat([dmin, m + 0.0], dim=1)
        return SuperBlockParams(scale=torch.cat([d, sc], dim=1), zero=zero, width=width)

    # ----- fitting helpers -------------------------------------------------------------------
    def _sub_errors(self, X, M, d, sc, dmin, m) -> torch.Tensor:
        """Σ M (x − x̂)² per row and sub-block, (rows, n_sub), under d (rows, 1), codes sc (rows, n_sub); M the weights."""
        s = (d * sc)[..., None]
        mu = None if dmin is None else (dmin * m)[..., None]
        err = (self._values(self._levels(X, s, mu), s, mu) - X).pow(2) * M
        return err.sum(dim=2)

    def _polish(self, X, M, d, sc, dmin, m):
        """Each sub-block's codes moved by −1, 0 or +1 (sc, and m) where that lowers its error."""
        steps = [(a, b) for a in (0, -1, 1) for b in ((0, -1, 1) if self.affine else (0,))]
        best_err, best_sc, best_m = None, sc, m
        for a, b in steps:
            sc_k = (sc + a).clamp(self.code_lo, self.code_hi)
            m_k = None if m is None else (m + b).clamp(0, self.code_hi)
            err = self._sub_errors(X, M, d, sc_k, dmin, m_k)
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_sc = torch.where(better, sc_k, best_sc)
            if m is not None:
                best_m = torch.where(better, m_k, best_m)
        return best_sc, best_m

    def _candidates(self, X):
        """(d, sc, dmin, m) candidates, llama.cpp's reference first. The symmetric types' (dmin, m = None): each
        sub-block's signed target scale s_j from :meth:`_targets` (llama.cpp's weights, then all 1), d from the
        largest |s_j| times each of D_FACTORS (:meth:`_scale_codes`, f = 1 llama.cpp's own), the codes nearest."""
        out = []
        for weighted in self.TARGET_WEIGHTS:
            S = self._targets(X, weighted)  # (rows, n_sub)
            max_scale = S.gather(1, S.abs().argmax(dim=1, keepdim=True))  # first of the largest (llama.cpp's >)
            for f in self.D_FACTORS:
                d, sc = self._scale_codes(S, max_scale, f)
                out.append((d, sc, None, None))
        return out

    def _targets(self, X: torch.Tensor, weighted: bool) -> torch.Tensor:
        """The symmetric types' per sub-block target scales (rows, n_sub)."""
        raise NotImplementedError

    def _scale_codes(self, S: torch.Tensor, max_scale: torch.Tensor, f: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(d (rows, 1), sc (rows, n_sub)) of the symmetric types for the largest target ``max_scale`` and factor f."""
        raise NotImplementedError

    def _nearest_codes(self, S: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """The sub-block scale codes nearest S / d, clamped to the code range (0 where d = 0)."""
        return torch.where(d != 0, _nearest(S / torch.where(d != 0, d, 1.0)), 0.0).clamp(self.code_lo, self.code_hi)


def _rdiv(c: float, t: torch.Tensor) -> torch.Tensor:
    """c / t rounded once, as C divides (torch's ``c / t`` is c · (1/t), two roundings)."""
    return torch.full_like(t, c) / t


def _seq_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ over the last axis in index order, as a C loop adds (float32 sums depend on the order)."""
    acc = t[..., 0].clone()
    for i in range(1, t.shape[-1]):
        acc += t[..., i]
    return acc


def _nearest(t: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: round half to even, as float32 + 1.5·2^23 does."""
    return torch.round(t)


class _AffineKGrid(KQuantGrid):
    """Q4_K and Q5_K: 8 sub-blocks of 32, x = d·sc_j·q − dmin·m_j with 6-bit sc_j, m_j (Q2_K: 16 of 16, 4-bit)."""

    WEIGHTS = "rms"  # make_qkx2_quants' weights in llama.cpp's reference: av_x + |x| ("rms") or |x| ("abs")
    USE_MAD = False  # ... and its error: squared, or absolute (Q2_K)

    def _targets(self, X: torch.Tensor, weighted: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """make_qkx2_quants per sub-block: (scale s_j, min μ_j ≥ 0), each (rows, n_sub); ``weighted``: as
        quantize_row_q*_K_ref calls it (weights av_x + |x|, or |x| and absolute errors for Q2_K), else all
        weights 1 and squared errors. Its float32 arithmetic in its order (sums element by element: its choice
        between near-equal steps follows them)."""
        nmax = float(self.q_hi)
        rmin, rdelta, nstep = self.QKX2
        mad = weighted and self.USE_MAD
        if weighted and self.WEIGHTS == "abs":
            w = X.abs()
        elif weighted:
            av_x = torch.sqrt(_seq_sum(X * X) / 32.0)[..., None]
            w = av_x + X.abs()
        else:
            w = torch.ones_like(X)

        def err(t: torch.Tensor) -> torch.Tensor:
            return t.abs() if mad else t.pow(2)
        xmin = X.min(dim=2, keepdim=True).values.clamp(max=0.0)
        xmax = X.max(dim=2, keepdim=True).values
        flat = xmax == xmin
        rng = torch.where(flat, torch.ones_like(xmax), xmax - xmin)
        sum_w, sum_x = _seq_sum(w)[..., None], _seq_sum(w * X)[..., None]
        iscale = _rdiv(nmax, rng)
        scale = _rdiv(1.0, iscale)
        L = _nearest(iscale * (X - xmin)).clamp(0, nmax)
        best = _seq_sum(w * err(scale * L + xmin - X))[..., None]
        best_scale, best_min = scale, xmin
        for i in range(nstep + 1):  # llama.cpp's min moves to each better fit's: later steps start from it
            step = float(np.float32(np.float32(rmin) + np.float32(rdelta) * np.float32(i)) + np.float32(nmax))
            rng = torch.where(flat, torch.ones_like(xmax), xmax - best_min)
            iscale = _rdiv(step, rng)
            L = _nearest(iscale * (X - best_min)).clamp(0, nmax)
            wl = w * L
            sum_l, sum_l2, sum_xl = (_seq_sum(t)[..., None] for t in (wl, wl * L, wl * X))
            D = sum_w * sum_l2 - sum_l * sum_l
            ok = D > 0
            Ds = torch.where(ok, D, torch.ones_like(D))
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
            pos = this_min > 0
            this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
            this_scale = torch.where(pos, sum_xl / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)), this_scale)
            cur = _seq_sum(w * err(this_scale * L + this_min - X))[..., None]
            better = ok & (cur < best)
            best = torch.where(better, cur, best)
            best_scale = torch.where(better, this_scale, best_scale)
            best_min = torch.where(better, this_min, best_min)
        best_scale = torch.where(flat, torch.zeros_like(best_scale), best_scale)
        return best_scale[..., 0], -best_min[..., 0]

    def _candidates(self, X):
        out = []
        for weighted in (True, False):
            S, Mu = self._targets(X, weighted)  # (rows, n_sub)
            max_scale = S.max(dim=1, keepdim=True).values.clamp(min=0.0)
            max_min = Mu.max(dim=1, keepdim=True).values.clamp(min=0.0)
            for f in self.D_FACTORS:
                top = float(self.code_hi)  # 63 (Q2_K: 15)
                if f == 1.0:  # llama.cpp's: codes nearest_int(63/max · s_j), d = fp16(max/63)
                    inv_s = torch.where(max_scale > 0, _rdiv(top, torch.where(max_scale > 0, max_scale, 1.0)), 0.0)
                    inv_m = torch.where(max_min > 0, _rdiv(top, torch.where(max_min > 0, max_min, 1.0)), 0.0)
                    sc = _nearest(inv_s * S).clamp(0, top)
                    m = _nearest(inv_m * Mu).clamp(0, top)
                    d, dmin = _fp16_param(max_scale / top), _fp16_param(max_min / top)
                else:
                    d, dmin = _fp16_param(f * max_scale / top), _fp16_param(f * max_min / top)
                    sc = _nearest(S / torch.where(d > 0, d, 1.0)).clamp(0, top) * (d > 0)
                    m = _nearest(Mu / torch.where(dmin > 0, dmin, 1.0)).clamp(0, top) * (dmin > 0)
                out.append((d, sc, dmin, m))
        return out


class Q2_KGrid(_AffineKGrid):
    """Q2_K: x = d·sc_j·c − dmin·m_j, c ∈ [0, 3], 16 sub-blocks of 16 with 4-bit sc_j, m_j; 84 bytes per 256
    weights (2.625 bits)."""

    kind = "q2_k"
    bits_fixed = 2
    sub = 16
    code_hi = 15
    SCALE_BITS = 4
    QKX2 = (-0.5, 0.1, 15)
    WEIGHTS = "abs"
    USE_MAD = True


class Q4_KGrid(_AffineKGrid):
    """Q4_K: x = d·sc_j·c − dmin·m_j, c ∈ [0, 15]; 144 bytes per 256 weights (4.5 bits)."""

    kind = "q4_k"
    bits_fixed = 4


class Q5_KGrid(_AffineKGrid):
    """Q5_K: x = d·sc_j·c − dmin·m_j, c ∈ [0, 31]; 176 bytes per 256 weights (5.5 bits)."""

    kind = "q5_k"
    bits_fixed = 5
    QKX2 = (-0.5, 0.1, 15)


class Q6_KGrid(KQuantGrid):
    """Q6_K: x = d·sc_j·(c − 32), c ∈ [0, 63], 16 sub-blocks of 16 with int8 sc_j; 210 bytes per 256 weights
    (6.5625 bits)."""

    kind = "q6_k"
    bits_fixed = 6
    sub = 16
    affine = False
    code_lo, code_hi = -128, 127
    SCALE_BITS = 8
    offset = 32

    def _targets(self, X: torch.Tensor, weighted: bool) -> torch.Tensor:
        """make_qx_quants(16, 32, x, L, rmse_type) per sub-block: the signed scale s_j (rows, n_sub);
        ``weighted``: rmse_type 1 (weights x², llama.cpp's), else 2 (all 1)."""
        nmax = 32.0
        w = X * X if weighted else torch.ones_like(X)
        amax, idx = X.abs().max(dim=2, keepdim=True)
        mx = X.gather(2, idx)
        zero = amax < GROUP_MAX_EPS
        mx = torch.where(zero, torch.ones_like(mx), mx)

        def sums(iscale):
            L = _nearest(iscale * X).clamp(-nmax, nmax - 1)
            return _seq_sum(w * X * L)[..., None], _seq_sum(w * L * L)[..., None]

        sumlx, suml2 = sums(_rdiv(-nmax, mx))
        scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, 1.0), 0.0)
        best = scale * sumlx
        for i in range(-9, 10):
            if i == 0:
                continue
            sumlx, suml2 = sums(_rdiv(-float(np.float32(nmax) + np.float32(0.1) * np.float32(i)), mx))
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            scale = torch.where(better, sumlx / torch.where(suml2 > 0, suml2, 1.0), scale)
            best = torch.where(better, scale * sumlx, best)
        return torch.where(zero, torch.zeros_like(scale), scale)[..., 0]

    def _scale_codes(self, S, max_scale, f):
        # llama.cpp's (f = 1): d = fp16(1/iscale), sc = min(127, nint(iscale·s)) (Q3_K: −32 and [−32, 31])
        none = max_scale.abs() < GROUP_MAX_EPS
        iscale = _rdiv(float(self.code_lo), f * torch.where(none, torch.ones_like(max_scale), max_scale))
        d = torch.where(none, 0.0, _fp16_param(_rdiv(1.0, iscale)))
        if f != 1.0:
            return d, self._nearest_codes(S, d)
        return d, torch.where(none, 0.0, _nearest(iscale * S).clamp(self.code_lo, self.code_hi))


class Q3_KGrid(Q6_KGrid):
    """Q3_K: x = d·sc_j·(c − 4), c ∈ [0, 7], 16 sub-blocks of 16 with 6-bit signed sc_j ∈ [−32, 31]; 110 bytes
    per 256 weights (3.4375 bits)."""

    kind = "q3_k"
    bits_fixed = 3
    code_lo, code_hi = -32, 31
    SCALE_BITS = 6
    offset = 4

    def _targets(self, X: torch.Tensor, weighted: bool) -> torch.Tensor:
        """make_q3_quants(16, 4, x, L, true) per sub-block, the signed scale s_j (rows, n_sub): levels
        nearest −4/max · x, then up to 5 passes that move one level at a time where Σ w x l)² / Σ w l² grows,
        with llama.cpp's weights w = x² (``weighted``) or all 1; its float32 arithmetic in its order."""
        nmax = 4.0
        w = X * X if weighted else torch.ones_like(X)
        amax, idx = X.abs().max(dim=2, keepdim=True)
        mx = X.gather(2, idx)
        zero = amax < GROUP_MAX_EPS
        mx = torch.where(zero, torch.ones_like(mx), mx)
        L = _nearest(_rdiv(-nmax, mx) * X).clamp(-nmax, nmax - 1)  # (rows, n_sub, 16)
        wx = w * X
        sumlx, suml2 = _seq_sum(wx * L), _seq_sum(w * L * L)  # (rows, n_sub)
        for _ in range(5):  # a pass without a change leaves everything as it is: no early exit needed
            for i in range(X.shape[2]):
                xi, wi, wxi, li = X[..., i], w[..., i], wx[..., i], L[..., i]
                slx = sumlx - wxi * li
                sl2 = suml2 - wi * li * li
                pos = slx > 0
                new = _nearest(xi * sl2 / torch.where(pos, slx, torch.ones_like(slx))).clamp(-nmax, nmax - 1)
                slx_n, sl2_n = slx + wxi * new, sl2 + wi * new * new
                take = pos & (new != li) & (sl2_n > 0) & (slx_n * slx_n * suml2 > sumlx * sumlx * sl2_n)
                L[..., i] = torch.where(take, new, li)
                sumlx = torch.where(take, slx_n, sumlx)
                suml2 = torch.where(take, sl2_n, suml2)
        scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1.0), 0.0)
        return torch.where(zero[..., 0], torch.zeros_like(scale), scale)


class IQ4_XSGrid(KQuantGrid):
    """IQ4_XS: x = d·sc_j·IQ4_NL_LEVELS[c], c ∈ [0, 15], 8 sub-blocks of 32 with 6-bit signed sc_j ∈ [−32, 31];
    136 bytes per 256 weights (4.25 bits). IQ4_NL's non-uniform levels on a k-quant super-block.

    Every product of ggml's ``dequantize_row_iq4_xs`` (fp16 d times a 6-bit integer, then a 7-bit level) is exact in
    float32. Codes are the nearest level of x / s_j (ties to the upper level, as ggml's ``best_index_int8``); the
    candidates start from llama.cpp's ``quantize_row_iq4_nl_impl`` (a ±7-step search of each sub-block's scale
    under its weights x², then d = −max/32), unweighted too, and are polished as every k-quant is."""

    kind = "iq4_xs"
    bits_fixed = 4
    sub = 32
    affine = False
    code_lo, code_hi = -32, 31
    SCALE_BITS = 6
    levels = IQ4_NL_LEVELS
    NTRY = 7  # llama.cpp's ±7 scale steps per sub-block

    def _make_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(the 16 levels, the 15 midpoints between them), float32 on ``device``."""
        lv = torch.tensor(self.levels, dtype=torch.float32, device=device)
        return lv, (lv[1:] + lv[:-1]) / 2

    def _codes(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The code of the level nearest x / s (code 8, level 1, where s = 0: x̂ is 0 whichever code)."""
        _, mids = self._tables(x.device)
        t = torch.where(s != 0, x / torch.where(s != 0, s, torch.ones_like(s)), torch.zeros_like(x))
        return torch.bucketize(t, mids, right=True)  # a midpoint goes up, as best_index_int8's strict <

    def _levels(self, x: torch.Tensor, s: torch.Tensor, mu: torch.Tensor | None) -> torch.Tensor:
        return self._tables(x.device)[0][self._codes(x, s)]

    def encode(self, x: torch.Tensor, p: GroupParams, start: int = 0) -> torch.Tensor:
        s, _ = self._effective(p, start, x.shape[1])
        return self._codes(x.to(torch.float32), s).to(torch.uint8)

    def decode(self, codes: torch.Tensor, p: GroupParams, start: int = 0) -> torch.Tensor:
        s, _ = self._effective(p, start, codes.shape[1])
        return s * self._tables(codes.device)[0][codes.long()]

    def _targets(self, X: torch.Tensor, weighted: bool) -> torch.Tensor:
        """Each sub-block's signed scale s_j (rows, n_sub), as quantize_row_iq4_nl_impl finds it without an
        imatrix: start at max/127 (the signed absmax on level −127), refit by least squares, then try the scales
        that put the absmax on (i − 127) for i = −7 … 7 and keep the best (Σ w q x)² / Σ w q²; w = x²
        (``weighted``, llama.cpp's) or all 1."""
        lv, _ = self._tables(X.device)
        w = X * X if weighted else torch.ones_like(X)
        amax, idx = X.abs().max(dim=2, keepdim=True)
        mx = X.gather(2, idx)
        zero = amax < GROUP_MAX_EPS
        mx = torch.where(zero, torch.ones_like(mx), mx)

        def sums(inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            q = lv[torch.bucketize(inv * X, (lv[1:] + lv[:-1]) / 2, right=True)]
            return _seq_sum(w * q * X)[..., None], _seq_sum(w * q * q)[..., None]

        sumqx, sumq2 = sums(_rdiv(1.0, mx / 127.0))
        d = torch.where(sumq2 > 0, sumqx / torch.where(sumq2 > 0, sumq2, 1.0), 0.0)
        best = d * sumqx
        for i in range(-self.NTRY, self.NTRY + 1):
            sumqx, sumq2 = sums(float(i + self.levels[0]) / mx)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = torch.where(better, sumqx / torch.where(sumq2 > 0, sumq2, 1.0), d)
            best = torch.where(better, d * sumqx, best)
        return torch.where(zero, torch.zeros_like(d), d)[..., 0]

    def _scale_codes(self, S, max_scale, f):
        d = _fp16_param(-max_scale / (32.0 * f))  # llama.cpp's (f = 1): d = −max/32, the largest scale on code −32
        return d, self._nearest_codes(S, d)


# ----- lattice i-quants: 8 weights per codeword ------------------------------------------------
LATTICE_DIM = 8  # weights under one sign pattern (of even parity) and one or two grid points


def sign_patterns(device: torch.device | str | None = None) -> torch.Tensor:
    """ggml's ksigns_iq2xs (128,) int64: the 8 sign bits of 7-bit index i, bit 7 set where i has an odd
    number of ones, so every pattern has an even number of negative signs."""
    i = torch.arange(128, device=device)
    odd = sum((i >> k) & 1 for k in range(7)) & 1
    return i | (odd << 7)


def lattice_points(name: str) -> torch.Tensor:
    """ggml's grid of i-quant ``name`` (``"IQ3_XXS"``: iq3xxs_grid, (256, 4); ``"IQ2_XS"``: iq2xs_grid, (512, 8)):
    the magnitudes of its points, float32 on the CPU, as gguf-py unpacks them."""
    import gguf.quants

    cls = getattr(gguf.quants, name)
    cls.init_grid()
    return torch.from_numpy(np.array(cls.grid, dtype=np.float32).reshape(cls.grid_shape))


class LatticeGrid(KQuantGrid):
    """An i-quant on a lattice codebook (``dim = 8``): sub-blocks of ``sub`` weights with 4-bit scale codes ls_j,
    s_j = d·(0.5 + ls_j)·SCALE_UNIT (fp16 d, ggml's db); each run of 8 weights is s_j · (σ_0 g_0, …, σ_7 g_7), g the
    magnitudes of ``parts`` points of ggml's grid (8/parts values each), σ a sign pattern with an even number of
    minus signs (7 stored bits, ksigns_iq2xs), or any of the 256 (``FREE_SIGNS``: 8 stored bits, IQ2_S).

    A codeword's word (its grid indices and 7 sign bits, laid out by :meth:`_word`) is stored as its eight
    DIGIT_BITS-bit codes, code k = bits DIGIT_BITS·k … of the word, so the codes pack at DIGIT_BITS bits per weight.

    The nearest codeword (under per-weight weights w) is exact (:func:`lattice_nearest`). Fitting: each
    sub-block's scale from a search of s = amax/v over the grid's range with a least-squares refit, then d and the
    codes ls_j as for the other k-quants, polished by ±1."""

    affine = False
    code_lo, code_hi = 0, 15
    SCALE_BITS = 4
    D_FACTORS = (1.0, 0.95)
    # unweighted targets only: adding llama.cpp's x²-weighted ones changed no error (Gaussian and heavy-tailed
    # 32 × 512, IQ3_XXS and IQ2_XS) and took 2-3 × the time; x²-weighted alone is 7-30 % worse
    TARGET_WEIGHTS = (False,)
    column_offsets = True
    dim = LATTICE_DIM
    POINTS = ""  # ggml's grid, by gguf-py's class name
    parts = 1  # grid points per codeword
    SCALE_UNIT = 0.5
    DIGIT_BITS = 2
    FREE_SIGNS = False  # the 8 signs are stored whole (no parity)
    SEARCH: tuple[float, ...] = ()  # the scale search: the sub-block's absmax on grid magnitude v, for these v

    def _make_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(the grid's points (P, 8/parts) float32, the sign patterns (128,) int64) on ``device``."""
        return lattice_points(self.POINTS).to(device), sign_patterns(device)

    @property
    def code_bits(self) -> int:
        return self.DIGIT_BITS

    def _effective(self, p: GroupParams, start: int, width: int) -> tuple[torch.Tensor, None]:
        sub = torch.arange(start, start + width, device=p.scale.device) // self.sub
        return self._scales(p.scale[:, :1], p.scale[:, 1:])[:, sub], None

    def _scales(self, d: torch.Tensor, ls: torch.Tensor) -> torch.Tensor:
        return d * (0.5 + ls) * self.SCALE_UNIT  # ggml's db, exact in float32

    def _word(self, index: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
        """The stored word of codewords with grid indices ``index`` (..., parts) and sign bits ``signs`` (bit k:
        weight k negative; the low 7 are stored, all 8 with FREE_SIGNS)."""
        raise NotImplementedError

    def _split(self, word: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(grid indices (..., parts), stored sign bits) of stored words (the inverse of :meth:`_word`)."""
        raise NotImplementedError

    def _extra_bits(self, p: GroupParams, run: torch.Tensor) -> torch.Tensor | int:
        """Bits that ride in the words of runs ``run`` beyond the codeword's (IQ3_XXS: its sub-block's scale)."""
        return 0

    def _values(self, index: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
        """σ ⊙ g (..., 8) of codewords (indices (..., parts), stored sign bits), before the scale."""
        grid, patterns = self._tables(index.device)
        g = grid[index].flatten(-2)  # (..., 8) magnitudes
        signs = signs & 255 if self.FREE_SIGNS else patterns[signs & 127]
        bits = (signs[..., None] >> torch.arange(LATTICE_DIM, device=index.device)) & 1
        return g * (1 - 2 * bits).to(torch.float32)

    def encode(self, x: torch.Tensor, p: GroupParams, start: int | None = None) -> torch.Tensor:
        rows, width = x.shape
        start = self._next_columns(p, width) if start is None else start
        if start % LATTICE_DIM or width % LATTICE_DIM:
            raise ValueError(f"{self.kind} codes runs of {LATTICE_DIM} columns: got columns {start}…{start + width}")
        s, _ = self._effective(p, start, width)
        n = width // LATTICE_DIM
        grid, _ = self._tables(x.device)
        index, signs, _ = lattice_nearest(x.to(torch.float32).reshape(rows, n, LATTICE_DIM), s[:, ::LATTICE_DIM],
                                          grid, self.parts, parity=not self.FREE_SIGNS)
        run = torch.arange(start // LATTICE_DIM, start // LATTICE_DIM + n, device=x.device)
        return self.codes_of(self._word(index, signs) | self._extra_bits(p, run))

    def codes_of(self, words: torch.Tensor) -> torch.Tensor:
        """The codes (rows, 8·n) uint8 of codeword words (rows, n) int64: code k = bits DIGIT_BITS·k … of the word."""
        digits = words[..., None] >> (self.DIGIT_BITS * torch.arange(LATTICE_DIM, device=words.device))
        return (digits & (2**self.DIGIT_BITS - 1)).flatten(-2).to(torch.uint8)

    def words_of(self, codes: torch.Tensor) -> torch.Tensor:
        """The codeword words (rows, n) int64 of codes (rows, 8·n) (the inverse of :meth:`codes_of`)."""
        digits = codes.to(torch.int64).reshape(*codes.shape[:-1], -1, LATTICE_DIM)
        return (digits << (self.DIGIT_BITS * torch.arange(LATTICE_DIM, device=codes.device))).sum(dim=-1)

    def decode(self, codes: torch.Tensor, p: GroupParams, start: int | None = None) -> torch.Tensor:
        rows, width = codes.shape
        s, _ = self._effective(p, 0 if start is None else start, width)
        return s * self._values(*self._split(self.words_of(codes))).reshape(rows, width)  # db · grid · ±1, exact

    def round(self, x: torch.Tensor, p: GroupParams) -> torch.Tensor:
        start = self._next_columns(p, x.shape[1])
        return self.decode(self.encode(x, p, start), p, start)

    def _sub_errors(self, X, M, d, sc, dmin, m) -> torch.Tensor:
        rows, n_sub, _ = X.shape
        s = self._scales(d, sc).repeat_interleave(self.sub // LATTICE_DIM, dim=1)  # (rows, runs)
        grid, _ = self._tables(X.device)
        _, _, err = lattice_nearest(X.reshape(rows, -1, LATTICE_DIM), s, grid, self.parts,
                                    M.reshape(rows, -1, LATTICE_DIM), parity=not self.FREE_SIGNS)
        return err.reshape(rows, n_sub, -1).sum(dim=2)

    def _targets(self, X: torch.Tensor, weighted: bool) -> torch.Tensor:
        """Each sub-block's scale s_j (rows, n_sub): of s = amax/v for v in SEARCH, each refitted by least squares
        on its codewords' values q (s = Σ w x q / Σ w q²), the one with the largest (Σ w x q)² / Σ w q²; w = x²
        (``weighted``, llama.cpp's weights without an imatrix) or all 1 (TARGET_WEIGHTS; weighting them by the fit's
        importances, LDLQ's pivots, lost 2 % on IQ3_XXS in tests/test_gguf_grids.py's pivot test)."""
        rows, n_sub, _ = X.shape
        grid, _ = self._tables(X.device)
        w = X * X if weighted else torch.ones_like(X)
        amax = X.abs().amax(dim=2)  # (rows, n_sub)
        runs = X.reshape(rows, -1, LATTICE_DIM)
        best_s, best = torch.zeros_like(amax), torch.full_like(amax, -1.0)
        for v in self.SEARCH:
            s = (amax / v).repeat_interleave(self.sub // LATTICE_DIM, dim=1)
            index, signs, _ = lattice_nearest(runs, s, grid, self.parts, w.reshape(rows, -1, LATTICE_DIM),
                                              parity=not self.FREE_SIGNS)
            q = self._values(index, signs).reshape(rows, n_sub, self.sub)
            sumqx, sumq2 = (w * q * X).sum(dim=2), (w * q * q).sum(dim=2)
            score = torch.where(sumq2 > 0, sumqx * sumqx / torch.where(sumq2 > 0, sumq2, 1.0), 0.0)
            better = score > best
            best = torch.where(better, score, best)
            best_s = torch.where(better, torch.where(sumq2 > 0, sumqx / torch.where(sumq2 > 0, sumq2, 1.0), 0.0),
                                 best_s)
        return torch.where(amax < GROUP_MAX_EPS, 0.0, best_s.clamp_min(0.0))

    def _scale_codes(self, S, max_scale, f):
        top = (self.code_hi + 0.5) * self.SCALE_UNIT  # s_j = d·(ls_j + ½)·unit: the largest on ls = 15 (f = 1)
        d = _fp16_param(max_scale / (top * f))
        ls = torch.where(d > 0, _nearest(S / (self.SCALE_UNIT * torch.where(d > 0, d, 1.0)) - 0.5), 0.0)
        return d, ls.clamp(self.code_lo, self.code_hi)


class IQ3_XXSGrid(LatticeGrid):
    """IQ3_XXS: 8 sub-blocks of 32, s_j = d·(0.5 + ls_j)·0.5; a codeword is two points of ggml's 256-point grid
    ``iq3xxs_grid`` (4 magnitudes each from {4, 12, 20, …, 52, 62}) and 8 signs of even parity. 98 bytes per 256
    weights: 3.0625 bits.

    Its word is i₁ | i₂ << 8 | signs << 16 | bit << 23, the bit being bit l of its sub-block's ls_j for the
    sub-block's codeword l (as ggml packs ls_j beside the signs): 3-bit codes, and d is the only other parameter."""

    kind = "iq3_xxs"
    bits_fixed = 3
    sub = 32
    POINTS = "IQ3_XXS"
    parts = 2
    DIGIT_BITS = 3
    # (relative MSE on 32 × 512 Gaussian weights: v in 16 … 62, 0.03191; 20 … 80, which clips the largest weights,
    # 0.03140; 30 … 90, 0.03140; ignoring the sign parity in the search, 0.0386)
    SEARCH = tuple(float(v) for v in np.linspace(20.0, 80.0, 10))

    @property
    def overhead_bits(self) -> int:
        return 16  # d; the eight 4-bit ls_j are bits of the codes

    def _word(self, index, signs):
        return index[..., 0] | (index[..., 1] << 8) | ((signs & 127) << 16)

    def _split(self, word):
        return torch.stack([word & 255, (word >> 8) & 255], dim=-1), (word >> 16) & 127

    def _extra_bits(self, p, run):
        ls = p.scale[:, 1:][:, run // 4].to(torch.int64)  # the 4 codewords of a sub-block carry ls_j's 4 bits
        return ((ls >> (run % 4)) & 1) << 23


class IQ2_XSGrid(LatticeGrid):
    """IQ2_XS: 16 sub-blocks of 16, s_j = d·(0.5 + ls_j)·0.25; a codeword is one point of ggml's 512-point grid
    ``iq2xs_grid`` (8 magnitudes from {8, 25, 43}) and 8 signs of even parity: a 16-bit word i | signs << 9, eight
    2-bit codes. 74 bytes per 256 weights (fp16 d, 32 words, 16 4-bit ls_j): 2.3125 bits."""

    kind = "iq2_xs"
    bits_fixed = 2
    sub = 16
    POINTS = "IQ2_XS"  # one point per codeword, 2-bit codes: LatticeGrid's defaults
    SCALE_UNIT = 0.25
    # (32 × 512 Gaussian weights: v in 12 … 43, 0.0849; 20 … 60, 0.08231; 25 … 70, 0.08228)
    SEARCH = tuple(float(v) for v in np.linspace(25.0, 70.0, 10))

    def _word(self, index, signs):
        return index[..., 0] | ((signs & 127) << 9)

    def _split(self, word):
        return (word & 511)[..., None], (word >> 9) & 127


class IQ2_SGrid(LatticeGrid):
    """IQ2_S: 16 sub-blocks of 16, s_j = d·(0.5 + ls_j)·0.25; a codeword is one point of ggml's 1024-point grid
    ``iq2s_grid`` (8 magnitudes from {8, 25, 43}) and 8 free signs: an 18-bit word i | signs << 10. 82 bytes per 256
    weights (fp16 d, per codeword 10 + 8 bits, 16 4-bit ls_j): 2.5625 bits.

    The word does not fit two bits per weight, so the codes are 3-bit digits of it (lqlr's own files pack them at 3
    bits); the accounting is the GGUF block's: bq = 2 and overhead_bits = 144, i.e. d (16), the sixteen ls_j (64)
    and the word's 2 × 32 bits beyond the codes' 2 per weight (64)."""

    kind = "iq2_s"
    bits_fixed = 2
    sub = 16
    POINTS = "IQ2_S"
    SCALE_UNIT = 0.25
    DIGIT_BITS = 3
    FREE_SIGNS = True
    SEARCH = IQ2_XSGrid.SEARCH  # the same magnitudes {8, 25, 43}

    @property
    def overhead_bits(self) -> int:
        return 16 + 16 * self.SCALE_BITS + 2 * (QK_K // LATTICE_DIM)

    def _word(self, index, signs):
        return index[..., 0] | ((signs & 255) << 10)

    def _split(self, word):
        return (word & 1023)[..., None], (word >> 10) & 255


def lattice_nearest(x: torch.Tensor, s: torch.Tensor, grid: torch.Tensor, parts: int,
                    w: torch.Tensor | None = None, chunk: int = 8192, parity: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The nearest codewords s·(σ ⊙ (g_1, …, g_parts)) of x (..., 8): g_k points of ``grid`` (P, 8/parts), σ signs
    with an even number of minus signs (``parity``; else any signs), under weights w (..., 8) (None: all 1),
    s (...) ≥ 0. Returns (the grid indices (..., parts) int64, the 8 sign bits (...) int64 (bit k: weight k
    negative), the weighted squared error (...)). Exact: min Σ w (x − x̂)² over all P^parts · 2⁷ (2⁸) codewords."""
    shape = x.shape[:-1]
    x = x.reshape(-1, LATTICE_DIM).to(torch.float32)
    s = s.reshape(-1, 1).to(torch.float32)
    w = torch.ones_like(x) if w is None else w.reshape(-1, LATTICE_DIM).to(torch.float32)
    n, width = x.shape[0], LATTICE_DIM // parts
    G, G2 = grid.T, (grid * grid).T  # (width, P)
    index = torch.empty(n, parts, dtype=torch.int64, device=x.device)
    flipped = torch.full((n,), -1, dtype=torch.int64, device=x.device)  # the weight a parity repair flips (−1: none)
    errors = torch.empty(n, dtype=torch.float32, device=x.device)
    neg = x < 0
    odd = (neg.sum(dim=1) % 2) == 1 if parity else torch.zeros_like(neg[:, 0])  # free signs: x's own
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        ax, wc, sc = x[a:b].abs(), w[a:b], s[a:b]
        oi = torch.nonzero(odd[a:b])[:, 0]  # the runs whose own signs have odd parity: one flip repairs them
        plain_e, plain_i, extra, fixed_i, fixed_k = [], [], [], [], []
        for k in range(parts):
            A, W = ax[:, k * width:(k + 1) * width], wc[:, k * width:(k + 1) * width]
            # Σ w (|x| − s g)² for every grid point (rows, P), expanded
            cost = (W * A * A).sum(1, keepdim=True) - 2 * sc * ((W * A) @ G) + sc * sc * (W @ G2)
            e0, i0 = cost.min(dim=1)
            flip = 4 * sc[oi] * W[oi] * A[oi]  # flipping weight i against x's sign adds flip_i · g_i
            pmin = flip[:, :1] * G[0]
            for i in range(1, width):
                pmin = torch.minimum(pmin, flip[:, i:i + 1] * G[i])
            e1, i1 = (cost[oi] + pmin).min(dim=1)
            plain_e.append(e0), plain_i.append(i0), extra.append(e1 - e0[oi]), fixed_i.append(i1)
            fixed_k.append((flip * grid[i1]).argmin(dim=1) + k * width)  # the weight the repair flips there
        # repair in the part where it costs least
        extra_t = torch.stack(extra, dim=1)  # (odd runs, parts)
        where = extra_t.argmin(dim=1, keepdim=True)
        err = sum(plain_e)
        err[oi] += extra_t.gather(1, where)[:, 0]
        errors[a:b] = err.clamp_min(0.0)
        idx = torch.stack(plain_i, dim=1)  # (rows, parts)
        idx[oi, where[:, 0]] = torch.stack(fixed_i, dim=1).gather(1, where)[:, 0]
        index[a:b] = idx
        flipped[a + oi] = torch.stack(fixed_k, dim=1).gather(1, where)[:, 0]
    bit = torch.arange(LATTICE_DIM, device=x.device)
    signs = (neg.to(torch.int64) << bit).sum(dim=1)
    signs = torch.where(flipped >= 0, signs ^ (1 << flipped.clamp_min(0)), signs)
    return index.reshape(*shape, parts), signs.reshape(shape), errors.reshape(shape)


K_GRIDS: dict[str, type[KQuantGrid]] = {g.kind: g for g in (Q2_KGrid, Q3_KGrid, Q4_KGrid, Q5_KGrid, Q6_KGrid,
                                                              IQ4_XSGrid, IQ3_XXSGrid, IQ2_XSGrid, IQ2_SGrid)}
GGUF_GRIDS.update(K_GRIDS)

assert {k: g.bits_fixed for k, g in GGUF_GRIDS.items()} == GGUF_BITS, "lqlr.config.GGUF_BITS and the grids disagree"
