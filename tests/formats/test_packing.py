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
