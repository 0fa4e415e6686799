"""GGUF export: ggml-exact block quantizers, exact lowbit -> GGUF block mapping, refusals, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, quants

from lowbit.errors import LowbitError
from lowbit.exporters import gguf as g
from lowbit.formats import QuantSpec
from lowbit.model.quantize import quantize_model
from lowbit.recipe import Recipe
from tests.conftest import make_tiny_llama
from tests.formats.test_ggml import _hard_input  # ties, zero blocks, tiny and huge scales


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1"])
def test_block_quantizer_matches_gguf_py_byte_for_byte(type_name):
    w = _hard_input()
    ours, raw = g.quantize_as(w, type_name)
    ref = quants.quantize(w.numpy(), GGMLQuantizationType[type_name])
    assert raw == GGMLQuantizationType[type_name]
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    assert ours.tobytes() == ref.tobytes()


def _export_tiny(tmp_path, scheme: QuantSpec, gguf_type: str = "auto", tie: bool = True, ignore=("lm_head",)):
    from tests.conftest import save_hf

    model = make_tiny_llama(tie=tie)
    folder = save_hf(model, tmp_path / "hf")
    quantize_model(model, Recipe(scheme=scheme, ignore=tuple(ignore)))
    res = g.write_gguf(model, tmp_path / "out.gguf", gguf_type, source=None, folder=folder)
    return model, res


def _read(path, name):
    t = next(t for t in GGUFReader(str(path)).tensors if t.name == name)
    return t, quants.dequantize(t.data, t.tensor_type)


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@pytest.mark.parametrize("scheme,expect", [
    (QuantSpec(kind="int", bits=8, granularity="group", group_size=32, scale_dtype="float16"), "Q8_0"),
    (QuantSpec(kind="int", bits=4, granularity="group", group_size=32, scale_dtype="float16"), "Q4_0"),
    (QuantSpec(kind="int", bits=4, granularity="group", group_size=32, symmetric=False, zero_domain="float",
               scale_dtype="float16"), "Q4_1"),
])
def test_exact_schemes_are_written_block_for_block(tmp_path, scheme, expect):
    model, res = _export_tiny(tmp_path, scheme)
    assert res.exact == 2 * 7 and res.requantized == 0
    assert res.tensor_types["blk.0.ffn_down.weight"] == expect
    assert "output.weight" not in res.tensor_types  # tied head, not quantized: llama.cpp reuses token_embd
    layer = model.model.layers[1]
    for gname, mod, heads in (("blk.1.ffn_down.weight", layer.mlp.down_proj, None),
                              ("blk.1.attn_q.weight", layer.self_attn.q_proj, model.config.num_attention_heads),
                              ("blk.1.attn_k.weight", layer.self_attn.k_proj, model.config.num_key_value_heads)):
        t, deq = _read(res.path, gname)
        assert t.tensor_type.name == expect
        w = torch.from_numpy(np.ascontiguousarray(deq)).reshape(mod.out_features, mod.in_features)
        if heads:
            w = _unpermute(w, heads)
        assert torch.equal(w, mod.dequantized_weight(torch.float32))  # same numbers, not just close


def test_other_int_schemes_are_requantized_with_a_note(tmp_path):
    scheme = QuantSpec(kind="int", bits=4, granularity="group", group_size=64, symmetric=False, scale_dtype="float16")
    model, res = _export_tiny(tmp_path, scheme, tie=False, ignore=())
    assert res.exact == 0 and res.requantized == 2 * 7 + 1
    assert res.tensor_types["blk.0.attn_v.weight"] == "Q4_1" and res.tensor_types["output.weight"] == "Q4_1"
    assert any("requantized" in n and "int4 asym g64 -> Q4_1" in n for n in res.notes)
    _, deq = _read(res.path, "output.weight")
    ref = quants.dequantize(quants.quantize(model.lm_head.dequantized_weight().numpy(), GGMLQuantizationType.Q4_1),
                            GGMLQuantizationType.Q4_1)
    assert np.array_equal(deq, ref)


def test_explicit_type_requantizes_everything_quantized(tmp_path):
    scheme = QuantSpec(kind="int", bits=8, granularity="channel")
    model, res = _export_tiny(tmp_path, scheme, gguf_type="Q5_0")
    assert {res.tensor_types[f"blk.{i}.{n}.weight"] for i in range(2) for n in ("attn_q", "ffn_up")} == {"Q5_0"}
    assert res.tensor_types["token_embd.weight"] == "F16" and res.tensor_types["blk.0.attn_norm.weight"] == "F32"


def test_tokenizer_and_hparams_are_written(tmp_path):
    model, res = _export_tiny(tmp_path, QuantSpec(kind="int", bits=8, granularity="channel"))
    r = GGUFReader(str(res.path))
    f = r.fields
    assert f["general.architecture"].contents() == "llama"
    assert f["llama.attention.head_count_kv"].contents() == model.config.num_key_value_heads
    assert len(f["tokenizer.ggml.tokens"].contents()) == model.config.vocab_size
    assert f["tokenizer.ggml.eos_token_id"].contents() == model.config.eos_token_id


@pytest.mark.parametrize("scheme,nearest", [
    (QuantSpec(kind="nf4", bits=4, granularity="group", group_size=32), "IQ4_NL"),
    (QuantSpec(kind="fp8_e4m3", bits=8, granularity="channel"), "Q8_0"),
    (QuantSpec(kind="int", bits=3, granularity="channel"), "Q3_K_M"),
])
def test_schemes_gguf_cannot_hold_are_refused_with_nearest_types(tmp_path, scheme, nearest):
    with pytest.raises(LowbitError, match=f"no GGUF.*{nearest}"):
        _export_tiny(tmp_path, scheme)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".out.gguf*"))  # nothing half-written


def test_unknown_type_and_unsupported_architecture_are_refused(tmp_path):
    with pytest.raises(LowbitError, match="Q4_K_M"):
        g.normalize_type("Q4_X")
    assert g.normalize_type("q4_k") == "Q4_K_M"
    model = make_tiny_llama()
    model.config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(LowbitError, match="compressed-tensors"):
        g.write_gguf(model, tmp_path / "x.gguf", "F16")
