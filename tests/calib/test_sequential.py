"""The block-by-block loop on a tiny random Llama: streaming from disk equals quantizing in memory,
RTN through the loop equals the plain quantize verb, artifacts reload, a singular Hessian falls back."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from dataclasses import asdict

import lowbit
from lowbit.calib import CalibConfig, CalibOptions, load_calibration
from lowbit.errors import LowbitError
from lowbit.formats.spec import QuantSpec
from lowbit.model.artifact import load_artifact
from lowbit.model.qlinear import prepare_model
from lowbit.model.quantize import quantize_model
from lowbit.recipe import Recipe, _int
from tests.conftest import make_tiny_llama, make_tokenizer

TEXTS = ["Quantization maps real numbers onto a small grid of integers. " * 6,
         "The river bends twice before it reaches the old mill by the bridge. " * 6]
W4 = Recipe(name="w4-g32", scheme=_int(4, "group", 32, symmetric=False, scale_dtype="float16"), group_fallback="shrink")
W8A8S = Recipe(name="w8a8-static", scheme=_int(8, "channel", activation="int8_static"))
FAST = CalibOptions(grid=4, awq_tokens=64, clip_tokens=32)


def calib():
    return load_calibration(TEXTS, make_tokenizer(), samples=2, seq_len=48)


def streamed_from(path, recipe, method, out=None, options=CalibOptions()):
    """The checkpoint read block by block from disk (lowbit.quantize on a path)."""
    cfg = CalibConfig(method=method, data=TEXTS, samples=2, seq_len=48, **asdict(options))
    return lowbit.quantize(str(path), recipe, calib=cfg, out=out)


def in_memory(recipe, method, data, options=CalibOptions(), model=None):
    """The same loop on a model already in memory (lowbit.quantize on a module)."""
    cfg = CalibConfig(method=method, data=data, **asdict(options))
    return lowbit.quantize(model if model is not None else make_tiny_llama(), recipe, tokenizer=make_tokenizer(), calib=cfg)


def same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq", "awq-gptq"])
def test_streaming_equals_in_memory(tiny_dir, method):
    streamed = streamed_from(tiny_dir, W4, method, options=FAST)
    in_mem = in_memory(W4, method, calib(), FAST)
    assert same_state(streamed.module, in_mem.module)
    assert streamed.calibration["method"] == method
    assert ("awq_ratios" in streamed.calibration) == method.startswith("awq")
    assert set(streamed.imatrix) == {p.name for p in streamed.plan if p.spec is not None}


@pytest.mark.slow
def test_streaming_an_untied_model_offloads_its_embedding_and_changes_nothing(tmp_path, monkeypatch):
    """The embedding goes back to disk during the loop and the head is quantized a block of rows at a
    time (both to bound memory on large models): the result equals the in-memory loop's."""
    from lowbit.calib import sequential
    from tests.conftest import save_hf

    folder = save_hf(make_tiny_llama(tie=False), tmp_path / "untied")
    offloaded = []
    real = sequential._offload
    monkeypatch.setattr(sequential, "OFFLOAD_MIN", 0)
    monkeypatch.setattr(sequential, "_offload", lambda m, names: (offloaded.extend(names), real(m, names)))
    real_rows = sequential._rows_in_chunks
    monkeypatch.setattr(sequential, "_rows_in_chunks", lambda lin, spec: real_rows(lin, spec, rows=64))
    streamed = streamed_from(folder, W4, "gptq", options=FAST)
    in_mem = in_memory(W4, "gptq", calib(), FAST, model=make_tiny_llama(tie=False))
    assert "model.embed_tokens.weight" in offloaded
    assert not streamed.module.model.embed_tokens.weight.is_meta
    assert same_state(streamed.module, in_mem.module)


def test_rtn_through_the_loop_equals_quantize_model():
    plain = make_tiny_llama()
    quantize_model(plain, W4)
    looped = in_memory(W4, "rtn", calib())
    assert same_state(plain, looped.module)


@pytest.mark.slow
def test_gptq_artifact_reloads_with_perm_and_imatrix(tiny_dir, tmp_path, ids):
    out = tmp_path / "art"
    q = streamed_from(tiny_dir, W4, "gptq", out=out, options=FAST)
    back = load_artifact(out)
    assert "perm" in dict(back.module.model.layers[0].self_attn.q_proj.named_buffers())
    assert set(back.imatrix) == set(q.imatrix)
    assert back.meta["calibration"]["data"]["tokens"] == 96
    assert back.meta["recipe"]["algorithm"] == "gptq"
    torch.testing.assert_close(back.module(ids).logits, q(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_gptq_reduces_output_error_of_a_block():
    """On the calibration tokens themselves, GPTQ's model is closer to the float model than RTN's."""
    data = load_calibration(TEXTS, make_tokenizer(), samples=2, seq_len=64)
    ref = make_tiny_llama()
    errs = {}
    for method in ("rtn", "gptq"):
        m = in_memory(W4, method, data)
        with torch.no_grad():
            errs[method] = (m(data.ids).logits - ref(data.ids).logits).pow(2).mean().item()
    assert errs["gptq"] < errs["rtn"], errs


def test_singular_hessian_falls_back_to_rtn_with_advice():
    data = load_calibration(TEXTS, make_tokenizer(), samples=1, seq_len=2)  # 2 tokens: H has rank <= 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = in_memory(W4, "gptq", data, CalibOptions(damp=0.0))
    msgs = [str(w.message) for w in caught if "fell back to round-to-nearest" in str(w.message)]
    assert msgs and "--damp" in msgs[0]
    fell = m.calibration["rtn_fallbacks"]
    assert fell
    plain = make_tiny_llama()
    quantize_model(plain, W4)
    name = fell[0]
    assert torch.equal(m.module.get_submodule(name).qtensor().tensors["qdata"], plain.get_submodule(name).qtensor().tensors["qdata"])


@pytest.mark.slow
def test_w8a8_static_gets_input_scales_and_smoothquant_keeps_function(tiny_dir, tmp_path, ids):
    out = tmp_path / "w8a8"
    q = streamed_from(tiny_dir, W8A8S, "smoothquant", out=out)
    lin = q.module.model.layers[0].mlp.down_proj
    assert lin.input_scale.numel() == 1 and lin.input_scale.item() > 0
    back = load_artifact(out)
    torch.testing.assert_close(back.module(ids).logits, q(ids).logits, rtol=1e-4, atol=1e-4)
    prepare_model(back.module, "reference")  # SmoothQuant's function, not the CPU kernel's rounding (tests/model/test_kernels.py)
    ref = make_tiny_llama()(ids).logits
    assert (back.module(ids).logits - ref).abs().mean() < 0.25 * ref.abs().mean()  # measured 0.12 on this random model


def test_method_checks():
    with pytest.raises(LowbitError, match="unknown"):
        in_memory(W4, "magic", calib())
    with pytest.raises(LowbitError, match="integer schemes"):
        in_memory("nf4", "gptq", calib())


# -- calibration data -----------------------------------------------------------------------------
def test_jsonl_text_and_messages(tmp_path):
    f = tmp_path / "c.jsonl"
    rows = [{"text": TEXTS[0]}, {"messages": [{"role": "user", "content": TEXTS[1]}]}, {"text": TEXTS[0]}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    d = load_calibration(str(f), make_tokenizer(), samples=100, seq_len=32)
    assert d.ids.shape[1] == 32 and 1 <= d.ids.shape[0] < 100  # fewer windows than asked: what the text gives
    assert d.stats["tokens"] == d.ids.numel()
    assert d.stats["duplicate_share"] == pytest.approx(1 / 3)
    assert 0 < d.stats["coverage"] <= 1


@pytest.mark.parametrize("content,match", [("", "empty"), ("hi there", "fewer than one window"),
                                           ('{"text": 1}\n', "line 1"), ("{oops\n", "not valid JSON")])
def test_bad_calibration_files(tmp_path, content, match):
    f = tmp_path / ("c.jsonl" if content.startswith("{") else "c.txt")
    f.write_text(content)
    with pytest.raises(LowbitError, match=match):
        load_calibration(str(f), make_tokenizer(), samples=4, seq_len=64)


def test_unknown_builtin_set():
    with pytest.raises(LowbitError, match="built-in"):
        load_calibration("no-such-set", make_tokenizer())


class _TwoInputs(torch.nn.Module):
    """a and b read one tensor; c reads a different tensor of the same shape, made after the first is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Linear(16, 16, bias=False) for _ in range(3))

    def forward(self, x):
        h = x * 2.0
        y = self.a(h) + self.b(h)
        del h  # its memory is free for the next tensor of this shape
        return self.c(y * 3.0)


def test_statistics_are_shared_only_by_linears_reading_the_same_tensor():
    from lowbit.calib.sequential import _collect

    block = _TwoInputs()
    xs = [torch.randn(1, 8, 16) for _ in range(3)]
    for _ in range(20):  # the allocator hands freed memory back often; any single reuse used to alias c to a
        stats = _collect(block, {"a": block.a, "b": block.b, "c": block.c}, xs, {}, torch.device("cpu"), True, 0)
        assert stats["a"] is stats["b"] and stats["c"] is not stats["a"]
        want = sum((x * 2).reshape(-1, 16).pow(2).sum(0) for x in xs)  # sum of squares of a's input
        torch.testing.assert_close(stats["a"].sq.float(), want)


@pytest.mark.parametrize("spec", [QuantSpec(kind="int", bits=8, granularity="channel"),
                                  QuantSpec(kind="int", bits=4, granularity="group", group_size=32, symmetric=False),
                                  QuantSpec(kind="fp8_e4m3", bits=8, granularity="channel")])
def test_head_in_row_blocks_equals_the_whole_matrix(spec):
    from torch import nn

    from lowbit.calib.sequential import _rows_in_chunks
    from lowbit.model.qlinear import QLinear

    torch.manual_seed(0)
    lin = nn.Linear(256, 100)
    chunked, whole = _rows_in_chunks(lin, spec, rows=16).state_dict(), QLinear.from_linear(lin, spec).state_dict()
    assert set(chunked) == set(whole) and all(torch.equal(chunked[k], whole[k]) for k in whole)


def test_awq_gptq_folds_awq_scales_then_rounds_with_gptq(monkeypatch):
    """awq-gptq: the same folded scales as awq, then GPTQ's rounding (not AWQ's clip search) on the
    rescaled Hessian."""
    from lowbit.calib import clip, gptq

    used = []
    monkeypatch.setattr(gptq, "gptq_quantize", lambda *a, real=gptq.gptq_quantize, **k: used.append("gptq") or real(*a, **k))
    monkeypatch.setattr(clip, "clip_search", lambda *a, real=clip.clip_search, **k: used.append("clip") or real(*a, **k))
    both = in_memory(W4, "awq-gptq", calib(), FAST)
    assert used and set(used) == {"gptq"}
    awq_only = in_memory(W4, "awq", calib(), FAST)
    first = {k: v for k, v in awq_only.calibration["awq_ratios"].items() if ".layers.0." in k}
    assert first and all(both.calibration["awq_ratios"][k] == v for k, v in first.items())  # block 0 sees the same inputs
    assert both.recipe.algorithm == "awq-gptq"
