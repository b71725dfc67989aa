"""Pack n-bit integer codes densely into bytes, and back.

Codes are laid out as one little-endian bit stream: code i occupies bits
[i·b, (i+1)·b) of the stream, so b = 3 puts 8 codes in 3 bytes and any width 1–8 works.
"""
from __future__ import annotations

import torch

_BIT_WEIGHTS = 2 ** torch.arange(8, dtype=torch.int32)


def packed_nbytes(n_codes: int, bits: int) -> int:
    """Bytes needed for ``n_codes`` codes of ``bits`` bits."""
    return (n_codes * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) into a flat uint8 tensor of ``packed_nbytes`` bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits}: packing supports widths 1 to 8")
    flat = codes.reshape(-1).to(torch.int32)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits}-bit packing: min {int(flat.min())}, max {int(flat.max())}")
    if bits == 8:
        return flat.to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.int32, device=flat.device)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)  # (n·bits,) bits, LSB first
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = _BIT_WEIGHTS.to(flat.device)
    return (stream.reshape(-1, 8) * weights).sum(dim=1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``n_codes`` codes as a flat uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits}: packing supports widths 1 to 8")
    need = packed_nbytes(n_codes, bits)
    if packed.numel() < need:
        raise ValueError(f"packed buffer holds {packed.numel()} bytes, {n_codes} codes of {bits} bits need {need}")
    data = packed.reshape(-1)[:need].to(torch.int32)
    if bits == 8:
        return data.to(torch.uint8)
    stream = ((data[:, None] >> torch.arange(8, dtype=torch.int32, device=data.device)) & 1).reshape(-1)
    stream = stream[: n_codes * bits].reshape(n_codes, bits)
    weights = _BIT_WEIGHTS[:bits].to(data.device)
    return (stream * weights).sum(dim=1).to(torch.uint8)
