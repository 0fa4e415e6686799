"""The end-to-end scale stage after learned rounding (--learn-e2e-steps): codes untouched, scales moved,
the float model's next-token KL lowered on held-back windows, streamed == in memory, stored as any artifact."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.calib import CalibOptions, load_calibration
from lowbit.calib import e2e
from lowbit.errors import LowbitError
from lowbit.eval.metrics import kld
from lowbit.formats.qtensor import dequantize_tensor, int_codes
from lowbit.formats.spec import QuantSpec
from lowbit.model.qlinear import QLinear
from tests.calib.test_sequential import TEXTS, W4, in_memory, same_state, streamed_from
from tests.conftest import make_tiny_llama, make_tokenizer

BLOCKS = dict(learn_steps=10, learn_batch=2)


def _qlinears(model) -> dict[str, QLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QLinear) and ".layers." in n}


def _kl(model, ref, ids) -> float:
    with torch.no_grad():
        return float(kld(ref(ids).logits, model(ids).logits).mean())


@pytest.mark.parametrize("spec", [QuantSpec(kind="int", bits=4, granularity="group", group_size=32),
                                  QuantSpec(kind="int", bits=4, granularity="group", group_size=32, symmetric=False),
                                  QuantSpec(kind="int", bits=3, granularity="group", group_size=32, symmetric=False,
                                            zero_domain="float", scale_dtype="float32")])
def test_the_scaled_module_is_the_qlinear_and_stores_what_it_computes(spec):
    """At m = 0 the differentiable module's weight is the QLinear's dequantized weight; after m moves, the
    QLinear it gives back holds the same codes and dequantizes to what the module used (up to the scale's
    storage dtype), and the module computes x @ weight.T + bias."""
    torch.manual_seed(0)
    q = QLinear.from_weight(torch.randn(24, 64), spec, torch.randn(24))
    x = torch.randn(3, 64)
    s = e2e._Scaled(q)
    with torch.no_grad():
        torch.testing.assert_close(s.weight(), dequantize_tensor(q.qtensor(), torch.float32), rtol=0, atol=0)
        s.m.uniform_(-0.2, 0.2)
        moved = s.weight()
        torch.testing.assert_close(s(x), x @ moved.T + q.bias)
    back = s.qlinear()
    assert torch.equal(int_codes(back.qtensor()), int_codes(q.qtensor()))
    assert not torch.equal(back.qtensor().tensors["scale"], q.qtensor().tensors["scale"])
    torch.testing.assert_close(dequantize_tensor(back.qtensor(), torch.float32), moved, rtol=2e-3, atol=1e-6)


def test_end_to_end_scales_lower_the_kl_keep_the_codes_and_save_as_any_artifact(tmp_path):
    data = load_calibration(TEXTS, make_tokenizer(), samples=8, seq_len=48)
    ref = make_tiny_llama()
    blockwise = in_memory(W4, "learned", data, CalibOptions(**BLOCKS))
    tuned = in_memory(W4, "learned", data, CalibOptions(**BLOCKS, learn_e2e_steps=40, learn_e2e_lr=5e-3))
    rec = tuned.calibration["learned_e2e"]
    assert rec["kept"] and rec["kl_learned"] < rec["kl_start"], rec
    assert rec["layers"] == 14 and rec["held_back_windows"] == 1  # 7 Linears x 2 blocks; the last eighth of 8
    # the block stage is the same in both runs: the codes agree, only the scales moved
    a, b = _qlinears(blockwise.module), _qlinears(tuned.module)
    assert a.keys() == b.keys()
    assert all(torch.equal(int_codes(a[n].qtensor()), int_codes(b[n].qtensor())) for n in a)
    assert any(not torch.equal(a[n].qtensor().tensors["scale"], b[n].qtensor().tensors["scale"]) for n in a)
    # and the whole model's KL to the float model went down on the calibration windows
    assert _kl(tuned, ref, data.ids) < _kl(blockwise, ref, data.ids)
    assert all(p.requires_grad for p in ref.parameters())
    lowbit.save(tuned, tmp_path / "art")
    back = lowbit.load(str(tmp_path / "art"))
    with torch.no_grad():
        torch.testing.assert_close(back(data.ids).logits, tuned(data.ids).logits, rtol=1e-4, atol=1e-4)


def test_end_to_end_streamed_from_disk_equals_in_memory(tiny_dir):
    opts = CalibOptions(**BLOCKS, learn_e2e_steps=5)
    streamed = streamed_from(tiny_dir, W4, "learned", options=opts)
    in_mem = in_memory(W4, "learned", load_calibration(TEXTS, make_tokenizer(), samples=2, seq_len=48), opts)
    assert "learned_e2e" in streamed.calibration
    assert same_state(streamed.module, in_mem.module)


def test_end_to_end_needs_the_learned_method_and_sane_settings():
    data = load_calibration(TEXTS, make_tokenizer(), samples=2, seq_len=48)
    with pytest.raises(LowbitError, match="--learn-e2e-steps works with --method learned"):
        in_memory(W4, "gptq", data, CalibOptions(learn_e2e_steps=5))
    with pytest.raises(LowbitError, match="--learn-e2e-batch is 0; it must be >= 1"):
        in_memory(W4, "learned", data, CalibOptions(**BLOCKS, learn_e2e_steps=5, learn_e2e_batch=0))
    with pytest.raises(LowbitError, match=r"--learn-e2e-lr is 0.0; it must be > 0"):
        in_memory(W4, "learned", data, CalibOptions(**BLOCKS, learn_e2e_steps=5, learn_e2e_lr=0.0))


def test_only_weight_only_integer_layers_with_row_or_group_scales_are_tuned():
    w = torch.randn(32, 64)
    assert e2e.tunable(QLinear.from_weight(w, QuantSpec(kind="int", bits=4, granularity="group", group_size=32)))
    assert e2e.tunable(QLinear.from_weight(w, QuantSpec(kind="int", bits=8, granularity="channel")))
    assert not e2e.tunable(QLinear.from_weight(w, QuantSpec(kind="int", bits=8, granularity="tensor")))
    assert not e2e.tunable(QLinear.from_weight(w, QuantSpec(kind="int", bits=8, granularity="channel",
                                                            activation="int8_dynamic")))
    assert not e2e.tunable(torch.nn.Linear(64, 32))


@pytest.mark.parametrize("checkpointed", [True, False])
def test_the_backward_pass_keeps_no_block_weight_under_checkpointing(monkeypatch, checkpointed):
    """The memory bound: during the stage autograd saves no float weight of a block for the backward pass
    (each block is run again when the backward pass reaches it). The control run without the checkpointing
    does save them, so the check can fail."""
    seen: list[tuple[int, ...]] = []
    real = e2e.tune_scales

    def watched(*a, **k):
        def pack(t):
            seen.append(tuple(t.shape))
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return real(*a, **k)

    monkeypatch.setattr(e2e, "tune_scales", watched)
    if not checkpointed:
        monkeypatch.setattr(e2e, "checkpoint", lambda fn, *a, use_reentrant: fn(*a))
    data = load_calibration(TEXTS, make_tokenizer(), samples=4, seq_len=48)
    tuned = in_memory(W4, "learned", data, CalibOptions(learn_steps=2, learn_batch=2, learn_e2e_steps=2))
    weights = {(q.out_features, q.in_features) for q in _qlinears(tuned.module).values()}
    assert seen  # the hooks did see the step's saved tensors (the head's, the KL's)
    assert bool(weights & set(seen)) is not checkpointed, (weights, sorted(set(seen)))
