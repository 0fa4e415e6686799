"""`lowbit export` on the tiny model: both formats, refusals with exit 2, nothing half-written."""

from __future__ import annotations

import json

import pytest
from gguf import GGUFReader
from tests.test_cli import assert_clean_failure, run


@pytest.fixture(scope="module")
def w4_artifact(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "w4"
    assert run("quantize", "--model", tiny_dir, "--recipe", "w4-g32", "--out", out).exit_code == 0
    return out


def test_export_gguf_auto(w4_artifact, tmp_path):
    out = tmp_path / "m.gguf"
    r = run("export", w4_artifact, "--format", "gguf", "--out", out)
    assert r.exit_code == 0, r.output
    assert "requantized" in r.output and "Q4_1" in r.output  # int4 asym (int zero point) is not Q4_1 exactly
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(out)).tensors}
    # the preset's INT8 head is the tied embedding table: written once, as token_embd (Q8_0, requantized)
    assert types["blk.0.ffn_up.weight"] == "Q4_1" and types["token_embd.weight"] == "Q8_0" and "output.weight" not in types
    assert_clean_failure(run("export", w4_artifact, "--format", "gguf", "--out", out), "already exists", "--force")


def test_export_compressed_tensors(tiny_dir, tmp_path):
    art = tmp_path / "w8"
    assert run("quantize", "--model", tiny_dir, "--recipe", "int8", "--out", art).exit_code == 0
    out = tmp_path / "ct"
    r = run("export", art, "--format", "compressed-tensors", "--out", out)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"


def test_export_refusals(tiny_dir, w4_artifact, tmp_path):
    nf4 = tmp_path / "nf4"
    assert run("quantize", "--model", tiny_dir, "--recipe", "nf4", "--out", nf4).exit_code == 0
    out = tmp_path / "x.gguf"
    assert_clean_failure(run("export", nf4, "--format", "gguf", "--out", out), "NF4", "Q4_K_M", "IQ4_NL", out=out)
    assert_clean_failure(run("export", w4_artifact, "--format", "onnx", "--out", out), "gguf or compressed-tensors")
    assert_clean_failure(run("export", w4_artifact, "--format", "gguf", "--type", "Q7", "--out", out), "Q4_K_M")
    (w4_artifact.parent / "broken").mkdir()
    broken = w4_artifact.parent / "broken"
    for f in w4_artifact.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    st = broken / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])  # truncated weights
    assert_clean_failure(run("export", broken, "--format", "gguf", "--out", out), "model.safetensors", "truncated", out=out)
