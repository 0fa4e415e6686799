import json

import pytest

from lowbit.errors import LowbitError
from lowbit.recipe import PRESETS, Recipe, matches, preset, resolve_recipe


def test_required_presets_exist_with_a_per_row_head():
    for name in ("int8", "w4-g128", "w4-g32", "nf4", "fp8", "w8a8-dynamic"):
        r = PRESETS[name]
        head = r.spec_for("lm_head")  # INT8 (FP8 for fp8) per row, weight-only: its rows can serve as the embedding table
        assert head.granularity == "channel" and head.bits == 8 and head.activation == "none"
        assert r.spec_for("model.layers.0.mlp.down_proj") is not None
    assert PRESETS["nf4"].scheme.double_quant
    assert PRESETS["int8"].scheme.granularity == "channel"


def test_round_trip_yaml_and_json(tmp_path):
    r = Recipe.from_dict({
        "name": "mine", "scheme": {"kind": "int", "bits": 4, "granularity": "group", "group_size": 32},
        "ignore": ["lm_head", "re:layers\\.0\\."],
        "overrides": [{"match": "*.down_proj", "scheme": {"kind": "int", "bits": 8}},
                      {"match": "*.q_proj", "scheme": None}],
    })
    r.save(tmp_path / "r.yaml")
    assert Recipe.from_file(tmp_path / "r.yaml") == r
    (tmp_path / "r.json").write_text(json.dumps(r.to_dict()))
    assert Recipe.from_file(tmp_path / "r.json") == r
    assert r.spec_for("model.layers.0.mlp.up_proj") is None  # regex ignore
    assert r.spec_for("model.layers.1.mlp.down_proj").bits == 8  # override
    assert r.spec_for("model.layers.1.self_attn.q_proj") is None  # override to keep
    assert r.spec_for("model.layers.1.mlp.up_proj").bits == 4


def test_patterns():
    assert matches("lm_head", "lm_head")
    assert matches("*.down_proj", "model.layers.3.mlp.down_proj")
    assert matches("down_proj", "model.layers.3.mlp.down_proj")
    assert not matches("up_proj", "model.layers.3.mlp.down_proj")
    assert matches("re:layers\\.[0-2]\\.", "model.layers.2.mlp.up_proj")


@pytest.mark.parametrize("data, word", [
    ({"scheme": {"kind": "int", "bits": 9}}, "bits"),
    ({}, "scheme"),
    ({"scheme": {"kind": "int"}, "algorithm": "magic"}, "algorithm"),
    ({"scheme": {"kind": "int"}, "colour": "red"}, "colour"),
    ({"scheme": {"kind": "int"}, "ignore": "re:("}, "regular expression"),
    ({"scheme": {"kind": "int"}, "overrides": [{"scheme": {}}]}, "match"),
    ({"scheme": {"kind": "int"}, "group_fallback": "maybe"}, "group_fallback"),
    ({"scheme": "int4"}, "mapping"),
])
def test_malformed_recipes_name_the_field(data, word):
    with pytest.raises(LowbitError, match=word):
        Recipe.from_dict(data)


def test_bad_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("scheme: {kind: int, bits: [\n")
    with pytest.raises(LowbitError, match="not valid YAML"):
        Recipe.from_file(bad)
    with pytest.raises(LowbitError, match="cannot be read"):
        Recipe.from_file(tmp_path / "missing.yaml")
    with pytest.raises(LowbitError, match="unknown preset 'w5'.*int8"):
        resolve_recipe("w5")
    assert preset("nf4") is PRESETS["nf4"]
