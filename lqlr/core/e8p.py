"""QuIP#'s E8P codebook as a Q grid: 8 weights per 16-bit codeword, 2 bits per weight.

The E8 lattice is D8 ∪ (D8 + ½), D8 the integer vectors with an even sum. E8P takes its codewords
from the half-integer coset shifted by ±¼: every codeword is ``y ± ¼·1`` with ``y`` in (ℤ + ½)⁸ of
even coordinate sum (so ``y`` ∈ E8). A 16-bit index splits as

* 8 bits: a *source* point ``a`` = |y|, one of 256 sign-free half-integer patterns — the 227 with
  ‖a‖² ≤ 10, and 29 of ‖a‖² = 12 (:func:`source_points` says which);
* 7 bits: the signs of y's first seven coordinates; the eighth sign is the one that gives y an even
  sum (flipping a half-integer coordinate changes the sum's parity, so exactly one sign works);
* 1 bit: the shift, +¼ or −¼.

2⁸ · 2⁷ · 2 = 2¹⁶ codewords. The codebook is computed from this definition, never stored: its side
information is 0 bits. A group of weights is ``scale · codeword`` with one fp16 scale per (row,
group); with a group at least as wide as the row, one scale per row (16 bits per row).

Nearest-codeword search is exact and structured (:func:`nearest`): for each shift and each source
point the best signs are those of x (an even-sum violation costs flipping the coordinate with the
smallest |x_i|·a_i), so one (n, 8) × (8, 256) product and a min replace the 2¹⁶-way comparison;
``tests/test_e8p.py`` checks it against brute force over all 65,536 codewords.

Codes are stored as eight 2-bit digits per codeword, one per weight (digit k = bits 2k..2k+1 of the
index), so a Q on this grid packs at 2 bits per weight like any 2-bit scalar grid.
"""
from __future__ import annotations

import itertools
from functools import lru_cache

import torch

from lqlr.core.grids import Grid, GroupParams, fp16_round

DIM = 8
N_SOURCE = 256
SHIFT = 0.25
# codeword units per standard deviation of the data: the MSE-optimal constant for N(0, 1) entries
# (1.02 → 0.09133, 1.035 → 0.0912, 1.05 → 0.09129 on 2·10⁵ 8-vectors; tests/test_e8p.py checks it is a minimum)
UNIT_SCALE = 1.035


@lru_cache(maxsize=None)
def _source_points_cpu() -> torch.Tensor:
    levels = (0.5, 1.5, 2.5, 3.5)
    pats = torch.tensor(list(itertools.product(levels, repeat=DIM)), dtype=torch.float32)  # (4⁸, 8)
    norm2 = pats.pow(2).sum(1)
    inner = pats[norm2 <= 10]  # the 227 sign-free patterns of norm² ≤ 10
    ring = pats[norm2 == 12]
    extra = ring[_ring_choice(ring)]
    points = torch.cat([inner, extra])
    assert points.shape == (N_SOURCE, DIM), points.shape
    return points


def _ring_choice(ring: torch.Tensor) -> torch.Tensor:
    """Which 29 of the 224 norm²-12 patterns complete the 256 sources: 29 of the 56 made of five 1.5s
    and three 0.5s — every other one in lexicographic order, and the second — as the other kind
    (2.5, 1.5, 1.5, 0.5⁵) lowers the Gaussian MSE less (0.09117 against 0.09102 on 10⁵ N(0, 1)
    8-vectors; any 29 of the 56 give 0.0910–0.0912)."""
    idx = torch.nonzero((ring == 1.5).sum(1) == 5).flatten()  # the 56, lexicographic
    return torch.cat([idx[::2], idx[1:2]])


def source_points(device: torch.device | str | None = None) -> torch.Tensor:
    """The 256 sign-free source points a (256, 8), half-integers in [0.5, 3.5]."""
    return _source_points_cpu().to(device)


def _parity(points: torch.Tensor) -> torch.Tensor:
    """Number of negative signs a codeword of each source needs, mod 2: sum(a) mod 2 (an integer)."""
    return points.sum(1).round().remainder(2).to(torch.int64)


def decode_index(index: torch.Tensor) -> torch.Tensor:
    """Codewords (..., 8) float32 of 16-bit indices (..., ) int64: source << 8 | signs << 1 | shift."""
    index = index.to(torch.int64)
    points = source_points(index.device)
    src = (index >> 8) & 0xFF
    a = points[src]  # (..., 8)
    bits = (index[..., None] >> (1 + torch.arange(7, device=index.device))) & 1  # (..., 7) first seven signs
    last = (bits.sum(-1) + _parity(points)[src]) & 1  # the eighth sign: makes the count of negatives ≡ sum(a)
    neg = torch.cat([bits, last[..., None]], dim=-1)
    y = a * (1 - 2 * neg).to(a.dtype)
    shift = torch.where((index & 1).bool(), SHIFT, -SHIFT).to(a.dtype)
    return y + shift[..., None]


def all_codewords(device: torch.device | str | None = None) -> torch.Tensor:
    """The whole codebook (65536, 8), row i the codeword of index i (for tests and brute force)."""
    return decode_index(torch.arange(1 << 16, device=device))


def nearest(x: torch.Tensor, chunk: int = 65536, shortlist: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact nearest codeword of each row of x (n, 8): its 16-bit index (n,) int64 and value (n, 8).

    For each shift ±¼, z = x ∓ ¼ is first decoded in the whole coset D8 + ½ (Conway & Sloane's D_n
    decoder: round every coordinate, and if the sum is odd re-round the one with the largest error
    the other way); when that point's sign-free pattern is one of the 256 sources it is the nearest
    codeword of that shift, since the codebook lies in the coset. The other rows (a point beyond the
    codebook's shells) take the structured search over the sources (:func:`_nearest_shifted`).
    """
    x = x.to(torch.float32)
    n = x.shape[0]
    points = source_points(x.device)  # (256, 8)
    parity = _parity(points)  # (256,)
    a2 = points.pow(2).sum(1)  # (256,)
    lookup = _pattern_lookup(x.device)
    weights = (1 << (1 + torch.arange(7, device=x.device))).to(torch.int64)  # sign bit k at bit k + 1
    digits = 4 ** torch.arange(DIM, device=x.device)
    index = torch.empty(n, dtype=torch.int64, device=x.device)
    value = torch.empty(n, DIM, dtype=torch.float32, device=x.device)
    for i in range(0, n, chunk):
        xs = x[i: i + chunk]
        m = xs.shape[0]
        z = torch.cat([xs - SHIFT, xs + SHIFT])  # (2m, 8): the +¼ codewords' offsets, then the −¼ ones
        y = _decode_coset(z)  # nearest points of D8 + ½
        a = y.abs()
        key = ((a - 0.5).round().clamp(0, 3).to(torch.int64) * digits).sum(1)
        src = torch.where((a <= 3.5).all(1), lookup[key], -1)  # -1: not a source pattern
        far = torch.nonzero(src < 0).flatten()
        if far.numel():  # beyond the codebook's shells: search the sources
            d_far, src_far, neg_far = _nearest_shifted(z[far], points, parity, a2, shortlist)
            src[far] = src_far
            y[far] = points[src_far] * (1 - 2 * neg_far.to(torch.float32))
        d = (z - y).pow(2).sum(1)
        plus = d[:m] <= d[m:]  # the +¼ codeword is (one of) the nearest
        pick = torch.where(plus, torch.arange(m, device=x.device), torch.arange(m, 2 * m, device=x.device))
        yb, sb = y[pick], src[pick]
        index[i: i + m] = (sb << 8) | (((yb[:, :7] < 0).to(torch.int64) * weights).sum(1)) | plus.to(torch.int64)
        value[i: i + m] = yb + torch.where(plus, SHIFT, -SHIFT)[:, None]
    return index, value


def _decode_coset(z: torch.Tensor) -> torch.Tensor:
    """Nearest point of D8 + ½·1 (half-integer vectors of even coordinate sum) to each row of z."""
    w = z - 0.5
    r = torch.round(w)
    err = w - r
    odd = torch.nonzero(r.sum(1).remainder(2) != 0).flatten()
    if odd.numel():
        k = err[odd].abs().argmax(1)
        e = err[odd, k]
        r[odd, k] += torch.where(e >= 0, 1.0, -1.0)  # the worst-rounded coordinate, the other way
    return r + 0.5


@lru_cache(maxsize=None)
def _pattern_lookup_cpu() -> torch.Tensor:
    """Source index of each sign-free pattern, keyed Σ_k (a_k − ½)·4^k (−1 for the 2¹⁶ − 256 others)."""
    points = _source_points_cpu()
    keys = ((points - 0.5).round().to(torch.int64) * 4 ** torch.arange(DIM)).sum(1)
    table = torch.full((4**DIM,), -1, dtype=torch.int64)
    table[keys] = torch.arange(N_SOURCE)
    return table


def _pattern_lookup(device: torch.device | str | None) -> torch.Tensor:
    return _pattern_lookup_cpu().to(device)


def _nearest_shifted(z: torch.Tensor, points: torch.Tensor, parity: torch.Tensor, a2: torch.Tensor,
                     shortlist: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest signed source point τ⊙a of each row of z (m, 8): distance (m,), source (m,), negative
    signs (m, 8) bool."""
    mag = z.abs()
    neg = z < 0  # (m, 8) the signs of z
    bound = z.pow(2).sum(1, keepdim=True) - 2 * (mag @ points.T) + a2[None]  # (m, 256) exact unless a flip is due
    flip_due = (neg.sum(1, keepdim=True) % 2) != parity[None]  # (m, 256) the parity of sign(z) is wrong for a
    k = min(shortlist, points.shape[0] - 1)
    lower, cand = bound.topk(k + 1, dim=1, largest=False)  # (m, k + 1) ascending
    cand = cand[:, :k]
    d, due, at = _exact(mag, cand, points, bound, flip_due)
    d_min, j = d.min(1)
    src, flip, flip_at = (t.gather(1, j[:, None])[:, 0] for t in (cand, due, at))
    unsure = torch.nonzero(d_min > lower[:, k]).flatten()  # a source left out might be nearer: search all
    if unsure.numel():
        every = torch.arange(points.shape[0], device=z.device).expand(unsure.numel(), -1)
        d, due, at = _exact(mag[unsure], every, points, bound[unsure], flip_due[unsure])
        d_min[unsure], jj = d.min(1)
        src[unsure] = jj
        flip[unsure], flip_at[unsure] = (t.gather(1, jj[:, None])[:, 0] for t in (due, at))
    signs = neg.clone()
    rows = torch.nonzero(flip).flatten()
    signs[rows, flip_at[rows]] = ~signs[rows, flip_at[rows]]
    return d_min, src, signs


def _exact(mag: torch.Tensor, cand: torch.Tensor, points: torch.Tensor, bound: torch.Tensor,
           flip_due: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact distances (m, c) of candidate sources ``cand`` (m, c), whether each needs its flip (m, c)
    and where (m, c): the flip costs 4·min_i |z_i| a_i over the lower bound."""
    least, at = (mag[:, None, :] * points[cand]).min(-1)  # (m, c) min_i |z_i| a_i
    due = flip_due.gather(1, cand)
    return bound.gather(1, cand) + 4 * least * due, due, at


def index_to_digits(index: torch.Tensor) -> torch.Tensor:
    """16-bit indices (..., ) -> eight 2-bit digits (..., 8) uint8, digit k = bits 2k, 2k+1."""
    shifts = 2 * torch.arange(DIM, device=index.device)
    return ((index.to(torch.int64)[..., None] >> shifts) & 3).to(torch.uint8)


def digits_to_index(digits: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`index_to_digits`: (..., 8) uint8 digits -> (..., ) int64 indices."""
    shifts = 2 * torch.arange(DIM, device=digits.device)
    return (digits.to(torch.int64) << shifts).sum(-1)


@lru_cache(maxsize=None)
def _residual_points_cpu() -> torch.Tensor:
    roots_int = []
    for i, j in itertools.combinations(range(DIM), 2):  # the 112 integer roots ±e_i ± e_j
        for si, sj in itertools.product((1.0, -1.0), repeat=2):
            v = [0.0] * DIM
            v[i], v[j] = si, sj
            roots_int.append(v)
    halves = [v for v in itertools.product((0.5, -0.5), repeat=DIM) if sum(x < 0 for x in v) % 2 == 0]  # 128
    axes = [[2.0 * s if k == i else 0.0 for k in range(DIM)] for i in range(DIM) for s in (1.0, -1.0)]  # 16
    points = torch.tensor(roots_int + [list(v) for v in halves] + axes, dtype=torch.float32)
    assert points.shape == (256, DIM)
    return points


def residual_points(device: torch.device | str | None = None) -> torch.Tensor:
    """The 1-bit residual codebook of the 3-bit grid (256, 8): E8's 240 roots (norm² 2) and the 16
    points ±2e_i (norm² 4), all in E8, closed under sign changes and permutations."""
    return _residual_points_cpu().to(device)


def nearest_residual(x: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact nearest point of :func:`residual_points` to each row of x (n, 8): index (n,), value (n, 8)."""
    x = x.to(torch.float32)
    book = residual_points(x.device)
    b2 = book.pow(2).sum(1)
    index = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for i in range(0, x.shape[0], chunk):
        index[i: i + chunk] = (b2[None] - 2 * x[i: i + chunk] @ book.T).argmin(1)  # ‖x − c‖² − ‖x‖²
    return index, book[index]


@lru_cache(maxsize=None)
def _coordinate_rms(residual_bits: int) -> float:
    """Root mean square of a coordinate over the residual stage's codebook (E8P for 2 bits, the shell for 1)."""
    book = all_codewords() if residual_bits == 2 else residual_points()
    return float(book.pow(2).mean().sqrt())


class E8PGrid(Grid):
    """Q on the E8P codebook: each row's group of g columns (g a multiple of 8) is an fp16 scale
    times g/8 codewords (2 bits per weight). 3 and 4 bits add a residual stage, as QuIP#'s RVQ:
    Q = s₁·c₁ + s₂·c₂ with c₁ the E8P codeword of x/s₁ and c₂ the nearest point to the residual
    (x − s₁c₁)/s₂ of a second codebook — the 256-point E8 shell of :func:`residual_points` (8 bits
    per 8 weights: 3 bits in all) or E8P again (16 bits: 4 in all); s₁, s₂ fp16 per (row, group).
    A weight's code holds its 2-bit digit of c₁'s index and its 1- or 2-bit digit of c₂'s."""

    kind = "e8p"
    dim = DIM
    # fit: scale candidates rms / UNIT_SCALE · f for f in linspace(SHRINK, WIDEN, CANDIDATES), the
    # per-row one of least squared error kept (the residual stage: RESIDUAL_CANDIDATES over a wider range)
    CANDIDATES = 1  # on N(0, 1) rows 5 candidates in [0.85, 1.15] gave 0.091066 against 0.091074 for one
    SHRINK = 0.85
    WIDEN = 1.15
    RESIDUAL_CANDIDATES = 7
    RESIDUAL_RANGE = (0.5, 1.5)

    def __init__(self, bits: int = 2, group_size: int = 4096) -> None:
        if int(bits) not in (2, 3, 4):
            raise ValueError(f"grid='e8p' codes 2, 3 or 4 bits per weight (E8P, + a 1- or 2-bit residual), got bits={bits}")
        if int(group_size) % DIM:
            raise ValueError(f"grid='e8p' encodes {DIM} weights at once: group_size must be a multiple of {DIM}, "
                             f"got {group_size}")
        super().__init__(int(bits), group_size)
        self.params_per_group = 1 if self.bits == 2 else 2  # s₁ (and s₂)
        self.residual_bits = self.bits - 2  # per weight: 0, 1 (the 256-point shell) or 2 (E8P)

    @property
    def overhead_bits(self) -> int:
        return 16 * self.params_per_group  # the fp16 scales

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        rows, g = x.shape
        if g % DIM:
            raise ValueError(f"an E8P group has a multiple of {DIM} columns, got {g}: the matrix's input width "
                             f"must be a multiple of {DIM}")
        return x.reshape(rows * (g // DIM), DIM)

    def _stage2(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return nearest(z) if self.residual_bits == 2 else nearest_residual(z)

    def _decode2(self, index: torch.Tensor) -> torch.Tensor:
        return decode_index(index) if self.residual_bits == 2 else residual_points(index.device)[index]

    @staticmethod
    def _best_scale(x: torch.Tensor, base: torch.Tensor, factors: list[float], quantize) -> torch.Tensor:
        """Per-row fp16 scale among base·f of least ‖x − s·quantize(x/s)‖²; x (rows, g)."""
        if len(factors) == 1:
            return fp16_round(base * factors[0]).clamp_min(6.2e-5)
        best_s = best_e = None
        for f in factors:
            s = fp16_round(base * f).clamp_min(6.2e-5)  # what is stored
            e = (x - quantize(x / s) * s).pow(2).sum(1, keepdim=True)
            if best_s is None:
                best_s, best_e = s, e
            else:
                take = e < best_e
                best_s, best_e = torch.where(take, s, best_s), torch.where(take, e, best_e)
        return best_s

    def fit(self, x: torch.Tensor) -> GroupParams:
        """Per-row s₁: min over candidates around rms(x)/UNIT_SCALE of ‖x − s₁·nearest(x/s₁)‖²; then
        s₂ the same on the residual, around rms(residual)/rms(second codebook)."""
        x = x.to(torch.float32)
        rows, g = x.shape
        rms = x.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-12)  # (rows, 1)
        first = lambda z: nearest(self._split(z))[1].reshape(rows, g)  # noqa: E731
        factors = torch.linspace(self.SHRINK, self.WIDEN, self.CANDIDATES).tolist() if self.CANDIDATES > 1 else [1.0]
        s1 = self._best_scale(x, rms / UNIT_SCALE, factors, first)
        if self.residual_bits == 0:
            return GroupParams(scale=s1)
        r = x - first(x / s1) * s1
        unit = _coordinate_rms(self.residual_bits)  # rms of a coordinate of the second codebook
        base = r.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-12) / unit
        second = lambda z: self._stage2(self._split(z))[1].reshape(rows, g)  # noqa: E731
        s2 = self._best_scale(r, base, torch.linspace(*self.RESIDUAL_RANGE, self.RESIDUAL_CANDIDATES).tolist(), second)
        return GroupParams(scale=torch.cat([s1, s2], dim=1))

    def _indices(self, x: torch.Tensor, p: GroupParams) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Stage indices of x (rows, g) and its rounded value."""
        rows, g = x.shape
        x = x.to(torch.float32)
        s1 = p.scale[:, :1]
        i1, c1 = nearest(self._split(x / s1))
        q = c1.reshape(rows, g) * s1
        if self.residual_bits == 0:
            return i1, None, q
        s2 = p.scale[:, 1:2]
        i2, c2 = self._stage2(self._split((x - q) / s2))
        return i1, i2, q + c2.reshape(rows, g) * s2

    def encode(self, x: torch.Tensor, p: GroupParams) -> torch.Tensor:
        rows, g = x.shape
        i1, i2, _ = self._indices(x, p)
        codes = index_to_digits(i1)  # (n, 8) 2-bit digits of c₁
        if i2 is not None:
            b2 = self.residual_bits
            shifts = b2 * torch.arange(DIM, device=x.device)
            codes = codes | (((i2[:, None] >> shifts) & ((1 << b2) - 1)).to(torch.uint8) << 2)
        return codes.reshape(rows, g)

    def decode(self, codes: torch.Tensor, p: GroupParams) -> torch.Tensor:
        rows, g = codes.shape
        c = self._split(codes).to(torch.int64)
        out = decode_index(digits_to_index(c & 3)).reshape(rows, g) * p.scale[:, :1]
        if self.residual_bits:
            b2 = self.residual_bits
            i2 = ((c >> 2) << (b2 * torch.arange(DIM, device=codes.device))).sum(-1)
            out = out + self._decode2(i2).reshape(rows, g) * p.scale[:, 1:2]
        return out

    def round(self, x: torch.Tensor, p: GroupParams) -> torch.Tensor:
        return self._indices(x, p)[2]
