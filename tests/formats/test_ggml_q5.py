"""ggml's Q5_0 and Q5_1 blocks: lowbit's quantizers byte for byte against gguf-py (random, on-grid and
edge-case blocks), the layout the module docstring describes decoded by hand, and lowbit's int5
storage packed into blocks that hold exactly its weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from lowbit.formats import QuantSpec, dequantize_tensor, ggml, quantize_tensor
from lowbit.formats.qtensor import int_codes
from tests.formats.test_ggml import _hard_input

Q5 = ("Q5_0", "Q5_1")


def _edge_blocks() -> torch.Tensor:
    """One row per case, each case two blocks (64 weights)."""
    torch.manual_seed(3)
    rows = [
        torch.zeros(64),  # all-zero blocks: d = 0, codes 16 (Q5_0) / 0 (Q5_1)
        torch.full((64,), 0.25),  # constant positive: Q5_0 puts it on code 0; Q5_1 has d = 0
        torch.full((64,), -3.0),  # constant negative
        torch.randn(64) * 0.02 - 0.5,  # all negative, largest magnitude negative
        torch.cat([torch.randn(31) * 0.01, torch.tensor([-1.0]), torch.randn(32) * 0.01]),  # one negative spike
        torch.cat([torch.randn(31) * 0.01, torch.tensor([1.0]), torch.randn(32) * 0.01]),  # one positive spike
        torch.linspace(-1, 1, 64),  # a rising ramp
        torch.cat([torch.tensor([1.0, -1.0]), torch.randn(62) * 0.1]),  # -x_max lands past the top of Q5_0's grid: code 31
        (torch.arange(64) % 32 - 16) / 16.0,  # every code once, exact ties at the half steps
        torch.randn(64) * 1e-7,  # subnormal-ish scales in fp16
        torch.randn(64) * 3000,  # large values (fp16 d still finite)
    ]
    return torch.stack(rows)


def _on_grid(type_name: str) -> torch.Tensor:
    """Weights that already are Q5 values: d * (q - 16), or d * q + m, with fp16 d and m."""
    torch.manual_seed(4)
    q = torch.randint(0, 32, (8, 128)).float()
    d = (torch.rand(8, 4, 1) * 0.05 + 0.001).half().float()
    q[:, ::32] = 0  # each block holds both ends of the grid, so the quantizer recovers d exactly
    q[:, 1::32] = 31
    if type_name == "Q5_0":
        return (d * (q.reshape(8, 4, 32) - 16)).reshape(8, 128)
    m = (torch.randn(8, 4, 1) * 0.1).half().float()
    return (d * q.reshape(8, 4, 32) + m).reshape(8, 128)


@pytest.mark.parametrize("type_name", Q5)
@pytest.mark.parametrize("case", ["random", "hard", "edge", "on-grid"])
def test_q5_quantizer_matches_gguf_py_byte_for_byte(type_name, case):
    torch.manual_seed(2)
    w = {"random": lambda: torch.randn(32, 512) * 0.05, "hard": _hard_input, "edge": _edge_blocks,
         "on-grid": lambda: _on_grid(type_name)}[case]()
    ours = ggml.QUANTIZERS[type_name](w).numpy()
    ref = quants.quantize(w.numpy(), GGMLQuantizationType[type_name])
    assert ours.dtype == np.uint8 and ours.shape == ref.shape == (w.shape[0], w.shape[1] // 32 * ggml.BLOCK_BYTES[type_name])
    assert ours.tobytes() == ref.tobytes()


@pytest.mark.parametrize("type_name", Q5)
def test_on_grid_weights_come_back_exactly(type_name):
    w = _on_grid(type_name)
    deq = quants.dequantize(ggml.QUANTIZERS[type_name](w).numpy(), GGMLQuantizationType[type_name])
    assert np.array_equal(deq.reshape(w.shape), w.numpy())


def _decode(blocks: torch.Tensor, type_name: str, cols: int) -> torch.Tensor:
    """The docstring's layout table, decoded by hand: (rows, bytes) uint8 -> (rows, cols) float32."""
    size = ggml.BLOCK_BYTES[type_name]
    b = blocks.reshape(blocks.shape[0], cols // 32, size)
    d = b[..., 0:2].contiguous().view(torch.float16).float()
    at = 4 if type_name == "Q5_1" else 2
    qh = b[..., at:at + 4].contiguous().view(torch.int32).long() & 0xFFFFFFFF  # one little-endian uint32
    qs = b[..., at + 4:]
    low = torch.cat([qs & 0x0F, qs >> 4], dim=-1).long()  # code j low nibble, code j + 16 high nibble
    high = (qh >> torch.arange(32)) & 1  # bit i: the fifth bit of code i
    q = (low | (high << 4)).float()
    if type_name == "Q5_0":
        return (d * (q - 16)).reshape(-1, cols)
    m = b[..., 2:4].contiguous().view(torch.float16).float()
    return (d * q + m).reshape(-1, cols)


@pytest.mark.parametrize("type_name", Q5)
def test_layout_table_decodes_like_gguf_py(type_name):
    w = torch.cat([_hard_input()[:, :128], _edge_blocks()[:, :64].repeat(1, 2)[:16]], dim=0)
    blocks = ggml.QUANTIZERS[type_name](w)
    ref = quants.dequantize(blocks.numpy(), GGMLQuantizationType[type_name])
    assert np.array_equal(_decode(blocks, type_name, w.shape[1]).numpy(), ref.reshape(w.shape))


def test_pack_places_fields_bits_and_nibbles_as_documented():
    codes = torch.arange(32).reshape(1, 32)  # code i = i: fifth bit set for 16..31
    d, m = torch.tensor([[0.5]]), torch.tensor([[-1.0]])
    b0, b1 = ggml.pack_q5_0(codes, d)[0], ggml.pack_q5_1(codes, d, m)[0]
    assert b0.shape == (22,) and b1.shape == (24,)
    assert b0[:2].view(torch.float16).item() == 0.5
    assert b1[:2].view(torch.float16).item() == 0.5 and b1[2:4].view(torch.float16).item() == -1.0
    for qh, qs in ((b0[2:6], b0[6:]), (b1[4:8], b1[8:])):
        assert qh.tolist() == [0, 0, 0xFF, 0xFF]  # bits 16..31 of the uint32
        assert qs.tolist() == [j | (j << 4) for j in range(16)]  # low four bits of j and of j + 16
    one = torch.zeros(1, 32, dtype=torch.long)
    one[0, 9] = 16  # only code 9 has its fifth bit
    assert ggml.pack_q5_0(one, d)[0][2:6].tolist() == [0, 2, 0, 0]


def _int5(**kw) -> QuantSpec:
    return QuantSpec(kind="int", bits=5, granularity="group", group_size=32, scale_dtype="float16", **kw)


# int5 storage -> Q5_0 / Q5_1 blocks: in test_ggml.py's test_lowbit_storage_packs_into_the_same_numbers


def test_lowbit_int5_scale_rule_is_not_ggmls_but_its_blocks_are_its_own():
    """lowbit's symmetric int5 takes d = max|x| / 15; ggml's Q5_0 takes x_max / -16. The blocks from
    lowbit's codes differ from ggml's quantization of the float weight, and hold lowbit's values."""
    torch.manual_seed(5)
    w = torch.randn(4, 64) * 0.05
    spec = _int5()
    qt = quantize_tensor(w, spec)
    codes = int_codes(qt)
    assert codes.min() >= -16 and codes.max() <= 15
    _, ours = ggml.blocks_from_qtensor(qt)
    assert ours.numpy().tobytes() != ggml.quantize_q5_0(w).numpy().tobytes()
    deq = quants.dequantize(ours.numpy(), GGMLQuantizationType.Q5_0).reshape(w.shape)
    assert torch.equal(torch.from_numpy(np.ascontiguousarray(deq)), dequantize_tensor(qt))
