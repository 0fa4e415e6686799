"""Tier 4 (end to end, tiny): quantize -> save -> reload -> identical logits -> generate."""

import json
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.formats import QuantSpec, dequantize_tensor
from lowbit.runtime.generate import complete
from lowbit.model.load import load_model, load_streaming
from lowbit.model.qlinear import QEmbedding, QLinear, prepare_model
from lowbit.model.quantize import round_kept
from lowbit.recipe import PRESETS, Recipe
from tests.conftest import make_tiny_llama, save_hf


def kld(p_logits, q_logits):
    p = p_logits.log_softmax(-1)
    return (p.exp() * (p - q_logits.log_softmax(-1))).sum(-1).mean().item()


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_round_trips_exactly(name, tiny_dir, ids, tmp_path):
    loaded = load_model(tiny_dir)
    with torch.no_grad():
        base = loaded.module(ids).logits
    lowbit.quantize(loaded, name)
    with torch.no_grad():
        q = loaded.module(ids).logits
    assert sum(isinstance(m, QLinear) for m in loaded.module.modules()) == 15  # 7 per layer and the head
    shared = isinstance(loaded.module.get_input_embeddings(), QEmbedding)
    assert shared  # every preset's head is INT8/FP8 per row, so the tied table is its rows
    lowbit.save(loaded, tmp_path / "art")
    meta = json.loads((tmp_path / "art" / "lowbit.json").read_text())
    assert meta.get("embedding") == "lm_head"
    assert meta["source"]["sha256"] == loaded.source["sha256"] and len(meta["source"]["sha256"]) == 64
    assert meta["recipe"]["name"] == name and meta["lowbit_version"] == lowbit.__version__
    reloaded = lowbit.load(tmp_path / "art")
    with torch.no_grad():
        again = reloaded(ids).logits
    assert torch.equal(q, again)
    assert 0 < kld(base, q) < (0.05 if "4" in name else 0.01)


def test_quantized_forward_equals_dequantized_weights(tiny_dir, ids):
    """QLinear's reference forward is F.linear with the dequantized weight: a float model given those weights agrees."""
    model = load_model(tiny_dir).module
    ref = load_model(tiny_dir).module
    lowbit.quantize(model, "w4-g32")
    prepare_model(model, "reference")
    round_kept(ref, "float16")  # what quantize does to the kept tensors
    for name, m in model.named_modules():
        if isinstance(m, QLinear):
            ref.get_submodule(name).weight.data = dequantize_tensor(m.qtensor())
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5)


def test_dynamic_int8_matches_its_float_emulation():
    lin = torch.nn.Linear(64, 32)
    spec = PRESETS["w8a8-dynamic"].scheme
    q = QLinear.from_linear(lin, spec)
    q.prepare("reference")  # the format's definition; the fast kernel is held to it in test_kernels.py
    x = torch.randn(3, 5, 64)
    sx = x.abs().amax(-1, keepdim=True) / 127
    xq = torch.clamp(torch.round(x / sx), -127, 127)
    w = q.qdata.float() * q.scale.float()
    expect = (xq * sx) @ w.T + lin.bias
    assert torch.allclose(q(x), expect, atol=1e-4)
    assert q(x).shape == (3, 5, 32)


def test_untied_quantized_head_round_trips(tmp_path, ids):
    folder = save_hf(make_tiny_llama(tie=True), tmp_path / "m")
    loaded = load_model(folder)
    recipe = Recipe(scheme=QuantSpec(kind="int", bits=8), ignore=())  # quantize the tied head too
    lowbit.quantize(loaded, recipe)
    assert isinstance(loaded.module.lm_head, QLinear)
    with torch.no_grad():
        q = loaded.module(ids).logits
    lowbit.save(loaded, tmp_path / "art")
    with torch.no_grad():
        assert torch.equal(lowbit.load(tmp_path / "art")(ids).logits, q)


def test_load_in_4bit_streams_and_matches_in_memory(tiny_dir, ids):
    streamed = lowbit.load(tiny_dir, load_in_4bit=True, quant_type="nf4", double_quant=True, group_size=32,
                           compute_dtype=torch.float32)
    in_mem = load_model(tiny_dir).module
    lowbit.quantize(in_mem, Recipe(scheme=QuantSpec(kind="nf4", bits=4, granularity="group", group_size=32,
                                                     double_quant=True), keep_dtype="float32"))
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, in_mem(ids).logits)
    bf16 = lowbit.load(tiny_dir, load_in_4bit=True, compute_dtype=torch.bfloat16)
    assert bf16.module.model.embed_tokens.weight.dtype == torch.bfloat16
    assert isinstance(bf16.module.model.layers[0].mlp.up_proj, QLinear)
    with torch.no_grad():
        assert bf16(ids).logits.dtype == torch.bfloat16


def test_streaming_never_materialises_the_float_model(tiny_dir, monkeypatch):
    """Every float weight tensor is quantized as it arrives: at most one is alive at a time."""
    import lowbit.model.load as load_mod

    seen = []
    real = load_mod.QLinear.from_weight
    monkeypatch.setattr(load_mod.QLinear, "from_weight",
                        classmethod(lambda cls, w, spec, bias=None: (seen.append(w.shape), real(w, spec, bias))[1]))
    model = load_streaming(tiny_dir, PRESETS["int8"], torch.float32).module
    assert len(seen) == 15  # 7 per layer, and the tied head built from the embedding table as it arrives
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert isinstance(model.get_input_embeddings(), QEmbedding)
    ids = torch.tensor([[256, 72, 101, 108, 108, 111]])
    in_memory = load_model(tiny_dir).module
    lowbit.quantize(in_memory, "int8")
    with torch.no_grad():  # same tensors either way (the streaming path skips round_kept's fp16 rounding of norms)
        assert torch.allclose(model(ids).logits, in_memory(ids).logits, atol=1e-2)


def test_generate_runs_on_reloaded_artifact(tiny_dir, tmp_path):
    loaded = load_model(tiny_dir)
    lowbit.quantize(loaded, "int8")
    lowbit.save(loaded, tmp_path / "art")
    reloaded = load_model(tmp_path / "art")
    text = complete(reloaded.module, reloaded.tokenizer, "Hello", max_new_tokens=8, chat=False)
    assert isinstance(text, str) and len(text) > 0


def test_nan_weights_are_refused_and_model_untouched(tmp_path):
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    with pytest.raises(LowbitError, match=r"model\.layers\.1\.mlp\.down_proj.*NaN"):
        lowbit.quantize(model, "int8")
    assert not any(isinstance(m, QLinear) for m in model.modules())


def test_indivisible_group_size_errors_or_shrinks():
    model = make_tiny_llama()  # in_features 64 and 128
    strict = Recipe(scheme=QuantSpec(kind="int", bits=4, granularity="group", group_size=48))
    with pytest.raises(LowbitError, match=r"in_features 64 is not divisible by group_size 48"):
        lowbit.quantize(model, strict)
    assert not any(isinstance(m, QLinear) for m in model.modules())
    shrink = Recipe(scheme=QuantSpec(kind="int", bits=4, granularity="group", group_size=48), group_fallback="shrink")
    with pytest.raises(LowbitError, match="not divisible"):  # 48 -> 24 -> 12 does not divide 64 either
        lowbit.quantize(model, shrink)
    plans = lowbit.quantize(model, "w4-g128").plan  # 128 -> 64 on 64-wide rows
    head = next(p for p in plans if p.name == "lm_head")
    assert head.spec.label == "int8 ch"  # the preset's head override
    groups = {p.name.rsplit(".", 1)[1]: p.spec.group_size for p in plans if p.spec and p is not head}
    assert groups == {"q_proj": 64, "k_proj": 64, "v_proj": 64, "o_proj": 64, "gate_proj": 64, "up_proj": 64,
                      "down_proj": 128}


@pytest.mark.parametrize("preset", ["w4-g32", "w8a8-dynamic"])
def test_biased_linears_round_trip(tmp_path, ids, preset):
    """Layers with biases (Qwen-style attention_bias, mlp_bias) keep them through save/load and streaming."""
    folder = save_hf(make_tiny_llama(attention_bias=True, mlp_bias=True), tmp_path / "biased")
    loaded = load_model(folder)
    lowbit.quantize(loaded, preset)
    assert loaded.module.model.layers[0].self_attn.q_proj.bias is not None
    with torch.no_grad():
        q = loaded.module(ids).logits
    lowbit.save(loaded, tmp_path / "art")
    with torch.no_grad():
        assert torch.equal(lowbit.load(tmp_path / "art")(ids).logits, q)
    streamed = lowbit.load(folder, load_in_8bit=True, compute_dtype=torch.float32)
    assert streamed.module.model.layers[1].mlp.down_proj.bias is not None
    with torch.no_grad():
        assert torch.isfinite(streamed(ids).logits).all()


def test_sharded_checkpoint_loads_both_ways(tmp_path, ids):
    model = make_tiny_llama()
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="100KB")
    from tests.conftest import make_tokenizer

    make_tokenizer().save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) > 1
    in_mem = load_model(folder)
    lowbit.quantize(in_mem, Recipe(scheme=PRESETS["int8"].scheme, keep_dtype="float32"))
    streamed = lowbit.load(folder, load_in_8bit=True, compute_dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, in_mem.module(ids).logits)
    assert len(in_mem.source["sha256"]) == 64


def test_an_artifact_written_by_lowbit_0_1_0_still_loads_to_its_logits():
    """tests/data/artifact-0.1.0: a GPTQ W4 artifact of the tiny random test model (not real weights),
    written by lowbit 0.1.0 before the public API moved to lowbit.Model, with the logits that release
    computed from it. The format is unchanged, so this release must read it to the same floats."""
    from safetensors.torch import load_file

    data = Path(__file__).resolve().parents[1] / "data"
    want = load_file(str(data / "artifact-0.1.0-logits.safetensors"))
    m = lowbit.load(data / "artifact-0.1.0")
    assert m.quantized and m.is_artifact and m.recipe.algorithm == "gptq"
    assert set(m.imatrix) == {p.name for p in m.plan if p.spec is not None and p.name != "lm_head"}
    assert m.calibration["method"] == "gptq" and m.meta["lowbit_version"] == "0.1.0"
    with torch.no_grad():
        assert torch.equal(m(want["ids"]).logits, want["logits"])
