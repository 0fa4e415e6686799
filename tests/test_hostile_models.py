"""Hostile and broken model folders and artifacts: no code from a model runs, no missing or foreign
tensor is accepted, an artifact is checked against its own record, and nothing outside it is read
unless it hashes to that record (an export's float source).

Each case goes through the CLI as a user would and expects exit code 2, one paragraph naming the
file or field, no traceback, and nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import lowbit
from lowbit.cli import app
from lowbit.errors import LowbitError
from tests.conftest import make_tiny_llama, save_hf

runner = CliRunner(env={"COLUMNS": "200"})


def refused(*args, match: str, out: Path | None = None):
    res = runner.invoke(app, [str(a) for a in args], input="y\ny\n")  # a "yes" to any prompt must change nothing
    text = res.output
    assert res.exit_code == 2, text
    assert "Traceback" not in text and match in " ".join(text.split()), text
    if out is not None:
        assert not out.exists()
    return text


@pytest.fixture
def folder(tmp_path) -> Path:
    return save_hf(make_tiny_llama(), tmp_path / "model")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("art")
    m = lowbit.quantize(lowbit.load(save_hf(make_tiny_llama(), root / "float")), "w4-g32")
    return lowbit.save(m, root / "w4")


def copy_of(artifact: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(artifact, tmp_path / "copy"))


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# -- 1. code shipped with a model never runs --------------------------------------------------------
@pytest.mark.parametrize("config_file", ["config.json", "tokenizer_config.json"])
def test_a_folder_with_auto_map_is_refused_and_its_code_never_runs(folder, tmp_path, config_file):
    marker = tmp_path / "code-ran"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                             "from transformers import LlamaForCausalLM as EvilForCausalLM\n")
    (folder / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                                  "from transformers import LlamaConfig as EvilConfig\n")
    edit_json(folder / config_file, lambda d: d.update(auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                                 "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
                                                                 "AutoTokenizer": ["tokenization_evil.T", None]}))
    refused("quantize", "--model", folder, "--recipe", "int8", "--out", tmp_path / "q", match="auto_map",
            out=tmp_path / "q")
    refused("generate", folder, "--prompt", "hi", match="never runs code")
    with pytest.raises(LowbitError, match="auto_map"):
        lowbit.load(folder)
    assert not marker.exists()


def test_an_artifact_with_auto_map_is_refused(artifact, tmp_path):
    art = copy_of(artifact, tmp_path)
    edit_json(art / "config.json", lambda d: d.update(auto_map={"AutoModelForCausalLM": "modeling_x.X"}))
    refused("generate", art, "--prompt", "hi", match="auto_map")


# -- 2. missing, foreign or mistyped weights are refused, never filled at random -------------------
def _rewrite(folder: Path, change) -> None:
    sd = load_file(str(folder / "model.safetensors"))
    change(sd)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("case,match", [
    ("missing", "are not in the weights"),
    ("unexpected", "not part of the model"),
    ("shape", "config.json implies"),
    ("int dtype", "not a float type"),
])
def test_a_float_checkpoint_must_hold_exactly_its_tensors(folder, tmp_path, case, match):
    key = "model.layers.1.mlp.up_proj.weight"

    def change(sd):
        if case == "missing":
            sd.pop(key)
        elif case == "unexpected":
            sd["model.layers.9.mlp.up_proj.weight"] = sd[key].clone()
        elif case == "shape":
            sd[key] = sd[key][:, :32].contiguous()
        else:
            sd[key] = sd[key].to(torch.int8)

    _rewrite(folder, change)
    refused("quantize", "--model", folder, "--recipe", "int8", "--out", tmp_path / "q", match=match, out=tmp_path / "q")
    refused("quantize", "--model", folder, "--recipe", "w4-g32", "--method", "gptq", "--calib", "wikipedia",
            "--samples", "1", "--seq-len", "16", "--out", tmp_path / "g", match=match, out=tmp_path / "g")
    with pytest.raises(LowbitError, match=match):
        lowbit.load(folder, load_in_8bit=True)


def test_an_artifact_without_its_record_is_not_read_as_a_float_model(artifact, tmp_path):
    art = copy_of(artifact, tmp_path)
    (art / "lowbit.json").unlink()
    refused("generate", art, "--prompt", "hi", match="damaged lowbit artifact")
    refused("export", art, "--format", "gguf", "--out", tmp_path / "x.gguf", match="damaged lowbit artifact",
            out=tmp_path / "x.gguf")


# -- 3. an artifact is checked against its own record ------------------------------------------------
def _spec_bits(bits):
    return lambda d: d["modules"]["model.layers.0.mlp.up_proj"]["spec"].update(bits=bits)


@pytest.mark.parametrize("change,match", [
    (_spec_bits(8), "disagree"),
    (lambda d: d["modules"]["model.layers.0.mlp.up_proj"]["spec"].update(granularity="channel", group_size=None), "disagree"),
    (lambda d: d.update(format_version="1"), "format_version"),
    (lambda d: d.update(format_version=99), "newer than this lowbit reads"),
    (lambda d: d["modules"]["lm_head"].update(in_features=-1), "in_features"),
    (lambda d: d["modules"]["model.layers.0.mlp.up_proj"].update(out_features=64), "disagree"),
    (lambda d: d["files"].update({"model.safetensors": "0" * 64}), "differ from the sha256"),
    (lambda d: d.update(embedding="everything"), "embedding"),
])
def test_an_edited_record_is_refused_by_load_and_info(artifact, tmp_path, change, match):
    art = copy_of(artifact, tmp_path)
    edit_json(art / "lowbit.json", change)
    refused("generate", art, "--prompt", "hi", match=match)
    refused("info", art, match=match)


def test_a_config_that_does_not_match_the_record_is_refused(artifact, tmp_path):
    art = copy_of(artifact, tmp_path)
    edit_json(art / "config.json", lambda d: d.update(intermediate_size=64))
    refused("generate", art, "--prompt", "hi", match="not a Linear of that shape")


def test_swapped_weights_are_refused(artifact, tmp_path):
    art = copy_of(artifact, tmp_path)
    other = lowbit.quantize(lowbit.load(save_hf(make_tiny_llama(seed=1), tmp_path / "f1")), "w4-g32")
    lowbit.save(other, tmp_path / "other")
    shutil.copy(tmp_path / "other" / "model.safetensors", art / "model.safetensors")  # same layout, other numbers
    refused("generate", art, "--prompt", "hi", match="differ from the sha256")
    refused("info", art, match="differ from the sha256")


def test_a_tensor_of_another_module_or_shape_is_refused(artifact, tmp_path):
    art = copy_of(artifact, tmp_path)
    rec = json.loads((art / "lowbit.json").read_text())
    rec.pop("files")  # as an artifact written before hashes were recorded: the tensors are still checked
    (art / "lowbit.json").write_text(json.dumps(rec))
    sd = load_file(str(art / "model.safetensors"))
    sd["model.layers.0.mlp.up_proj.scale"] = sd["model.layers.0.mlp.up_proj.scale"][:, :1].contiguous()
    save_file(sd, str(art / "model.safetensors"), metadata={"format": "pt"})
    refused("generate", art, "--prompt", "hi", match="disagree")


# -- 4. nothing outside the artifact is read without a recorded sha256 --------------------------------------------------------
def test_export_does_not_follow_an_artifacts_source_path(artifact, tmp_path, monkeypatch):
    art = copy_of(artifact, tmp_path)
    foreign = tmp_path / "elsewhere" / "foreign.gguf"
    foreign.parent.mkdir()
    foreign.write_bytes(b"GGUF" + b"\0" * 64)
    edit_json(art / "lowbit.json", lambda d: d.update(source={"name": "x", "kind": "gguf", "path": str(foreign)}))
    opened = []
    real_open = open

    def spy(path, *a, **k):
        opened.append(Path(str(path)).resolve() if isinstance(path, (str, Path)) else path)
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", spy)
    res = lowbit.export(lowbit.load(art), format="gguf", out=tmp_path / "out.gguf")
    monkeypatch.undo()
    assert foreign.resolve() not in opened
    assert any("tokenizer.json" in n for n in res.notes)


def test_a_bundled_source_name_is_not_a_path(artifact, tmp_path):
    from lowbit.exporters.gguf_vocab import source_gguf

    outside = tmp_path / "x.gguf"
    outside.write_bytes(b"GGUF")
    assert source_gguf({"kind": "bundled", "name": str(outside), "sha256": "0" * 64}) is None
    assert source_gguf({"kind": "bundled", "name": "../" * 8 + str(outside), "sha256": "0" * 64}) is None


@pytest.mark.slow
@pytest.mark.parametrize("category", ["size limits", "output"])
def test_hostile_cases_end_cleanly_in_a_fresh_process_under_a_memory_limit(category):
    """benchmarks/hostile.py runs each case in a fresh `lowbit` process limited to 60 s and 6 GB of
    address space: every case of these categories ends as a clean error or a safe success."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "hostile.py"), "--only", category],
                          capture_output=True, text=True, timeout=900, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) >= 7
    assert all(r["outcome"] in ("clean error", "handled") for r in rows), [r for r in rows if r["outcome"] not in
                                                                             ("clean error", "handled")]


def test_a_compressed_tensors_folder_with_a_foreign_tensor_or_slow_regex_is_refused(artifact, tmp_path):
    ct = tmp_path / "ct"
    lowbit.export(lowbit.load(artifact), format="compressed-tensors", out=ct)
    assert lowbit.load(ct).module is not None  # as exported, it loads
    files = sorted(ct.glob("*.safetensors"))
    sd = load_file(str(files[0]))
    sd["model.layers.9.extra.weight"] = torch.zeros(2, 2)
    save_file(sd, str(files[0]), metadata={"format": "pt"})
    refused("generate", ct, "--prompt", "hi", match="not part of the model")
    save_file({k: v for k, v in sd.items() if "layers.9" not in k}, str(files[0]), metadata={"format": "pt"})
    edit_json(ct / "config.json", lambda d: d["quantization_config"].update(ignore=["re:(a|aa)+$" + "x" * 2000]))
    refused("generate", ct, "--prompt", "hi", match="regular expression")


def test_the_header_check_accepts_exactly_the_dtypes_the_reader_reads():
    from lowbit.model.sources import ST_ITEM_BYTES
    from lowbit.model.st_reader import DTYPES

    assert set(ST_ITEM_BYTES) == set(DTYPES)
    assert all(ST_ITEM_BYTES[k] == DTYPES[k].itemsize for k in DTYPES)
