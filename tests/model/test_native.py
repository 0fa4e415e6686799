"""lowbit's native kernels (lowbit/native): the int4pack / int8pack products at small batch, and the
whole Llama decode step, against the float reference and against the torch path they replace."""

from __future__ import annotations

import warnings

import pytest
import torch

from lowbit import native
from lowbit.formats.spec import QuantSpec
from lowbit.model.qlinear import QLinear

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.why_not()}")

# Activations are rounded to int8 in blocks of 32, one float scale per block (as llama.cpp rounds its
# activations for Q4_0 / Q8_0): measured 0.5-0.7% relative error of a layer's output on random data.
NATIVE_TOL = 1.5e-2

SPECS = {
    "int8 sym ch": QuantSpec(kind="int", bits=8, granularity="channel"),
    "int4 sym g32": QuantSpec(kind="int", bits=4, granularity="group", group_size=32),
    "int4 asym g128": QuantSpec(kind="int", bits=4, granularity="group", group_size=128, symmetric=False),
    "int4 sym ch": QuantSpec(kind="int", bits=4, granularity="channel"),
    "int3 asym g64": QuantSpec(kind="int", bits=3, granularity="group", group_size=64, symmetric=False),
}


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


class _Count:
    """Counts calls into the native library's matmuls."""

    def __init__(self, monkeypatch):
        self.n = 0
        for name in ("int4_mm", "int8_mm"):
            real = getattr(native, name)

            def wrapped(*a, _real=real, **k):
                self.n += 1
                return _real(*a, **k)
            monkeypatch.setattr(native, name, wrapped)


@pytest.mark.parametrize("rows", [1, 5, 8])
@pytest.mark.parametrize("label", list(SPECS))
def test_native_matmul_matches_reference_at_small_batch(label, rows, monkeypatch):
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(96, 512, generator=g) * 0.05, torch.randn(96, generator=g)
    x = torch.randn(rows, 512, generator=g)
    m = QLinear.from_weight(w, SPECS[label], b)
    m.prepare("reference")
    ref = m(x)
    m.prepare("auto")
    calls = _Count(monkeypatch)
    y = m(x)
    assert calls.n == 1  # the native kernel ran, not torch's
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert 0 < _rel(y, ref) < NATIVE_TOL
    # between the limits torch's kernel runs; from DEQUANT_ROWS on, float weights dequantized once per
    # call and one float GEMM, which leaves only the packed scales' bf16 rounding (test_kernels.py's 1%)
    mid = m(torch.cat([x] * (native.MAX_ROWS // rows + 1)))
    big = m(torch.cat([x] * (native.DEQUANT_ROWS // rows + 1)))
    assert calls.n == 1 and _rel(big[:rows], ref) < 1e-2 and _rel(mid[:rows], y) < 2 * NATIVE_TOL


def test_native_int4_reads_a_column_slice_of_the_scales():
    """A fused q/k/v keeps its modules' scales as slices: the kernel walks them with their stride."""
    g = torch.Generator().manual_seed(4)
    N, K, gs = 96, 256, 64
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.int32)
    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = (torch.rand(K // gs, N, 2, generator=g) * 0.1).to(torch.bfloat16)
    x = torch.randn(2, K, generator=g)
    full = native.int4_mm(x, w, gs, sz, N)
    part = native.int4_mm(x, w[32:64], gs, sz[:, 32:64], 32)  # rows 32..63: a slice in both tensors
    assert torch.equal(part, full[:, 32:64])
    s, z = sz[..., 0].float().t().repeat_interleave(gs, 1), sz[..., 1].float().t().repeat_interleave(gs, 1)
    exact = x @ ((q.float() - 8) * s + z).t()
    assert _rel(full, exact) < NATIVE_TOL
    with pytest.raises(RuntimeError, match="refused"):
        native.int4_mm(x[:, :100], w, gs, sz, N)  # 100 inputs: not a multiple of the group


def test_native_int8_handles_minus_128_codes():
    """GPTQ can leave -128 in a symmetric int8 weight; the sign trick must not overflow on it."""
    w = torch.full((32, 64), -128, dtype=torch.int8)
    s = torch.full((32,), 0.01).to(torch.bfloat16)
    x = -torch.ones(1, 64)
    y = native.int8_mm(x, w, s)
    assert torch.allclose(y, torch.full((1, 32), 128 * 64 * s[0].float().item()), rtol=1e-3)


def _lean_pair(model, ids, steps):
    """Logits of `steps` greedy decode steps with the native step and with the torch loop."""
    from lowbit.runtime.decode import LeanDecoder

    out = []
    for use_native in (True, False):
        dec = LeanDecoder(model, 1, ids.shape[1] + steps + 1)
        assert dec.native is not None, dec.native_why
        if not use_native:
            dec.native = None
        logits, seq = [dec.prefill(ids)], []
        for i in range(steps):
            nxt = torch.tensor([[int(ids[0, i % ids.shape[1]])]])  # the same tokens for both: teacher forcing
            logits.append(dec.step(nxt))
            seq.append(nxt)
        out.append(torch.cat(logits))
    return out


def test_native_step_equals_the_torch_loop_in_float(ids):
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama()
    with torch.no_grad():
        nat, ref = _lean_pair(model, ids, 12)
    assert torch.allclose(nat, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("preset", ["int8", "w4-g32", "w4-g128"])
def test_native_step_close_to_the_float_model_for_quantized_presets(ids, preset):
    """The native step against the same quantized model on the reference path (float activations):
    within the kernels' stated tolerance, and the float model's next token mostly kept."""
    import lowbit
    from tests.conftest import make_tiny_llama
    from lowbit.model.qlinear import prepare_model

    model = make_tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(model, preset)
    with torch.no_grad():
        nat, fast_torch = _lean_pair(model, ids, 12)
        prepare_model(model, "reference", warn=False)
        from lowbit.runtime.decode import LeanDecoder

        dec = LeanDecoder(model, 1, ids.shape[1] + 13)
        dec.native = None  # reference kernels: the native step does not apply anyway
        ref = [dec.prefill(ids)] + [dec.step(torch.tensor([[int(ids[0, i % ids.shape[1]])]])) for i in range(12)]
        ref = torch.cat(ref)
    assert _rel(nat, ref) < 2 * NATIVE_TOL
    assert (nat.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_native_step_is_used_by_generate_and_keeps_greedy_tokens(ids):
    from tests.conftest import make_tiny_llama
    from lowbit.runtime.decode import LeanDecoder, lean_generate

    model = make_tiny_llama()
    with torch.no_grad():
        dec = LeanDecoder(model, 1, ids.shape[1] + 20)
        calls = {"n": 0}
        real = dec.native.step

        def counted(*a):
            calls["n"] += 1
            return real(*a)
        dec.native.step = counted
        with_native = lean_generate(model, ids, 20, decoder=dec)
        without = LeanDecoder(model, 1, ids.shape[1] + 20)
        without.native = None
        assert torch.equal(with_native, lean_generate(model, ids, 20, decoder=without))
    assert calls["n"] == 19
    assert torch.get_num_threads() >= 1 and native._threads is None  # decoding() restored the thread setting


def test_native_step_declines_what_it_does_not_run():
    from tests.conftest import make_tiny_llama
    from lowbit.runtime.decode import LeanDecoder

    model = make_tiny_llama()
    assert LeanDecoder(model, 2, 32).native_why == "batch above 1"
    assert LeanDecoder(model, 1, 32, "int8").native_why == "int8 KV cache"
    nf4 = make_tiny_llama()
    import lowbit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(nf4, "nf4")
        dec = LeanDecoder(nf4, 1, 32)
    assert dec.native is None and "bf16deq" in dec.native_why


def test_native_off_or_unbuildable_falls_back_to_torch(monkeypatch, tmp_path, ids):
    from tests.conftest import make_tiny_llama
    from lowbit.runtime.decode import LeanDecoder, lean_generate

    model = make_tiny_llama()
    with torch.no_grad():
        expected = lean_generate(model, ids, 8)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_why", None)
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    assert not native.available() and "LOWBIT_NATIVE=0" in native.why_not()
    with torch.no_grad():
        dec = LeanDecoder(model, 1, 64)
        assert dec.native is None and "LOWBIT_NATIVE" in dec.native_why
        assert torch.equal(lean_generate(model, ids, 8, decoder=dec), expected)
    monkeypatch.setattr(native, "_why", None)
    monkeypatch.delenv("LOWBIT_NATIVE")
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")  # a compiler that fails
    assert not native.available() and "could not be built" in native.why_not()
    assert not list((tmp_path / "native").glob("*.so"))  # nothing half-written left behind


def test_native_step_runs_gemma3_past_its_sliding_window():
    """Gemma 3's q/k norms, sandwich norms, tanh-GELU and sliding-window layers (window 8, 30 steps),
    float and INT8: the native step against the torch loop."""
    import lowbit
    from tests.model.test_kernels import _tiny_gemma3

    model = _tiny_gemma3()
    ids = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        nat, ref = _lean_pair(model, ids, 30)
    assert torch.allclose(nat, ref, atol=1e-4, rtol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(model, "int8")
    with torch.no_grad():
        nat, ref = _lean_pair(model, ids, 30)
    assert _rel(nat, ref) < 2 * NATIVE_TOL


def test_concurrent_decode_loops_restore_the_thread_setting():
    """`lowbit bench` decodes several requests at once in threads: the process-wide torch thread count
    must come back to what it was whatever order the loops end in."""
    import threading

    before = torch.get_num_threads()
    a, b = native.single_threaded_torch(), native.single_threaded_torch()
    a.__enter__()
    t = threading.Thread(target=b.__enter__)
    t.start()
    t.join()
    assert torch.get_num_threads() == 1 and native.threads() == before
    a.__exit__(None, None, None)  # the first one out leaves the setting alone: b is still decoding
    assert torch.get_num_threads() == 1
    b.__exit__(None, None, None)
    assert torch.get_num_threads() == before and native._threads is None
