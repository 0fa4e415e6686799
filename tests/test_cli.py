"""The CLI on the tiny model: the happy path, and every bad input exits 2 with one clear paragraph."""

import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from lowbit.cli import app
from tests.conftest import make_tiny_llama, save_hf

runner = CliRunner(env={"COLUMNS": "200"})


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_failure(result, *words, out=None):
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    text = " ".join(result.output.split())
    assert "Traceback" not in text
    for w in words:
        assert w in text, f"{w!r} not in: {text}"
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_quantize_info_generate(tiny_dir, tmp_path):
    out = tmp_path / "art"
    r = run("quantize", "--model", tiny_dir, "--recipe", "w4-g32", "--out", out)
    assert r.exit_code == 0, r.output
    assert "15 of 15 linear modules" in " ".join(r.output.split())
    assert (out / "lowbit.json").is_file() and (out / "model.safetensors").is_file()
    r = run("info", out)
    assert r.exit_code == 0, r.output
    assert "int4 asym g32" in r.output and "bits/weight" in r.output and "model.layers.1.mlp.down_proj" in r.output
    r = run("info", out, "--json")
    assert '"linear_bits_per_weight"' in r.output
    r = run("generate", out, "--prompt", "Hello", "-n", "5", "--raw")
    assert r.exit_code == 0, r.output
    r = run("quantize", "--model", tiny_dir, "--recipe", "int8", "--out", out)
    assert_clean_failure(r, "already exists", "--force")
    r = run("quantize", "--model", tiny_dir, "--recipe", "int8", "--out", out, "--force")
    assert r.exit_code == 0 and "'int8'" in r.output


def test_presets_and_help():
    r = run("presets")
    assert r.exit_code == 0 and "w4-g128" in r.output and "nf4" in r.output
    for cmd in ("quantize", "generate", "info", "presets"):
        r = run(cmd, "--help")
        assert r.exit_code == 0 and "Example:" in r.output


def test_missing_model_path(tmp_path):
    out = tmp_path / "o"
    assert_clean_failure(run("quantize", "--model", tmp_path / "nope", "--out", out), "nope", "no such file", out=out)


def test_folder_without_model(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "o"
    assert_clean_failure(run("quantize", "--model", tmp_path / "empty", "--out", out), "config.json", out=out)


def test_truncated_safetensors(tiny_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    out = tmp_path / "o"
    assert_clean_failure(run("quantize", "--model", bad, "--out", out), "model.safetensors", "truncated", out=out)


def test_garbage_safetensors_header(tiny_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    out = tmp_path / "o"
    assert_clean_failure(run("quantize", "--model", bad, "--out", out), "model.safetensors", "corrupt", out=out)


@pytest.mark.parametrize("content", [b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64, b"not a gguf file"])
def test_corrupt_gguf(tmp_path, content):
    g = tmp_path / "m.gguf"
    g.write_bytes(content)
    out = tmp_path / "o"
    assert_clean_failure(run("quantize", "--model", g, "--out", out), "m.gguf", "corrupt", out=out)


def test_indivisible_group_size(tiny_dir, tmp_path):
    rec = tmp_path / "r.yaml"
    rec.write_text("scheme: {kind: int, bits: 4, granularity: group, group_size: 48}\n")
    out = tmp_path / "o"
    assert_clean_failure(run("quantize", "--model", tiny_dir, "--recipe", rec, "--out", out),
                         "model.layers.0.self_attn.q_proj", "not divisible by group_size 48", "group_fallback", out=out)


def test_nan_weights(tmp_path):
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[0, 0] = float("inf")
    folder = save_hf(model, tmp_path / "nan")
    out = tmp_path / "o"
    assert_clean_failure(run("quantize", "--model", folder, "--out", out), "model.layers.0.self_attn.v_proj", "NaN/Inf", out=out)


def test_unknown_preset(tiny_dir, tmp_path):
    out = tmp_path / "o"
    assert_clean_failure(run("quantize", "--model", tiny_dir, "--recipe", "int5", "--out", out), "unknown preset 'int5'", "w4-g128", out=out)


@pytest.mark.parametrize("text, words", [
    ("scheme: {kind: int, bits: [\n", ["not valid YAML"]),
    ("scheme: {kind: int, bits: 9}\n", ["bits", "2 to 8"]),
    ("scheme: {kind: int}\nignored: [lm_head]\n", ["unknown field", "ignored"]),
    ("- just\n- a list\n", ["mapping"]),
])
def test_malformed_recipe(tiny_dir, tmp_path, text, words):
    rec = tmp_path / "r.yaml"
    rec.write_text(text)
    out = tmp_path / "o"
    assert_clean_failure(run("quantize", "--model", tiny_dir, "--recipe", rec, "--out", out), "r.yaml", *words, out=out)


def test_info_and_generate_on_non_artifacts(tmp_path):
    assert_clean_failure(run("info", tmp_path), "lowbit.json")
    assert_clean_failure(run("generate", tmp_path / "nope", "--prompt", "hi"), "no such file")


def test_damaged_artifact(tiny_dir, tmp_path):
    out = tmp_path / "art"
    assert run("quantize", "--model", tiny_dir, "--out", out).exit_code == 0
    (out / "lowbit.json").write_text("{ half")
    assert_clean_failure(run("generate", out, "--prompt", "hi"), "lowbit.json", "damaged")


def test_real_process_prints_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", "quantize", "--model", str(tmp_path / "x"), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "no such file" in r.stderr
