"""lowbit qat on a tiny model: training lowers the divergence below round to nearest's, what is saved is
what was trained, an interrupted run resumes to the same weights, a non-finite loss stops with the
last good checkpoint kept, and bad input is refused with the fix."""

from __future__ import annotations

import warnings

import pytest
import torch

import lowbit
from lowbit import qat
from lowbit.errors import LowbitError
from lowbit.model.handle import as_model
from tests.conftest import make_tiny_llama, make_tokenizer

TEXTS = ["Quantization maps real numbers onto a small grid of integers, and training can adapt to it. " * 8,
         "The river bends twice before it reaches the old mill by the bridge, then runs to the sea. " * 8]


def _base():
    return as_model(make_tiny_llama(), make_tokenizer())


def _cfg(**kw):
    return qat.QATConfig(**{"steps": 24, "lr": 5e-4, "batch": 2, "seq_len": 32, "data": TEXTS, "samples": 16,
                            "checkpoint_every": 4, **kw})


def _kld(a, b, ids):
    with torch.no_grad():
        la, lb = a(ids).logits.log_softmax(-1), b(ids).logits.log_softmax(-1)
    return float((la.exp() * (la - lb)).sum(-1).mean())


def test_qat_beats_round_to_nearest_and_saves_what_it_trained(tmp_path):
    base = _base()
    res = qat.train(base, "w4-g32", tmp_path / "q", _cfg())
    assert len(res.losses) == 24 and sum(res.losses[-4:]) < sum(res.losses[:4])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ptq = lowbit.quantize(_base(), "w4-g32")
    ids = torch.tensor([make_tokenizer()(TEXTS[0])["input_ids"][:64]])
    assert _kld(base, res.model, ids) < 0.8 * _kld(base, ptq, ids)
    back = lowbit.load(str(tmp_path / "q"))
    assert back.calibration["method"] == "qat" and back.calibration["steps"] == 24
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, res.model(ids).logits, rtol=1e-4, atol=1e-4)
    assert not (tmp_path / "q.qat-state").exists()  # the state is removed once the artifact is written
    cmp = qat.compare(base, ptq, res.model)
    assert cmp["recovered_pct"] > 0 and cmp["mean_kld"]["qat"] < cmp["mean_kld"]["ptq"]


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    whole = qat.train(_base(), "w4-g32", tmp_path / "a", _cfg())

    def stop_at_6(done, total, loss):
        if done == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        qat.train(_base(), "w4-g32", tmp_path / "b", _cfg(), progress=stop_at_6)
    assert (tmp_path / "b.qat-state" / "state.pt").is_file() and not (tmp_path / "b").exists()
    resumed = qat.train(_base(), "w4-g32", tmp_path / "b", _cfg())
    assert resumed.resumed_from == 6
    sa, sb = whole.model.module.state_dict(), resumed.model.module.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # other settings cannot resume someone else's state
    with pytest.raises(KeyboardInterrupt):
        qat.train(_base(), "w4-g32", tmp_path / "c", _cfg(), progress=stop_at_6)
    with pytest.raises(LowbitError, match="other settings"):
        qat.train(_base(), "w4-g32", tmp_path / "c", _cfg(lr=1e-3))


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = qat._fake_quant
    calls = {"n": 0}

    def poisoned(w, spec):
        calls["n"] += 1
        out = real(w, spec)
        return out * float("nan") if calls["n"] > 8 * 14 else out  # 14 Linears x 8 steps, then NaN
    monkeypatch.setattr(qat, "_fake_quant", poisoned)
    with pytest.raises(LowbitError, match=r"loss is nan .*last good checkpoint \(step 8\).*smaller --lr"):
        qat.train(_base(), "w4-g32", tmp_path / "q", _cfg(steps=12))
    assert not (tmp_path / "q").exists() and (tmp_path / "q.qat-state" / "state.pt").is_file()


@pytest.mark.parametrize("kw, recipe, match", [
    ({"data": ["too short"]}, "w4-g32", "fewer than one batch|fewer than one window"),
    ({"steps": 10_000}, "w4-g32", "would read the data"),
    ({"lr": float("nan")}, "w4-g32", "--lr"),
    ({}, "w8a8-dynamic", "no fake quantizer"),
])
def test_bad_input_is_refused_with_the_fix(tmp_path, kw, recipe, match):
    with pytest.raises(LowbitError, match=match):
        qat.train(_base(), recipe, tmp_path / "q", _cfg(**kw))
    assert not (tmp_path / "q").exists()


def test_a_recipe_without_fake_quantizer_is_refused_before_any_model_loads(tmp_path):
    """The baseline path does not exist: the recipe's refusal comes first, naming the field."""
    with pytest.raises(LowbitError, match=r"w8a8-dynamic: field 'scheme' .*no fake quantizer.*fix: a weight-only"):
        qat.train(str(tmp_path / "no-such-model"), "w8a8-dynamic", tmp_path / "q", _cfg())
    # an override is judged on the block modules it matches (by trainable), not up front: one for the head passes
    import dataclasses

    from lowbit.recipe import PRESETS, Override

    w4 = PRESETS["w4-g128"]
    qat.check_recipe(dataclasses.replace(w4, overrides=(Override("lm_head", PRESETS["w8a8-dynamic"].scheme),)))


def test_a_quantized_baseline_and_an_existing_out_are_refused(tmp_path):
    (tmp_path / "q").mkdir()
    with pytest.raises(LowbitError, match="exists"):
        qat.train(_base(), "w4-g32", tmp_path / "q", _cfg())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = lowbit.quantize(_base(), "int8")
    with pytest.raises(LowbitError, match="full-precision"):
        qat.train(q, "w4-g32", tmp_path / "r", _cfg())


def test_lora_adapters_on_the_frozen_quantized_base_merge_within_the_tolerance(tmp_path):
    base = _base()
    cfg = _cfg(lora_rank=8, lr=2e-3, merge_tolerance=0.0)
    with pytest.raises(LowbitError, match=r"mean KLD of .* above --merge-tolerance 0.*adapters are kept"):
        qat.train(base, "w4-g32", tmp_path / "q", cfg)
    assert not (tmp_path / "q").exists() and (tmp_path / "q.qat-state" / "state.pt").is_file()
    # a looser tolerance: the same adapters merged again, no retraining
    res = qat.train(base, "w4-g32", tmp_path / "q", _cfg(lora_rank=8, lr=2e-3, merge_tolerance=0.05))
    assert res.resumed_from == 24 and 0 < res.merge_kld <= 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ptq = lowbit.quantize(_base(), "w4-g32")
    ids = torch.tensor([make_tokenizer()(TEXTS[0])["input_ids"][:64]])
    assert _kld(base, res.model, ids) < _kld(base, ptq, ids)
    assert lowbit.load(str(tmp_path / "q")).calibration["lora_rank"] == 8
