"""The public API's contract: one handle, keyword-only settings, clear refusals, models in memory used as they are."""

from __future__ import annotations

import importlib

import pytest
import torch

import lowbit
from lowbit import CalibConfig, EvalConfig
from lowbit.errors import LowbitError
from tests.conftest import make_tiny_llama, make_tokenizer


def test_verbs_are_not_shadowed_by_subpackages():
    for sub in ("lowbit.exporters.gguf", "lowbit.benchmark.latency", "lowbit.eval.gate", "lowbit.model.load",
                "lowbit.runtime.generate", "lowbit.calib"):
        importlib.import_module(sub)
    from lowbit import api

    for verb in ("load", "quantize", "save", "evaluate", "gate", "bench", "export", "generate"):
        assert getattr(lowbit, verb) is getattr(api, verb), verb


def test_settings_are_keyword_only():
    with pytest.raises(TypeError, match="positional"):
        lowbit.quantize(make_tiny_llama(), "w4-g32", "gptq")


def test_quantize_returns_the_handle_with_plan_and_recipe():
    m = lowbit.quantize(make_tiny_llama(), "w4-g32", tokenizer=make_tokenizer())
    assert isinstance(m, lowbit.Model) and m.quantized and m.recipe.name == "w4-g32"
    assert {p.name for p in m.plan if p.spec is not None} >= {"lm_head", "model.layers.0.mlp.down_proj"}
    assert not any(n.startswith("lowbit_") for n in vars(m.module))  # nothing rides on the module
    with pytest.raises(LowbitError, match="already quantized"):
        lowbit.quantize(m, "int8")


def test_save_refuses_what_could_not_be_loaded_back(tmp_path):
    with pytest.raises(LowbitError, match="not been quantized"):
        lowbit.save(lowbit.Model(make_tiny_llama(), make_tokenizer()), tmp_path / "a")
    with pytest.raises(LowbitError, match="no tokenizer"):
        lowbit.save(lowbit.quantize(make_tiny_llama(), "int8"), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_calibration_without_a_tokenizer_says_how_to_give_one():
    with pytest.raises(LowbitError, match="tokenizer"):
        lowbit.quantize(make_tiny_llama(), "w4-g32", calib=CalibConfig(method="gptq", data=["some text " * 40]))


def test_evaluate_uses_models_in_memory_without_reloading(tiny_dir, monkeypatch):
    base = lowbit.load(tiny_dir)
    cand = lowbit.quantize(lowbit.load(tiny_dir), "int8")
    import lowbit.eval.run as run_mod

    monkeypatch.setattr(run_mod, "load_model", lambda *a, **k: pytest.fail("evaluate reloaded a model"))
    run = lowbit.evaluate(base, cand, suites=(), config=EvalConfig(quick=True, samples=2, seq_len=32))
    assert run["candidate"]["recipe"] == "int8" and run["suites"] == []
    assert 0 <= run["divergence"]["mean_kld"] < 0.5 and run["divergence"]["samples"] == 2


def test_export_and_generate_check_their_options_first(tiny_dir, tmp_path):
    with pytest.raises(LowbitError, match="unknown; use gguf or compressed-tensors"):
        lowbit.export(str(tmp_path / "nothing-here"), format="zip", out=tmp_path / "x")
    with pytest.raises(LowbitError, match="--type: applies to --format gguf only"):
        lowbit.export(str(tmp_path / "nothing-here"), format="compressed-tensors", type="Q4_0", out=tmp_path / "y")
    with pytest.raises(LowbitError, match="prompt is empty"):
        lowbit.generate(str(tmp_path / "nothing-here"), "  ")
    m = lowbit.quantize(lowbit.load(tiny_dir), "w4-g32")
    pieces = []
    out = lowbit.generate(m, "Hello", max_new_tokens=4, on_text=pieces.append)
    assert out.tokens == 4 and out.text == "".join(pieces) and out.engine
    res = lowbit.export(m, format="gguf", out=tmp_path / "m.gguf")
    assert res.path.stat().st_size > 0 and res.exact + res.requantized == 15


def test_an_artifact_just_saved_is_checked_without_hashing_its_files_again(tiny_dir, tmp_path, monkeypatch):
    from lowbit.exporters.inspect import artifact_summary
    from lowbit.model import sources

    out = lowbit.save(lowbit.quantize(lowbit.load(tiny_dir), "w4-g32"), tmp_path / "a")
    monkeypatch.setattr(sources, "sha256_files", lambda paths: pytest.fail(f"hashed again: {paths}"))
    assert artifact_summary(out)["modules"]  # the weights' sha256 was remembered when they were written
