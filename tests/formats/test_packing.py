import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import packing
from lowbit.formats._reference import pack_list


@settings(max_examples=80, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 5), cols=st.integers(1, 70), seed=st.integers(0, 10_000))
def test_pack_unpack_round_trip_and_matches_reference(bits, rows, cols, seed):
    v = torch.randint(0, 2**bits, (rows, cols), generator=torch.Generator().manual_seed(seed))
    p = packing.pack(v, bits)
    assert p.dtype == torch.uint8 and p.shape == (rows, packing.packed_cols(cols, bits))
    for r in range(rows):
        assert p[r].tolist() == pack_list(v[r].tolist(), bits)
    assert torch.equal(packing.unpack(p, bits, cols).long(), v)


def test_nibble_layout_is_low_first():
    p = packing.pack(torch.tensor([[0x1, 0xA]]), 4)
    assert p.tolist() == [[0xA1]]


def test_odd_widths_round_trip_at_every_row_length():
    """3, 5, 6 and 7 bits: every `bits` bytes hold 8 values; rows whose length is not a multiple of 8
    end in a partial chunk, which unpack pads and drops again."""
    torch.manual_seed(0)
    for bits in (3, 5, 6, 7):
        for cols in (1, 7, 8, 9, 64, 100, 1536):
            v = torch.randint(0, 2 ** bits, (5, cols))
            packed = packing.pack(v, bits)
            assert packed.shape == (5, packing.packed_cols(cols, bits))
            assert torch.equal(packing.unpack(packed, bits, cols), v.to(torch.uint8)), (bits, cols)
