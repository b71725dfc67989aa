"""QTIP's bitshift trellis code as a Q grid: ``k`` bits per weight, a computed codebook, Viterbi search.

A sequence of T weights is coded by a bit stream of T·k bits read through a window of L bits (the
*state*) that moves k bits per weight: s_t = ((s_{t−1} << k) | d_t) mod 2^L, d_t the t-th k-bit digit,
and weight t decodes to ``code[s_t]``. The stream is *tail-biting* (read cyclically: s_0's upper L − k
bits are the stream's last L − k bits), so a sequence costs exactly T·k bits. Each state has 2^k
successors and 2^k predecessors; the best digits for a sequence x are found by the Viterbi algorithm,
min over stream of Σ_t (x_t − code[s_t])², in O(T·2^L) per sequence.

``code`` is QTIP's "1MAD" Gaussian code, computed and never stored (0 bits of side information):
the state's image under one multiply-add mod 2³², its four bytes summed (an Irwin–Hall-like sum of
four near-uniform bytes, mean 510, variance 4·(256² − 1)/12), standardised to mean 0, variance 1.

Layout (QTIP's): a sequence is a tile of 16 rows × 16 consecutive input columns, read row by row
(T = 256), so block LDLQ (:mod:`lqlr.core.ldlq`) rounds 16 columns at a time (``dim = 16``); a
matrix whose row count is not a multiple of 16 ends in shorter tiles (16·r weights for r rows).
Each row has one fp16 scale per group (a group as wide as the row: one per row). A weight's stored
code is its digit d_t, so the codes pack at k bits per weight like a k-bit scalar grid.

The cost is 2^L states per weight and 1.25 Viterbi passes per sequence (the tail-biting approximation:
a first pass over the 64 weights around the seam fixes the stream's last L − k bits, a second pass is
constrained to start and end on them). On a CPU the search is compiled C++ (``trellis_cpu.cpp``, one
sequence per thread, in cache), elsewhere batched torch. QTIP uses L = 16; on a CPU L = 10 or 12 is
the practical range (docs/codebooks.md gives distortion and time per L).
"""
from __future__ import annotations

from pathlib import Path

import torch

from lqlr.config import TRELLIS_DEFAULT_STATE_BITS, TRELLIS_STATE_BITS
from lqlr.core.grids import Grid, GroupParams, fp16_round

TILE = 16  # a sequence is a TILE × TILE block of weights (rows × input columns), read row by row
DEFAULT_STATE_BITS = TRELLIS_DEFAULT_STATE_BITS
# 1MAD: value of state s = (sum of the bytes of (MULTIPLIER·s + INCREMENT) mod 2³²) − MEAN) / STD
MULTIPLIER = 34038481
INCREMENT = 76625530
BYTE_SUM_MEAN = 4 * 255 / 2
BYTE_SUM_STD = (4 * (256**2 - 1) / 12) ** 0.5
BACKPOINTER_BYTES = 1 << 27  # Viterbi's back-pointers per batch of sequences (128 MiB)
SEAM_WINDOW = 64  # the tail-biting seam is read off a first pass over this many weights each side of it


def gaussian_code(state_bits: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``code[s]`` for every state s < 2^L (2^L,) float32: QTIP's 1MAD code, ≈ N(0, 1) over the states."""
    s = torch.arange(1 << state_bits, dtype=torch.int64, device=device)
    h = (MULTIPLIER * s + INCREMENT) & 0xFFFFFFFF
    total = sum((h >> (8 * i)) & 0xFF for i in range(4))
    return (total.to(torch.float32) - BYTE_SUM_MEAN) / BYTE_SUM_STD


def viterbi(x: torch.Tensor, code: torch.Tensor, k: int, overlap: torch.Tensor | None = None,
            compiled: bool = True) -> torch.Tensor:
    """States (B, T) int64 minimising Σ_t (x_t − code[s_t])² over bitshift sequences of x (B, T).

    s_t = ((s_{t−1} << k) | d_t) mod 2^L, L = log2(len(code)). ``overlap`` (B,) constrains each
    sequence to start and end on it (tail-biting with a known seam): s_0 >> k == overlap and
    s_{T−1} mod 2^(L−k) == overlap. Without it s_0 is free. On a CPU the compiled search
    (``trellis_cpu.cpp``) runs when it is available and ``compiled``; elsewhere the batched torch one.
    """
    ext = _extension() if compiled and x.device.type == "cpu" else None
    if ext is not None:
        empty = torch.empty(0, dtype=torch.int64)
        return ext.viterbi(x.to(torch.float32), code.to(torch.float32), k, empty if overlap is None else overlap.cpu())
    return _viterbi_torch(x, code, k, overlap)


def _extension():
    from lqlr.util.cpp import compiled

    return compiled(Path(__file__).with_name("trellis_cpu.cpp"), "lqlr_trellis")


def _viterbi_torch(x: torch.Tensor, code: torch.Tensor, k: int, overlap: torch.Tensor | None) -> torch.Tensor:
    """:func:`viterbi` in batched torch ops (any device)."""
    B, T = x.shape
    S = code.numel()
    L = S.bit_length() - 1
    K, low = 1 << k, 1 << (L - k)
    x = x.to(torch.float32)
    cost = (x[:, :1] - code[None]).square_()  # (B, S) best cost of a path ending in each state
    if overlap is not None:
        start_ok = (torch.arange(S, device=x.device) >> k)[None] == overlap[:, None]
        cost.masked_fill_(~start_ok, float("inf"))
    back = torch.empty(T, B, low, dtype=torch.uint8, device=x.device)  # top k bits of each state's best predecessor
    for t in range(1, T):
        # predecessors of s' are (p << (L − k)) | (s' >> k), p < 2^k: min over p for each j = s' >> k
        best, arg = cost.view(B, K, low).min(1)  # (B, low)
        back[t] = arg
        cost = (x[:, t : t + 1] - code[None]).square_().view(B, low, K).add_(best[:, :, None]).view(B, S)
    if overlap is not None:
        end_ok = (torch.arange(S, device=x.device) & (low - 1))[None] == overlap[:, None]
        cost.masked_fill_(~end_ok, float("inf"))
    s = cost.argmin(1)  # (B,)
    states = torch.empty(B, T, dtype=torch.int64, device=x.device)
    states[:, T - 1] = s
    for t in range(T - 1, 0, -1):  # walk the back-pointers
        j = s >> k
        s = (back[t].gather(1, j[:, None])[:, 0].to(torch.int64) << (L - k)) | j
        states[:, t - 1] = s
    return states


def encode_tailbiting(x: torch.Tensor, code: torch.Tensor, k: int) -> torch.Tensor:
    """Digits (B, T) uint8 of tail-biting streams for the sequences x (B, T), by two Viterbi passes:
    the first, unconstrained, runs over the SEAM_WINDOW weights each side of the seam (the end of x, then
    its start) and reads the stream's last L − k bits off its middle, far from its free start and free end;
    the second, over all of x, is constrained to them at both ends. Needs T·k ≥ L."""
    B, T = x.shape
    L = code.numel().bit_length() - 1
    if T * k < L or T < 4:
        raise ValueError(f"a trellis sequence of {T} weights at {k} bits cannot hold an {L}-bit state")
    out = torch.empty(B, T, dtype=torch.uint8, device=x.device)
    per_batch = max(1, BACKPOINTER_BYTES // (T << (L - k)))
    half = T // 2
    reach = min(half, max(SEAM_WINDOW, 4 * -(-L // k)))  # weights each side of the seam the first pass sees
    for i in range(0, B, per_batch):
        xb = x[i : i + per_batch]
        # the first pass runs over the seam's neighbourhood only: x[T − reach], ..., x[T − 1], x[0], ..., x[reach − 1]
        around = torch.roll(xb, reach, dims=1)[:, : 2 * reach]
        seam = viterbi(around, code, k)[:, reach - 1] & ((1 << (L - k)) - 1)  # the stream's last L − k bits
        out[i : i + per_batch] = (viterbi(xb, code, k, overlap=seam) & ((1 << k) - 1)).to(torch.uint8)
    return out


def stream_states(digits: torch.Tensor, k: int, state_bits: int) -> torch.Tensor:
    """States (B, T) int64 of tail-biting streams of k-bit digits (B, T): s_t = the L bits ending at d_t."""
    d = digits.to(torch.int64)
    s = torch.zeros_like(d)
    for j in range(-(-state_bits // k)):  # digit d_{t−j} sits at bits k·j of s_t
        s |= torch.roll(d, j, dims=1) << (k * j)
    return s & ((1 << state_bits) - 1)


def to_sequences(x: torch.Tensor) -> list[torch.Tensor]:
    """Tiles of x (rows, g) as sequences: (n, 256) for the full 16-row tiles, then (g/16, 16·r) for the r
    rows left over (when rows % 16 ≠ 0). g must be a multiple of 16."""
    rows, g = x.shape
    full = rows - rows % TILE
    out = [x[:full].reshape(full // TILE, TILE, g // TILE, TILE).transpose(1, 2).reshape(-1, TILE * TILE)]
    if full < rows:
        r = rows - full
        out.append(x[full:].reshape(r, g // TILE, TILE).transpose(0, 1).reshape(g // TILE, r * TILE))
    return out


def from_sequences(seqs: list[torch.Tensor], rows: int, g: int) -> torch.Tensor:
    """Inverse of :func:`to_sequences`: the (rows, g) matrix."""
    full = rows - rows % TILE
    out = seqs[0].reshape(full // TILE, g // TILE, TILE, TILE).transpose(1, 2).reshape(full, g)
    if full < rows:
        r = rows - full
        rest = seqs[1].reshape(g // TILE, r, TILE).transpose(0, 1).reshape(r, g)
        out = torch.cat([out, rest])
    return out


class TrellisGrid(Grid):
    """Q on QTIP's bitshift trellis: ``bits`` (k) bits per weight, ``state_bits`` (L) bits of state, tiles
    of 16 × 16 weights (tail-biting, no side information beyond the scales) and one fp16 scale per (row,
    group): a weight is scale · code[s_t]. The scale is rms(row's group) × UNIT_SCALE[bits]."""

    kind = "trellis"
    dim = TILE
    # scale per rms of the data, by bits per weight: the MSE-optimal constant on N(0, 1) at L = 10-12 (2 bits, L = 12:
    # 1.0 → 0.07452, 1.04 → 0.07450, 1.08 → 0.07483; 3 bits: 1.0 → 0.01978, 1.12 → 0.01928; 4 bits: 1.0 → 0.00551,
    # 1.16 → 0.00503 on 256 sequences of 256). More bits put codes further out, where the 1MAD code (bounded at ±3.45)
    # is sparse. tests/test_trellis.py checks that ±5 % is not better at 2 bits.
    UNIT_SCALE = {2: 1.04, 3: 1.1, 4: 1.15}

    def __init__(self, bits: int = 2, group_size: int = 4096, state_bits: int = DEFAULT_STATE_BITS) -> None:
        lo, hi = TRELLIS_STATE_BITS
        if int(bits) not in self.UNIT_SCALE:
            raise ValueError(f"grid='trellis' codes {tuple(self.UNIT_SCALE)} bits per weight, got bits={bits}")
        if not (lo <= int(state_bits) <= hi and int(state_bits) > int(bits)):
            raise ValueError(f"trellis state_bits={state_bits}: choose {lo}-{hi} and more than bits={bits} "
                             "(16 is QTIP's; 10-12 are practical on a CPU)")
        if int(group_size) % TILE:
            raise ValueError(f"grid='trellis' codes tiles of {TILE} columns: group_size must be a multiple of {TILE}, "
                             f"got {group_size}")
        super().__init__(int(bits), int(group_size))
        self.state_bits = int(state_bits)
        self._code: dict[torch.device, torch.Tensor] = {}

    @property
    def overhead_bits(self) -> int:
        return 16  # the fp16 scale

    def code(self, device: torch.device) -> torch.Tensor:
        """The 2^L code values on ``device`` (computed once per device)."""
        device = torch.device(device)
        if device not in self._code:
            self._code[device] = gaussian_code(self.state_bits, device)
        return self._code[device]

    def fit(self, x: torch.Tensor) -> GroupParams:
        rms = x.to(torch.float32).pow(2).mean(1, keepdim=True).sqrt()
        return GroupParams(scale=fp16_round(rms * self.UNIT_SCALE[self.bits]).clamp_min(6.2e-5))

    def _check(self, g: int) -> None:
        if g % TILE:
            raise ValueError(f"a trellis group has a multiple of {TILE} columns, got {g}: the matrix's input width "
                             f"must be a multiple of {TILE}")

    def encode(self, x: torch.Tensor, p: GroupParams) -> torch.Tensor:
        rows, g = x.shape
        self._check(g)
        z = x.to(torch.float32) / p.scale[:, :1]
        code = self.code(x.device)
        digits = [encode_tailbiting(seq, code, self.bits) for seq in to_sequences(z)]
        return from_sequences(digits, rows, g)

    def decode(self, codes: torch.Tensor, p: GroupParams) -> torch.Tensor:
        rows, g = codes.shape
        self._check(g)
        code = self.code(codes.device)
        values = [code[stream_states(seq, self.bits, self.state_bits)] for seq in to_sequences(codes)]
        return from_sequences(values, rows, g) * p.scale[:, :1]

    def spec(self) -> dict:
        return {**super().spec(), "state_bits": self.state_bits}
