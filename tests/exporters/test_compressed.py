"""compressed-tensors export: written by the library, loaded back by transformers and by lowbit."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.exporters.compressed import write_compressed
from lowbit.model.handle import Model
from lowbit.formats import QuantSpec
from lowbit.model.load import load_model
from lowbit.model.qlinear import prepare_model
from lowbit.model.quantize import quantize_model
from lowbit.recipe import Recipe
from tests.conftest import make_tiny_llama, make_tokenizer

W4_SYM = QuantSpec(kind="int", bits=4, granularity="group", group_size=32, scale_dtype="float16")
W4_ASYM = QuantSpec(kind="int", bits=4, granularity="group", group_size=32, symmetric=False, scale_dtype="float16")
W4_ASYM_F = QuantSpec(kind="int", bits=4, granularity="group", group_size=32, symmetric=False, zero_domain="float",
                      scale_dtype="float16")
W8_CH = QuantSpec(kind="int", bits=8, granularity="channel")
W8A8 = QuantSpec(kind="int", bits=8, granularity="channel", activation="int8_dynamic")
FP8 = QuantSpec(kind="fp8_e4m3", bits=8, granularity="channel")


def _quantized(spec, tie=False):
    model = make_tiny_llama(tie=tie)
    quantize_model(model, Recipe(scheme=spec, ignore=() if not tie else ("lm_head",)))
    prepare_model(model, "reference")  # the format's definition (fp32 dequantize + matmul), as transformers runs it
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# (spec, format, tolerance on max |logit difference| after loading in transformers)
SLOW = pytest.mark.slow  # a second each; the default run keeps the W4A16 case
CASES = [pytest.param(W4_SYM, "pack-quantized", 0.0, id="w4a16"),
         pytest.param(W8_CH, "pack-quantized", 0.0, id="w8a16", marks=SLOW),
         pytest.param(FP8, "float-quantized", 0.0, id="fp8", marks=SLOW),
         # compressed-tensors quantizes activations with scale amax/127.5 (range -128..127), lowbit with amax/127
         pytest.param(W8A8, "int-quantized", 0.2, id="w8a8", marks=SLOW)]


@pytest.mark.parametrize("spec,fmt,tol", CASES)
def test_transformers_loads_export_with_lowbit_logits(tmp_path, ids, spec, fmt, tol):
    from transformers import AutoModelForCausalLM

    model = _quantized(spec)
    ref = _logits(model, ids)
    res = write_compressed(Model(model, make_tokenizer()), tmp_path / "ct")
    assert res.exact == 15 and res.requantized == 0
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert {g["format"] for g in qc["config_groups"].values()} == {fmt}
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32)
    diff = (_logits(hf, ids) - ref).abs().max().item()
    assert diff <= tol
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ct" / "model.safetensors"), framework="pt") as f:  # stored in the format's dtype
        key = "model.layers.0.mlp.up_proj." + ("weight" if fmt != "pack-quantized" else "weight_packed")
        assert f.get_tensor(key).dtype == {"pack-quantized": torch.int32, "int-quantized": torch.int8,
                                           "float-quantized": torch.float8_e4m3fn}[fmt]
    if tol == 0.0:  # weight-only: the stored grid is lowbit's exactly
        q = hf.model.layers[1].mlp.down_proj.weight
        assert torch.equal(q.float(), model.model.layers[1].mlp.down_proj.dequantized_weight())


def test_asymmetric_export_and_lowbit_import(tmp_path, ids):
    """Asymmetric pack-quantized (zero points packed as vLLM reads them): lowbit's importer decompresses it
    with the library; transformers 5.24 + compressed-tensors 0.20 cannot load this layout (a known bug)."""
    model = _quantized(W4_ASYM, tie=True)
    ref = _logits(model, ids)
    write_compressed(Model(model, make_tokenizer()), tmp_path / "ct")
    st = tmp_path / "ct" / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(st), framework="pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight_zero_point").dtype == torch.int32  # packed
    back = load_model(tmp_path / "ct")
    assert back.source["kind"] == "compressed-tensors"
    assert torch.equal(back.module.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.dequantized_weight())
    assert torch.allclose(_logits(back.module, ids), ref, atol=1e-4)


def test_float_zero_domain_is_requantized_with_a_note(tmp_path):
    model = _quantized(W4_ASYM_F)
    res = write_compressed(Model(model, None), tmp_path / "ct")
    assert res.exact == 0 and res.requantized == 15
    assert any("asym-f" in n for n in res.notes)


def test_nf4_and_e5m2_are_refused_with_nearest(tmp_path):
    nf4 = QuantSpec(kind="nf4", bits=4, granularity="group", group_size=32)
    with pytest.raises(LowbitError, match="int4 group"):
        write_compressed(Model(_quantized(nf4), None), tmp_path / "a")
    with pytest.raises(LowbitError, match="fp8_e4m3"):
        write_compressed(Model(_quantized(QuantSpec(kind="fp8_e5m2", bits=8, granularity="channel")), None), tmp_path / "b")
    assert not list(tmp_path.iterdir())


def test_existing_output_needs_force(tmp_path):
    (tmp_path / "ct").mkdir()
    with pytest.raises(LowbitError, match="--force"):
        write_compressed(Model(_quantized(W4_SYM), None), tmp_path / "ct")


def test_tied_int8_head_exports_its_rows_as_the_embedding_table(tmp_path, ids):
    """The presets' INT8 head serves a tied model's embeddings in lowbit; compressed-tensors gets the
    table written out (the head's rows, dequantized) beside the quantized head."""
    from transformers import AutoModelForCausalLM

    import lowbit

    model = make_tiny_llama(tie=True)
    lowbit.quantize(model, "int8")
    prepare_model(model, "reference")
    write_compressed(Model(model, make_tokenizer()), tmp_path / "ct")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32)
    assert (_logits(hf, ids) - _logits(model, ids)).abs().max().item() < 5e-3  # fp16 table vs int8 x scale rows
