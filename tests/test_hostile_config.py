"""Hostile user files: recipes, gate specs, user eval suites and calibration files that try to fetch,
hang, blow up memory or slip a wrong type through. Each must end in a LowbitError (CLI: exit 2, one
paragraph, no traceback) naming the file and field, fast, and before any model loads."""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

import lowbit.datafile as datafile
from lowbit.calib.data import MAX_CALIB_BYTES, read_texts
from lowbit.cli import app
from lowbit.errors import LowbitError
from lowbit.eval.gate import load_spec
from lowbit.eval.suites import tool_calling, user
from lowbit.recipe import Recipe, resolve_recipe

runner = CliRunner(env={"COLUMNS": "200"})
FAST_S = 3.0  # every refusal below must come well within this


@contextmanager
def bounded(limit: float = FAST_S):
    t0 = time.perf_counter()
    yield
    elapsed = time.perf_counter() - t0
    assert elapsed < limit, f"took {elapsed:.2f} s"


def refused(fn, *words, limit: float = FAST_S) -> str:
    """Run fn, expecting a LowbitError whose message holds every word; returns the message."""
    with bounded(limit), pytest.raises(LowbitError) as e:
        fn()
    msg = str(e.value)
    for w in words:
        assert w in msg, f"{w!r} not in: {msg}"
    return msg


def cli_refused(args, *words, limit: float = 30.0) -> str:
    """The CLI exits 2 with one clean paragraph naming every word (the limit covers the CLI's imports)."""
    with bounded(limit):
        result = runner.invoke(app, [str(a) for a in args])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in text
    for w in words:
        assert w in text, f"{w!r} not in: {text}"
    return text


@pytest.fixture
def no_network(monkeypatch):
    """Any socket opened during the test fails it."""
    def boom(*args, **kwargs):
        raise AssertionError("a socket was opened")

    monkeypatch.setattr(socket, "socket", boom)
    monkeypatch.setattr(socket, "create_connection", boom)


@pytest.fixture
def quick_timeout(monkeypatch):
    """A short regex timeout, so the timeout tests stay fast (the default is 1 s)."""
    monkeypatch.setattr(datafile, "REGEX_TIMEOUT_S", 0.1)


def suite(tmp_path: Path, *rows, name: str = "suite.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def schema_row(schema) -> dict:
    return {"prompt": "Answer in JSON.", "check": {"type": "json_schema", "value": schema}}


MISSING_MODEL = "no-such-model-folder"  # a check that ran after the model load would fail on this instead


# -- 1. JSON schemas resolve offline only ------------------------------------------------------------
@pytest.mark.parametrize("ref", ["https://example.com/schema.json", "http://127.0.0.1:9/s.json#/x",
                                 "file:///etc/passwd", "other.json", "/etc/passwd"])
@pytest.mark.parametrize("nested", [False, True])
def test_external_ref_in_user_schema_is_refused_at_load(tmp_path, no_network, ref, nested):
    schema = {"type": "object", "properties": {"city": {"$ref": ref}}} if nested else {"$ref": ref}
    path = suite(tmp_path, {"prompt": "hi"}, schema_row(schema))
    refused(lambda: user.load_items(path), f"eval file {path}: line 2", "field 'check.value'", ref, "offline")


def test_local_file_ref_is_not_read(tmp_path, no_network):
    (tmp_path / "other.json").write_text('{"type": "string"}')
    for ref in ("other.json", (tmp_path / "other.json").as_uri()):
        path = suite(tmp_path, schema_row({"$ref": ref}))
        refused(lambda: user.load_items(path), "line 1", "check.value", "offline")


def test_validator_never_fetches_even_past_the_load_check(no_network):
    """check_output on a schema that skipped load_items, and BFCL-style function schemas."""
    for ref in ("https://example.com/s.json", "file:///etc/passwd"):
        msg = refused(lambda: user.check_output({"type": "json_schema", "value": {"$ref": ref}}, '{"a": 1}',
                                                "eval file x.jsonl: line 7"),
                      "eval file x.jsonl: line 7", "check.value")
        assert "offline" in msg
        fn = {"name": "f", "parameters": {"type": "dict", "properties": {"a": {"$ref": ref}}}}
        with bounded():
            scored = tool_calling.score_call({"name": "f", "arguments": {"a": 1}}, [fn])
        assert scored["json_valid"] and not scored["schema_valid"] and "offline" in scored["error"]


def test_internal_refs_still_work(tmp_path, no_network):
    schema = {"$defs": {"city": {"type": "string", "minLength": 2}}, "type": "object",
              "properties": {"city": {"$ref": "#/$defs/city"}}, "required": ["city"]}
    path = suite(tmp_path, schema_row(schema))
    check = user.load_items(path)[0]["check"]
    assert user.check_output(check, '{"city": "Paris"}') is True
    assert user.check_output(check, '{"city": 5}') is False


@pytest.mark.parametrize("schema, words", [
    ({"$ref": "#"}, ["loop"]),
    ({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, ["loop"]),
    ({"$ref": "#/$defs/missing"}, ["cannot be resolved"]),
])
def test_broken_internal_refs_fail_at_load(tmp_path, schema, words):
    path = suite(tmp_path, schema_row(schema))
    refused(lambda: user.load_items(path), "line 1", "check.value", *words)


# -- 2. regular expressions cannot hang ----------------------------------------------------------------
def test_backtracking_regex_check_is_bounded(tmp_path, quick_timeout):
    # (a+)+$ : the regex package answers it at once; (a|aa)+$ still backtracks, and times out.
    with bounded(1.0):
        assert user.check_output({"type": "regex", "value": "(a+)+$"}, "a" * 40 + "!") is False
    path = suite(tmp_path, {"id": "slow", "prompt": "x", "check": {"type": "regex", "value": "(a|aa)+$"}})
    check = user.load_items(path)[0]["check"]  # a valid pattern: loads
    refused(lambda: user.check_output(check, "a" * 60 + "!", f"eval file {path}: line 1"),
            f"eval file {path}: line 1", "field 'check.value'", "(a|aa)+$", "simplify", limit=1.5)


def test_backtracking_regex_in_schema_pattern_is_bounded(quick_timeout):
    check = {"type": "json_schema", "value": {"properties": {"s": {"pattern": "(a|aa)+$"}}}}
    refused(lambda: user.check_output(check, json.dumps({"s": "a" * 60 + "!"}), "eval file x.jsonl: line 2"),
            "eval file x.jsonl: line 2", "check.value", "pattern", "simplify", limit=1.5)
    props = {"type": "json_schema", "value": {"patternProperties": {"(a|aa)+$": {}}, "additionalProperties": False}}
    refused(lambda: user.check_output(props, json.dumps({"a" * 60 + "!": 1}), "eval file x.jsonl: line 3"),
            "line 3", "patternProperties", limit=1.5)


def test_backtracking_recipe_pattern_is_bounded(tmp_path, quick_timeout):
    path = tmp_path / "r.yaml"
    path.write_text('scheme: {kind: int, bits: 8}\nignore: ["re:(a|aa)+$"]\n')
    recipe = Recipe.from_file(path)
    assert recipe.spec_for("model.layers.0.mlp.up_proj") is not None  # short names: fine
    refused(lambda: recipe.spec_for("a" * 60 + "!"), f"recipe file {path}", "ignore[0]", "(a|aa)+$", "simplify",
            limit=1.5)


@pytest.mark.parametrize("pattern, words", [
    ("a" * 1001, ["1,001 characters", "1,000"]),
    ("(?:a{1000}){1000}", ["repeats too much", "10,000"]),  # the regex package would build 270 MB for it
    ("a{4294967294}", ["repeats too much"]),
    ("(unclosed", ["not a valid regular expression"]),
])
def test_heavy_or_bad_patterns_are_refused_up_front(tmp_path, pattern, words):
    path = suite(tmp_path, {"prompt": "x", "check": {"type": "regex", "value": pattern}})
    refused(lambda: user.load_items(path), "line 1", "check.value", *words)
    rpath = tmp_path / "r.json"
    rpath.write_text(json.dumps({"scheme": {"kind": "int"}, "overrides": [{"match": "re:" + pattern, "scheme": None}]}))
    refused(lambda: Recipe.from_file(rpath), f"recipe file {rpath}", "overrides[0].match", *words)
    schema = suite(tmp_path, schema_row({"properties": {"a": {"pattern": pattern}}}), name="schema.jsonl")
    msg = refused(lambda: user.load_items(schema), "line 1", "check.value")
    assert "is not a 'regex'" in msg if pattern == "(unclosed" else all(w in msg for w in ["pattern", *words])


# -- 3. YAML aliases, size, depth, encoding ------------------------------------------------------------
LAUGHS = "\n".join(['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
                   + [f"{chr(98 + i)}: &{chr(98 + i)} [{','.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)]
                   + ["name: *i", "scheme: {kind: int, bits: 8}"]) + "\n"


def test_billion_laughs_recipe_and_spec(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(LAUGHS)
    refused(lambda: Recipe.from_file(path), f"recipe file {path}", "YAML aliases are not allowed")
    spec = tmp_path / "spec.yaml"
    spec.write_text("base: &b {max_mean_kld: 0.02}\nquality: *b\n")
    refused(lambda: load_spec(str(spec)), f"spec file {spec}", "YAML aliases are not allowed")
    cli_refused(["gate", spec, MISSING_MODEL, MISSING_MODEL, "--quick", "--no-report"],
                str(spec), "YAML aliases are not allowed")


def test_anchor_with_merge_key_is_refused(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("base: &s {kind: int, bits: 8}\nscheme: {<<: *s, granularity: channel}\n")
    refused(lambda: Recipe.from_file(path), "YAML aliases are not allowed")


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_dev_zero_recipe_fails_fast_naming_the_limit(tmp_path):
    refused(lambda: resolve_recipe("/dev/zero"), "recipe file /dev/zero", "256 KB limit")
    cli_refused(["quantize", "--model", MISSING_MODEL, "--recipe", "/dev/zero", "--out", tmp_path / "out"],
                "/dev/zero", "256 KB limit")
    assert not (tmp_path / "out").exists()


def test_oversized_recipe_and_spec_are_refused_before_reading(tmp_path):
    for name in ("big.yaml", "big.json"):
        path = tmp_path / name
        with open(path, "wb") as f:  # sparse: 2 MB that cost nothing to write
            f.truncate(2_000_000)
        refused(lambda: Recipe.from_file(path), str(path), "256 KB limit")
        refused(lambda: load_spec(str(path)), str(path), "256 KB limit")


@pytest.mark.parametrize("name, text", [("deep.json", "[" * 100_000 + "]" * 100_000),
                                        ("deep.yaml", "[" * 100_000 + "]" * 100_000),
                                        ("block.yaml", "a:\n" + "".join(" " * i + "-\n" for i in range(1, 200)))])
def test_deep_nesting_is_refused(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    refused(lambda: Recipe.from_file(path), f"recipe file {path}", "nested")


def test_non_utf8_recipe_and_spec(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\nscheme: {kind: int}\n".encode("latin-1"))
    refused(lambda: Recipe.from_file(path), f"recipe file {path}", "UTF-8")
    cli_refused(["quantize", "--model", MISSING_MODEL, "--recipe", path, "--out", tmp_path / "out"], str(path), "UTF-8")
    spec = tmp_path / "latin1-spec.yaml"
    spec.write_bytes(b"quality: {max_mean_kld: 0.02}  # \xff\n")
    refused(lambda: load_spec(str(spec)), f"spec file {spec}", "UTF-8")


def test_fifo_is_refused_without_blocking(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no named pipes here")
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    refused(lambda: Recipe.from_file(fifo), str(fifo), "pipe")
    refused(lambda: user.load_items(fifo), str(fifo), "pipe")


# -- 4. size limits on user suites and calibration files -------------------------------------------------
def test_50mb_suite_is_refused_before_reading(tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:
        f.truncate(50_000_000)  # sparse: no memory and no time to write
    refused(lambda: user.load_items(path), f"eval file {path}", "20 MB limit")
    cli_refused(["eval", MISSING_MODEL, MISSING_MODEL, "--suites", f"user:{path}", "--quick", "--no-report"],
                str(path), "20 MB limit")


def test_suite_line_and_field_limits(tmp_path):
    many = suite(tmp_path, *(['{"prompt": "x"}'] * (user.MAX_LINES + 1)), name="many.jsonl")
    refused(lambda: user.load_items(many), f"eval file {many}", "10,001 lines", "10,000")
    for row, words in [({"prompt": "x", "max_new_tokens": 10**9}, ["max_new_tokens", "4096"]),
                       ({"prompt": "x" * (user.MAX_PROMPT_CHARS + 1)}, ["field 'prompt'", "100,000"]),
                       ('{"prompt": "x", "id": ' + "[" * 100 + "]" * 100 + "}", ["nested"]),
                       ('{"prompt": "x", "max_new_tokens": ' + "9" * 5000 + "}", ["not valid JSON"])]:
        path = suite(tmp_path, row, name="one.jsonl")
        refused(lambda: user.load_items(path), f"eval file {path}: line 1", *words)


def test_too_many_distinct_schemas_is_refused(tmp_path, monkeypatch):
    assert user.MAX_SCHEMA_VALUES == 20_000  # about 4 s of meta-schema checks at worst; a smaller limit keeps this fast
    monkeypatch.setattr(user, "MAX_SCHEMA_VALUES", 2000)
    rows = [schema_row({"type": "object", "title": f"s{i}", "properties": {f"k{j}": {"type": "string"} for j in range(20)}})
            for i in range(2000 // 40 + 1)]
    path = suite(tmp_path, *rows)
    refused(lambda: user.load_items(path), f"eval file {path}", "2,000")
    same = suite(tmp_path, *([schema_row({"type": "object", "properties": {"k": {"type": "string"}}})] * 2000),
                 name="same.jsonl")
    with bounded():
        assert len(user.load_items(same)) == 2000  # a repeated schema is checked once


def test_calibration_file_over_the_limit_is_refused_before_reading(tmp_path):
    for name in ("calib.txt", "calib.jsonl"):
        path = tmp_path / name
        with open(path, "wb") as f:
            f.truncate(MAX_CALIB_BYTES + 1)
        refused(lambda: read_texts(str(path), tokenizer=None), f"calibration file {path}", "16 MB limit")


def test_binary_calibration_file_is_refused_and_a_few_bad_bytes_are_not(tmp_path):
    """A binary file passed as --calib (random bytes, or a model's NUL-padded header) is refused, naming the
    file; real text with a stray Latin-1 byte is read, the byte replaced."""
    import random

    noise = tmp_path / "noise.txt"
    noise.write_bytes(random.Random(0).randbytes(4000))
    refused(lambda: read_texts(str(noise), tokenizer=None), f"calibration file {noise}", "not a text file")
    nuls = tmp_path / "model.jsonl"
    nuls.write_bytes(b"GGUF" + b"\x00" * 3000)
    refused(lambda: read_texts(str(nuls), tokenizer=None), f"calibration file {nuls}", "control characters")
    latin = tmp_path / "cafe.txt"
    latin.write_bytes("The caf\xe9 opens at eight. ".encode("latin-1") * 20)
    texts, _ = read_texts(str(latin), tokenizer=None)
    assert "caf\ufffd opens" in texts[0]


# -- 5. types and ranges -----------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme, field", [
    ({"kind": "int", "bits": 4, "granularity": "group", "group_size": 128, "symmetric": "false"}, "symmetric"),
    ({"kind": "nf4", "bits": 4, "granularity": "group", "group_size": 64, "double_quant": 1}, "double_quant"),
    ({"kind": "int", "bits": 8.0}, "bits"),
    ({"kind": "int", "bits": True}, "bits"),
    ({"kind": "int", "bits": 4, "granularity": "group", "group_size": "128"}, "group_size"),
    ({"kind": "int", "bits": 4, "granularity": "group", "group_size": 128.0}, "group_size"),
    ({"kind": "int", "version": True}, "version"),
    ({"kind": 8}, "kind"),
])
def test_wrong_json_types_in_schemes_are_refused(tmp_path, scheme, field):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"scheme": scheme}))
    refused(lambda: Recipe.from_file(path), f"recipe file {path}", f"'{field}'")
    path.write_text(json.dumps({"scheme": {"kind": "int"}, "overrides": [{"match": "*.q_proj", "scheme": scheme}]}))
    refused(lambda: Recipe.from_file(path), f"recipe file {path}", "overrides[0]", f"'{field}'")


def test_symmetric_string_via_cli(tmp_path):
    path = tmp_path / "sym.yaml"
    path.write_text('scheme: {kind: int, bits: 4, granularity: group, group_size: 128, symmetric: "false"}\n')
    cli_refused(["quantize", "--model", MISSING_MODEL, "--recipe", path, "--out", tmp_path / "out"],
                str(path), "'symmetric'", "true or false")


@pytest.mark.parametrize("data, field", [
    ({"version": True}, "version"),
    ({"version": 1.0}, "version"),
    ({"name": 5}, "name"),
    ({"description": ["a"]}, "description"),
    ({"kv_cache": False}, "kv_cache"),
    ({1: "x"}, "unknown field"),
])
def test_wrong_json_types_in_recipes_are_refused(data, field):
    refused(lambda: Recipe.from_dict({"scheme": {"kind": "int"}, **data}, "recipe file r.yaml"), "recipe file r.yaml", field)


@pytest.mark.parametrize("body, field", [
    ("quality: {min_top1_agreement: -5}", "quality.min_top1_agreement"),
    ("quality: {min_top1_agreement: 1.5}", "quality.min_top1_agreement"),
    ("quality: {max_mean_kld: -0.1}", "quality.max_mean_kld"),
    ("quality: {max_p99_kld: .nan}", "quality.max_p99_kld"),
    ("quality: {max_ppl_increase_pct: -1}", "quality.max_ppl_increase_pct"),
    ("quality: {suites: {json: {min_valid_pct: 150}}}", "quality.suites.json.min_valid_pct"),
    ("quality: {suites: {user: {file: x.jsonl, max_pass_drop: -5}}}", "quality.suites.user.max_pass_drop"),
    ("quality: {suites: {jargon: {max_kld: -1}}}", "quality.suites.jargon.max_kld"),
    ("latency: {min_decode_speedup: 0}", "latency.min_decode_speedup"),
    ("latency: {p95_improvement_pct: 150}", "latency.p95_improvement_pct"),
    ("memory: {reduction_pct: 101}", "memory.reduction_pct"),
    ("eval: {samples: -3}", "eval.samples"),
    ("eval: {seq_len: 0.5}", "eval.seq_len"),
    ("eval: {context: true}", "eval.context"),
    ("eval: {samples: 1000000000}", "eval.samples"),
    ("bench: {requests: 0}", "bench.requests"),
    ("bench: {batch_size: 2.5}", "bench.batch_size"),
    ("bench: {warmup: -1}", "bench.warmup"),
])
def test_gate_spec_ranges(tmp_path, body, field):
    path = tmp_path / "spec.yaml"
    path.write_text(body + "\n")
    refused(lambda: load_spec(str(path)), f"spec file {path}", f"'{field}'", "fix")


def test_good_gate_spec_still_parses(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("quality: {max_mean_kld: 0, min_top1_agreement: 1, suites: {json: {min_valid_pct: 100}}}\n"
                    "latency: {p95_improvement_pct: -20, min_decode_speedup: 0.8}\nmemory: {reduction_pct: 50}\n"
                    "eval: {samples: 4, seq_len: 128, context: 512}\nbench: {requests: 4, warmup: 0}\n")
    spec = load_spec(str(path))
    assert spec.section("eval") == {"samples": 4, "seq_len": 128, "context": 512}


@pytest.mark.parametrize("body, field", [("eval: {samples: -3}", "eval.samples"),
                                         ("eval: {seq_len: 0.5}", "eval.seq_len"),
                                         ("quality: {min_top1_agreement: -5}", "quality.min_top1_agreement")])
def test_bad_gate_spec_via_cli_fails_before_models_load(tmp_path, body, field):
    path = tmp_path / "bad.yaml"
    path.write_text(body + "\n")
    cli_refused(["gate", path, MISSING_MODEL, MISSING_MODEL, "--quick", "--no-report"], str(path), field)


def test_bad_user_suite_via_cli_fails_before_models_load(tmp_path, no_network):
    path = suite(tmp_path, schema_row({"$ref": "https://example.com/s.json"}))
    cli_refused(["eval", MISSING_MODEL, MISSING_MODEL, "--suites", f"user:{path}", "--quick", "--no-report"],
                str(path), "line 1", "check.value", "offline")
