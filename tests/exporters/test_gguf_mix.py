"""A tuned mix of int8 / int5 / int4 g32 modules exports to GGUF block for block (--type auto): every
module's tensor has the exact GGUF type of its scheme, and its GGUF dequantization is lowbit's weight,
bit for bit (q/k rows in llama.cpp's rotary order). Slow: llama.cpp runs the mix and agrees."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from gguf import GGUFReader, quants

import lowbit
from lowbit.exporters import gguf as g
from lowbit.exporters.gguf_tensors import maybe_permute
from lowbit.formats import QuantSpec
from lowbit.model.qlinear import QLinear
from lowbit.recipe import Override, Recipe
from tests.conftest import make_tiny_llama, save_hf


def g32(bits: int, zero_domain: str | None = None) -> QuantSpec:
    """int `bits`, groups of 32, fp16 scales: symmetric, or with a float offset (zero_domain='float')."""
    if zero_domain is None:
        return QuantSpec(kind="int", bits=bits, granularity="group", group_size=32, scale_dtype="float16")
    return QuantSpec(kind="int", bits=bits, granularity="group", group_size=32, symmetric=False,
                     zero_domain=zero_domain, scale_dtype="float16")


EXPECT = {  # GGUF type of each lowbit scheme
    g32(8): "Q8_0", g32(5): "Q5_0", g32(5, "float"): "Q5_1", g32(4): "Q4_0", g32(4, "float"): "Q4_1",
}


def mix_recipe() -> Recipe:
    """Per-module overrides across all five types, different in each layer, q and k included (their rows
    are permuted for llama.cpp), and the head (untied) quantized too."""
    return Recipe(name="gguf-mix", scheme=g32(4), ignore=(), overrides=(
        Override("lm_head", g32(5, "float")),
        Override("model.layers.0.self_attn.q_proj", g32(5)),
        Override("model.layers.0.self_attn.k_proj", g32(5, "float")),
        Override("model.layers.0.self_attn.v_proj", g32(8)),
        Override("model.layers.0.mlp.down_proj", g32(4, "float")),
        Override("model.layers.0.mlp.up_proj", g32(5)),
        Override("model.layers.1.self_attn.q_proj", g32(8)),
        Override("model.layers.1.self_attn.k_proj", g32(4, "float")),
        Override("model.layers.1.self_attn.o_proj", g32(5, "float")),
        Override("model.layers.1.mlp.gate_proj", g32(8)),
        Override("model.layers.1.mlp.down_proj", g32(5)),
    ))


def quantized_tiny(tmp_path, recipe: Recipe, tie: bool = True) -> lowbit.Model:
    """The tiny Llama saved as a Hugging Face folder (the float source), loaded and quantized in memory."""
    folder = save_hf(make_tiny_llama(tie=tie), tmp_path / "float")
    return lowbit.quantize(lowbit.load(folder), recipe)


def _tensors(path) -> dict:
    return {t.name: t for t in GGUFReader(str(path)).tensors}


def check_exact_mix(q, res) -> None:
    """Every quantized module: the exact type, and the GGUF dequantization equal to lowbit's weight."""
    from gguf import MODEL_ARCH, get_tensor_name_map

    module = q.module if hasattr(q, "module") else q
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, module.config.num_hidden_layers)
    tensors = _tensors(res.path)
    qmods = {n: m for n, m in module.named_modules() if isinstance(m, QLinear)}
    assert res.exact == len(qmods) and res.requantized == 0 and res.from_float == 0
    assert not [n for n in res.notes if "requantized" in n or "float source" in n], res.notes
    seen = set()
    for mod_name, mod in qmods.items():
        g_name = names.get_name(mod_name + ".weight", try_suffixes=(".weight",))
        t = tensors[g_name]
        assert t.tensor_type.name == EXPECT[mod.spec], (mod_name, t.tensor_type.name)
        seen.add(EXPECT[mod.spec])
        deq = quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(mod.out_features, mod.in_features)
        want = maybe_permute(mod.dequantized_weight(torch.float32), mod_name + ".weight", module.config)
        assert torch.equal(torch.from_numpy(np.ascontiguousarray(deq)), want), mod_name  # same numbers
    assert seen == set(EXPECT.values())


def test_a_mix_of_five_block_types_exports_block_for_block(tmp_path):
    q = quantized_tiny(tmp_path, mix_recipe(), tie=False)
    assert {m.spec for m in q.module.modules() if isinstance(m, QLinear)} == set(EXPECT)
    art = lowbit.save(q, tmp_path / "mix")
    for m in (q, lowbit.load(art)):  # in memory, and the saved artifact read back
        res = lowbit.export(m, format="gguf", out=tmp_path / "mix.gguf", force=True)
        assert res.tensor_types["output.weight"] == "Q5_1" and res.tensor_types["blk.0.attn_q.weight"] == "Q5_0"
        check_exact_mix(m, res)


@pytest.mark.parametrize("spec,type_name", [(g32(5), "Q5_0"), (g32(5, "float"), "Q5_1")])
def test_explicit_q5_type_writes_int5_modules_exactly_and_requantizes_the_rest(tmp_path, spec, type_name):
    q = quantized_tiny(tmp_path, Recipe(scheme=spec, overrides=(Override("*.down_proj", g32(8)),)))
    res = g.write_gguf(q.module, tmp_path / "x.gguf", type_name, q.source, q.folder)
    assert res.exact == 2 * 6 and res.requantized == 2  # the INT8 down_proj modules become type_name too
    assert {t for n, t in res.tensor_types.items() if n.startswith("blk.") and n.endswith("weight")
            and "norm" not in n} == {type_name}
    assert any(f"int8 g32 -> {type_name}" in n for n in res.notes)


def test_int5_with_an_integer_zero_point_is_requantized_to_q5_1(tmp_path):
    q = quantized_tiny(tmp_path, Recipe(scheme=g32(5, "int")))
    res = g.write_gguf(q.module, tmp_path / "x.gguf", "auto", q.source, q.folder)
    assert res.exact == 0 and res.requantized == 14 and res.tensor_types["blk.0.ffn_up.weight"] == "Q5_1"
    assert res.from_float == 14  # every module is requantized: from the float model the source names
    assert any("int5 asym g32 -> Q5_1" in n for n in res.notes)


# -- llama.cpp runs the mix ---------------------------------------------------------------------------
@pytest.mark.slow
def test_llama_cpp_runs_the_exact_mix_and_agrees_with_lowbit(tmp_path):
    import copy
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        if os.environ.get("LOWBIT_SKIP_LLAMACPP") == "1":
            pytest.skip("LOWBIT_SKIP_LLAMACPP=1: llama-cpp-python was not built")
        pytest.fail("llama-cpp-python is not installed; run scripts/setup.sh (or set LOWBIT_SKIP_LLAMACPP=1)")
    from lowbit.data.corpora import wikipedia_articles
    from lowbit.eval.divergence import compare, make_samples
    from lowbit.exporters import llamacpp

    smol = lowbit.load("smollm2-135m")
    samples = make_samples(smol.tokenizer, wikipedia_articles(), seq_len=128, n=2)
    # the same five types over SmolLM2's 30 blocks, by projection (its head is tied: kept F16)
    recipe = Recipe(name="gguf-mix", scheme=g32(4), overrides=(
        Override("*.q_proj", g32(5)), Override("*.k_proj", g32(5, "float")), Override("*.v_proj", g32(8)),
        Override("*.o_proj", g32(4, "float")), Override("*.down_proj", g32(5)), Override("*.up_proj", g32(5, "float")),
    ))
    q = lowbit.quantize(lowbit.Model(copy.deepcopy(smol.module), smol.tokenizer, smol.source, smol.folder), recipe)
    res = lowbit.export(q, format="gguf", out=tmp_path / "mix.gguf")
    check_exact_mix(q, res)
    lm = llamacpp.LlamaCppLM(res.path)
    try:
        d = compare(q.module, lm, samples, use_cache=False)  # lowbit's evaluation of these weights as the reference
        base = compare(smol.module, q.module, samples, use_cache=False)
    finally:
        lm.close()
    # same weights; llama.cpp rounds activations to 8 bits in its quantized dot products, lowbit computes in FP32
    assert d["mean_kld"] < 0.01 and d["top1"] > 0.9, d
    assert d["mean_kld"] < base["mean_kld"] / 2, (d["mean_kld"], base["mean_kld"])  # far closer than to FP32
