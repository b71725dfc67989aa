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
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lqlr.core.gguf_grids import BLOCK, GGUF_GRIDS, GGUFGrid
from lqlr.core.grids import QuantizedTensor

HALF = BLOCK // 2


def ggml_type(kind: str) -> GGMLQuantizationType:
    """The ggml type of GGUF grid ``kind`` (``"q4_0"`` → ``GGMLQuantizationType.Q4_0``)."""
    if kind not in GGUF_GRIDS:
        raise ValueError(f"grid {kind!r} is not a GGUF format: choose one of {', '.join(GGUF_GRIDS)}")
    return GGMLQuantizationType[kind.upper()]


def _blocks_per_row(kind: str, cols: int) -> int:
    if cols % BLOCK:
        raise ValueError(f"{kind} stores rows in blocks of {BLOCK} weights: a row of {cols} is not a multiple of "
                         f"{BLOCK} (llama.cpp keeps such a tensor in another type)")
    return cols // BLOCK


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
