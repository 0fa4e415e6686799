"""Learned rounding (--method learned): lower block loss than round-to-nearest, the same storage as
every other method (what was learned is exactly what is stored), streamed from disk as the others."""

from __future__ import annotations

import torch

import lowbit
from lowbit.calib import CalibConfig, CalibOptions, load_calibration
from lowbit.calib import learned
from lowbit.calib.sequential import LEARN_LOSSES
from lowbit.formats.qtensor import dequantize_tensor
from lowbit.formats.spec import QuantSpec
from tests.calib.test_sequential import TEXTS, W4, in_memory, same_state, streamed_from
from tests.conftest import make_tiny_llama, make_tokenizer

FAST = CalibOptions(learn_steps=30, learn_batch=2)
RTN_START = CalibOptions(learn_steps=30, learn_batch=2, learn_init="rtn")
GPTQ_START = CalibOptions(learn_steps=30, learn_batch=2, learn_init="gptq")


def _layer0_kwargs(model, seq: int) -> dict:
    """The keyword arguments (rotary tables, mask) the model passes its first block, captured by a hook."""
    seen = {}

    def grab(mod, args, kwargs):
        seen.setdefault("kwargs", {k: v for k, v in kwargs.items() if k != "hidden_states"})

    h = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(torch.randint(0, 200, (1, seq)), use_cache=False)
    h.remove()
    return seen["kwargs"]


def test_the_stored_weight_is_the_learned_weight():
    """After learning, the fake-quantized weight the loss saw and the stored QTensor dequantize to the same
    values (up to the scales' float16 storage), for the three integer zero domains."""
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    for spec in (QuantSpec(kind="int", bits=4, granularity="group", group_size=32),
                 QuantSpec(kind="int", bits=4, granularity="group", group_size=32, symmetric=False),
                 QuantSpec(kind="int", bits=3, granularity="group", group_size=32, symmetric=False,
                           zero_domain="float", scale_dtype="float32")):
        r = learned._Rounding(w, spec)
        with torch.no_grad():
            r.V.uniform_(-0.5, 0.5)
            r.a_lo.uniform_(0.6, 1.0)
            r.a_hi.uniform_(0.6, 1.0)
        fake = r.weight().detach()
        stored = dequantize_tensor(r.qtensor(), torch.float32)
        step = (w.abs().amax() / 3).item()
        assert (fake - stored).abs().max() < 0.02 * step, spec.label
        # V = 0 and the full range is round to nearest exactly
        assert torch.equal(r.qtensor(learned=False).tensors["qdata"], lowbit.formats.quantize_tensor(w, spec).tensors["qdata"])


def test_learned_rounding_lowers_the_block_loss_and_saves_as_any_artifact(tmp_path):
    data = load_calibration(TEXTS, make_tokenizer(), samples=4, seq_len=48)
    q = in_memory(W4, "learned", data, RTN_START)
    blocks = q.calibration["learned_blocks"]
    assert len(blocks) == 2 and all(b["loss_learned"] < b["loss_start"] for b in blocks.values())
    assert {b["start"] for b in blocks.values()} == {"rtn"}
    assert q.calibration["method"] == "learned" and q.recipe.algorithm == "learned"
    ref, rtn = make_tiny_llama(), in_memory(W4, "rtn", data)
    with torch.no_grad():
        err = {k: (m(data.ids).logits - ref(data.ids).logits).pow(2).mean().item() for k, m in (("learned", q), ("rtn", rtn))}
    assert err["learned"] < err["rtn"], err
    lowbit.save(q, tmp_path / "art")
    back = lowbit.load(str(tmp_path / "art"))
    with torch.no_grad():
        torch.testing.assert_close(back(data.ids).logits, q(data.ids).logits, rtol=1e-4, atol=1e-4)


def test_streamed_from_disk_equals_in_memory(tiny_dir):
    streamed = streamed_from(tiny_dir, W4, "learned", options=FAST)
    in_mem = in_memory(W4, "learned", load_calibration(TEXTS, make_tokenizer(), samples=2, seq_len=48), FAST)
    assert same_state(streamed.module, in_mem.module)


def test_method_learned_needs_an_integer_recipe():
    import pytest

    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match="integer schemes"):
        lowbit.quantize(make_tiny_llama(), "nf4", tokenizer=make_tokenizer(),
                        calib=CalibConfig(method="learned", data=TEXTS, samples=2, seq_len=48))


def test_the_relative_loss_weighs_every_token_by_its_own_size():
    """A first token 100 times larger than the rest (the attention sink's massive activations) and the same
    10% error on every token: the relative loss is 0.01 whatever the sizes; the plain MSE is mostly the
    large token's. An unknown loss is refused before any work."""
    import pytest

    from lowbit.errors import LowbitError

    t = torch.ones(1, 3, 4)
    t[0, 0] *= 100
    y = t * 1.1
    torch.testing.assert_close(learned._err(y, t, "relative"), torch.tensor(0.01))
    torch.testing.assert_close(learned._err(y, t, "mse"), torch.tensor(0.01 * (10_000 + 1 + 1) / 3))
    with pytest.raises(LowbitError, match="--learn-loss 'l1' is unknown"):
        lowbit.quantize(make_tiny_llama(), "w4-g32", tokenizer=make_tokenizer(),
                        calib=CalibConfig(method="learned", data=TEXTS, samples=2, seq_len=48, learn_loss="l1"))


def test_the_awq_start_on_a_family_without_a_scale_table_says_which_starts_still_work():
    import pytest

    from lowbit.errors import LowbitError

    model = make_tiny_llama()
    model.config.model_type = "mystery"
    with pytest.raises(LowbitError, match="'mystery' has no scale-folding table, which --method learned --learn-init awq "
                                          r"needs.*--learn-init rtn or gptq"):
        lowbit.quantize(model, "w4-g32", tokenizer=make_tokenizer(),
                        calib=CalibConfig(method="learned", data=TEXTS, samples=2, seq_len=48, learn_init="awq"))


def test_windows_go_through_the_block_as_one_batch_with_the_same_loss():
    """The batched loss (one forward of several windows, the block's kwargs captured for one window and
    broadcast) equals the mean of the windows' own losses."""
    torch.manual_seed(0)
    model = make_tiny_llama()
    layer, kwargs = model.model.layers[0], _layer0_kwargs(model, 24)
    xs = [torch.randn(1, 24, model.config.hidden_size) for _ in range(3)]
    ys = [torch.randn(1, 24, model.config.hidden_size) for _ in range(3)]
    with torch.no_grad():
        for loss in LEARN_LOSSES:
            batched = learned._loss(layer, xs, ys, kwargs, "cpu", [0, 1, 2], loss)
            alone = sum(learned._loss(layer, xs, ys, kwargs, "cpu", [i], loss) for i in range(3)) / 3
            torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)


def test_the_targets_are_the_float_models_activations_not_the_float_block_on_quantized_inputs():
    """With xs_float given, the loss's targets (returned as the next block's float inputs) are the float
    block run on xs_float, and the block loop records that target for every block."""
    torch.manual_seed(0)
    model = make_tiny_llama()
    layer, kwargs = model.model.layers[0], _layer0_kwargs(model, 16)
    hidden = model.config.hidden_size
    xs, xs_float = ([torch.randn(1, 16, hidden) for _ in range(4)] for _ in range(2))
    with torch.no_grad():
        want = [learned._block_out(layer(x, **kwargs)) for x in xs_float]
    linears = {"mlp.down_proj": layer.mlp.down_proj}
    spec = QuantSpec(kind="int", bits=4, granularity="group", group_size=32)
    with torch.enable_grad():
        _, rec, targets = learned.learn_block(layer, linears, {"mlp.down_proj": spec}, xs, kwargs, "cpu",
                                              learned.LearnOptions(steps=3, batch=2), xs_float=xs_float)
    for got, w in zip(targets, want):
        torch.testing.assert_close(got, w)
    assert rec["target"] == "float model"
    data = load_calibration(TEXTS, make_tokenizer(), samples=4, seq_len=48)
    q = in_memory(W4, "learned", data, FAST)
    assert {b["target"] for b in q.calibration["learned_blocks"].values()} == {"float model"}


def test_a_gptq_start_is_reproduced_exactly_before_learning():
    """Started from GPTQ's result (act-order: a column permutation, groups along it) and the weights it
    rounded, V = 0 gives back GPTQ's codes, scales and zero points, and the fake-quantized weight the loss
    sees is GPTQ's dequantized weight in the input order; after moving V, what is stored is what the loss
    saw."""
    from lowbit.calib import gptq

    torch.manual_seed(0)
    w, x = torch.randn(16, 64), torch.randn(256, 64) * torch.linspace(0.2, 3, 64)
    H = x.T @ x / x.shape[0]
    for spec in (QuantSpec(kind="int", bits=4, granularity="group", group_size=32, symmetric=False, scale_dtype="float16"),
                 QuantSpec(kind="int", bits=3, granularity="group", group_size=32),
                 QuantSpec(kind="int", bits=4, granularity="group", group_size=32, symmetric=False,
                           zero_domain="float", scale_dtype="float32"),
                 QuantSpec(kind="int", bits=4, granularity="channel")):  # act-order undone in storage
        init, updated = gptq.gptq_quantize(w, H, spec, act_order=True, return_updated=True)
        assert ("perm" in init.tensors) == (spec.granularity == "group") and torch.equal(gptq.gptq_quantize(w, H, spec, act_order=True).tensors["qdata"],
                                                      init.tensors["qdata"])
        r = learned._Rounding(w, spec, (init, updated))
        with torch.no_grad():
            torch.testing.assert_close(r.weight(), dequantize_tensor(init, torch.float32), rtol=0, atol=1e-6)
        r.V.requires_grad_(False)
        r.a_lo.requires_grad_(False)
        r.a_hi.requires_grad_(False)
        again = r.qtensor()  # learned = True, V = 0, full range: the same storage
        for k, t in init.tensors.items():
            assert torch.equal(again.tensors[k], t), (spec.label, k)
        assert r.qtensor(learned=False) is init
        assert r.params() == [r.V]  # GPTQ's scales are kept: only the offsets are learned
        with torch.no_grad():
            r.V.uniform_(-0.5, 0.5)
        step = (w.abs().amax() / 3).item()
        assert (r.weight() - dequantize_tensor(r.qtensor(), torch.float32)).abs().max() < 0.02 * step, spec.label


def test_learning_from_gptq_does_not_end_worse_than_gptq():
    """The block loop starts learned rounding from GPTQ's result and keeps GPTQ's where learning did not
    lower the held-back loss: the model's error against the float one is at most GPTQ's (plus noise
    from the held-back choice) on the calibration windows, and below round to nearest's."""
    data = load_calibration(TEXTS, make_tokenizer(), samples=4, seq_len=48)
    q = in_memory(W4, "learned", data, GPTQ_START)
    assert {b["start"] for b in q.calibration["learned_blocks"].values()} == {"gptq"}
    gptq_q, rtn = in_memory(W4, "gptq", data), in_memory(W4, "rtn", data)
    ref = make_tiny_llama()
    with torch.no_grad():
        err = {k: (m(data.ids).logits - ref(data.ids).logits).pow(2).mean().item()
               for k, m in (("learned", q), ("gptq", gptq_q), ("rtn", rtn))}
    assert err["learned"] < err["rtn"] and err["learned"] < 1.05 * err["gptq"], err


def test_an_awq_start_is_awq_until_learning_moves_it():
    """Started from AWQ (its scales folded into the norms, its clipped ranges), learned rounding with a
    learning rate of 0 stores exactly what --method awq stores; after learning, the ranges move too, the
    record names the start, and the error against the float model is at most AWQ's (plus the held-back
    choice's noise) and below round to nearest's."""
    data = load_calibration(TEXTS, make_tokenizer(), samples=4, seq_len=48)
    awq_q = in_memory(W4, "awq", data)
    still = in_memory(W4, "learned", data, CalibOptions(learn_steps=3, learn_batch=2, learn_init="awq", learn_lr=0.0))
    assert same_state(still.module, awq_q.module)
    q = in_memory(W4, "learned", data, CalibOptions(learn_steps=30, learn_batch=2, learn_init="awq"))
    assert {b["start"] for b in q.calibration["learned_blocks"].values()} == {"awq"}
    assert q.calibration["awq_ratios"]  # the scales were searched, as --method awq does
    rtn, ref = in_memory(W4, "rtn", data), make_tiny_llama()
    with torch.no_grad():
        err = {k: (m(data.ids).logits - ref(data.ids).logits).pow(2).mean().item()
               for k, m in (("learned", q), ("awq", awq_q), ("rtn", rtn))}
    assert err["learned"] < err["rtn"] and err["learned"] < 1.05 * err["awq"], err


def _random_norms(model):
    """Norm weights away from 1, so the gains the normed loss reads are visible."""
    g = torch.Generator().manual_seed(3)
    for n, p in model.named_parameters():
        if "norm" in n:
            p.data = torch.rand(p.shape, generator=g) * 2 + 0.1
    return model


def test_the_normed_loss_weighs_each_channel_by_the_gain_of_the_norms_that_read_it():
    """_err "normed": with unit weights it is the relative loss; a channel of weight 0 does not count. The
    weight the block loop gives block i is the mean squared gain of block i+1's two stream norms (Llama:
    input and post-attention), and of the final norm after the last block."""
    from lowbit.calib.sequential import _BlockLoop

    t = torch.randn(1, 5, 4)
    y = t.clone()
    y[..., 0] += 3.0
    torch.testing.assert_close(learned._err(y, t, "normed", torch.ones(4)), learned._err(y, t, "relative"))
    w = torch.ones(4)
    w[0] = 0
    assert float(learned._err(y, t, "normed", w)) == 0.0
    assert float(learned._err(y, t, "normed", None)) == float(learned._err(y, t, "relative"))  # no norm found
    model = _random_norms(make_tiny_llama())
    loop = _BlockLoop(model, W4, "learned", None, CalibOptions(learn_loss="normed"), None)
    nxt = model.model.layers[1]
    torch.testing.assert_close(loop.stream_weight(0), (nxt.input_layernorm.weight.detach() ** 2
                                                       + nxt.post_attention_layernorm.weight.detach() ** 2) / 2)
    torch.testing.assert_close(loop.stream_weight(1), model.model.norm.weight.detach() ** 2)


def test_the_normed_loss_streamed_from_disk_equals_in_memory(tmp_path):
    """Streamed, the next block's norm is read from the checkpoint (the module does not hold it yet): the
    same result as in memory, and every block records the loss it used."""
    from tests.conftest import save_hf

    opts = CalibOptions(learn_steps=20, learn_batch=2, learn_loss="normed")
    folder = save_hf(_random_norms(make_tiny_llama()), tmp_path / "tiny")
    streamed = streamed_from(folder, W4, "learned", options=opts)
    in_mem = in_memory(W4, "learned", load_calibration(TEXTS, make_tokenizer(), samples=2, seq_len=48), opts,
                       model=_random_norms(make_tiny_llama()))
    assert same_state(streamed.module, in_mem.module)
    assert {b["loss"] for b in streamed.calibration["learned_blocks"].values()} == {"normed"}


def test_the_postnorm_loss_is_the_relative_error_after_the_reading_norms():
    """_err "postnorm": the relative error of what the reading norms pass on. An error along the token's own
    direction (a rescaled token) is divided away by the RMS; an error in one massive channel counts as the
    rescaling it causes in every other channel (the "normed" weights miss that); with no norm found it is
    the relative loss. The block loop hands block i the norms of block i+1 (and the final norm last)."""
    from lowbit.calib.sequential import _BlockLoop

    model = _random_norms(make_tiny_llama())
    loop = _BlockLoop(model, W4, "learned", None, CalibOptions(learn_loss="postnorm"), None)
    readers = loop.stream_readers(0)
    nxt = model.model.layers[1]
    assert len(readers) == 2
    torch.testing.assert_close(readers[0].weight, nxt.input_layernorm.weight.detach())
    torch.testing.assert_close(readers[1].weight, nxt.post_attention_layernorm.weight.detach())
    last = loop.stream_readers(1)
    assert len(last) == 1 and torch.equal(last[0].weight, model.model.norm.weight.detach())
    t = torch.randn(1, 5, 64)
    assert float(learned._err(1.5 * t, t, "postnorm", readers=readers)) < 1e-10  # scale: divided away
    assert float(learned._err(1.5 * t, t, "relative")) > 0.2
    big = t.clone()
    big[..., 0] = 24.0  # one massive channel, about 90% of the energy, as in Gemma 3's stream
    y = big.clone()
    y[..., 0] = 19.2  # a 20% error there rescales every other channel by about 1.2
    reader = type(readers[0])(64, eps=1e-6)
    reader.weight.data[:] = 10.0  # the norm scales the massive channel down against the rest
    reader.weight.data[0] = 1.0
    w = reader.weight.detach() ** 2
    with torch.no_grad():
        post = float(learned._err(y, big, "postnorm", readers=[reader]))
    normed = float(learned._err(y, big, "normed", w))
    assert post > 0.02 and post > 5 * normed, (post, normed)
    torch.testing.assert_close(learned._err(y, big, "postnorm", readers=[]), learned._err(y, big, "relative"))


def test_the_postnorm_loss_streamed_from_disk_equals_in_memory_and_beats_rtn(tmp_path):
    """Streamed, the readers' weights come from the checkpoint: the same result as in memory; every block
    records "postnorm"; and the learned model is closer to the float one than round to nearest."""
    from tests.conftest import save_hf

    opts = CalibOptions(learn_steps=20, learn_batch=2, learn_loss="postnorm")
    folder = save_hf(_random_norms(make_tiny_llama()), tmp_path / "tiny")
    streamed = streamed_from(folder, W4, "learned", options=opts)
    data = load_calibration(TEXTS, make_tokenizer(), samples=2, seq_len=48)
    in_mem = in_memory(W4, "learned", data, opts, model=_random_norms(make_tiny_llama()))
    assert same_state(streamed.module, in_mem.module)
    assert {b["loss"] for b in streamed.calibration["learned_blocks"].values()} == {"postnorm"}
    # 20 steps keep round to nearest in these blocks (the held-back loss rises); 100 learn block 0
    learnt = in_memory(W4, "learned", data, CalibOptions(learn_steps=100, learn_batch=2, learn_loss="postnorm"),
                       model=_random_norms(make_tiny_llama()))
    assert learnt.calibration["learned_blocks"][0]["kept"]
    rtn, ref = in_memory(W4, "rtn", data, model=_random_norms(make_tiny_llama())), _random_norms(make_tiny_llama())
    with torch.no_grad():
        err = {k: (m(data.ids).logits - ref(data.ids).logits).pow(2).mean().item()
               for k, m in (("learned", learnt), ("rtn", rtn))}
    assert err["learned"] < err["rtn"], err


def test_the_lookahead_loss_is_the_mean_of_this_and_the_next_blocks_postnorm_errors():
    """_loss with a block ahead: the block's output goes on through the float next block; the loss is the
    mean of the postnorm error at the block's output and at the next block's, against the next block's
    float outputs. The next block is never trained: no gradient reaches its weights."""
    from lowbit.calib.learned import _loss
    from lowbit.calib.sequential import _BlockLoop

    model = _random_norms(make_tiny_llama())
    loop = _BlockLoop(model, W4, "learned", None, CalibOptions(learn_loss="lookahead"), None)
    layer, nxt = model.model.layers[0], model.model.layers[1]
    kw = _layer0_kwargs(model, 6)
    nxt_kw = dict(kw)  # the tiny Llama's blocks share their rotary tables and mask
    xs = [torch.randn(1, 6, 64) for _ in range(3)]
    with torch.no_grad():
        ys = [learned._block_out(layer(x + 0.1 * torch.randn_like(x), **kw)) for x in xs]
        ys2 = [learned._block_out(nxt(y, **nxt_kw)) for y in ys]
        r0, r1 = loop.stream_readers(0), loop.stream_readers(1)
        got = _loss(layer, xs, ys, kw, "cpu", [0, 1, 2], "lookahead", None, r0, (nxt, nxt_kw, r1), ys2)
        y = torch.cat([learned._block_out(layer(x, **kw)) for x in xs])
        want = (learned._err(y, torch.cat(ys), "postnorm", readers=r0)
                + learned._err(learned._block_out(nxt(y, **nxt_kw)), torch.cat(ys2), "postnorm", readers=r1)) / 2
    torch.testing.assert_close(got, want)
    assert float(got) != float(learned._err(y, torch.cat(ys), "postnorm", readers=r0))


def test_the_lookahead_loss_streamed_equals_in_memory_freezes_the_block_ahead_and_beats_rtn(tmp_path):
    """Streamed, the block ahead is read from the checkpoint a block early: the same result as in memory.
    Every block but the last records "lookahead" (the last has no block ahead: postnorm); the model's
    parameters keep the requires_grad they had; 100 steps end closer to the float model than round to
    nearest."""
    from tests.conftest import save_hf

    opts = CalibOptions(learn_steps=20, learn_batch=2, learn_loss="lookahead")
    folder = save_hf(_random_norms(make_tiny_llama()), tmp_path / "tiny")
    streamed = streamed_from(folder, W4, "learned", options=opts)
    data = load_calibration(TEXTS, make_tokenizer(), samples=2, seq_len=48)
    model = _random_norms(make_tiny_llama())
    in_mem = in_memory(W4, "learned", data, opts, model=model)
    assert same_state(streamed.module, in_mem.module)
    losses = {bi: b["loss"] for bi, b in streamed.calibration["learned_blocks"].items()}
    assert losses == {0: "lookahead", 1: "postnorm (last block: no block ahead)"}, losses
    assert all(p.requires_grad for p in model.parameters() if p.is_floating_point())
    learnt = in_memory(W4, "learned", data, CalibOptions(learn_steps=100, learn_batch=2, learn_loss="lookahead"),
                       model=_random_norms(make_tiny_llama()))
    rtn, ref = in_memory(W4, "rtn", data, model=_random_norms(make_tiny_llama())), _random_norms(make_tiny_llama())
    with torch.no_grad():
        err = {k: (m(data.ids).logits - ref(data.ids).logits).pow(2).mean().item()
               for k, m in (("learned", learnt), ("rtn", rtn))}
    assert err["learned"] < err["rtn"], err
