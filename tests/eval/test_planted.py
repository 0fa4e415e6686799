"""The planted regressions (tests/plant.py) do what they say, and the gate sees each where it should:
damage past a position leaves short text alone and shows in the long-context suite."""

from __future__ import annotations

import warnings

import pytest
import torch

import lowbit
from lowbit.model.handle import as_model
from tests import plant
from tests.conftest import make_tiny_llama, make_tokenizer


def _handle(quant: str | None = None, **kw):
    h = as_model(make_tiny_llama(**kw), make_tokenizer())
    if quant:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            h = lowbit.quantize(h, quant)
    return h


@torch.no_grad()
def test_structure_rows_scale_only_those_logits_on_a_quantized_head():
    h = _handle("int8")
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    before = h(ids).logits
    emb = h.module.get_input_embeddings()(ids)
    n = plant.scale_structure_rows(h, 0.5)
    rows = plant.structure_token_ids(h.tokenizer)
    after = h(ids).logits
    assert n == len(rows) > 0
    assert torch.allclose(after[..., rows], 0.5 * before[..., rows], atol=1e-5)
    other = [i for i in range(before.shape[-1]) if i not in set(rows)]
    assert torch.equal(after[..., other], before[..., other])
    assert torch.equal(h.module.get_input_embeddings()(ids), emb)  # the embedding lookups keep their rows


@torch.no_grad()
def test_rotary_and_kv_damage_leave_text_shorter_than_their_start_alone():
    h = _handle(max_position_embeddings=512)
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(1))
    clean = h(ids).logits
    hook = plant.stretch_rotary_past(h, 120, 3.0)
    bent = h(ids).logits
    hook.remove()
    assert torch.equal(bent[:, :120], clean[:, :120]) and not torch.allclose(bent[:, 120:], clean[:, 120:])
    hooks = plant.crush_old_kv(h, 64, 2)
    assert torch.equal(h(ids[:, :64]).logits, clean[:, :64])  # within the window: nothing is old
    crushed = h(ids).logits
    for x in hooks:
        x.remove()
    assert not torch.allclose(crushed[:, -1], clean[:, -1], atol=1e-4)
    assert torch.equal(h(ids).logits, clean)  # removed: the model is whole again


def test_crushed_layer_recipe_sets_one_module():
    r = plant.crushed_layer_recipe("int8", "model.layers.1.mlp.down_proj", 2)
    h = _handle()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = lowbit.quantize(h, r)
    specs = {p.name: p.spec for p in q.plan if p.spec is not None}
    assert specs["model.layers.1.mlp.down_proj"].bits == 2 and specs["model.layers.0.mlp.down_proj"].bits == 8


def test_damage_past_a_position_shows_in_the_long_context_suite_only():
    base = _handle(max_position_embeddings=256)
    cand = _handle(max_position_embeddings=256)
    plant.stretch_rotary_past(cand, 128, 4.0)
    run = lowbit.evaluate(base, cand, config=lowbit.EvalConfig(suites=("general", "long_context"), quick=True,
                                                                  samples=4, seq_len=128))
    assert run["divergence"]["mean_kld"] == pytest.approx(0, abs=1e-7)  # 128-token samples: untouched
    lc = {s["name"]: s for s in run["suites"]}["long_context"]["metrics"]
    assert lc["ppl_0_64"]["candidate"] == pytest.approx(lc["ppl_0_64"]["baseline"], rel=1e-5)
    assert abs(lc["ppl_64_256"]["candidate"] / lc["ppl_64_256"]["baseline"] - 1) > 1e-3  # a random model: small, but 100x the noise
