"""End-to-end tuning of the group scales against the float model's logits (`--learn-e2e-steps`; after
EfficientQAT's second stage, E2E-QP).

Block-wise learned rounding (learned.py) matches each block's output; what a user measures is the
model's next-token distribution. This stage runs after every block is rounded: the integer codes stay
as they are and only each group's scale moves, for all quantized Linears of all blocks at once, to lower

    loss = mean over tokens of KL(p_float || p_quantized)

where p_float comes from the float model's last hidden states (the float stream the block loop already
carries to the end) through the final norm and the head, and p_quantized from the quantized blocks run
on the calibration windows' embeddings, through the same norm and head. The scale is learned as
s = s0 * exp(m) with m starting at 0 (a relative step, the same for every group's magnitude), by Adam
with its learning rate decayed linearly to zero, one or more windows a step.

Codes fixed, a scale per group: the artifact keeps its format (only the scale tensor's values change,
cast back to their storage dtype). As in the block stage, the result is kept only if the KL on the
held-back windows (the last eighth) went down, else the scales the blocks left are kept (recorded).

Memory: the whole quantized model (the streaming loop holds it by then anyway), each quantized weight's
code unpacked to one byte, five floats per group (s0, m, m's gradient and Adam's two moments), and during each
step each block's input (tokens x hidden) and the logits of the step's windows (tokens x vocabulary, with
their gradients). Each block runs under activation checkpointing: its float weights and inner
activations are not kept for the backward pass but made again, one block at a time, when the backward
pass reaches it (one more forward pass of the blocks a step). So the float weights of one block at a
time, as in the streaming loop; the codes of all blocks are the difference (one byte a weight). Weight-only
integer layers only: int8-activation layers and the head keep their scales (a quantized head serves
teacher and student alike, as its dequantized weight: the CPU kernels pass no gradient).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lowbit.calib.learned import held_back
from lowbit.calib.sequential import _block_out
from lowbit.formats import affine
from lowbit.formats.qtensor import int_codes, zero_of
from lowbit.model.qlinear import QLinear


class _Scaled(nn.Module):
    """A weight-only int QLinear as a float Linear whose scales are s0 * exp(m), m learnable; the weight is
    the format's own dequantization (affine.dequantize) of the fixed codes with those scales."""

    def __init__(self, q: QLinear) -> None:
        super().__init__()
        self.q, self.spec, self.bias = q, q.spec, q.bias
        t = q.qtensor().tensors
        # one byte a weight whatever the width: signed codes when symmetric, 0..2**b-1 otherwise
        self.codes = int_codes(q.qtensor()).to(torch.int8 if q.spec.symmetric else torch.uint8)
        self.zero = zero_of(t)
        self.s0 = t["scale"].float()
        self.inv = None if "perm" not in t else torch.argsort(t["perm"].long())  # stored order -> input order
        self.m = nn.Parameter(torch.zeros_like(self.s0))

    def scale(self) -> torch.Tensor:
        return self.s0 * torch.exp(self.m)

    def weight(self) -> torch.Tensor:
        w = affine.dequantize(self.codes, self.scale(), self.zero, self.spec)
        return w if self.inv is None else w[:, self.inv]

    def forward(self, x):
        return F.linear(x, self.weight().to(x.dtype), self.bias)

    def qlinear(self) -> QLinear:
        """The QLinear with the learned scales in their storage dtype; codes untouched."""
        q = self.q
        t = dict(q.qtensor().tensors)
        with torch.no_grad():
            t["scale"] = affine._store_scale(self.scale(), self.spec)
        return QLinear(q.in_features, q.out_features, q.spec, t, q.bias)


def tunable(q) -> bool:
    """A weight-only integer QLinear with a scale per row or per group (a per-tensor scale is left alone)."""
    return (isinstance(q, QLinear) and q.spec.kind == "int" and q.spec.activation == "none" and q.spec.bits <= 8
            and q.spec.granularity in ("channel", "group"))


def _head(model: nn.Module):
    """The model's logits from the final norm's output. A quantized head (QLinear) runs as its dequantized
    float weight (the CPU kernels carry no gradient back to their input; the same values)."""
    head = model.get_output_embeddings()
    if isinstance(head, QLinear):
        w = head.dequantized_weight(torch.float32)
        b = None if head.bias is None else head.bias.float()
        return lambda x: F.linear(x.float(), w, b)
    return head


def _logits(model: nn.Module, head, norm: nn.Module, h: torch.Tensor) -> torch.Tensor:
    z = head(norm(h)).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(z / cap) * cap if cap else z


def _run_block(layer: nn.Module, h: torch.Tensor, kw: dict) -> torch.Tensor:
    return _block_out(layer(h, **kw))


def _kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) from logits (..., vocab): eval.metrics.kld's formula,
    written here because calib sits a layer below eval and may not import it (docs/ARCHITECTURE.md,
    tests/test_layers.py)."""
    lt, ls = teacher.log_softmax(-1), student.log_softmax(-1)
    return (lt.exp() * (lt - ls)).sum(-1).mean()


def tune_scales(model: nn.Module, layers: nn.ModuleList, norm: nn.Module, x0s: list[torch.Tensor],
                hs_float: list[torch.Tensor], kwargs: list[dict], device, steps: int, lr: float = 1e-3,
                batch: int = 1, seed: int = 0, say=None) -> dict:
    """Tune the scales of every weight-only int QLinear in `layers` (in place: each is replaced by one
    with the learned scales when the held-back KL went down). x0s: the windows' inputs to block 0;
    hs_float: the float model's last hidden states on them (before the final norm); kwargs: per block, what
    it gets besides the stream (masks, rotary tables). Returns a record."""
    t0 = time.perf_counter()
    frozen = [p for p in model.parameters() if p.requires_grad]  # only the scales learn
    swapped: list[tuple[nn.Module, str, _Scaled]] = []
    for layer in layers:
        for name, mod in list(layer.named_modules()):
            if tunable(mod):
                parent, _, leaf = name.rpartition(".")
                owner = layer.get_submodule(parent) if parent else layer
                s = _Scaled(mod)
                setattr(owner, leaf, s)
                swapped.append((owner, leaf, s))
    if not swapped:
        return {"steps": 0, "kept": False, "skipped": "no weight-only integer Linear in the blocks"}
    params = [s.m for _, _, s in swapped]
    for p in frozen:
        p.requires_grad_(False)
    held, train = held_back(len(x0s))
    rng = torch.Generator().manual_seed(seed)
    head = _head(model)

    def loss_on(idx: list[int]) -> torch.Tensor:
        if len({x0s[i].shape for i in idx}) == 1:
            groups = [idx]
        else:  # unequal windows: one at a time
            groups = [[i] for i in idx]
        total = 0.0
        for g in groups:
            h = torch.cat([x0s[i] for i in g]).to(device)
            for layer, kw in zip(layers, kwargs):
                if torch.is_grad_enabled():  # keep only the block's input; its inside is run again in backward
                    h = checkpoint(_run_block, layer, h, kw, use_reentrant=False)
                else:
                    h = _run_block(layer, h, kw)
            with torch.no_grad():
                t = _logits(model, head, norm, torch.cat([hs_float[i] for i in g]).to(device))
            total = total + _kl(t, _logits(model, head, norm, h)) * len(g)
        return total / len(idx)

    def held_kl() -> float:
        with torch.no_grad():
            return float(sum(float(loss_on([i])) for i in held) / len(held))

    trace: list[float] = []
    kl_start = kl_end = math.nan
    try:
        kl_start = held_kl()
        opt = torch.optim.Adam(params, lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / max(steps, 1))
        order: list[int] = []
        with torch.enable_grad():
            for step in range(steps):
                if len(order) < batch:
                    order += [train[j] for j in torch.randperm(len(train), generator=rng).tolist()]
                idx, order = order[:batch], order[batch:]
                loss = loss_on(idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                trace.append(float(loss.detach()))
                if say and (step % 10 == 0 or step == steps - 1):
                    say(f"end-to-end scales: step {step + 1}/{steps}, KL {trace[-1]:.4f}")
        kl_end = held_kl()
    finally:  # on an error too: the model gets its QLinears back (unchanged unless kept)
        for p in frozen:
            p.requires_grad_(True)
        keep = math.isfinite(kl_end) and kl_end < kl_start
        for owner, leaf, s in swapped:
            setattr(owner, leaf, s.qlinear() if keep else s.q)
    moved = torch.cat([s.m.detach().abs().flatten() for _, _, s in swapped])
    return {"steps": steps, "lr": lr, "batch": batch, "kl_start": kl_start, "kl_learned": kl_end, "kept": keep,
            "kl_train_first": sum(trace[:10]) / max(len(trace[:10]), 1) if trace else None,
            "kl_train_last": sum(trace[-10:]) / max(len(trace[-10:]), 1) if trace else None,
            "scale_change_mean": float(moved.mean()), "scale_change_max": float(moved.max()),
            "layers": len(swapped), "held_back_windows": len(held), "seconds": round(time.perf_counter() - t0, 1)}
