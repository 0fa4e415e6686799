"""The README's promises: the two set-up commands come first, and every Python block runs as shown."""

import os
import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def run_block(code: str, folder: Path) -> dict:
    """exec a README block in `folder` (its relative paths, like out/, land there)."""
    scope: dict = {}
    old = os.getcwd()
    os.chdir(folder)
    try:
        exec(compile(code, "README.md", "exec"), scope)
    finally:
        os.chdir(old)
    return scope


def test_readme_opens_with_the_two_commands():
    first_block = re.search(r"```sh\n(.*?)```", README, re.S).group(1)
    commands = [ln.split("#")[0].strip() for ln in first_block.splitlines() if ln.strip()]
    assert commands == ["make demo", "make test"]
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "make test" in ci


def test_the_readme_has_the_python_blocks_these_tests_run():
    # the fourth (the `openai` client against `lowbit serve`) runs in tests/serve/test_examples.py
    assert len(BLOCKS) == 4, "a Python block was added or removed: give it a test below"


def test_first_python_example_runs_as_documented(tmp_path):
    scope = run_block(BLOCKS[0], tmp_path)
    assert scope["q"].reshape(-1).tolist() == [-127, -48, 11, 101]
    assert round(scope["scale"].item(), 5) == 0.00945
    assert [round(v, 4) for v in scope["w_hat"].reshape(-1).tolist()] == [-1.2, -0.4535, 0.1039, 0.9543]


@pytest.mark.slow
def test_quantize_evaluate_export_generate_block_runs(tmp_path, capsys):
    scope = run_block(BLOCKS[1], tmp_path)
    q, run = scope["q"], scope["run"]
    assert q.quantized and q.recipe.algorithm == "gptq" and q.calibration["data"]["tokens"] == 16 * 256
    assert run["candidate"]["recipe"] == "w4-g128" and 0 < run["divergence"]["mean_kld"] < 1
    assert (tmp_path / "out" / "smollm2-w4" / "lowbit.json").is_file()
    assert (tmp_path / "out" / "smollm2-w4.gguf").stat().st_size > 10_000_000
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("mean KLD ") and len(printed) >= 2 and printed[1].strip()


@pytest.mark.slow
def test_streaming_and_load_in_4bit_block_runs(tmp_path, capsys):
    scope = run_block(BLOCKS[2], tmp_path)
    assert scope["big"].recipe.algorithm == "gptq" and (tmp_path / "out" / "big-w4" / "lowbit.json").is_file()
    assert scope["m4"].quantized and scope["m4"].recipe.name == "load-nf4"
    assert capsys.readouterr().out.strip() == "load-nf4 four bits"
