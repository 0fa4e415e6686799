"""`lowbit quantize --method/--calib` on the tiny model: the happy path writes an artifact that
`lowbit eval`'s loader reads back; bad calibration input exits 2 and writes nothing."""

import json

import pytest

from tests.calib.test_sequential import TEXTS
from tests.test_cli import assert_clean_failure, run


@pytest.mark.slow
def test_quantize_gptq_with_jsonl_calibration(tiny_dir, tmp_path):
    calib = tmp_path / "c.jsonl"
    calib.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    out = tmp_path / "art"
    r = run("quantize", "--model", tiny_dir, "--recipe", "w4-g32", "--method", "gptq", "--calib", calib,
            "--samples", 2, "--seq-len", 32, "--out", out)
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "(gptq)" in text and "2 x 32 tokens" in text
    meta = json.loads((out / "lowbit.json").read_text())
    assert meta["calibration"]["method"] == "gptq" and meta["calibration"]["data"]["tokens"] == 64
    assert (out / "imatrix.safetensors").is_file()


def test_quantize_bad_calibration_exits_2(tiny_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    out = tmp_path / "art"
    r = run("quantize", "--model", tiny_dir, "--recipe", "w4-g32", "--calib", empty, "--out", out)
    assert_clean_failure(r, str(empty), "empty", out=out)
    r = run("quantize", "--model", tiny_dir, "--recipe", "nf4", "--method", "awq", "--out", out)
    assert_clean_failure(r, "integer schemes", out=out)
    r = run("quantize", "--model", tiny_dir, "--recipe", "w4-g32", "--method", "learned", "--learn-init", "foo",
            "--out", out)
    assert_clean_failure(r, "--learn-init 'foo' is unknown", out=out)
    r = run("quantize", "--model", tiny_dir, "--recipe", "w4-g32", "--method", "learned", "--learn-loss", "l1",
            "--out", out)
    assert_clean_failure(r, "--learn-loss 'l1' is unknown; use one of relative, mse, normed, postnorm", out=out)
    r = run("quantize", "--model", tiny_dir, "--recipe", "w4-g32", "--method", "gptq", "--learn-e2e-steps", 5,
            "--out", out)
    assert_clean_failure(r, "--learn-e2e-steps works with --method learned", out=out)


def test_quantize_learned_with_end_to_end_scales_records_the_stage(tiny_dir, tmp_path):
    out = tmp_path / "art"
    r = run("quantize", "--model", tiny_dir, "--recipe", "w4-g32", "--method", "learned", "--calib", "wikipedia",
            "--samples", 4, "--seq-len", 32, "--learn-steps", 5, "--learn-e2e-steps", 6, "--learn-e2e-lr", 0.005,
            "--out", out)
    assert r.exit_code == 0, r.output
    e2e = json.loads((out / "lowbit.json").read_text())["calibration"]["learned_e2e"]
    assert e2e["steps"] == 6 and e2e["lr"] == 0.005 and e2e["layers"] == 14
    assert e2e["kl_start"] > 0 and e2e["kept"] == (e2e["kl_learned"] < e2e["kl_start"])
