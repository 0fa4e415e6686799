"""ggml block codecs: ggml-exact quantizers (byte for byte against gguf-py), the block layout the module
docstring describes, and lowbit storage packed into blocks without requantizing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from lowbit.errors import LowbitError
from lowbit.formats import QuantSpec, dequantize_tensor, ggml, quantize_tensor


def _hard_input() -> torch.Tensor:
    torch.manual_seed(1)
    w = torch.randn(16, 256) * 0.03
    w[0, :32] = 0  # an all-zero block
    w[1, :32] = torch.arange(32) / 31.0  # many exact ties after scaling
    w[2, :32] = -w[1, :32]  # largest magnitude negative (Q4_0 takes its sign)
    w[3, 32:64] = 1e-8  # tiny scale
    w[4, :] = torch.randn(256) * 100  # large values
    return w


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1"])
def test_block_quantizer_matches_gguf_py_byte_for_byte(type_name):
    w = _hard_input()
    ours = ggml.QUANTIZERS[type_name](w).numpy()
    ref = quants.quantize(w.numpy(), GGMLQuantizationType[type_name])
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    assert ours.tobytes() == ref.tobytes()


def _decode(blocks: torch.Tensor, type_name: str, cols: int) -> torch.Tensor:
    """The docstring's layout table, decoded by hand: (rows, bytes) uint8 -> (rows, cols) float32."""
    size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[type_name]
    b = blocks.reshape(blocks.shape[0], cols // 32, size)
    d = b[..., 0:2].contiguous().view(torch.float16).float()
    if type_name == "Q8_0":
        return (d * b[..., 2:].contiguous().view(torch.int8).float()).reshape(-1, cols)
    qs = b[..., 4:] if type_name == "Q4_1" else b[..., 2:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()  # code j low, code j + 16 high
    if type_name == "Q4_0":
        return (d * (q - 8)).reshape(-1, cols)
    m = b[..., 2:4].contiguous().view(torch.float16).float()
    return (d * q + m).reshape(-1, cols)


@pytest.mark.parametrize("type_name,size", [("Q8_0", 34), ("Q4_0", 18), ("Q4_1", 20)])
def test_layout_table_decodes_like_gguf_py(type_name, size):
    w = _hard_input()
    blocks = ggml.QUANTIZERS[type_name](w)
    assert blocks.shape == (w.shape[0], w.shape[1] // ggml.BLOCK * size)
    ref = quants.dequantize(blocks.numpy(), GGMLQuantizationType[type_name])
    assert np.array_equal(_decode(blocks, type_name, w.shape[1]).numpy(), ref.reshape(w.shape))


def test_pack_places_fields_and_nibbles_as_documented():
    codes = torch.arange(32).remainder(16).reshape(1, 32)
    d, m = torch.tensor([[0.5]]), torch.tensor([[-1.0]])
    b = ggml.pack_q4_1(codes, d, m)[0]
    assert b[:2].view(torch.float16).item() == 0.5 and b[2:4].view(torch.float16).item() == -1.0
    assert b[4:].tolist() == [(j % 16) | ((j + 16) % 16) << 4 for j in range(16)]
    q8 = ggml.pack_q8_0(torch.arange(-16, 16).reshape(1, 32), d)[0]
    assert q8[:2].view(torch.float16).item() == 0.5 and q8[2:].view(torch.int8).tolist() == list(range(-16, 16))


def test_rows_not_a_multiple_of_the_block_are_refused():
    with pytest.raises(LowbitError, match="multiple of 32"):
        ggml.quantize_q8_0(torch.zeros(2, 48))


def _int5(**kw) -> QuantSpec:
    return QuantSpec(kind="int", bits=5, granularity="group", group_size=32, scale_dtype="float16", **kw)


@pytest.mark.parametrize("spec,expect", [
    (QuantSpec(kind="int", bits=8, granularity="group", group_size=32, scale_dtype="float16"), "Q8_0"),
    (QuantSpec(kind="int", bits=4, granularity="group", group_size=32, scale_dtype="float16"), "Q4_0"),
    (QuantSpec(kind="int", bits=4, granularity="group", group_size=32, symmetric=False, zero_domain="float",
               scale_dtype="float16"), "Q4_1"),
    (QuantSpec(kind="int", bits=4, granularity="group", group_size=32, symmetric=False, scale_dtype="float16"), None),
    (QuantSpec(kind="int", bits=4, granularity="group", group_size=64, scale_dtype="float16"), None),
    (QuantSpec(kind="int", bits=8, granularity="group", group_size=32), None),  # fp32 scales
    (QuantSpec(kind="int", bits=8, granularity="channel"), None),
    (_int5(), "Q5_0"),
    (_int5(symmetric=False, zero_domain="float"), "Q5_1"),
    (_int5(symmetric=False), None),  # integer zero point: x = s * (q - z) is not d * q + m with fp16 m
    (QuantSpec(kind="int", bits=5, granularity="group", group_size=32), None),  # fp32 scales
    (QuantSpec(kind="int", bits=5, granularity="group", group_size=64, scale_dtype="float16"), None),
    (QuantSpec(kind="int", bits=5, granularity="channel", scale_dtype="float16"), None),
    (QuantSpec(kind="int", bits=6, granularity="group", group_size=32, scale_dtype="float16"), None),
])
def test_lowbit_storage_packs_into_the_same_numbers(spec, expect):
    torch.manual_seed(0)
    w = torch.randn(8, 128) * 0.05
    w[0, :32] = 0  # an all-zero group
    w[1, 32:64] = 0.125  # a constant group
    w[2, :32] = -w[2, :32].abs()  # negative extreme
    qt = quantize_tensor(w, spec)
    assert ggml.exact_type(spec, 128) == expect
    got = ggml.blocks_from_qtensor(qt)
    if expect is None:
        assert got is None
        return
    type_name, blocks = got
    assert type_name == expect and blocks.shape == (8, 4 * ggml.BLOCK_BYTES[expect])
    deq = quants.dequantize(blocks.numpy(), GGMLQuantizationType[expect]).reshape(w.shape)
    assert torch.equal(torch.from_numpy(np.ascontiguousarray(deq)), dequantize_tensor(qt, torch.float32))


def test_act_order_storage_is_not_a_block_type():
    spec = QuantSpec(kind="int", bits=8, granularity="group", group_size=32, scale_dtype="float16")
    qt = quantize_tensor(torch.randn(4, 64), spec)
    qt.tensors["perm"] = torch.arange(64, dtype=torch.int32).flip(0)
    assert ggml.exact_type(spec, 64) == "Q8_0" and ggml.blocks_from_qtensor(qt) is None
    assert ggml.exact_type(spec, 48) is None  # rows must be whole blocks
