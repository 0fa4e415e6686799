"""GGUF exports that cannot be written from lowbit's codes quantize the float model the artifact came
from, when lowbit.json names it and it is still there with the same sha256; otherwise they requantize
lowbit's codes and say what that costs. The notes say which was done."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.exporters import gguf as g
from lowbit.exporters.gguf_source import float_source_for, recorded_source
from lowbit.exporters.gguf_tensors import maybe_permute
from lowbit.formats import QuantSpec, ggml
from lowbit.model.qlinear import QLinear
from lowbit.recipe import Override, Recipe
from tests.conftest import make_tiny_llama, save_hf

W4_SYM_G32 = QuantSpec(kind="int", bits=4, granularity="group", group_size=32, scale_dtype="float16")  # == Q4_0
W4_ASYM_G32 = QuantSpec(kind="int", bits=4, granularity="group", group_size=32, symmetric=False,
                        scale_dtype="float16")  # integer zero point: no GGUF type holds it exactly


def make_artifact(root: Path, recipe="w4-g128", imatrix: bool = False, **model_kw) -> tuple[Path, Path]:
    """(float folder, artifact folder): the tiny Llama saved as a Hugging Face folder, quantized, saved."""
    model = make_tiny_llama(**model_kw)
    with torch.no_grad():  # norm gains off 1.0, so float32 and the artifact's float16 copies differ
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    folder = save_hf(model, root / "float")
    q = lowbit.quantize(lowbit.load(folder), recipe)
    if imatrix:  # as calibration would record it: mean x**2 per input channel of each quantized module
        torch.manual_seed(7)
        q.imatrix = {n: torch.rand(m.in_features) + 0.1 for n, m in q.module.named_modules() if isinstance(m, QLinear)}
    return folder, lowbit.save(q, root / "art")


def edit_meta(art: Path, change) -> None:
    meta = json.loads((art / "lowbit.json").read_text())
    change(meta)
    (art / "lowbit.json").write_text(json.dumps(meta))


def tensors(path: Path) -> dict:
    return {t.name: t for t in GGUFReader(str(path)).tensors}


def gguf_name(hf_name: str, n_layers: int = 2) -> str:
    from gguf import MODEL_ARCH, get_tensor_name_map

    return get_tensor_name_map(MODEL_ARCH.LLAMA, n_layers).get_name(hf_name, try_suffixes=(".weight", ".bias"))


@pytest.fixture()
def w4(tmp_path) -> tuple[Path, Path]:
    return make_artifact(tmp_path)


# -- finding the float source -----------------------------------------------------------------------
def test_the_recorded_float_source_is_found_and_checked(w4):
    folder, art = w4
    meta = json.loads((art / "lowbit.json").read_text())
    fs = float_source_for(None, art)
    assert fs.usable and fs.arg == fs.where == str(folder) and fs.sha256 == meta["source"]["sha256"]
    assert fs.per_module and fs.algorithm == "rtn"  # RTN quantizes each module on its own
    assert recorded_source(None, art)[0] == meta["source"]
    given = {"kind": "hf", "path": "/nowhere", "sha256": "0" * 64}
    assert recorded_source(given, art)[0] is given  # the identity the model carries wins over the folder's record
    assert not float_source_for(None, None).usable and "no float source is recorded" in float_source_for(None, None).why_not


def test_a_moved_changed_or_unverifiable_source_is_not_used(w4, tmp_path):
    folder, art = w4
    sd = load_file(str(folder / "model.safetensors"))
    sd["model.norm.weight"] = sd["model.norm.weight"] + 1
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    fs = float_source_for(None, art)
    assert not fs.usable and "has changed since it was quantized" in fs.why_not
    shutil.rmtree(folder)
    fs = float_source_for(None, art)
    assert not fs.usable and fs.why_not == f"not found at {folder}"
    for source, why in [
        ({"kind": "hf", "path": str(tmp_path)}, "no sha256"),
        ({"kind": "compressed-tensors", "path": str(tmp_path), "sha256": "0" * 64}, "not float weights"),
        ({"kind": "lowbit", "path": str(art), "sha256": "0" * 64}, "not float weights"),
        ({"kind": "bundled", "name": str(tmp_path / "x.gguf"), "sha256": "0" * 64}, "not a bundled model name"),
        ({"kind": "gguf", "path": str(art), "sha256": "0" * 64}, "is now a lowbit model"),
        ({"kind": "hf", "sha256": "0" * 64}, "names no path"),
    ]:
        fs = float_source_for(source)
        assert not fs.usable and why in fs.why_not, (source, fs.why_not)


def test_a_source_without_a_recorded_sha256_is_not_read(w4, tmp_path, monkeypatch):
    _, art = w4
    foreign = tmp_path / "elsewhere" / "foreign.gguf"
    foreign.parent.mkdir()
    foreign.write_bytes(b"GGUF" + b"\0" * 64)
    edit_meta(art, lambda m: m.update(source={"name": "x", "kind": "gguf", "path": str(foreign)}))
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: (opened.append(str(p)), real_open(p, *a, **k))[1])
    res = lowbit.export(lowbit.load(art), format="gguf", out=tmp_path / "out.gguf")
    monkeypatch.undo()
    assert str(foreign) not in opened and res.from_float == 0
    assert any(f"not from the float source (no sha256 of {foreign} is recorded" in n for n in res.notes), res.notes


# -- gguf-py types: from the float weights ------------------------------------------------------------
def test_auto_export_quantizes_the_float_source_not_lowbits_codes(w4, tmp_path):
    folder, art = w4
    res = lowbit.export(art, format="gguf", out=tmp_path / "m.gguf")
    assert res.exact == 0 and res.requantized == res.from_float == 2 * 7 + 1 and res.float_source == str(folder)
    assert any(n.startswith(f"read from the float source {folder} (sha256 ") for n in res.notes), res.notes
    assert any("quantized from the float source (no exact GGUF equivalent) int4 asym g64 -> Q4_1" in n for n in res.notes)
    assert not any("requantized from lowbit's" in n for n in res.notes)
    fl = lowbit.load(folder).module
    config = fl.config
    got = tensors(res.path)
    state = fl.state_dict()
    for hf_name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                    "model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"):
        t = got[gguf_name(hf_name)]
        want = ggml.QUANTIZERS[t.tensor_type.name](maybe_permute(state[hf_name], hf_name, config))
        assert np.asarray(t.data).tobytes() == want.numpy().tobytes(), hf_name  # the float weight, quantized once
    assert got["token_embd.weight"].tensor_type.name == "Q8_0"  # the INT8 head, tied: the embedding table
    # kept tensors come from the float model too (the artifact stored them in float16)
    norm = state["model.layers.0.input_layernorm.weight"]
    assert not torch.equal(norm.half().float(), norm)
    assert np.array_equal(np.asarray(got["blk.0.attn_norm.weight"].data), norm.numpy())


def test_without_the_float_source_the_codes_are_requantized_and_the_notes_say_so(w4, tmp_path):
    folder, art = w4
    shutil.move(folder, tmp_path / "moved")
    loaded = lowbit.load(art)
    res = lowbit.export(loaded, format="gguf", out=tmp_path / "m.gguf")
    assert res.exact == 0 and res.requantized == 15 and res.from_float == 0 and res.float_source is None
    assert any(n.startswith("requantized from lowbit's int4 asym g128, int4 asym g64, int8 ch codes, not from the float "
                            f"source (not found at {folder}): expect more error") for n in res.notes), res.notes
    mod = loaded.module.model.layers[0].mlp.up_proj
    want = ggml.quantize_q4_1(mod.dequantized_weight(torch.float32))
    assert np.asarray(tensors(res.path)["blk.0.ffn_up.weight"].data).tobytes() == want.numpy().tobytes()


def test_use_float_source_false_keeps_to_lowbits_weights(w4, tmp_path):
    _, art = w4
    loaded = lowbit.load(art)
    res = lowbit.export(loaded, format="gguf", out=tmp_path / "m.gguf", type="Q4_0", from_float=False)
    assert res.requantized == 15 and res.from_float == 0
    assert any("not from the float source (asked for: --from-codes / from_float=False)" in n for n in res.notes), res.notes
    mod = loaded.module.model.layers[0].mlp.up_proj
    want = ggml.quantize_q4_0(mod.dequantized_weight(torch.float32))
    assert np.asarray(tensors(res.path)["blk.0.ffn_up.weight"].data).tobytes() == want.numpy().tobytes()


def test_float_types_hold_lowbits_weights_and_never_read_the_source(w4, tmp_path):
    _, art = w4
    loaded = lowbit.load(art)
    res = lowbit.export(loaded, format="gguf", type="F32", out=tmp_path / "m.gguf")
    assert res.from_float == 0 and not any("float source" in n for n in res.notes)
    mod = loaded.module.model.layers[0].mlp.up_proj
    assert np.array_equal(np.asarray(tensors(res.path)["blk.0.ffn_up.weight"].data),
                          mod.dequantized_weight(torch.float32).numpy())


def test_exact_blocks_stay_beside_float_weights_only_when_each_module_was_quantized_alone(tmp_path):
    recipe = Recipe(name="mixed", scheme=W4_ASYM_G32, ignore=("lm_head",), overrides=(Override("*.down_proj", W4_SYM_G32),))
    folder, art = make_artifact(tmp_path, recipe)
    loaded = lowbit.load(art)
    state = lowbit.load(folder).module.state_dict()
    res = lowbit.export(loaded, format="gguf", out=tmp_path / "m.gguf")
    assert res.exact == 2 and res.requantized == res.from_float == 12
    got = tensors(res.path)
    down = loaded.module.model.layers[1].mlp.down_proj
    assert got["blk.1.ffn_down.weight"].tensor_type == GGMLQuantizationType.Q4_0
    assert np.asarray(got["blk.1.ffn_down.weight"].data).tobytes() == ggml.blocks_from_qtensor(down.qtensor())[1].numpy().tobytes()
    up = ggml.quantize_q4_1(state["model.layers.1.mlp.up_proj.weight"])
    assert np.asarray(got["blk.1.ffn_up.weight"].data).tobytes() == up.numpy().tobytes()
    # AWQ moves scales between modules and into the norms: float weights cannot stand beside its exact blocks
    edit_meta(art, lambda m: m["recipe"].update(algorithm="awq"))
    res = lowbit.export(lowbit.load(art), format="gguf", out=tmp_path / "m.gguf", force=True)
    assert res.exact == 2 and res.requantized == 12 and res.from_float == 0
    assert any("not from the float source (2 module(s) are written block for block beside them, and the recorded "
               "algorithm (awq) may have moved scales" in n for n in res.notes), res.notes


def test_a_source_whose_tensors_are_not_the_models_is_not_used(tmp_path):
    _, art = make_artifact(tmp_path)
    other = save_hf(make_tiny_llama(intermediate_size=96), tmp_path / "other")
    digest = lowbit.load(other).source["sha256"]
    edit_meta(art, lambda m: m.update(source={"name": "other", "kind": "hf", "path": str(other), "sha256": digest}))
    res = lowbit.export(art, format="gguf", out=tmp_path / "m.gguf")
    assert res.from_float == 0 and res.requantized == 15
    assert any(f"{other} is not this model's float source: its tensor model.layers.0.mlp.gate_proj.weight is (96, 64), "
               "the model's is (128, 64)" in n for n in res.notes), res.notes


# -- K-quants: llama.cpp quantizes the float model ----------------------------------------------------
def test_k_quant_export_is_llama_cpps_quantization_of_the_float_source(tmp_path):
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed: K-quants are made by llama.cpp")
    from lowbit.exporters import llamacpp
    from lowbit.exporters.gguf_tensors import imatrix_by_gguf_name

    folder, art = make_artifact(tmp_path, imatrix=True)
    loaded = lowbit.load(art)
    res = lowbit.export(loaded, format="gguf", type="Q4_K_M", out=tmp_path / "k.gguf")
    assert res.requantized == res.from_float == 15 and res.float_source == str(folder)
    assert any(f"quantized by llama.cpp (Q4_K_M) from the float source {folder} (sha256 " in n
               and "with lowbit's importance matrix for 14 tensors" in n for n in res.notes), res.notes
    # the same bytes as llama.cpp's own Q4_K_M of an F32 GGUF of the float model, with the same imatrix
    fl = lowbit.load(folder)
    base = g.write_gguf(fl.module, tmp_path / "f32.gguf", "F32", fl.source, fl.folder)
    imx = {k: v for k, v in imatrix_by_gguf_name(loaded.imatrix, 2).items() if k in base.tensor_types}
    llamacpp.quantize(tmp_path / "f32.gguf", tmp_path / "ref.gguf", "Q4_K_M", imatrix=imx)
    ours, ref = tensors(res.path), tensors(tmp_path / "ref.gguf")
    assert ours.keys() == ref.keys()
    for name, t in ref.items():
        assert ours[name].tensor_type == t.tensor_type and np.asarray(ours[name].data).tobytes() == np.asarray(t.data).tobytes(), name
    # the float model gone: llama.cpp requantizes lowbit's dequantized weights, and the notes say what that costs
    shutil.rmtree(folder)
    res = lowbit.export(lowbit.load(art), format="gguf", type="Q4_K_M", out=tmp_path / "k2.gguf")
    assert res.requantized == 15 and res.from_float == 0 and res.float_source is None
    assert any("from the F32 dequantization of the model, with lowbit's importance matrix" in n for n in res.notes)
    assert any(f"not from the float source (not found at {folder}): expect more error" in n for n in res.notes), res.notes
    diff = [n for n, t in tensors(res.path).items() if np.asarray(t.data).tobytes() != np.asarray(ref[n].data).tobytes()]
    assert "blk.0.ffn_up.weight" in diff  # rounded twice: not the float model's quantization
