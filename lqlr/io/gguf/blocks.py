"""A QuantizedTensor on a GGUF grid as ggml tensor bytes, and back.

ggml stores a (rows, cols) tensor of a 32-weight block type row by row, cols/32 blocks per row,
each block little-endian and packed (ggml-common.h):

    Q4_0, IQ4_NL  d:f16 | qs[16]                 18 bytes
    Q4_1          d:f16 | m:f16 | qs[16]         20 bytes
    Q5_0          d:f16 | qh:u32 | qs[16]        22 bytes
    Q5_1          d:f16 | m:f16 | qh:u32 | qs[16] 24 bytes
    Q8_0          d:f16 | qs[32] int8            34 bytes

For the 4- and 5-bit types qs[j] holds the low four bits of code c_j in its low nibble and those
of c_{j+16} in its high nibble (j < 16); Q5's qh has bit j = bit 4 of c_j (j < 32). Q8_0's byte
is the int8 level q = c − 128. The bytes are what ``gguf.GGUFWriter.add_tensor(...,
raw_dtype=ggml_type(kind))`` writes and ``gguf.quants.dequantize`` reads.

The k-quants store a row in super-blocks of 256 weights (``block_q4_K`` etc. in ggml-common.h), with L_i the
code of weight i of the super-block and sc_j, m_j the codes of sub-block j:

    Q2_K  scales[16] | qs[64] | d:f16 | dmin:f16                84 bytes
    Q3_K  hmask[32] | qs[64] | scales[12] | d:f16               110 bytes
    Q4_K  d:f16 | dmin:f16 | scales[12] | qs[128]              144 bytes
    Q5_K  d:f16 | dmin:f16 | scales[12] | qh[32] | qs[128]     176 bytes
    Q6_K  ql[128] | qh[64] | scales[16] int8 | d:f16           210 bytes

Q4_K/Q5_K: the eight 6-bit (sc_j, m_j) pack as get_scale_min_k4 reads them: scales[j] = sc_j, scales[j+4] = m_j
(j < 4), and for j ≥ 4 the low nibbles in scales[j+4] = sc_j & 15 | (m_j & 15) << 4, the high two bits in bits
6-7 of scales[j−4] (sc_j) and scales[j] (m_j). qs[32c + l] = L_{64c+l} & 15 | (L_{64c+32+l} & 15) << 4 (c < 4);
Q5_K's qh[l] has bit 2c = bit 4 of L_{64c+l} and bit 2c+1 = bit 4 of L_{64c+32+l}. Q6_K: in each half h of 128,
with a, b, c, e = L_{128h+l}, L_{128h+32+l}, L_{128h+64+l}, L_{128h+96+l} (l < 32): ql[64h+l] = a & 15 |
(c & 15) << 4, ql[64h+32+l] = b & 15 | (e & 15) << 4, qh[32h+l] = a >> 4 | (b >> 4) << 2 | (c >> 4) << 4 |
(e >> 4) << 6; scales[j] is the int8 sc_j of sub-block j (16 weights). Q2_K: scales[j] = sc_j | m_j << 4 (16
sub-blocks of 16), qs[32h+l] = a | b << 2 | c << 4 | e << 6 with a, b, c, e as for Q6_K. Q3_K: qs as Q2_K's
with the low two bits of each code, bit k of hmask[m] = bit 2 of L_{32k+m}, and the 6-bit u_j = sc_j + 32 in
scales[j] (low nibble, j < 8), scales[j−8] (high nibble, j ≥ 8) and bits 2(j/4) of scales[8 + j%4] (top two).

    IQ4_XS  d:f16 | scales_h:u16 | scales_l[4] | qs[128]            136 bytes

IQ4_XS: the 6-bit u_j = sc_j + 32 of sub-block j (32 weights) has its low nibble in scales_l[j/2] (low nibble for
even j, high for odd) and its top two bits at bits 2j of scales_h; qs[16j + l] = L_{32j+l} | L_{32j+16+l} << 4.

    IQ3_XXS  d:f16 | qs[64] | signs_scales u32[8]                  98 bytes

IQ3_XXS: codeword l of sub-block j (weights 32j + 8l … +7) has its grid indices in qs[8j + 2l], qs[8j + 2l + 1] and
its 7 sign bits at bits 7l of signs_scales[j], whose top four bits hold ls_j (lqlr's codes carry the same bits).

    IQ2_XS  d:f16 | qs u16[32] | scales[8]                         74 bytes

IQ2_XS: qs[r] is codeword r's word (9-bit grid index | 7 sign bits << 9, lqlr's word), scales[j] = ls_{2j} | ls_{2j+1} << 4.

    IQ2_S  d:f16 | qs[32] | signs[32] | qh[8] | scales[8]           82 bytes

IQ2_S: codeword r (weights 8r … 8r + 7) has the low 8 bits of its 10-bit grid index in qs[r], its 8 sign bits in
signs[r] and the index's top two bits at bits 2(r % 4) of qh[r / 4]; scales as IQ2_XS's.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lqlr.core.gguf_grids import BLOCK, GGUF_GRIDS, QK_K, GGUFGrid, KQuantGrid, LatticeGrid
from lqlr.core.grids import QuantizedTensor

HALF = BLOCK // 2


def ggml_type(kind: str) -> GGMLQuantizationType:
    """The ggml type of GGUF grid ``kind`` (``"q4_0"`` → ``GGMLQuantizationType.Q4_0``)."""
    if kind not in GGUF_GRIDS:
        raise ValueError(f"grid {kind!r} is not a GGUF format: choose one of {', '.join(GGUF_GRIDS)}")
    return GGMLQuantizationType[kind.upper()]


def _blocks_per_row(kind: str, cols: int) -> int:
    block = GGUF_GRIDS[kind].group_block
    if cols % block:
        raise ValueError(f"{kind} stores rows in blocks of {block} weights: a row of {cols} is not a multiple of "
                         f"{block} (llama.cpp keeps such a tensor in another type)")
    return cols // block


def _fp16_bytes(t: torch.Tensor, what: str) -> np.ndarray:
    """(rows, nb) fp16-exact float32 values as little-endian fp16 bytes, (rows, nb, 2)."""
    half = t.detach().to(torch.float16)
    if not torch.equal(half.to(torch.float32), t.detach().to(torch.float32)):
        raise ValueError(f"the block {what} are not fp16 values: a GGUF block stores them as fp16")
    return half.cpu().numpy().astype("<f2").view(np.uint8).reshape(*t.shape, 2)


def to_gguf_bytes(qt: QuantizedTensor) -> np.ndarray:
    """The ggml bytes of ``qt`` (on a GGUF grid), uint8 (rows, cols/32 · block bytes)."""
    grid = qt.grid
    size = GGML_QUANT_SIZES[ggml_type(grid.kind)][1]  # refuses a grid that is no GGUF format
    if isinstance(grid, KQuantGrid):
        return _k_bytes(qt, size)
    assert isinstance(grid, GGUFGrid)
    rows, cols = qt.shape
    nb = _blocks_per_row(grid.kind, cols)
    c = qt.codes.detach().cpu().numpy().astype(np.uint8).reshape(rows, nb, BLOCK)  # (rows, nb, 32)
    parts = [_fp16_bytes(qt.scale, "scales d")]
    if grid.affine:
        parts.append(_fp16_bytes(qt.zero, "offsets m"))
    if grid.bits == 8:
        parts.append(c ^ np.uint8(0x80))  # int8 q = c − 128, as its two's-complement byte
    else:
        if grid.bits == 5:
            bit4 = ((c >> 4) & 1).astype("<u4") << np.arange(BLOCK, dtype="<u4")  # bit j of qh = bit 4 of c_j
            parts.append(bit4.sum(axis=2, dtype="<u4").view(np.uint8).reshape(rows, nb, 4))
        low = c & np.uint8(0x0F)
        parts.append(low[..., :HALF] | (low[..., HALF:] << np.uint8(4)))  # c_j | c_{j+16} << 4
    data = np.concatenate(parts, axis=2)
    assert data.shape[2] == size
    return data.reshape(rows, nb * size)


def from_gguf_bytes(data: np.ndarray, shape: tuple[int, int], kind: str,
                    device: torch.device | str = "cpu") -> QuantizedTensor:
    """The QuantizedTensor of ggml bytes ``data`` (uint8, any shape holding rows × cols/32 blocks) of
    a (rows, cols) tensor of GGUF type ``kind``, on ``device``."""
    size = GGML_QUANT_SIZES[ggml_type(kind)][1]  # refuses a kind that is no GGUF format
    grid = GGUF_GRIDS[kind]()
    rows, cols = shape
    nb = _blocks_per_row(kind, cols)
    raw = np.ascontiguousarray(data, dtype=np.uint8)
    if raw.size != rows * nb * size:
        raise ValueError(f"{kind} data of {raw.size} bytes does not hold a {rows}×{cols} tensor "
                         f"({rows * nb * size} bytes)")
    b = raw.reshape(rows, nb, size)
    if isinstance(grid, KQuantGrid):
        return _k_tensor(b, grid, device)

    def fp16(at: int) -> torch.Tensor:
        v = np.ascontiguousarray(b[..., at:at + 2]).view("<f2").reshape(rows, nb).astype(np.float32)
        return torch.from_numpy(v).to(device)

    scale, at = fp16(0), 2
    zero = None
    if grid.affine:
        zero, at = fp16(at), at + 2
    if grid.bits == 8:
        c = b[..., at:] ^ np.uint8(0x80)
    else:
        qh = None
        if grid.bits == 5:
            qh = np.ascontiguousarray(b[..., at:at + 4]).view("<u4").reshape(rows, nb, 1)
            at += 4
        qs = b[..., at:]
        c = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=2)  # (rows, nb, 32)
        if qh is not None:
            c = c | (((qh >> np.arange(BLOCK, dtype="<u4")) & 1).astype(np.uint8) << np.uint8(4))
    codes = torch.from_numpy(np.ascontiguousarray(c).reshape(rows, cols)).to(device)
    return QuantizedTensor(codes=codes, scale=scale, zero=zero, grid=grid)


# ----- k-quants --------------------------------------------------------------------------------
def _codes_of(t: torch.Tensor, lo: int, hi: int, what: str) -> np.ndarray:
    """Integer-valued float codes as int64, checked to lie in [lo, hi]."""
    a = t.detach().cpu().numpy()
    c = np.rint(a).astype(np.int64)
    if not np.array_equal(c, a) or (c.size and (c.min() < lo or c.max() > hi)):
        raise ValueError(f"the {what} are not integer codes in [{lo}, {hi}]: a k-quant stores them so")
    return c


def _k_bytes(qt: QuantizedTensor, size: int) -> np.ndarray:
    grid = qt.grid
    rows, cols = qt.shape
    nb, ns = _blocks_per_row(grid.kind, cols), grid.n_sub
    L = qt.codes.detach().cpu().numpy().astype(np.uint8).reshape(rows, nb, QK_K)
    scale = qt.scale.reshape(rows, nb, 1 + ns)
    d = _fp16_bytes(scale[..., 0], "super-block scales d")
    sc = _codes_of(scale[..., 1:], grid.code_lo, grid.code_hi, "sub-block scales")
    if isinstance(grid, LatticeGrid):  # (rows, nb, codeword) words
        words = grid.words_of(qt.codes.detach().cpu()).numpy().astype(np.uint32).reshape(rows, nb, 32)
    if grid.kind == "iq2_xs":
        ls = sc.astype(np.uint8)  # (rows, nb, 16)
        parts = [d, words.astype("<u2").view(np.uint8).reshape(rows, nb, 64), ls[..., 0::2] | (ls[..., 1::2] << 4)]
    elif grid.kind == "iq2_s":
        ls = sc.astype(np.uint8)  # (rows, nb, 16)
        index, signs = words & 1023, (words >> 10) & 255
        high = (index >> 8).reshape(rows, nb, 8, 4) << (2 * np.arange(4, dtype=np.uint32))
        parts = [d, (index & 255).astype(np.uint8), signs.astype(np.uint8), high.sum(axis=3).astype(np.uint8),
                 ls[..., 0::2] | (ls[..., 1::2] << 4)]
    elif grid.kind == "iq3_xxs":
        qs = np.stack([words & 255, (words >> 8) & 255], axis=3).astype(np.uint8).reshape(rows, nb, 64)
        signs = ((words >> 16) & 127).reshape(rows, nb, 8, 4)
        aux = (signs << (7 * np.arange(4, dtype=np.uint32))).sum(axis=3, dtype=np.uint32)
        aux = aux | (sc.astype(np.uint32) << 28)
        parts = [d, qs, aux.astype("<u4").view(np.uint8).reshape(rows, nb, 32)]
    elif grid.bits == 2:  # Q2_K
        zero = qt.zero.reshape(rows, nb, 1 + ns)
        dmin = _fp16_bytes(zero[..., 0], "super-block mins dmin")
        lm = _codes_of(zero[..., 1:], 0, grid.code_hi, "sub-block mins").astype(np.uint8)
        Lq = L.reshape(rows, nb, 2, 4, 32)  # (half h, quarter, l)
        qs = Lq[..., 0, :] | (Lq[..., 1, :] << 2) | (Lq[..., 2, :] << 4) | (Lq[..., 3, :] << 6)
        parts = [sc.astype(np.uint8) | (lm << 4), qs.reshape(rows, nb, 64), d, dmin]
    elif grid.affine:  # Q4_K, Q5_K
        zero = qt.zero.reshape(rows, nb, 1 + ns)
        dmin = _fp16_bytes(zero[..., 0], "super-block mins dmin")
        ls, lm = sc.astype(np.uint8), _codes_of(zero[..., 1:], 0, grid.code_hi, "sub-block mins").astype(np.uint8)
        scales = np.concatenate([ls[..., :4] | ((ls[..., 4:] >> 4) << 6), lm[..., :4] | ((lm[..., 4:] >> 4) << 6),
                                 (ls[..., 4:] & 0xF) | ((lm[..., 4:] & 0xF) << 4)], axis=2)  # (rows, nb, 12)
        Lc = L.reshape(rows, nb, 4, 2, 32)  # (chunk c of 64, half, l)
        qs = ((Lc[..., 0, :] & 0xF) | ((Lc[..., 1, :] & 0xF) << 4)).reshape(rows, nb, 128)
        parts = [d, dmin, scales]
        if grid.bits == 5:
            shift = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)  # bit 2c + half
            qh = (((Lc >> 4) & 1) << shift[..., None]).sum(axis=(2, 3), dtype=np.uint8)  # (rows, nb, 32)
            parts.append(qh)
        parts.append(qs)
    elif grid.kind == "iq4_xs":
        ls = (sc + 32).astype(np.uint16)  # (rows, nb, 8) 6-bit
        scales_h = ((ls >> 4) << (2 * np.arange(8, dtype=np.uint16))).sum(axis=2, dtype=np.uint16)
        low = (ls & 0xF).astype(np.uint8)
        Lb = L.reshape(rows, nb, 8, 2, HALF)  # (sub-block, half, j)
        qs = (Lb[..., 0, :] | (Lb[..., 1, :] << 4)).reshape(rows, nb, 128)
        parts = [d, scales_h.astype("<u2").view(np.uint8).reshape(rows, nb, 2), low[..., 0::2] | (low[..., 1::2] << 4),
                 qs]
    elif grid.bits == 3:  # Q3_K
        hi = ((L >> 2) & 1).reshape(rows, nb, 8, 32)  # bit 2 of weight 32k + m: bit k of hmask[m]
        hmask = (hi << np.arange(8, dtype=np.uint8)[:, None]).sum(axis=2, dtype=np.uint8)
        Lq = (L & 3).reshape(rows, nb, 2, 4, 32)
        qs = Lq[..., 0, :] | (Lq[..., 1, :] << 2) | (Lq[..., 2, :] << 4) | (Lq[..., 3, :] << 6)
        ls = (sc + 32).astype(np.uint8)  # (rows, nb, 16) 6-bit
        low, high = ls & 0xF, ls >> 4
        scales = np.concatenate([low[..., :8] | (low[..., 8:] << 4),
                                 high[..., 0:4] | (high[..., 4:8] << 2) | (high[..., 8:12] << 4) | (high[..., 12:] << 6)],
                                axis=2)  # (rows, nb, 12)
        parts = [hmask, qs.reshape(rows, nb, 64), scales, d]
    else:  # Q6_K
        Lq = L.reshape(rows, nb, 2, 4, 32)  # (half h, quarter, l)
        lo, hi = Lq & 0xF, Lq >> 4
        ql = np.concatenate([lo[..., 0, :] | (lo[..., 2, :] << 4), lo[..., 1, :] | (lo[..., 3, :] << 4)], axis=3)
        qh = hi[..., 0, :] | (hi[..., 1, :] << 2) | (hi[..., 2, :] << 4) | (hi[..., 3, :] << 6)
        parts = [ql.reshape(rows, nb, 128), qh.reshape(rows, nb, 64), sc.astype(np.int8).view(np.uint8), d]
    data = np.concatenate(parts, axis=2)
    assert data.shape[2] == size
    return data.reshape(rows, nb * size)


def _k_tensor(b: np.ndarray, grid: KQuantGrid, device: torch.device | str) -> QuantizedTensor:
    """The QuantizedTensor of k-quant blocks ``b`` (rows, nb, block bytes)."""
    rows, nb, _ = b.shape

    def fp16(at: int) -> np.ndarray:
        return np.ascontiguousarray(b[..., at:at + 2]).view("<f2").reshape(rows, nb, 1).astype(np.float32)

    zero = None
    if grid.kind == "iq2_xs":
        words = np.ascontiguousarray(b[..., 2:66]).view("<u2").reshape(rows, nb, 32).astype(np.int64)
        L = grid.codes_of(torch.from_numpy(words)).numpy()
        ls = np.stack([b[..., 66:74] & 0xF, b[..., 66:74] >> 4], axis=3).reshape(rows, nb, 16)
        scale = np.concatenate([fp16(0), ls.astype(np.float32)], axis=2)
    elif grid.kind == "iq2_s":
        low, signs = b[..., 2:34].astype(np.int64), b[..., 34:66].astype(np.int64)
        high = (b[..., 66:74, None].astype(np.int64) >> (2 * np.arange(4))) & 3  # (rows, nb, 8, 4)
        words = (low | (high.reshape(rows, nb, 32) << 8)) | (signs << 10)
        L = grid.codes_of(torch.from_numpy(words)).numpy()
        ls = np.stack([b[..., 74:82] & 0xF, b[..., 74:82] >> 4], axis=3).reshape(rows, nb, 16)
        scale = np.concatenate([fp16(0), ls.astype(np.float32)], axis=2)
    elif grid.kind == "iq3_xxs":
        qs = b[..., 2:66].reshape(rows, nb, 8, 4, 2).astype(np.uint32)
        aux = np.ascontiguousarray(b[..., 66:98]).view("<u4").reshape(rows, nb, 8, 1).astype(np.uint32)
        ls = aux >> 28
        run = np.arange(4, dtype=np.uint32)
        words = qs[..., 0] | (qs[..., 1] << 8) | (((aux >> (7 * run)) & 127) << 16) | (((ls >> run) & 1) << 23)
        L = grid.codes_of(torch.from_numpy(words.astype(np.int64))).numpy()
        scale = np.concatenate([fp16(0), ls[..., 0].astype(np.float32)], axis=2)
    elif grid.bits == 2:  # Q2_K
        sc, qs = b[..., :16], b[..., 16:80].reshape(rows, nb, 2, 1, 32)
        L = (qs >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3  # (rows, nb, half, quarter, l)
        scale = np.concatenate([fp16(80), (sc & 0xF).astype(np.float32)], axis=2)
        zero = np.concatenate([fp16(82), (sc >> 4).astype(np.float32)], axis=2)
        zero = torch.from_numpy(zero.reshape(rows, -1)).to(device)
    elif grid.affine:
        d, dmin, q = fp16(0), fp16(2), b[..., 4:16]
        ls = np.concatenate([q[..., :4] & 63, (q[..., 8:] & 0xF) | ((q[..., :4] >> 6) << 4)], axis=2)
        lm = np.concatenate([q[..., 4:8] & 63, (q[..., 8:] >> 4) | ((q[..., 4:8] >> 6) << 4)], axis=2)
        at = 16
        qh = None
        if grid.bits == 5:
            qh, at = b[..., at:at + 32], at + 32
        qs = b[..., at:at + 128].reshape(rows, nb, 4, 1, 32)
        L = np.concatenate([qs & 0xF, qs >> 4], axis=3)  # (rows, nb, 4, 2, 32)
        if qh is not None:
            shift = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)
            L = L | (((qh[..., None, None, :] >> shift[..., None]) & 1) << 4)
        scale = np.concatenate([d, ls.astype(np.float32)], axis=2)
        zero = torch.from_numpy(np.concatenate([dmin, lm.astype(np.float32)], axis=2).reshape(rows, -1)).to(device)
    elif grid.kind == "iq4_xs":
        scales_h = np.ascontiguousarray(b[..., 2:4]).view("<u2").reshape(rows, nb, 1)
        low = np.stack([b[..., 4:8] & 0xF, b[..., 4:8] >> 4], axis=3).reshape(rows, nb, 8)
        high = (scales_h >> (2 * np.arange(8, dtype=np.uint16))) & 3
        ls = low.astype(np.int64) | (high.astype(np.int64) << 4)
        qs = b[..., 8:136].reshape(rows, nb, 8, 1, HALF)
        L = np.concatenate([qs & 0xF, qs >> 4], axis=3)  # (rows, nb, sub-block, half, j)
        scale = np.concatenate([fp16(0), ls.astype(np.float32) - 32], axis=2)
    elif grid.bits == 3:  # Q3_K
        hmask, qs, q = b[..., :32], b[..., 32:96].reshape(rows, nb, 2, 1, 32), b[..., 96:108]
        low = (qs >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3  # (rows, nb, half, quarter, l)
        hi = (hmask[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # (rows, nb, 8, 32)
        L = low.reshape(rows, nb, QK_K) | (hi.reshape(rows, nb, QK_K) << 2)
        ls_low = np.concatenate([q[..., :8] & 0xF, q[..., :8] >> 4], axis=2)  # (rows, nb, 16)
        ls_high = (q[..., 8:12][..., None, :] >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3  # (.., j//4, j%4)
        ls = ls_low | (ls_high.reshape(rows, nb, 16) << 4)
        scale = np.concatenate([fp16(108), ls.astype(np.float32) - 32], axis=2)
    else:
        ql = b[..., :128].reshape(rows, nb, 2, 2, 32)  # (half, first/second 32, l)
        qh = b[..., 128:192].reshape(rows, nb, 2, 1, 32)
        sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8).astype(np.float32)
        lo = np.concatenate([ql & 0xF, ql >> 4], axis=3)  # quarters 0, 1, 2, 3
        hi = (qh >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3
        L = lo | (hi << 4)
        scale = np.concatenate([fp16(208), sc], axis=2)
    codes = torch.from_numpy(np.ascontiguousarray(L, dtype=np.uint8).reshape(rows, nb * QK_K)).to(device)
    return QuantizedTensor(codes=codes, scale=torch.from_numpy(scale.reshape(rows, -1)).to(device), zero=zero,
                           grid=grid)
