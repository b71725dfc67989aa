import pytest
import torch

from lqlr.core.packing import pack, packed_nbytes, unpack


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 4099])
def test_round_trip_every_width(bits, n):
    gen = torch.Generator().manual_seed(bits * 100 + n)
    codes = torch.randint(0, 2**bits, (n,), generator=gen, dtype=torch.int64).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(n, bits) == -(-n * bits // 8)
    assert torch.equal(unpack(packed, bits, n), codes)


def test_bit_layout_by_hand():
    # 2 bits, LSB first: codes 1,2,3,0 -> bits 1,0 | 0,1 | 1,1 | 0,0 -> 0b00111001 = 57
    assert pack(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [57]
    # 3 bits: 5 = 101, 3 = 011, 7 = 111 -> stream 1,0,1, 1,1,0, 1,1,1 -> byte0 = 0b11011101, byte1 = 1
    assert pack(torch.tensor([5, 3, 7], dtype=torch.uint8), 3).tolist() == [0b11011101, 1]
    assert pack(torch.tensor([0xF, 0x1], dtype=torch.uint8), 4).tolist() == [0x1F]


def test_2d_codes_and_errors():
    codes = torch.randint(0, 8, (5, 13), dtype=torch.int64).to(torch.uint8)
    assert torch.equal(unpack(pack(codes, 3), 3, codes.numel()).reshape(5, 13), codes)
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="widths 1 to 8"):
        pack(codes, 9)
    with pytest.raises(ValueError, match="need"):
        unpack(torch.zeros(2, dtype=torch.uint8), 4, 10)
