"""benchmarks/offgrid.py: off-grid F32 variants of quantized GGUF files.

The fast tests build a tiny GGUF whose quantized tensors are made from known codes and steps, so the
bins every dithered weight must stay in are known here independently of the script's step readers.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFReader, GGUFValueType, GGUFWriter, quants

from lowbit.errors import LowbitError

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "offgrid.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("offgrid_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


og = _load_script()

META = {  # key -> (value, type, sub type)
    "general.name": ("tiny off-grid test", GGUFValueType.STRING, None),
    "llama.block_count": (1, GGUFValueType.UINT32, None),
    "llama.rope.freq_base": (10000.0, GGUFValueType.FLOAT32, None),
    "tokenizer.ggml.tokens": (["<s>", "a", "b", "</s>"], GGUFValueType.ARRAY, GGUFValueType.STRING),
    "tokenizer.ggml.token_type": ([3, 1, 1, 3], GGUFValueType.ARRAY, GGUFValueType.INT32),
    "general.file_type": (3, GGUFValueType.UINT32, None),
}


def _f16(x):
    return np.asarray(x, dtype=np.float16).astype(np.float32)


def q4_1_weights(rng, rows: int, cols: int):
    """Weights exactly on a Q4_1 grid, every block using all 16 codes twice, so re-quantizing them gives
    back the same step and minimum; returns (weights, step per block)."""
    n = rows * cols // 32
    step, low = _f16(rng.uniform(0.01, 0.05, (n, 1))), _f16(rng.normal(0, 0.1, (n, 1)))
    codes = rng.permuted(np.tile(np.repeat(np.arange(16), 2), (n, 1)), axis=1)
    return (step * codes + low).astype(np.float32).reshape(rows, cols), step.reshape(-1)


def q8_0_weights(rng, rows: int, cols: int):
    n = rows * cols // 32
    step = _f16(rng.uniform(0.001, 0.01, (n, 1)))
    codes = rng.integers(-126, 127, (n, 32))
    codes[:, 0] = 127  # the block's largest magnitude fixes the step the quantizer picks
    return (step * codes).astype(np.float32).reshape(rows, cols), step.reshape(-1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A GGUF with a Q4_1 tensor (8 x 64), a Q8_0 tensor (4 x 96), two F32 tensors and metadata."""
    rng = np.random.default_rng(7)
    w41, s41 = q4_1_weights(rng, 8, 64)
    w80, s80 = q8_0_weights(rng, 4, 96)
    assert np.array_equal(quants.dequantize(quants.quantize(w41, Q.Q4_1), Q.Q4_1), w41)  # built on the grid
    assert np.array_equal(quants.dequantize(quants.quantize(w80, Q.Q8_0), Q.Q8_0), w80)
    path = tmp_path_factory.mktemp("offgrid") / "tiny.Q4_1.gguf"
    w = GGUFWriter(str(path), "llama")
    for key, (val, vtype, sub) in META.items():
        w.add_key_value(key, val, vtype, sub)
    w.add_tensor("blk.0.attn_norm.weight", rng.normal(1, 0.1, 64).astype(np.float32))
    w.add_tensor("blk.0.ffn_down.weight", quants.quantize(w41, Q.Q4_1), raw_dtype=Q.Q4_1)
    w.add_tensor("blk.0.extra.weight", rng.normal(0, 1, (3, 5)).astype(np.float32))
    w.add_tensor("token_embd.weight", quants.quantize(w80, Q.Q8_0), raw_dtype=Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"path": path, "steps": {"blk.0.ffn_down.weight": s41, "token_embd.weight": s80}}


@pytest.fixture(scope="module")
def variant(tiny, tmp_path_factory):
    dst = tmp_path_factory.mktemp("variant") / "tiny-offgrid-s0.gguf"
    return dst, og.dither_gguf(tiny["path"], dst, seed=0)


def _weights(path: Path) -> dict[str, np.ndarray]:
    """name -> float32 values in numpy order, whatever the stored type."""
    r = GGUFReader(str(path))
    shape = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in r.tensors}
    return {t.name: quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape[t.name]) for t in r.tensors}


def test_names_order_shapes_and_types_are_kept(tiny, variant):
    src, dst = GGUFReader(str(tiny["path"])), GGUFReader(str(variant[0]))
    assert [t.name for t in dst.tensors] == [t.name for t in src.tensors]
    assert [t.shape.tolist() for t in dst.tensors] == [t.shape.tolist() for t in src.tensors]
    assert {t.name: t.shape.tolist() for t in dst.tensors}["blk.0.ffn_down.weight"] == [64, 8]  # GGUF: innermost first
    assert {t.tensor_type for t in dst.tensors} == {Q.F32}
    assert _weights(variant[0])["blk.0.ffn_down.weight"].shape == (8, 64)


def test_metadata_is_copied_except_the_file_type(tiny, variant):
    src, dst = GGUFReader(str(tiny["path"])), GGUFReader(str(variant[0]))
    assert dst.fields["general.file_type"].contents() == og.ALL_F32
    assert dst.fields["general.architecture"].contents() == "llama"
    for key, (val, vtype, _) in META.items():
        assert dst.fields[key].types == src.fields[key].types
        if key != "general.file_type":
            assert dst.fields[key].contents() == val
    assert [k for k in dst.fields] == [k for k in src.fields]  # same keys in the same order


def test_float_tensors_are_copied_exactly(tiny, variant):
    a, b = _weights(tiny["path"]), _weights(variant[0])
    for name in ("blk.0.attn_norm.weight", "blk.0.extra.weight"):
        assert np.array_equal(a[name], b[name])


@pytest.mark.parametrize("name", ["blk.0.ffn_down.weight", "token_embd.weight"])
def test_dithered_weights_stay_within_half_a_step_of_their_grid_value(tiny, variant, name):
    orig, new = _weights(tiny["path"])[name].reshape(-1, 32), _weights(variant[0])[name].reshape(-1, 32)
    offset = (new.astype(np.float64) - orig) / tiny["steps"][name][:, None]
    assert np.abs(offset).max() <= 0.5
    assert (new != orig).all()  # off the grid: no weight kept its grid value
    assert offset.min() < -0.4 and offset.max() > 0.4  # the noise spans the bin, not a sliver of it
    assert abs(offset.mean()) < 0.1


def test_the_returned_stats_describe_the_file(variant):
    _, st = variant
    assert (st["dithered"], st["copied"]) == (2, 2)
    assert st["weights"] == 8 * 64 + 4 * 96
    assert 0.4 < st["max_offset_steps"] <= 0.5
    assert st["on_grid"] == 0 and st["zero_step_weights"] == 0
    assert set(st["per_type"]) == {"Q4_1", "Q8_0"}


def test_the_same_seed_gives_the_same_bytes_and_another_seed_other_noise(tiny, variant, tmp_path):
    again, other = tmp_path / "again.gguf", tmp_path / "other.gguf"
    og.dither_gguf(tiny["path"], again, seed=0)
    og.dither_gguf(tiny["path"], other, seed=1)
    assert again.read_bytes() == variant[0].read_bytes()
    a, b = _weights(variant[0]), _weights(other)
    assert not np.array_equal(a["blk.0.ffn_down.weight"], b["blk.0.ffn_down.weight"])
    assert np.array_equal(a["blk.0.attn_norm.weight"], b["blk.0.attn_norm.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.gguf", "other.gguf"]  # no temporaries left


def test_read_back_verification_passes_and_catches_a_weight_out_of_its_bin(tiny, variant, tmp_path):
    st = og.verify_variant(tiny["path"], variant[0])
    assert og.file_problems(st) == [] and st["max_offset_steps"] <= 0.5
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(variant[0].read_bytes())
    r = GGUFReader(str(bad), "r+")
    t = next(t for t in r.tensors if t.name == "blk.0.ffn_down.weight")
    t.data[0, 0] += tiny["steps"]["blk.0.ffn_down.weight"][0]  # one whole step: into the next bin
    t.data.flush()
    del r, t
    problems = og.file_problems(og.verify_variant(tiny["path"], bad))
    assert problems and "out of its bin" in problems[0]


def test_requantizing_a_dithered_tensor_no_longer_reproduces_it(tiny, variant):
    req = og.requant_check(tiny["path"], variant[0])
    assert (req["tensor"], req["type"]) == ("blk.0.ffn_down.weight", "Q4_1")
    assert req["original"] == 0.0
    assert req["dithered"] > 1e-3


@pytest.mark.parametrize("qtype", sorted(og.STEP_READERS, key=lambda q: q.name), ids=lambda q: q.name)
def test_step_readers_give_the_spacing_gguf_dequantizes_to(qtype):
    """Random block bytes: within each sub-block the dequantized values are whole multiples of the step
    apart, and in most sub-blocks two of them are exactly one step apart (so it is not a divisor)."""
    rng = np.random.default_rng(int(qtype))
    raw = rng.integers(0, 256, (64, GGML_QUANT_SIZES[qtype][1] * 2), dtype=np.uint8)
    with np.errstate(all="ignore"):  # random fp16 scales include inf and nan; those blocks are skipped
        vals = quants.dequantize(raw, qtype).astype(np.float64)
        steps, sub = og.grid_steps(raw, qtype)
        vals = vals.reshape(-1, sub)
        sane = np.isfinite(vals).all(1) & np.isfinite(steps) & (steps > 0)
        sane &= np.abs(vals).max(1) < 1e3 * steps  # leaves float32 rounding far below a step
        k = (vals - vals[:, :1]) / steps[:, None]
        gaps = np.diff(np.sort(vals, axis=1), axis=1)
        smallest = np.where(gaps > 0, gaps, np.inf).min(1) / steps
    assert sub == (16 if qtype in (Q.Q2_K, Q.Q3_K, Q.Q6_K) else 32)
    assert sane.sum() >= 20
    assert np.abs(k - np.round(k))[sane].max() < 1e-3
    assert np.median(np.round(smallest[sane], 3)) == 1.0


def test_a_type_without_a_step_reader_is_refused_and_leaves_nothing(tmp_path):
    src = tmp_path / "iq.gguf"
    w = GGUFWriter(str(src), "llama")
    block, size = GGML_QUANT_SIZES[Q.IQ4_NL]
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((2, size * 2), dtype=np.uint8), raw_dtype=Q.IQ4_NL)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "out"
    with pytest.raises(LowbitError, match=r"iq\.gguf.*IQ4_NL.*STEP_READERS"):
        og.dither_gguf(src, out / "x.gguf", seed=0)
    assert not out.exists() or not any(out.iterdir())


def test_unknown_model_names_and_negative_seeds_are_refused(tiny, tmp_path):
    with pytest.raises(LowbitError, match="not a bundled model"):
        og.offgrid_path("no-such-model")
    with pytest.raises(LowbitError, match="negative"):
        og.dither_gguf(tiny["path"], tmp_path / "x.gguf", seed=-1)


@pytest.mark.slow
def test_the_real_smollm2_variant_loads_and_is_close_but_not_equal():
    try:
        path = og.offgrid_path("smollm2-135m")
    except LowbitError as e:
        pytest.skip(str(e))
    m = og.logit_check("smollm2-135m", path, tokens=256, seq_len=256)
    assert m["same_tokenizer"]
    assert 0 < m["kld"] < og.MAX_KLD
    assert m["top1"] > 0.5
