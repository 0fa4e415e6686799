"""lowbit's native kernels (lowbit/native): its own q4 / q8 layouts, every instruction-set path this
CPU can run (each forced in turn), the known-answer self-check, the switches, and the whole decode step
against the torch loop."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from lowbit import native
from lowbit.errors import LowbitError
from lowbit.formats.spec import QuantSpec
from lowbit.model.qlinear import QLinear
from lowbit.native import layout

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.why_not()}")

# Activations are rounded to int8 in blocks of 32, one float scale per block (as llama.cpp rounds its
# activations for Q4_0 / Q8_0): measured 0.5-0.7% relative error of a layer's output on random data.
NATIVE_TOL = 1.5e-2
PATHS = native.supported_isas() if native.available() else []

SPECS = {
    "int8 sym ch": QuantSpec(kind="int", bits=8, granularity="channel"),
    "int4 sym g32": QuantSpec(kind="int", bits=4, granularity="group", group_size=32),
    "int4 asym g128": QuantSpec(kind="int", bits=4, granularity="group", group_size=128, symmetric=False),
    "int4 asym-f g64": QuantSpec(kind="int", bits=4, granularity="group", group_size=64, symmetric=False,
                                 zero_domain="float"),
    "int4 sym ch": QuantSpec(kind="int", bits=4, granularity="channel"),
    "int3 asym g64": QuantSpec(kind="int", bits=3, granularity="group", group_size=64, symmetric=False),
}


def _random_q4(seed: int, N: int, K: int, G: int, scale_max: float):
    """Codes 0..15, scales up to scale_max and symmetric offsets, packed: (codes, scale, w, p)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (N, K), generator=g)
    scale = torch.rand(N, K // G, generator=g) * scale_max
    return codes, scale, *layout.pack_q4(codes, scale, -8 * scale, G), g


@pytest.fixture(params=PATHS)
def path(request):
    """Each instruction-set path this CPU supports, forced for the test."""
    with native.using(request.param):
        yield request.param


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


# -- the layout -----------------------------------------------------------------------------------
def test_q4_layout_round_trips_and_places_nibbles_as_documented():
    g = torch.Generator().manual_seed(0)
    N, K, G = 64, 96, 32
    codes = torch.randint(0, 16, (N, K), generator=g)
    scale, offset = torch.rand(N, K // G, generator=g), torch.randn(N, K // G, generator=g)
    w, p = layout.pack_q4(codes, scale, offset, G)
    assert w.shape == (N // 32, K * 16) and w.dtype == torch.uint8 and p.shape == (N // 32, K // G, 2, 32)
    assert torch.equal(layout.unpack_q4(w, N, K), codes.int())
    # row 33 (block 1, r = 1), inputs 13 and 9 (chunk 1, j = 1): byte at 1 * 128 + 1 * 4 + 1 of block 1
    assert int(w[1, 128 + 4 + 1]) == int(codes[33, 9]) | (int(codes[33, 13]) << 4)
    s, o = layout.unpack_params(p, N)
    assert torch.allclose(s, scale, rtol=1e-3) and torch.allclose(o, offset, atol=1e-3 * scale.max().item())
    with pytest.raises(ValueError, match="N % 32"):
        layout.pack_q4(codes[:48], scale[:48], offset[:48], G)


def test_q4_params_fall_back_to_float32_when_float16_would_lose_them():
    s = torch.full((32, 2), 1e-6)  # below float16's normal range
    assert layout.pack_params(s, -8 * s).dtype == torch.float32
    s = torch.full((32, 2), 0.01)
    assert layout.pack_params(s, -8 * s).dtype == torch.float16


# -- products on every path -----------------------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 5, 8, 20])
@pytest.mark.parametrize("label", list(SPECS))
def test_native_matmul_matches_reference(path, label, rows, monkeypatch):
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
    # from DEQUANT_ROWS on, float weights dequantized once per call and one float GEMM: only the
    # params' float16 rounding is left
    big = m(torch.cat([x] * (native.DEQUANT_ROWS // rows + 1)))
    assert calls.n == 1 and _rel(big[:rows], ref) < 1e-3


def test_every_path_computes_the_same_integer_sums():
    """Every path computes the same integer sums. int4: then the same float operations in the same order,
    so the same floats; int8 sums its blocks across vector lanes, so only within 1e-5."""
    N, K, G = 96, 640, 64
    _, _, w, p, g = _random_q4(9, N, K, G, 0.01)
    w8 = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    s8 = torch.rand(N, generator=g) * 0.01
    x = torch.randn(3, K, generator=g)
    with native.using("generic"):
        ref4, ref8 = native.int4_mm(x, w, p, G, N, 8), native.int8_mm(x, w8, s8)
    for isa in PATHS:
        with native.using(isa):
            assert torch.equal(native.int4_mm(x, w, p, G, N, 8), ref4), isa
            assert _rel(native.int8_mm(x, w8, s8), ref8) < 1e-5, isa


def test_native_int4_runs_a_slice_of_row_blocks(path):
    """A fused q/k/v keeps its modules' weights as runs of row blocks of one concatenation."""
    N, K, gs = 96, 256, 64
    _, _, w, p, g = _random_q4(4, N, K, gs, 0.1)
    x = torch.randn(2, K, generator=g)
    full = native.int4_mm(x, w, p, gs, N)
    part = native.int4_mm(x, w[1:2], p[1:2], gs, 32)  # rows 32..63
    assert torch.equal(part, full[:, 32:64])
    exact = x @ layout.q4_weight(w, p, N, K, gs).t()
    assert _rel(full, exact) < NATIVE_TOL
    with pytest.raises(RuntimeError, match="q4 layout"):
        native.int4_mm(x[:, :100], w, p, gs, N)  # 100 inputs: not the layout's width


def test_native_int8_handles_minus_128_codes(path):
    """GPTQ can leave -128 in a symmetric int8 weight; the sign trick must not overflow on it."""
    w = torch.full((32, 64), -128, dtype=torch.int8)
    s = torch.full((32,), 0.01)
    x = -torch.ones(1, 64)
    y = native.int8_mm(x, w, s)
    assert torch.allclose(y, torch.full((1, 32), 128 * 64 * 0.01), rtol=1e-5)


# -- the self-check and the switches --------------------------------------------------------------
@pytest.fixture()
def fresh(monkeypatch):
    """native's process-wide choice, reset for one test (restored after)."""
    monkeypatch.setattr(native, "_active", None)
    monkeypatch.setattr(native, "_why", None)
    yield monkeypatch


def test_selfcheck_passes_on_every_path():
    for isa in PATHS:
        assert native.selfcheck(native._open(isa)) == "", isa


def test_a_kernel_that_disagrees_turns_native_code_off_with_one_line(fresh, capsys):
    real = layout.pack_q4

    def wrong(codes, scale, offset, group, dtype=None):  # a layout the kernels do not read: rows out of order
        w, p = real(codes, scale, offset, group, dtype)
        return w.flip(0).contiguous(), p

    fresh.setattr(layout, "pack_q4", wrong)
    assert not native.available()
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and "self-check failed: int4 product" in said and native.cpu_name() in said
    assert "torch's kernels" in native.why_not()


def test_lowbit_isa_forces_a_path_and_rejects_unknown_values(fresh, capsys):
    fresh.setenv("LOWBIT_ISA", "generic")
    assert native.isa() == "generic" and "forced by LOWBIT_ISA" in native.describe()
    fresh.setattr(native, "_active", None)
    fresh.setattr(native, "_why", None)
    fresh.setenv("LOWBIT_ISA", "sse9")
    with pytest.raises(LowbitError, match="LOWBIT_ISA='sse9'.*avx512vnni, avx512, avx2, generic"):
        native.available()


def test_a_forced_path_the_cpu_lacks_falls_back_and_says_so(fresh, capsys):
    fresh.setattr(native, "cpu_features", lambda: native.NEEDS["avx2"])  # an AVX2-only CPU
    fresh.setenv("LOWBIT_ISA", "avx512vnni")
    assert native.isa() == "avx2"
    said = capsys.readouterr().err
    assert "LOWBIT_ISA=avx512vnni" in said and "avx512f" in said and "the avx2 path runs" in said
    with pytest.raises(LowbitError, match="lacks"):
        with native.using("avx512"):
            pass


def test_the_cli_refuses_a_bad_lowbit_isa_before_any_work(tmp_path):
    env = {**os.environ, "LOWBIT_ISA": "avx9000"}
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", "info", str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "LOWBIT_ISA='avx9000'" in r.stderr and "Traceback" not in r.stderr


def test_native_off_or_unbuildable_falls_back_to_torch(fresh, tmp_path, ids):
    from tests.conftest import make_tiny_llama
    from lowbit.runtime.decode import LeanDecoder, lean_generate

    model = make_tiny_llama()
    with torch.no_grad():
        expected = lean_generate(model, ids, 8)
    fresh.setattr(native, "_active", None)
    fresh.setattr(native, "_why", None)
    fresh.setenv("LOWBIT_NATIVE", "0")
    assert not native.available() and "LOWBIT_NATIVE=0" in native.why_not()
    with torch.no_grad():
        dec = LeanDecoder(model, 1, 64)
        assert dec.native is None and "LOWBIT_NATIVE" in dec.native_why
        assert torch.equal(lean_generate(model, ids, 8, decoder=dec), expected)
    fresh.setattr(native, "_why", None)
    fresh.setattr(native, "_libs", {})
    fresh.delenv("LOWBIT_NATIVE")
    fresh.setenv("LOWBIT_CACHE", str(tmp_path))
    fresh.setenv("CC", "/bin/false")  # a compiler that fails
    assert not native.available() and "could not be built" in native.why_not()
    assert not list((tmp_path / "native").glob("*.so"))  # nothing half-written left behind


def test_modules_packed_without_native_code_hold_torch_layout_and_still_run(fresh):
    """Packed while native code is off: torch's int4pack (read by torch only). Packed with it on and
    run inside native.disabled(): lowbit's layout through torch ops. Both equal the reference."""
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(64, 256, generator=g) * 0.05, torch.randn(3, 256, generator=g)
    spec = SPECS["int4 asym g128"]
    m = QLinear.from_weight(w, spec)
    m.prepare("reference")
    ref = m(x)
    m.prepare("auto")
    assert "p" in m._packed
    with native.disabled():
        assert _rel(m(x), ref) < 1e-3
        m.prepare("auto")
        assert "sz" in m._packed and "p" not in m._packed
        assert _rel(m(x), ref) < 1e-2  # torch's kernel: bf16 activations and scales


# -- the decode step ------------------------------------------------------------------------------
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


def test_native_step_equals_the_torch_loop_in_float(path, ids):
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama()
    with torch.no_grad():
        nat, ref = _lean_pair(model, ids, 12)
    assert torch.allclose(nat, ref, atol=1e-4, rtol=1e-4)


def test_native_step_with_attention_wider_than_hidden_and_mlp(path, tmp_path, monkeypatch):
    """o_proj reads n_heads * head_dim inputs, here more than hidden (64) and intermediate (128): the
    step's activation scratch must hold them (the sanitized run checks the bounds). A fresh copy of the
    library (its scratch empty) and a prompt of 64+ tokens (prefill on the float GEMM), so the step is
    the first to round activations."""
    import lowbit
    from tests.conftest import make_tiny_llama

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_libs", {})
    monkeypatch.setattr(native, "_active", native._open(path))
    model = make_tiny_llama(head_dim=64)  # 4 heads x 64 = 256
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(model, "int8")
    ids = torch.randint(0, 256, (1, native.DEQUANT_ROWS + 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        nat, ref = _lean_pair(model, ids, 8)
    assert _rel(nat, ref) < 2 * NATIVE_TOL


@pytest.mark.parametrize("preset", ["int8", "w4-g32", "w4-g128", "w8a8-dynamic"])
def test_native_step_close_to_the_float_model_for_quantized_presets(path, ids, preset):
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
    from lowbit.runtime.decode import LeanDecoder, engine_label, lean_generate

    model = make_tiny_llama()
    assert engine_label(model) == f"lean, native step ({native.isa()})"
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


def test_native_step_runs_gemma3_past_its_sliding_window(path):
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


def test_many_row_products_reuse_one_weight_buffer_with_the_same_result(monkeypatch):
    """The float weight of a many-row product is written into a per-thread buffer reused across calls:
    the same floats as a fresh tensor, for both kernels; calls that autograd may replay, and weights over
    SCRATCH_MAX, get their own tensor (a buffer overwritten later would corrupt the saved weight)."""
    from lowbit.model import kernels

    N, K, G = 96, 256, 64
    _, _, w4, p4, g = _random_q4(11, N, K, G, 0.05)
    w8, s8 = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8), torch.rand(N, generator=g) * 0.01
    x = torch.randn(native.DEQUANT_ROWS + 3, K, generator=g)
    plans = {"int8pack": (kernels.KernelPlan("int8pack", True, ""), {"w": w8, "s": s8}),
             "int4pack": (kernels.KernelPlan("int4pack", True, "", group=G), {"w": w4, "p": p4})}
    for name, (plan, p) in plans.items():
        monkeypatch.setattr(kernels, "SCRATCH_MAX", 0)
        fresh = kernels._dequantized_gemm(plan, p, x, N)
        monkeypatch.setattr(kernels, "SCRATCH_MAX", 1 << 24)
        with torch.no_grad():
            first, again = kernels._dequantized_gemm(plan, p, x, N), kernels._dequantized_gemm(plan, p, x * 2, N)
        assert torch.equal(first, fresh) and torch.equal(again, kernels._dequantized_gemm(plan, p, x * 2, N)), name
        assert kernels._scratch.buf.numel() >= N * K
        xg = x.clone().requires_grad_(True)
        assert kernels._weight_buffer(xg, N * K) is None and kernels._weight_buffer(x, (1 << 24) + 1) is None
        kernels._dequantized_gemm(plan, p, xg, N).sum().backward()
        w_eff = kernels._dequantized_gemm(plan, p, torch.eye(K), N).t()  # (N, K): the weight the product used
        torch.testing.assert_close(xg.grad, torch.ones(x.shape[0], N) @ w_eff)
