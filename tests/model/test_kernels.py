"""Fast CPU kernels against the reference path, per format, per module and through a whole model."""

import warnings

import pytest
import torch

import lowbit
from lowbit.formats import QuantSpec
from lowbit.model.artifact import load_artifact
from lowbit.model.load import load_model
from lowbit.model.qlinear import QLinear, prepare_model

SPECS = {
    "int8 ch": (QuantSpec(kind="int", bits=8, granularity="channel"), "int8pack"),
    "int4 asym g128": (QuantSpec(kind="int", bits=4, granularity="group", group_size=128, symmetric=False,
                                 scale_dtype="float16"), "int4pack"),
    "int4 asym-f g32": (QuantSpec(kind="int", bits=4, granularity="group", group_size=32, symmetric=False,
                                  scale_dtype="float16", zero_domain="float"), "int4pack"),
    "int4 sym g64": (QuantSpec(kind="int", bits=4, granularity="group", group_size=64), "int4pack"),
    "int4 sym ch": (QuantSpec(kind="int", bits=4, granularity="channel"), "int4pack"),
    "int3 asym g128": (QuantSpec(kind="int", bits=3, granularity="group", group_size=128, symmetric=False), "int4pack"),
    "int8 a8dyn": (QuantSpec(kind="int", bits=8, granularity="channel", activation="int8_dynamic"), "int8dyn"),
    "nf4": (QuantSpec(kind="nf4", bits=4, granularity="group", group_size=64), "bf16deq"),
    "fp8": (QuantSpec(kind="fp8_e4m3", bits=8, granularity="channel"), "bf16deq"),
    "int4 g16": (QuantSpec(kind="int", bits=4, granularity="group", group_size=16), "bf16deq"),
}
# The fast kernels take bf16 activations (and bf16 scales for int4pack): 8 mantissa bits, so the
# stated tolerance against the fp32 reference is 1% relative error of the layer output.
REL_TOL = 1e-2


def _tol(kernel: str) -> float:
    """int8dyn rounds activations its own way: per-token-scaled, then asymmetric uint8 over the batch
    (PyTorch's quantized linear), 7-bit on a CPU without VNNI (u8 x s8 pair sums would overflow int16).
    Measured 1-1.5% from the symmetric per-token int8 reference: 3% allowed."""
    return 3e-2 if kernel == "int8dyn" else REL_TOL


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("label", list(SPECS))
def test_fast_kernel_matches_reference(label):
    spec, kernel = SPECS[label]
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(96, 512, generator=g) * 0.05, torch.randn(96, generator=g)
    x = torch.randn(2, 7, 512, generator=g)
    m = QLinear.from_weight(w, spec, b)
    stored = {k: v.clone() for k, v in m.state_dict().items()}
    m.prepare("reference")
    ref = m(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = m.prepare("auto")
        y = m(x)
    assert plan.name == kernel and plan.fast == (kernel != "bf16deq")
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert _rel(y, ref) < _tol(kernel)
    # the stored form survives the kernel's repacking bit for bit (int4pack drops qdata in memory)
    assert all(torch.equal(stored[k], v) for k, v in m.state_dict().items()) and set(stored) == set(m.state_dict())


def test_int4pack_holds_the_weight_once_in_memory():
    m = QLinear.from_weight(torch.randn(256, 1024), SPECS["int4 sym g64"][0])
    before = m.memory_bytes
    m.prepare("auto")
    assert "qdata" not in m._buffers
    assert m.memory_bytes < 1.3 * before  # packed codes replace qdata; bf16 scale/zero pairs are extra


def test_act_order_permutation_runs_on_the_fast_kernel():
    from lowbit.formats import affine
    from lowbit.formats.qtensor import int_qtensor

    spec = SPECS["int4 asym g128"][0]
    torch.manual_seed(0)
    w, x = torch.randn(64, 256), torch.randn(3, 256)
    perm = torch.randperm(256)
    scale, zero = affine.choose_qparams(w[:, perm], spec)
    qt = int_qtensor(spec, affine.quantize(w[:, perm], scale, zero, spec), scale, zero, perm)
    m = QLinear(256, 64, spec, qt.tensors)
    m.prepare("reference")
    ref = m(x)
    assert m.prepare("auto").name == "int4pack"
    assert _rel(m(x), ref) < REL_TOL
    assert _rel(ref, x @ w.T) < 0.2  # and the reference really is the un-permuted weight


def test_one_warning_names_the_slow_modules(tiny_dir):
    model = load_model(tiny_dir).module
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lowbit.quantize(model, "nf4")
    msgs = [str(w.message) for w in caught if "no fast CPU kernel" in str(w.message)]
    assert len(msgs) == 1  # one warning for the whole model, not one per module
    assert "model.layers.0.self_attn.q_proj" in msgs[0] and "NF4" in msgs[0] and "lm_head" not in msgs[0]
    plans = prepare_model(model, warn=False)
    assert plans.pop("lm_head").name == "int8pack"  # the preset's INT8 head has its fast kernel
    assert {p.name for p in plans.values()} == {"bf16deq"}


@pytest.mark.parametrize("preset", ["int8", "w4-g32", "w8a8-dynamic"])
def test_whole_model_fast_logits_close_to_reference_and_artifact_unchanged(tiny_dir, ids, tmp_path, preset):
    handle = lowbit.quantize(load_model(tiny_dir), preset)
    model = handle.module
    with torch.no_grad():
        prepare_model(model, "reference")
        ref = model(ids).logits
        plans = prepare_model(model, "auto")
        fast = model(ids).logits
    assert all(p.fast for p in plans.values())
    assert _rel(fast, ref) < 2 * _tol("int8dyn" if preset == "w8a8-dynamic" else "")
    assert (fast.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    out = lowbit.save(handle, tmp_path / "a")  # saving a model on fast kernels stores the same artifact
    back = load_artifact(out).module
    prepare_model(back, "reference")
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref)


# -- the lean decode loop and KV-cache quantization ------------------------------------------------
def _hf_greedy(model, ids, n, **kw):
    return model.generate(ids, max_new_tokens=n, do_sample=False, temperature=None, top_p=None, top_k=None, **kw)[:, ids.shape[1]:]


def test_lean_decode_equals_transformers_greedy(ids):
    from tests.conftest import make_tiny_llama
    from lowbit.runtime.decode import lean_generate

    model = make_tiny_llama()
    with torch.no_grad():
        assert torch.equal(lean_generate(model, ids, 24), _hf_greedy(model, ids, 24))
        assert torch.equal(lean_generate(model, ids, 24, repetition_penalty=1.1),
                           _hf_greedy(model, ids, 24, repetition_penalty=1.1))


@pytest.mark.parametrize("preset", ["int8", "w4-g32"])
def test_lean_decode_fuses_projections_without_changing_tokens_or_memory(ids, preset, tmp_path):
    """q/k/v and gate/up run as one kernel call each: same tokens as transformers' generate over the
    separate modules, same bytes held, and the modules still save the same tensors."""
    from tests.conftest import make_tiny_llama, make_tokenizer
    from lowbit.model.artifact import save_artifact
    from lowbit.model.handle import Model
    from lowbit.model.quantize import quantize_model
    from lowbit.recipe import PRESETS
    from lowbit.runtime.decode import LeanDecoder, lean_generate

    model = make_tiny_llama()
    plans = quantize_model(model, PRESETS[preset])
    held = sum(m.memory_bytes for m in model.modules() if isinstance(m, QLinear))
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    dec = LeanDecoder(model, 1, 64)
    from lowbit import native

    if not native.available():  # fusing concatenates lowbit's own layouts only
        assert all(f is None for f in dec.qkv + dec.gate_up)
        return
    assert all(f is not None for f in dec.qkv + dec.gate_up)
    assert dec.qkv[0].plan.name == ("int8pack" if preset == "int8" else "int4pack")
    with torch.no_grad():
        assert torch.equal(lean_generate(model, ids, 16, decoder=dec), _hf_greedy(model, ids, 16))
    assert sum(m.memory_bytes for m in model.modules() if isinstance(m, QLinear)) == held
    after = model.state_dict()
    assert after.keys() == saved.keys() and all(torch.equal(after[k], saved[k]) for k in saved)
    save_artifact(Model(model, make_tokenizer(), plan=plans, recipe=PRESETS[preset]), tmp_path / "art")  # slices of the fused tensors save on their own
    back = load_artifact(tmp_path / "art").module.state_dict()
    assert all(torch.equal(back[k], saved[k]) for k in saved)


def test_lean_decode_left_padded_batch_equals_single_rows():
    from tests.conftest import make_tiny_llama
    from lowbit.runtime.decode import lean_generate

    model = make_tiny_llama(seed=3)
    g = torch.Generator().manual_seed(0)
    short, long = torch.randint(0, 256, (1, 7), generator=g), torch.randint(0, 256, (1, 13), generator=g)
    batch = torch.cat([torch.cat([torch.full((1, 6), 257), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :6] = 0
    with torch.no_grad():
        both = lean_generate(model, batch, 12, attention_mask=mask)
        assert torch.equal(both[0:1], lean_generate(model, short, 12))
        assert torch.equal(both[1:2], lean_generate(model, long, 12))
        assert torch.equal(both, _hf_greedy(model, batch, 12, attention_mask=mask, pad_token_id=257))


@pytest.mark.parametrize("kind,tol", [("int8", 0.02), ("fp8", 0.08)])
def test_quantized_kv_cache_close_to_float_in_both_engines(kind, tol):
    from tests.conftest import make_tiny_llama
    from lowbit.runtime.decode import LeanDecoder
    from lowbit.model.kvcache import QuantizedKVCache, kv_bytes_per_token

    model = make_tiny_llama(seed=1)
    x = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x).logits
        hf_cache = QuantizedKVCache(kind, model.config)
        hf = model(x, cache=hf_cache).logits
        dec = LeanDecoder(model, 2, 64, kind)
        lean = dec.prefill(x)
        step = dec.step(torch.tensor([[5], [6]]))
        full = model(torch.cat([x, torch.tensor([[5], [6]])], 1)).logits[:, -1]
    assert 0 < _rel(hf, ref) < tol
    assert 0 < _rel(lean, ref[:, -1]) < tol and _rel(step, full) < tol
    assert torch.allclose(lean, hf[:, -1], atol=1e-4)  # one format, two engines: the same numbers
    # 2 layers, 2 KV heads of 16 dims, 2 rows x 48 tokens: codes plus one fp32 scale per token-head
    assert hf_cache.nbytes == kv_bytes_per_token(2, 2, 16, kind) * 2 * 48
    assert kv_bytes_per_token(2, 2, 16, kind) / kv_bytes_per_token(2, 2, 16, "none") == pytest.approx(20 / 64)


def test_kv_cache_bad_kind_and_unsupported_architecture():
    from types import SimpleNamespace

    from lowbit.errors import LowbitError
    from lowbit.model.kvcache import QuantizedKVCache, check_architecture

    with pytest.raises(LowbitError, match="int8, fp8"):
        QuantizedKVCache("int4")
    cfg = SimpleNamespace(model_type="qwen3_next", layer_types=["linear_attention", "full_attention"])
    with pytest.raises(LowbitError, match="linear_attention"):
        check_architecture(cfg)


def _tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                           max_position_embeddings=256, query_pre_attn_scalar=16, tie_word_embeddings=True)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms (Gemma scales by 1 + w) and visible weights
        for p in model.parameters():
            p.normal_(0, 0.08 if p.ndim == 2 else 0.3)
    return model


def test_lean_decode_gemma3_sliding_windows_equal_transformers():
    """Prompts longer than the sliding window, left padding, q/k norms and (1 + w) norms: same tokens as HF."""
    from lowbit.runtime.decode import LeanDecoder, lean_generate

    model = _tiny_gemma3()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (1, 20), generator=g)
    with torch.no_grad():
        dec = LeanDecoder(model, 1, 64)
        assert torch.allclose(dec.prefill(ids), model(ids).logits[:, -1], atol=1e-5)
        assert torch.equal(lean_generate(model, ids, 20), _hf_greedy(model, ids, 20))
        a, b = torch.randint(0, 300, (1, 6), generator=g), torch.randint(0, 300, (1, 14), generator=g)
        batch = torch.cat([torch.cat([torch.zeros(1, 8, dtype=torch.long), a], 1), b])
        mask = torch.ones_like(batch)
        mask[0, :8] = 0
        both = lean_generate(model, batch, 12, attention_mask=mask)
        assert torch.equal(both, _hf_greedy(model, batch, 12, attention_mask=mask, pad_token_id=0))
        assert torch.equal(both[0:1], lean_generate(model, a, 12))


def test_quantized_gemma3_embedding_reads_head_rows(tmp_path):
    """A tied Gemma head quantized to INT8 serves the (scaled) embedding lookups; save/load keeps it."""
    from lowbit.model.qlinear import QEmbedding
    from lowbit.recipe import PRESETS

    model = _tiny_gemma3()
    emb = model.get_input_embeddings()
    ids = torch.tensor([[1, 5, 7, 299]])
    with torch.no_grad():
        want = emb(ids)
        lowbit.quantize(model, PRESETS["int8"])
        got = model.get_input_embeddings()(ids)
    assert isinstance(model.get_input_embeddings(), QEmbedding)
    assert _rel(got, want) < 0.01 and got.dtype == want.dtype


def test_recipe_kv_cache_travels_with_the_artifact(tiny_dir, tmp_path, ids):
    from lowbit.recipe import PRESETS, Recipe
    from lowbit.model.kvcache import kv_of

    recipe = Recipe.from_dict({**PRESETS["int8"].to_dict(), "name": "int8-kv8", "kv_cache": "int8"})
    handle = lowbit.quantize(load_model(tiny_dir), recipe)
    model = handle.module
    assert kv_of(model) == "int8"
    out = lowbit.save(handle, tmp_path / "a")
    back = load_artifact(out).module
    assert kv_of(back) == "int8"
    with torch.no_grad():  # the attached cache is used by whole-sequence forwards, and differs from float K/V
        with_kv = back(ids).logits
        from lowbit.model.kvcache import attach

        attach(back, "none")
        plain = back(ids).logits
    assert 0 < _rel(with_kv, plain) < 0.05
    with pytest.raises(Exception, match="kv_cache"):
        Recipe.from_dict({**PRESETS["int8"].to_dict(), "kv_cache": "int4"})
