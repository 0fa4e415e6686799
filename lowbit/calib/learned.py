"""Learned rounding, block by block (`--method learned`; after AutoRound's signed-gradient rounding and
EfficientQAT's block-wise training of the quantization parameters).

Round-to-nearest picks each weight's code alone. Here, for every quantized Linear of a decoder block,
a rounding offset V per weight (in [-0.5, 0.5]: up or down from nearest) and a shrink factor for the
minimum and the maximum of every group's range (in [MIN_SHRINK, 1]) are learned so that the block's
output on the calibration activations matches the float model's:

    q     = clamp(round(w / s + V) + z, qmin, qmax)          s, z from the group's shrunk [min, max]
    y, t  = block_q(x_q), block_float(x_f)
    loss  = mean over tokens of |y - t|^2 / |t|^2                 (loss="relative", the default; see _err)
          or mean((y - t)**2)                                     (loss="mse")

where x_q is the block's input in the model quantized so far and x_f its input in the float model. As in
AutoRound, the target is the float model's activation, not the float block run on the quantized input
(GPTQ's target), so each block also learns to cancel the error the blocks before it left. The loop keeps
both streams of activations (twice the activations' memory).

The rounding is made differentiable by the straight-through estimator (round's gradient taken as 1),
and the parameters move by the sign of their gradient (signSGD, learning rate decayed linearly to
zero), a few hundred steps per block on mini-batches of the calibration windows. Then the weights are
rounded once, in the format's exact storage (the same codes, scales and zero points as any other
method: same artifact, same kernels), and the quantized block's outputs become the next block's
inputs, as GPTQ does (the float block's outputs become the next float inputs). The result is kept only
if its loss on held-back windows is below the starting point's (else the block keeps its start, recorded).

The start is round to nearest on each group's full range, or (init, `--learn-init gptq`) GPTQ's result:
its scales and zero points, and the weights as GPTQ rounded them (each column with the earlier columns'
error spread in), so V = 0 reproduces GPTQ's codes and V picks the other neighbour of GPTQ's compensated
weight. From GPTQ only V is learned: its weights sit on its own scales' grid, which a moved range would
re-round wholesale.

Memory: the float model's activations beside the quantized ones (as large as the inputs the loop already
holds) and one copy of the block's weights' parameters: bounded like the other methods.
"""

from __future__ import annotations

import math
import time
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.calib.sequential import _block_out
from lowbit.formats import affine
from lowbit.formats.qtensor import QTensor, int_qtensor
from lowbit.formats.spec import QuantSpec

MIN_SHRINK = 0.5


@dataclass
class LearnOptions:
    steps: int = 200  # signSGD steps per block
    lr: float | None = None  # None: 2 / steps (twice AutoRound's default: measured better here, see docs/qat.md)
    batch: int = 4  # calibration windows per step
    seed: int = 0
    loss: str = "relative"  # "relative": each token's squared error over its target's square; "mse": plain;
    # "normed": relative, each channel weighted by the squared gain of the norms that read it (weight)
    weight: torch.Tensor | None = None  # "normed": (hidden,) per-channel factors; None: as "relative"
    readers: list | None = None  # "postnorm"/"lookahead": the norm modules that next read the output; None/empty: as "relative"
    # "lookahead": (the next block, its keyword arguments, the norms that read its output), the next block
    # kept in float and frozen; None (the last block): as "postnorm"
    ahead: tuple | None = None


def _err(y: torch.Tensor, t: torch.Tensor, loss: str, weight: torch.Tensor | None = None,
         readers: list | None = None) -> torch.Tensor:
    """The block's output error against its target t, averaged over tokens. "mse": the plain mean squared
    error. "relative": each token's squared error divided by its target's squared norm. The residual stream
    of these models carries massive activations at the first position (the attention sink: from SmolLM2's
    block 11 on, a mean square about 745,000 against at most 740 elsewhere), and its absolute error is most
    of the plain MSE (87% at block 15 under RTN W4: benchmarks/sink_share.py) while the next RMSNorm divides
    that magnitude away; the relative form weighs every token by the error the next block actually sees.
    "normed" (weight: one factor per channel, the squared gain of the norms that read the block's output;
    see sequential.stream_weight): the relative error of what those norms pass on. Gemma 3's stream keeps
    72-98% of its energy in four of its 640 channels at every position, channels its reading norms mostly
    scale by 0.1-2 against a median of 2.6-29 (benchmarks/stream_channels.py); unweighted, those channels
    carry most of the error the relative loss sees and the least of what the next block reads.
    "postnorm" (readers: the norm modules that next read the output): the relative error of the norms'
    outputs, averaged over the norms. Unlike "normed" it keeps the division by each token's RMS: an error
    in Gemma's four massive channels changes that RMS and so rescales every other channel the norm passes
    on, while an error along the token's own direction is divided away."""
    y, t = y.float(), t.float()
    if loss == "mse":
        return F.mse_loss(y, t)
    if loss in ("postnorm", "lookahead") and readers:
        total = 0.0
        for r in readers:
            ry, rt = r(y).float(), r(t).float()
            total = total + ((ry - rt).pow(2).sum(-1) / rt.pow(2).sum(-1).clamp(min=1e-12)).mean()
        return total / len(readers)
    if loss == "normed" and weight is not None:
        w = weight.to(y.device, torch.float32)
        d = ((y - t).pow(2) * w).sum(-1) / (t.pow(2) * w).sum(-1).clamp(min=1e-12)
        return d.mean()
    d = (y - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp(min=1e-12)
    return d.mean()


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class _Rounding:
    """One Linear's learnable rounding: offsets V, range shrink factors, and the fake-quantized weight."""

    def __init__(self, w: torch.Tensor, spec: QuantSpec, init: tuple[QTensor, torch.Tensor] | None = None,
                 learn_range: bool | None = None) -> None:
        """init: start from another method's (QTensor, the weights it rounded, in its stored column order):
        those weights are learned around, from its scales and zero points, so V = 0 reproduces its codes
        exactly. GPTQ's: V moves a code to the other neighbour of GPTQ's compensated weight. AWQ's: the
        scaled weights on AWQ's clipped ranges. None: start from w, round to nearest on each group's full
        range. learn_range: learn the range's shrink factors too (None: only without an init)."""
        self.spec = spec
        self.learn_range = init is None if learn_range is None else learn_range
        self.init = None if init is None else init[0]
        self.perm = None if init is None or "perm" not in init[0].tensors else init[0].tensors["perm"].long()
        self.inv = None if self.perm is None else torch.argsort(self.perm)  # stored order -> input order
        self.qmin, self.qmax = affine.qrange(spec.bits, spec.symmetric)
        if init is None:
            self.w = w.detach().float()
            self.g = affine.as_groups(self.w, spec)  # (rows, n_groups, gs)
            self.lo0, self.hi0 = self.g.amin(-1), self.g.amax(-1)
        else:
            self.w = init[1].float()  # stored order: groups run along it
            self.g = affine.as_groups(self.w, spec)
            self.lo0, self.hi0 = _range_of(init[0], spec, self.qmax)
        self.V = torch.zeros_like(self.g, requires_grad=True)
        self.a_lo = torch.ones_like(self.lo0, requires_grad=True)
        self.a_hi = torch.ones_like(self.hi0, requires_grad=True)

    def params(self) -> list[torch.Tensor]:
        """What is learned: the offsets and (learn_range) the range. GPTQ's weights sit on the grid of its
        own scales; a moved range would re-round them all, undoing its compensation."""
        return [self.V, self.a_lo, self.a_hi] if self.learn_range else [self.V]

    def clamp_(self) -> None:
        with torch.no_grad():
            self.V.clamp_(-0.5, 0.5)
            self.a_lo.clamp_(MIN_SHRINK, 1.0)
            self.a_hi.clamp_(MIN_SHRINK, 1.0)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lo0 * self.a_lo, self.hi0 * self.a_hi

    def weight(self) -> torch.Tensor:
        """The fake-quantized weight (rows, cols), differentiable in V and the range factors."""
        lo, hi = self._range()
        spec, qmin, qmax, g, V = self.spec, self.qmin, self.qmax, self.g, self.V
        tiny = 1e-10
        if spec.symmetric:
            s = (torch.maximum(lo.abs(), hi.abs()) / qmax).clamp(min=tiny).unsqueeze(-1)
            out = torch.clamp(_round_ste(g / s + V), qmin, qmax) * s
        elif spec.zero_domain == "float":
            s = ((hi - lo) / qmax).clamp(min=tiny).unsqueeze(-1)
            m = lo.unsqueeze(-1)
            out = torch.clamp(_round_ste((g - m) / s + V), qmin, qmax) * s + m
        else:
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
            s = ((hi - lo) / qmax).clamp(min=tiny).unsqueeze(-1)
            z = torch.clamp(_round_ste(-lo.unsqueeze(-1) / s), qmin, qmax)
            out = (torch.clamp(_round_ste(g / s + V) + z, qmin, qmax) - z) * s
        out = out.reshape(self.w.shape)
        if self.perm is not None:  # back to the input order
            out = out[:, self.inv]
        return out

    def qtensor(self, learned: bool = True) -> QTensor:
        """The stored form: scales and zero points from the learned range in their storage dtype, and
        codes round(w / s + V) (learned=False: the starting point, round to nearest on the full range or
        the init QTensor)."""
        if not learned and self.init is not None:
            return self.init
        with torch.no_grad():
            lo, hi = self._range() if learned else (self.lo0, self.hi0)
            scale, zero = affine.qparams_from_range(lo, hi, self.spec)
            x = self.g
            if learned:  # w + V * s: quantize() then computes round(w / s + V) (+ z) in the format's own rule
                x = self.g + self.V * scale.float().unsqueeze(-1)
            codes = affine.quantize(x.reshape(self.w.shape), scale, zero, self.spec)
            return int_qtensor(self.spec, codes, scale, zero, self.perm)


def _range_of(qt: QTensor, spec: QuantSpec, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's (lo, hi) that qparams_from_range turns back into qt's own scale and zero point."""
    t = qt.tensors
    s = t["scale"].float().reshape(t["scale"].shape[0], -1)
    if spec.symmetric:
        return -qmax * s, qmax * s
    if spec.zero_domain == "float":
        lo = t["offset"].float().reshape(s.shape)
        return lo, lo + qmax * s
    z = t["zero_point"].float().reshape(s.shape)
    return -z * s, (qmax - z) * s


def held_back(n: int) -> tuple[list[int], list[int]]:
    """(held-back, training) window indices: the last eighth (at least one) judges the result; with one
    window it serves both."""
    held = list(range(n))[-max(1, n // 8):] if n > 1 else [0]
    return held, [i for i in range(n) if i not in held] or held


def _mean(v: list[float]) -> float | None:
    return sum(v) / len(v) if v else None


def _patch(m: nn.Linear, r: _Rounding) -> None:
    def forward(self, x):
        return F.linear(x, r.weight().to(x.dtype), self.bias)

    m.forward = types.MethodType(forward, m)


def _unpatch(m: nn.Linear) -> None:
    m.__dict__.pop("forward", None)


def _loss(layer, xs, ys, kwargs, device, idx, loss: str, weight: torch.Tensor | None = None,
          readers: list | None = None, ahead: tuple | None = None, ys2: list | None = None) -> torch.Tensor:
    """The error (_err) of the block's outputs on windows idx. The windows go through the block as one
    batch (one fake-quantized weight per step, one larger GEMM); the block's other inputs (position
    embeddings, causal mask) were captured for one window and broadcast over the batch. Windows of
    unequal length (a user's short last window) go one at a time. ahead ("lookahead"): the outputs go on
    through the float next block as well, and the loss is the mean of the two blocks' errors after their
    reading norms (ys2: the next block's float targets)."""
    def err(y, i_s):
        e = _err(y, torch.cat([ys[i] for i in i_s]).to(device), loss, weight, readers)
        if ahead is None:
            return e
        nxt, nkw, nreaders = ahead
        y2 = _block_out(nxt(y, **nkw))
        return (e + _err(y2, torch.cat([ys2[i] for i in i_s]).to(device), loss, None, nreaders)) / 2

    if len(idx) > 1 and len({xs[i].shape for i in idx}) == 1:
        x = torch.cat([xs[i] for i in idx]).to(device)
        return err(_block_out(layer(x, **kwargs)), idx)
    total = 0.0
    for i in idx:
        total = total + err(_block_out(layer(xs[i].to(device), **kwargs)), [i])
    return total / len(idx)


def learn_block(layer: nn.Module, linears: dict[str, nn.Linear], specs: dict[str, QuantSpec], xs: list[torch.Tensor],
                kwargs: dict, device, options: LearnOptions, say=None,
                xs_float: list[torch.Tensor] | None = None,
                init: dict[str, tuple[QTensor, torch.Tensor]] | None = None,
                init_name: str = "gptq") -> tuple[dict[str, QTensor], dict, list[torch.Tensor]]:
    """Learn the rounding of `linears` (name -> Linear of `layer`) on the inputs xs (the quantized blocks'
    outputs so far). The targets are the float block's outputs on xs_float, the float model's own inputs
    to this block (None: on xs), so the block also learns to undo the error the blocks before it left
    (AutoRound's choice; GPTQ's targets are the float layer on the quantized inputs). init: name ->
    (QTensor, the weights it rounded) of the method init_name ("gptq": only V learned; "awq": V and the
    range) to start from (None or a missing name: round to nearest). Returns (name ->
    QTensor in the format's storage, a record of losses and time, the targets: the next block's xs_float)."""
    t0 = time.perf_counter()
    with torch.no_grad():
        ys = [_block_out(layer(x.to(device), **kwargs)).to("cpu", x.dtype) for x in (xs_float or xs)]
    if not linears:  # a block the recipe keeps in float: nothing to learn, only the float stream moves on
        return {}, {"steps": 0, "kept": True, "skipped": "no quantized Linear",
                    "seconds": round(time.perf_counter() - t0, 1)}, ys
    ahead = options.ahead if options.loss == "lookahead" else None
    ys2, frozen = None, []
    if ahead is not None:  # the next block's float outputs on the float stream: the second target
        nxt, nkw, _ = ahead
        frozen = [p for p in nxt.parameters() if p.requires_grad]
        for p in frozen:  # gradients flow through it to this block's weights, never into it
            p.requires_grad_(False)
        with torch.no_grad():
            ys2 = [_block_out(nxt(y.to(device), **nkw)).to("cpu", y.dtype) for y in ys]
    rng = torch.Generator().manual_seed(options.seed)
    held, train = held_back(len(xs))
    init = init or {}
    roundings = {name: _Rounding(m.weight, specs[name], init.get(name),
                                 learn_range=name not in init or init_name != "gptq")
                 for name, m in linears.items()}
    for name, m in linears.items():
        m.weight.requires_grad_(False)
        _patch(m, roundings[name])
    params = [p for r in roundings.values() for p in r.params()]
    lr0 = options.lr if options.lr is not None else 2.0 / max(options.steps, 1)
    trace: list[float] = []  # the training batches' losses
    try:
        with torch.no_grad():
            loss_start = float(_loss(layer, xs, ys, kwargs, device, held, options.loss, options.weight, options.readers, ahead, ys2))  # V = 0, full range: the starting point
        with torch.enable_grad():
            for step in range(options.steps):
                batch = torch.randperm(len(train), generator=rng)[: options.batch].tolist()
                loss = _loss(layer, xs, ys, kwargs, device, [train[b] for b in batch], options.loss, options.weight, options.readers, ahead, ys2)
                trace.append(float(loss.detach()))
                for p in params:
                    p.grad = None
                loss.backward()
                lr = lr0 * (1 - step / max(options.steps, 1))
                with torch.no_grad():
                    for p in params:
                        if p.grad is not None:
                            p.sub_(lr * p.grad.sign())
                for r in roundings.values():
                    r.clamp_()
        with torch.no_grad():
            loss_learned = float(_loss(layer, xs, ys, kwargs, device, held, options.loss, options.weight, options.readers, ahead, ys2))
    finally:
        for m in linears.values():
            _unpatch(m)
        for p in frozen:
            p.requires_grad_(True)
    keep = math.isfinite(loss_learned) and loss_learned <= loss_start
    out = {name: r.qtensor(learned=keep) for name, r in roundings.items()}
    start = sorted({init_name if r.init is not None else "rtn" for r in roundings.values()})
    found = {"normed": options.weight is not None, "postnorm": bool(options.readers),
             "lookahead": bool(options.readers)}.get(options.loss, True)
    loss_used = options.loss if found else "relative (no norm found)"
    if options.loss == "lookahead" and found and ahead is None:
        loss_used = "postnorm (last block: no block ahead)"
    record = {"start": "+".join(start), "loss": loss_used, "loss_start": loss_start, "loss_learned": loss_learned, "kept": keep,
              "steps": options.steps, "loss_train_first": _mean(trace[:10]), "loss_train_last": _mean(trace[-10:]),
              "target": "float model" if xs_float is not None else "float block", "seconds": round(time.perf_counter() - t0, 1)}
    return out, record, ys
