"""Quantization-aware training with distillation: `lowbit qat BASELINE --recipe R --out ART --steps N`.

When post-training quantization misses the criteria and training is affordable, the quantized
model's weights are trained so that it matches the full-precision model:

- every decoder-block Linear the recipe quantizes runs on its weight fake-quantized in the recipe's
  exact format (lowbit's own quantize_tensor / dequantize_tensor, scales and zero points from the
  current weight), with the straight-through estimator: the gradient reaches the float weight as if
  rounding were the identity. At the end the trained weights are quantized with the same recipe
  (round to nearest), so the artifact holds exactly the codes the last training step computed;
- the loss is KL(teacher || student) per token on the teacher's (the baseline's) full next-token
  distribution over the training windows (distillation: the student learns the teacher's outputs,
  not the text's next tokens);
- only the block Linears' weights train (norms, embedding and head are frozen, and the head keeps the
  recipe's format by round to nearest), with Adam and a linearly decayed learning rate.

Training state is checkpointed every `checkpoint_every` steps to `OUT.qat-state/` (written to a
temporary name and renamed), and a run with the same settings resumes from it. A loss that is not
finite stops the run: the last good checkpoint is kept and the error says so. The artifact is
written atomically (lowbit.save), then the state folder is removed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError

MAX_EPOCHS = 20  # more passes over the data than this: "too little data for the requested steps"


@dataclass
class QATConfig:
    steps: int = 200
    lr: float = 1e-5
    batch: int = 4  # windows per step
    seq_len: int = 256
    data: str | Path | list = "mix"  # a .txt / .jsonl file, a built-in set, or texts (as --calib)
    samples: int = 256  # windows read from the data
    checkpoint_every: int = 50
    seed: int = 0
    lora_rank: int = 0  # 0: train every block weight; r > 0: rank-r adapters on the frozen quantized base (peft)
    merge_tolerance: float = 0.02  # LoRA: the largest mean KLD allowed between the trained model and its merged,
    # requantized artifact on the check windows

    def check(self) -> "QATConfig":
        for name, lo, hi in (("steps", 1, 1_000_000), ("batch", 1, 1024), ("seq_len", 8, 131_072),
                             ("samples", 1, 1_000_000), ("checkpoint_every", 1, 1_000_000), ("lora_rank", 0, 4096)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise LowbitError(f"qat --{name.replace('_', '-')}: {v!r} is out of range; fix: a whole number "
                                  f"from {lo} to {hi:,}")
        if not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or not 0 < self.lr <= 1:
            raise LowbitError(f"qat --lr: {self.lr!r}; fix: a number above 0 and at most 1 (e.g. 1e-5)")
        if not isinstance(self.merge_tolerance, (int, float)) or not math.isfinite(self.merge_tolerance) \
                or self.merge_tolerance < 0:
            raise LowbitError(f"qat --merge-tolerance: {self.merge_tolerance!r}; fix: a mean KLD of 0 or more (e.g. 0.02)")
        return self

    def fingerprint(self, baseline: str, recipe: dict) -> str:
        d = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()
             if k not in ("checkpoint_every", "merge_tolerance")}
        blob = json.dumps({"cfg": d, "baseline": baseline, "recipe": recipe}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class QATResult:
    model: object  # the quantized lowbit.Model (saved at out)
    out: Path
    steps: int
    resumed_from: int
    losses: list[float]
    seconds: float
    peak_rss_bytes: int | None
    merge_kld: float | None = None  # LoRA: mean KLD of the merged, requantized artifact to the trained model


def _fake_quant(w: torch.Tensor, spec) -> torch.Tensor:
    """w in the recipe's format and back, with the gradient passed straight through to w."""
    from lowbit.formats import dequantize_tensor, quantize_tensor

    with torch.no_grad():
        wq = dequantize_tensor(quantize_tensor(w.detach(), spec), w.dtype)
    return w + (wq - w).detach()


def _patch(m: nn.Linear, spec) -> None:
    def forward(self, x):
        return F.linear(x, _fake_quant(self.weight, spec), self.bias)

    m.forward = types.MethodType(forward, m)


FAKE_QUANT_KINDS = ("int", "nf4", "fp8_e4m3", "fp8_e5m2")


def _no_fake_quant(spec) -> bool:
    return spec.kind not in FAKE_QUANT_KINDS or spec.activation != "none"


def check_recipe(recipe) -> None:
    """Refuse, before any model loads, a recipe whose scheme has no fake quantizer here. Overrides are
    judged by trainable(), on the block modules they actually match (one for the head may be anything)."""
    if _no_fake_quant(recipe.scheme):
        raise LowbitError(f"qat --recipe {recipe.name}: field 'scheme' has format {recipe.scheme.label}, which has no "
                          f"fake quantizer here (weight-only int, NF4 and FP8 formats have); fix: a weight-only recipe "
                          f"such as w4-g128")


def trainable(student: nn.Module, recipe) -> dict[str, tuple[nn.Linear, object]]:
    """The decoder-block Linears the recipe quantizes: name -> (module, spec)."""
    from lowbit.calib.sequential import decoder_layers
    from lowbit.model.quantize import plan_model

    prefix, _ = decoder_layers(student)
    out = {}
    for p in plan_model(student, recipe):
        if p.spec is None or not p.name.startswith(prefix + "."):
            continue
        if _no_fake_quant(p.spec):
            raise LowbitError(f"qat: module {p.name} has format {p.spec.label}, which has no fake quantizer here "
                              f"(weight-only int, NF4 and FP8 formats have); fix: a weight-only recipe such as w4-g128")
        out[p.name] = (student.get_submodule(p.name), p.spec)
    if not out:
        raise LowbitError("qat: the recipe quantizes no decoder-block Linear of this model; fix: another recipe")
    return out


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rss() -> int | None:
    from lowbit.benchmark.latency import max_rss_bytes

    try:
        return max_rss_bytes()
    except OSError:
        return None


def train(baseline, recipe, out: str | Path, config: QATConfig, *, force: bool = False,
          progress: Callable[[int, int, float], None] | None = None, say=lambda s: None) -> QATResult:
    """Train, quantize and save. baseline: a float model (path, bundled name or lowbit.Model)."""
    from lowbit import api
    from lowbit.calib.data import load_calibration
    from lowbit.model.handle import as_model
    from lowbit.recipe import resolve_recipe

    config.check()
    recipe = resolve_recipe(recipe) if not hasattr(recipe, "scheme") else recipe
    check_recipe(recipe)
    out = Path(out)
    if out.exists() and not force:
        raise LowbitError(f"qat --out {out}: exists; fix: another path, or --force to replace it")
    t0 = time.perf_counter()
    teacher = api.load(baseline) if isinstance(baseline, (str, Path)) else as_model(baseline)
    if teacher.quantized or teacher.is_artifact:
        raise LowbitError("qat BASELINE: a quantized model was given; fix: the full-precision model it came from")
    tok = teacher.need_tokenizer("qat")
    data = load_calibration(config.data, tok, config.samples, config.seq_len)
    windows = data.ids
    if windows.shape[0] < config.batch:
        raise LowbitError(f"qat --data: {windows.shape[0]} window(s) of {config.seq_len} tokens, fewer than one batch "
                          f"({config.batch}); fix: more text, a smaller --batch or --seq-len")
    epochs = config.steps * config.batch / windows.shape[0]
    if epochs > MAX_EPOCHS:
        raise LowbitError(f"qat --data: {windows.shape[0]} windows for {config.steps} steps of {config.batch} would "
                          f"read the data {epochs:.0f} times (more than {MAX_EPOCHS}); fix: more text (or --samples), "
                          f"or fewer --steps")
    student = api.load(baseline) if isinstance(baseline, (str, Path)) else _copy(teacher)
    teacher.module.eval()
    student.module.eval()  # no dropout; the gradients still flow
    for p in teacher.module.parameters():
        p.requires_grad_(False)
    for p in student.module.parameters():
        p.requires_grad_(False)
    mods = trainable(student.module, recipe)
    lora = config.lora_rank > 0
    for m, spec in mods.values():
        if lora:  # the frozen base is the quantized model itself: its weights on the grid
            with torch.no_grad():
                m.weight.copy_(_fake_quant(m.weight, spec))
        else:
            m.weight.requires_grad_(True)
        _patch(m, spec)
    net = student.module
    if lora:
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(student.module, LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank,
                                                        target_modules=list(mods), lora_dropout=0.0, bias="none"))
    named = ({n: p for n, p in net.named_parameters() if p.requires_grad} if lora
             else {n: m.weight for n, (m, _) in mods.items()})
    params = list(named.values())
    opt = torch.optim.Adam(params, lr=config.lr)
    state_dir = out.with_name(out.name + ".qat-state")
    fp = config.fingerprint(str(teacher.source.get("sha256") or teacher.name), recipe.to_dict())
    start, losses = 0, []
    state_file = state_dir / "state.pt"
    if state_file.is_file():
        st = torch.load(state_file, weights_only=False)
        if st.get("fingerprint") != fp:
            raise LowbitError(f"qat: {state_dir} holds the state of a run with other settings; fix: the same settings "
                              f"to resume, or remove the folder to start again")
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(st["weights"][name])
        opt.load_state_dict(st["optimizer"])
        start, losses = st["step"], st["losses"]
        say(f"resuming from step {start} ({state_dir})")
    gen = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(windows.shape[0], generator=gen)
    per_epoch = max(1, windows.shape[0] // config.batch)

    def batch_at(step: int) -> torch.Tensor:
        e, i = divmod(step, per_epoch)
        perm = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(config.seed + e)) if e else order
        return windows[perm[i * config.batch:(i + 1) * config.batch]]

    def checkpoint(step: int) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        _atomic_save({"fingerprint": fp, "step": step, "losses": losses, "optimizer": opt.state_dict(),
                      "weights": {n: p.detach().clone() for n, p in named.items()}}, state_file)

    step = start
    try:
        for step in range(start, config.steps):
            ids = batch_at(step)
            with torch.no_grad():
                t_lp = teacher.module(ids).logits.float().log_softmax(-1)
            s_lp = net(input_ids=ids).logits.float().log_softmax(-1)
            loss = (t_lp.exp() * (t_lp - s_lp)).sum(-1).mean()
            if not torch.isfinite(loss.detach()):
                last = torch.load(state_file, weights_only=False)["step"] if state_file.is_file() else 0
                raise LowbitError(f"qat: the loss is {float(loss.detach())} at step {step + 1}; training stopped. The last good "
                                  f"checkpoint (step {last}) is kept in {state_dir}; fix: a smaller --lr (now "
                                  f"{config.lr:g}), then run again to resume")
            for g in opt.param_groups:
                g["lr"] = config.lr * (1 - step / config.steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if progress:
                progress(step + 1, config.steps, losses[-1])
            if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
                checkpoint(step + 1)
        merge_kld = None
        if lora:  # merge the adapters into the quantized base, requantize, and check what that changed
            checkpoint(len(losses))  # a merge refused below can be retried with another tolerance, no retraining
            check = windows[order[: min(4, windows.shape[0])]]
            with torch.no_grad():
                ref = net(input_ids=check).logits.float().log_softmax(-1)
            net = net.merge_and_unload()
    except KeyboardInterrupt:
        checkpoint(len(losses))
        say(f"interrupted: the state after step {len(losses)} is saved in {state_dir}; the same command resumes")
        raise
    finally:
        for m, _ in mods.values():
            m.__dict__.pop("forward", None)
            m.weight.requires_grad_(False)
    peak = _rss()
    say("quantizing the trained weights")
    if lora:
        student.module = net
    q = api.quantize(student, recipe)
    if lora:
        with torch.no_grad():
            got = q.module(check).logits.float().log_softmax(-1)
        merge_kld = float((ref.exp() * (ref - got)).sum(-1).mean())
        if not merge_kld <= config.merge_tolerance:
            raise LowbitError(f"qat --lora: merging the adapters and requantizing changed the outputs by a mean KLD of "
                              f"{merge_kld:.4f}, above --merge-tolerance {config.merge_tolerance:g}; nothing was "
                              f"written to {out}. The trained adapters are kept in {state_dir}. Fix: accept it "
                              f"(rerun with a higher --merge-tolerance: no retraining), or train every weight "
                              f"(without --lora), whose result needs no merge")
    q.calibration = {"method": "qat", "steps": config.steps, "lr": config.lr, "batch": config.batch,
                     "data": {"source": data.source, **data.stats}, "loss_first": losses[0] if losses else None,
                     "loss_last": losses[-1] if losses else None, "resumed_from": start,
                     **({"lora_rank": config.lora_rank, "merge_kld": merge_kld} if lora else {}),
                     "seconds": round(time.perf_counter() - t0, 1)}
    api.save(q, out, force=force)
    shutil.rmtree(state_dir, ignore_errors=True)
    return QATResult(q, out, config.steps, start, losses, time.perf_counter() - t0, peak, merge_kld)


def compare(baseline, ptq, qat, spec=None, quick: bool = True) -> dict:
    """PTQ and QAT against the same baseline and criteria: each one's gate run (a spec) or evaluation
    (none), and the share of PTQ's mean-KLD gap that training recovered."""
    from lowbit import api

    runs = {}
    for name, m in (("ptq", ptq), ("qat", qat)):
        runs[name] = (api.gate(spec, baseline, m, quick=quick) if spec is not None
                      else api.evaluate(baseline, m, config=api.EvalConfig(quick=quick)))
    k_ptq, k_qat = (runs[n]["divergence"]["mean_kld"] for n in ("ptq", "qat"))
    return {"runs": runs, "mean_kld": {"ptq": k_ptq, "qat": k_qat},
            "recovered_pct": 100 * (k_ptq - k_qat) / k_ptq if k_ptq > 0 else None}


def _copy(handle):
    import copy

    from lowbit.model.handle import Model

    return Model(copy.deepcopy(handle.module), handle.tokenizer, dict(handle.source), handle.folder)
