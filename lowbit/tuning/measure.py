"""Sensitivity: how much KL divergence each module adds under each format of the menu.

For a Linear with weight w, a format turns w into w + dw and its output y = w x into y + dw x. To
second order, the KL divergence of the model's next-token distribution from the float model's is
half the output change weighted by the Fisher information of the output:

    KL ~ 1/2 * sum over tokens t and output rows j of  F[t, j] * (dw[j] . x[t])**2

F is estimated with the model's own predictions: labels are sampled from its softmax (not read from
the text), so the squared gradient of their log-likelihood is an unbiased Fisher estimate. The
tokens' Fisher and activations are taken as independent (the Kronecker factorisation of K-FAC):

    KL_module ~ 1/2 * sum_j G[j] * dw[j] A dw[j]^T / tokens,   G[j] = sum_t g[t, j]**2,  A = mean_t x[t] x[t]^T

which is additive over modules and in the units the gate measures (mean KLD per token). Cross terms
between modules are ignored; the tuner's trials measure the real thing and correct the estimate.

One forward and one backward pass per calibration window on the float model (held in memory: the
backward pass needs every block at once); no parameter gradients are kept.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats.qtensor import qdq
from lowbit.model.handle import Model
from lowbit.tuning.menu import HEAD, MENU, Option, fitted, spec_bytes
from lowbit.version import __version__

MEASUREMENT_VERSION = 1
MAX_MEASUREMENT_BYTES = 64_000_000


@dataclass
class ModuleCost:
    name: str
    rows: int
    cols: int
    kld: dict[str, float]  # option key -> estimated mean KLD per token this module adds
    bytes: dict[str, int]  # option key -> stored bytes
    spec: dict[str, dict | None]  # option key -> the fitted spec (groups shrunk for this row length)


@dataclass
class Measurement:
    model: dict  # name, sha256 of the float weights
    calibration: dict  # source, samples, seq_len, tokens
    modules: list[ModuleCost]
    fixed_bytes: int  # everything that is not a menu module (head in INT8, norms, untied embeddings)
    params: int  # parameters of the whole model (embeddings included)
    float_bytes: int  # the float model's weight bytes in memory (what the gate's memory criterion compares to)
    seconds: float = 0.0
    menu: list[str] = field(default_factory=lambda: [o.key for o in MENU])

    def to_dict(self) -> dict:
        return {"version": MEASUREMENT_VERSION, "lowbit_version": __version__, "model": self.model,
                "calibration": self.calibration, "fixed_bytes": self.fixed_bytes, "params": self.params,
                "float_bytes": self.float_bytes, "seconds": self.seconds, "menu": self.menu,
                "modules": [m.__dict__ for m in self.modules]}

    def save(self, path: str | Path) -> Path:
        from lowbit.model.artifact import temp_beside, move_into_place

        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LowbitError(f"measurement file {path}: cannot create its folder ({e.strerror}); fix: choose another path") from None
        tmp = temp_beside(path)
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        move_into_place(tmp, path, True)
        return path

    @classmethod
    def load(cls, path: str | Path, model_sha256: str | None = None) -> "Measurement":
        """Read a measurement file; refuse one made for other weights (model_sha256 given)."""
        from lowbit.datafile import read_bounded

        path = Path(path)
        where = f"measurement file {path}"
        try:
            data = json.loads(read_bounded(path, "measurement file", MAX_MEASUREMENT_BYTES,
                                           "pass a file written by `lowbit tune --measurement`",
                                           f"{where}: not found; fix: check the path, or give a new path to measure into"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LowbitError(f"{where}: not JSON ({e}); fix: pass a file written by `lowbit tune`, or delete it "
                              f"so the measurement runs again") from None
        if not isinstance(data, dict) or data.get("version") != MEASUREMENT_VERSION:
            raise LowbitError(f"{where}: field 'version' is {data.get('version') if isinstance(data, dict) else '?'}, "
                              f"this lowbit reads version {MEASUREMENT_VERSION}; fix: measure again (delete the file)")
        try:
            mods = [ModuleCost(str(m["name"]), int(m["rows"]), int(m["cols"]),
                               {str(k): float(v) for k, v in m["kld"].items()},
                               {str(k): int(v) for k, v in m["bytes"].items()}, dict(m["spec"])) for m in data["modules"]]
            meas = cls(dict(data["model"]), dict(data["calibration"]), mods, int(data["fixed_bytes"]),
                       int(data["params"]), int(data["float_bytes"]), float(data.get("seconds", 0.0)),
                       list(data.get("menu", [])))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LowbitError(f"{where}: field {e} is missing or malformed; fix: measure again (delete the file)") from None
        for m in mods:
            bad = [k for k, v in m.kld.items() if not math.isfinite(v) or v < 0]
            if bad or set(m.kld) != set(m.bytes):
                raise LowbitError(f"{where}: module {m.name}: costs are not finite and non-negative for every "
                                  f"format; fix: measure again (delete the file)")
        if model_sha256 and meas.model.get("sha256") != model_sha256:
            raise LowbitError(f"{where}: made for model {meas.model.get('name')} (sha256 "
                              f"{str(meas.model.get('sha256'))[:12]}), not this one ({model_sha256[:12]}); "
                              f"fix: pass the measurement of this model, or a new path to measure it again")
        return meas


def targets(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The Linear modules the tuner allocates: every Linear but the output head."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]


def _fixed_bytes(module: nn.Module, names: set[str]) -> tuple[int, int]:
    """(bytes of everything outside the menu modules as lowbit stores it, parameters of the whole model)."""
    head = module.get_output_embeddings()
    head_ptr = head.weight.data_ptr() if head is not None else None  # a tied embedding shares it, counted once
    seen, fixed, params = set(), 0, 0
    for pname, p in module.named_parameters(remove_duplicate=False):
        key = p.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        params += p.numel()
        owner = pname.rpartition(".")[0]
        if owner in names:
            continue
        if key == head_ptr:  # the head in INT8 per row (a tied embedding reads its rows)
            fixed += spec_bytes(HEAD, *p.shape)
        else:
            fixed += 2 * p.numel()  # kept in float16
    return fixed, params


@torch.no_grad()
def _costs(name: str, w: torch.Tensor, a: torch.Tensor, g: torch.Tensor, tokens: int,
           menu: tuple[Option, ...]) -> ModuleCost:
    rows, cols = w.shape
    kld, nbytes, specs = {}, {}, {}
    for opt in menu:
        try:
            spec = fitted(opt.spec, cols, name)
        except LowbitError:
            continue  # this row length cannot take the format (no group size fits)
        if spec is None:
            err = 0.0
        else:
            dw = qdq(w, spec) - w  # (rows, cols)
            per_row = ((dw @ a) * dw).sum(1)  # dw[j] A dw[j]^T, (rows,)
            err = float(0.5 * (g * per_row).sum() / tokens)
        kld[opt.key], nbytes[opt.key] = max(err, 0.0), spec_bytes(spec, rows, cols)
        specs[opt.key] = None if spec is None else spec.to_dict()
    return ModuleCost(name, rows, cols, kld, nbytes, specs)


def measure(model: Model, ids: torch.Tensor, menu: tuple[Option, ...] = MENU, calibration: dict | None = None,
            seed: int = 0, progress=None) -> Measurement:
    """Estimate every (module, format) cost from calibration windows `ids` (samples, seq_len)."""
    t0 = time.perf_counter()
    module = model.module
    if model.quantized:
        raise LowbitError(f"tune: model {model.name} is already quantized; fix: pass the float model")
    mods = targets(module)
    if not mods:
        raise LowbitError(f"tune: model {model.name} has no Linear modules to quantize")
    names = {n for n, _ in mods}
    a_sum = {n: torch.zeros(m.in_features, m.in_features) for n, m in mods}  # sum of x x^T, (in, in)
    g_sum = {n: torch.zeros(m.out_features) for n, m in mods}  # sum of squared output gradients, (out,)

    def hook(name):
        def fwd(mod, inp, out):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()  # (tokens, in)
            a_sum[name].addmm_(x.T, x)

            def grad(gout):
                g_sum[name].add_(gout.detach().reshape(-1, gout.shape[-1]).float().square().sum(0))
            if out.requires_grad:
                out.register_hook(grad)
        return fwd

    handles = [m.register_forward_hook(hook(n)) for n, m in mods]
    gen = torch.Generator().manual_seed(seed)
    was_training = module.training
    module.eval()
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    emb = module.get_input_embeddings()
    tokens = 0
    try:
        for i, row in enumerate(ids):
            x = emb(row[None]).detach().requires_grad_(True)  # gradients flow to activations only
            with torch.enable_grad():
                logits = module(inputs_embeds=x, use_cache=False).logits.float()[0]  # (seq, vocab)
                logp = torch.log_softmax(logits, -1)
                with torch.no_grad():  # labels from the model's own distribution: the true Fisher
                    y = torch.multinomial(logp.exp(), 1, generator=gen)[:, 0]
                logp.gather(1, y[:, None]).sum().backward()
            tokens += row.numel()
            if progress:
                progress("measuring: forward + backward", i + 1, len(ids))
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)
        module.train(was_training)
    costs = []
    for k, (n, m) in enumerate(mods):
        costs.append(_costs(n, m.weight.detach().float(), a_sum.pop(n) / tokens, g_sum.pop(n), tokens, menu))
        if progress:
            progress("measuring: formats per module", k + 1, len(mods))
    fixed, params = _fixed_bytes(module, names)
    src = model.source or {}
    ident = {"name": model.name, "sha256": src.get("sha256") or weights_digest(module)}
    return Measurement(ident, calibration or {"tokens": tokens}, costs, fixed, params, model.weight_bytes,
                       time.perf_counter() - t0, [o.key for o in menu])


def weights_digest(module: nn.Module) -> str:
    """A sha256 over the float weights, for models that came without a source hash (built in memory)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()
