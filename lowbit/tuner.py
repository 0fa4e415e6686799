"""lowbit.tune: the smallest (or best) model that passes the user's gate, found by measured trials.

    result = lowbit.tune("smollm2-135m", TuneConfig(spec="default", max_bits=4.5), out="out/tuned")

1. Sensitivity (lowbit.tuning.measure): every module's estimated KL divergence under every format of
   the menu, from calibration windows; saved to a file and reused for other budgets or specs.
2. Allocation (lowbit.tuning.allocate): a format per module under the size budget, or the smallest
   mix whose estimate meets the quality target; the uniform schemes are candidates too.
3. Trials: each candidate is quantized with the chosen method and judged by the user's whole spec
   (lowbit.gate; the quality criteria first, so a candidate that already fails them skips the
   suites and the latency run). A failed criterion points the next step: a tighter KLD target
   (the allocator then gives more bits to the modules with the largest estimated share), a smaller
   budget after a memory failure, formats with fast kernels after a latency failure, the KV cache
   back to float after a long-context failure, a calibrated method when RTN was used.
4. The result: the best passing trial (saved to `out`), the Pareto set, or, when nothing passes,
   the closest trials and what failed by how much. Every trial is recorded in the run registry.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from lowbit import api
from lowbit.calib import CalibConfig
from lowbit.calib.data import CalibData, load_calibration
from lowbit.errors import LowbitError
from lowbit.eval.gate import QUALITY_KEYS, Spec, load_spec, parse_spec
from lowbit.formats.spec import QuantSpec
from lowbit.model.handle import Model
from lowbit.model.kernels import plan_for
from lowbit.recipe import ALGORITHMS, Override, Recipe
from lowbit.tuning.allocate import Allocation, for_budget, for_quality, uniforms
from lowbit.tuning.measure import Measurement, measure
from lowbit.tuning.menu import HEAD, MENU, Option
from lowbit.version import __version__

Say = Callable[[str], None]
START_TARGET_SHARE = 0.5  # the first trial aims its estimate at half the spec's mean-KLD limit
DEFAULT_TARGET_KLD = 0.01  # when the spec has no mean-KLD limit
MAX_EST_RATIO = 5.0  # a calibrated trial measuring above this multiple of the (RTN) estimate is retried with RTN


class _TimeUp(Exception):
    pass


@dataclass(frozen=True)
class TuneConfig:
    spec: str | Spec = "default"  # a gate spec file, "default", or a parsed Spec
    max_bits: float | None = None  # bits per weight over the whole model
    max_size: int | None = None  # bytes of the stored weights
    min_memory_reduction: float | None = None  # percent below the float model's weight bytes
    method: str = "gptq"  # how each trial is quantized (rtn, rtn-mse, gptq, awq, awq-gptq)
    calib: str | CalibData = "mix"  # calibration prompts (file, built-in set, or windows), measurement and trials
    samples: int = 16
    seq_len: int = 256
    measurement: str | Path | None = None  # read when it exists (and matches the model), else written there
    menu: tuple[Option, ...] = MENU
    max_trials: int = 8
    time_budget_s: float | None = None
    quick: bool = False  # each trial's gate with small samples
    seed: int = 0
    act_order: bool = True  # GPTQ's column order; off for GGUF mixes (a permuted module is not a GGUF block type)

    def check(self) -> None:
        budgets = [b for b in (self.max_bits, self.max_size, self.min_memory_reduction) if b is not None]
        if len(budgets) > 1:
            raise LowbitError("tune: give one budget: --max-bits, --max-size or --min-memory-reduction")
        if self.max_bits is not None and not 1 <= self.max_bits <= 32:
            raise LowbitError(f"tune: --max-bits {self.max_bits} is out of range; give 1 to 32 bits per weight")
        if self.min_memory_reduction is not None and not 0 < self.min_memory_reduction < 100:
            raise LowbitError(f"tune: --min-memory-reduction {self.min_memory_reduction} must be between 0 and 100 (percent)")
        if self.method not in ALGORITHMS or self.method == "smoothquant":
            raise LowbitError(f"tune: --method '{self.method}' is not a weight-only method; use one of "
                              f"{', '.join(a for a in ALGORITHMS if a != 'smoothquant')}")
        if self.max_trials < 1:
            raise LowbitError("tune: --max-trials must be at least 1")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise LowbitError("tune: --time-budget must be positive")


@dataclass
class Trial:
    index: int
    alloc: Allocation
    method: str
    kv_cache: str
    why: str  # what led to this candidate
    passed: bool = False
    criteria: list = field(default_factory=list)
    failed: list = field(default_factory=list)  # rows that failed
    stage: str = ""  # "quality" (stopped after the quality criteria) or "full"
    mean_kld: float | None = None
    p95_ms: float | None = None
    seconds: float = 0.0
    run_id: int | None = None
    stopped: str = ""  # e.g. "time budget expired mid-trial"
    stored_bytes: int | None = None  # what the built model stores (the allocation's bytes plus, e.g., GPTQ's permutations)

    def summary(self) -> dict:
        return {"trial": self.index, "how": self.alloc.how, "method": self.method, "kv_cache": self.kv_cache,
                "why": self.why, "bits": self.alloc.bits, "bytes": self.alloc.bytes, "est_kld": self.alloc.est_kld,
                "mean_kld": self.mean_kld, "p95_ms": self.p95_ms, "passed": self.passed, "stage": self.stage,
                "failed": [f"{r['name']}: {_fmt(r['value'])} {r['op']} {r['threshold']:g}" for r in self.failed],
                "seconds": self.seconds, "run_id": self.run_id, "stopped": self.stopped, "stored_bytes": self.stored_bytes,
                "formats": dict(Counter(self.alloc.choice.values()))}


@dataclass
class TuneResult:
    passed: bool
    best: Trial | None
    trials: list[Trial]
    pareto: list[Trial]
    closest: list[Trial]
    measurement: Measurement
    recipe: Recipe | None  # reproduces the best (or the closest) candidate with lowbit quantize
    model: Model | None  # the best passing model, quantized
    notes: list[str]
    seconds: float
    out: Path | None = None

    def to_dict(self) -> dict:
        return {"passed": self.passed, "best": self.best.summary() if self.best else None,
                "trials": [t.summary() for t in self.trials], "pareto": [t.index for t in self.pareto],
                "closest": [t.index for t in self.closest], "notes": self.notes, "seconds": self.seconds,
                "lowbit_version": __version__, "model": self.measurement.model,
                "measurement_seconds": self.measurement.seconds, "out": str(self.out) if self.out else None}


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4g}"


# -- the recipe of an allocation --------------------------------------------------------------------
def recipe_for(alloc: Allocation, meas: Measurement, method: str, kv_cache: str = "none", name: str = "tuned") -> Recipe:
    """A recipe that gives every module its allocated format: the most common one as the scheme, the
    others as per-module overrides (exact names), the head INT8 per row as in every preset."""
    from lowbit.tuning.menu import BY_KEY

    common = Counter(alloc.choice.values()).most_common()
    base_key = next((k for k, _ in common if BY_KEY[k].spec is not None), None)
    if base_key is None:  # everything in float16: the scheme is never used
        base_key = "int8-ch"
    overrides = [Override("lm_head", HEAD)]
    for m in meas.modules:
        k = alloc.choice[m.name]
        if k != base_key:
            overrides.append(Override(m.name, BY_KEY[k].spec))
    desc = (f"tuned by lowbit {__version__}: {alloc.how}, {alloc.bits:.2f} bits/weight, estimated KLD "
            f"{alloc.est_kld:.4g}; formats {dict(Counter(alloc.choice.values()))}")
    return Recipe(scheme=BY_KEY[base_key].spec, name=name, algorithm=method, ignore=(), overrides=tuple(overrides),
                  group_fallback="shrink", kv_cache=kv_cache, description=desc)


# -- spec handling ------------------------------------------------------------------------------------
def _quality_only(sp: Spec) -> Spec | None:
    """The spec's quality criteria without suites, latency and bench: the cheap first stage."""
    q = {k: v for k, v in sp.section("quality").items() if k in QUALITY_KEYS}
    if not q or not (sp.suites or sp.section("latency")):
        return None  # nothing to skip: the whole spec is this stage (running both would measure it twice)
    data = {"quality": q}
    for key in ("memory", "eval", "bench"):  # the same measurements as the full spec's, so the full stage reuses them
        if sp.section(key):
            data[key] = sp.section(key)
    return parse_spec(data, f"{sp.source} (quality criteria)")


def _check_spec(sp: Spec) -> None:
    q = sp.section("quality")
    if not ({k for k in q if k in QUALITY_KEYS} or sp.suites):
        raise LowbitError(f"tune: spec {sp.source} has no quality criterion; the tuner would keep shrinking the model "
                          f"without limit. fix: add a quality section, e.g. quality: {{max_mean_kld: 0.02}}")


def _severity(row: dict) -> float:
    """How far a failed row is from passing, as a ratio > 1 (the size of the step the next trial needs)."""
    v, t = row["value"], row["threshold"]
    if v is None:
        return 2.0
    if row["op"] == "<=":
        return v / t if t > 0 else (2.0 if v > 0 else 1.0)
    if 0 < t <= 1 and v < 1:  # agreement-like: compare the shortfalls from 1
        return max((1 - v) / max(1 - t, 1e-9), 1.0)
    return t / v if v > 0 else 2.0


def _kind(row: dict) -> str:
    n = row["name"]
    if "latency" in n or "speedup" in n:
        return "latency"
    if "memory" in n:
        return "memory"
    if n.startswith("long context"):
        return "long_context"
    return "quality"


# -- the loop -----------------------------------------------------------------------------------------
class _Search:
    """The state that picks each next candidate from what the trials measured."""

    def __init__(self, meas: Measurement, cfg: TuneConfig, sp: Spec, budget: int | None):
        self.meas, self.cfg, self.sp, self.budget = meas, cfg, sp, budget
        self.allowed = {o.key for o in cfg.menu}
        self.method = cfg.method
        self.kv = "none"
        limit = sp.section("quality").get("max_mean_kld")
        self.target = None if budget is not None else (limit or DEFAULT_TARGET_KLD / START_TARGET_SHARE) * START_TARGET_SHARE
        self.pass_target: float | None = None  # largest target that passed (quality mode)
        self.fail_target: float | None = None  # smallest target that failed
        self.tried: set[tuple] = set()
        self.back_to_rtn = False  # set once a calibrated method measured far above the RTN estimate
        self.notes: list[str] = []

    def propose(self, why: str) -> tuple[Allocation, str] | None:
        if self.target is not None:
            alloc = for_quality(self.meas, self.target, self.allowed)
            if self.budget is not None and alloc.bytes > self.budget:
                alloc = for_budget(self.meas, self.budget, self.allowed)
        else:
            alloc = for_budget(self.meas, self.budget, self.allowed)
        if (alloc.key(), self.method, self.kv) in self.tried:
            return None
        return alloc, why

    def first(self) -> list[tuple[Allocation, str]]:
        """Trial 1 is the allocator's mix; under a size budget trial 2 is the best uniform scheme that fits,
        so the measured result can never lose to uniform quantization."""
        first = self.propose("allocator's mix " + (f"under {self.budget / 1e6:.1f} MB" if self.budget is not None
                                                   else f"for estimated KLD {self.target:.4g}"))
        out = [first] if first else []
        if self.budget is not None:
            fits = [u for u in uniforms(self.meas, self.allowed) if u.bytes <= self.budget]
            if fits:
                u = min(fits, key=lambda a: a.est_kld)
                if not first or u.key() != first[0].key():
                    out.append((u, "best uniform scheme under the budget (the baseline the mix must beat)"))
        return out

    def after(self, t: Trial) -> str | None:
        """Update the state from a finished trial; returns the reason for the next one, or None to stop."""
        self.tried.add((t.alloc.key(), t.method, t.kv_cache))
        if t.passed:
            if self.target is None:  # size budget: the best mix under it passed; nothing smaller is asked for
                return None
            self.pass_target = max(self.pass_target or 0, self.target)
            nxt = (math.sqrt(self.target * self.fail_target) if self.fail_target else self.target * 2.0)
            if self.fail_target and self.fail_target / self.target < 1.25:
                return None  # bracketed closely enough
            self.target = nxt
            return f"trial {t.index} passed: a smaller mix (estimated KLD target {nxt:.4g})"
        kinds = {_kind(r) for r in t.failed}
        steps = []
        if "long_context" in kinds and self.kv != "none":
            self.kv = "none"
            steps.append("KV cache back to float (long-context criterion failed)")
        if "latency" in kinds:
            fast = {k for k in self.allowed if k == "f16" or
                    all(plan_for(QuantSpec.from_dict(m.spec[k]), m.cols, False, m.rows).fast
                        for m in self.meas.modules if k in m.spec and m.spec[k] is not None)}
            fast.discard("f16")
            if fast and fast != self.allowed:
                self.allowed = fast
                steps.append("formats without a fast CPU kernel dropped (latency criterion failed): "
                             + ", ".join(sorted(fast)))
        if "memory" in kinds:
            row = next(r for r in t.failed if _kind(r) == "memory")
            if row["value"] is not None:
                need = (100 - row["threshold"]) / max(100 - row["value"], 1e-9)  # allowed / achieved bytes
                new = int(t.alloc.bytes * need * 0.98)
                self.budget = new if self.budget is None else min(self.budget, new)
                steps.append(f"size budget {self.budget / 1e6:.1f} MB (memory criterion failed)")
        if kinds & {"quality", "long_context"}:
            sev = max(_severity(r) for r in t.failed if _kind(r) in ("quality", "long_context"))
            ratio = t.mean_kld / max(t.alloc.est_kld, 1e-12) if t.mean_kld is not None else None
            if self.method != "rtn" and not self.back_to_rtn and ratio is not None and ratio > MAX_EST_RATIO:
                # the estimate is round-to-nearest's: a calibrated method that lands far above it moved the
                # weights away from what was measured (e.g. weights already on a format's grid, which RTN keeps)
                self.back_to_rtn = True
                steps.append(f"RTN instead of {self.method} (measured mean KLD {t.mean_kld:.4g} is {ratio:.0f}x the "
                             f"estimate, which round-to-nearest made)")
                self.method = "rtn"
            elif self.method == "rtn" and not self.back_to_rtn:
                self.method = "gptq"
                if self.budget is not None and self.cfg.act_order:  # room for GPTQ's act-order permutations
                    self.budget -= sum(4 * m.cols for m in self.meas.modules)
                steps.append("GPTQ instead of RTN (a quality criterion failed)")
            elif self.target is not None:
                self.fail_target = min(self.fail_target or math.inf, self.target)
                if self.pass_target:  # bisect between the target that passed and this one
                    if self.target / self.pass_target < 1.25:
                        return None
                    nxt = math.sqrt(self.pass_target * self.target)
                else:
                    nxt = self.target * min(max(1 / sev ** 2, 0.2), 0.7)
                self.target = nxt
                steps.append(f"estimated KLD target {nxt:.4g} (worst failing criterion {sev:.2f}x its limit): the "
                             f"modules with the largest estimated share get more bits")
            elif self.method in ("gptq", "rtn-mse"):
                self.method = "awq-gptq"
                steps.append("AWQ scales + GPTQ rounding (a quality criterion failed at this size)")
            else:
                self.notes.append(f"nothing under the size budget passed the quality criteria after trial {t.index}")
                return None
        return "; ".join(steps) if steps else None


def _pareto(trials: list[Trial]) -> list[Trial]:
    done = [t for t in trials if t.mean_kld is not None]

    def dominated(a: Trial) -> bool:
        for b in done:
            if b is a:
                continue
            pa, pb = a.p95_ms or 0, b.p95_ms or 0
            if (b.alloc.bytes <= a.alloc.bytes and b.mean_kld <= a.mean_kld and pb <= pa and
                    (b.alloc.bytes < a.alloc.bytes or b.mean_kld < a.mean_kld or pb < pa)):
                return True
        return False
    return sorted((t for t in done if not dominated(t)), key=lambda t: t.alloc.bytes)


def _closeness(t: Trial) -> float:
    return max((_severity(r) for r in t.failed), default=1.0) if not t.passed else 0.0


def tune(model: str | Path, config: TuneConfig | None = None, *, out: str | Path | None = None, force: bool = False,
         record: bool = True, say: Say | None = None, progress=None) -> TuneResult:
    """Measure, allocate and verify until the spec passes within the budget (see the module doc)."""
    cfg = config or TuneConfig()
    cfg.check()
    say = say or (lambda s: None)
    sp = cfg.spec if isinstance(cfg.spec, Spec) else load_spec(str(cfg.spec))
    _check_spec(sp)
    if out is not None:  # checked before the measurement and the trials, not after them
        api.check_out_vs_input(out, model)
        if os.path.lexists(out) and not force:
            raise LowbitError(f"tune: --out {out} already exists; fix: pass --force to replace it, or choose another --out")
    t0 = time.perf_counter()
    deadline = t0 + cfg.time_budget_s if cfg.time_budget_s else None
    base = model if isinstance(model, Model) else api.load(model, say=say)
    if base.quantized:
        raise LowbitError(f"tune: model {base.name} is already quantized; fix: pass the float model")
    tok = base.need_tokenizer("tune")
    data = cfg.calib if isinstance(cfg.calib, CalibData) else load_calibration(cfg.calib, tok, cfg.samples, cfg.seq_len)
    meas = _measurement(base, data, cfg, say, progress)
    budget = _budget(cfg, meas)
    search = _Search(meas, cfg, sp, budget)
    quality_sp = _quality_only(sp)
    trials: list[Trial] = []
    best_model, best = None, None
    pending = search.first()
    why, batch = None, []
    while len(trials) < cfg.max_trials:
        if not pending:
            try:
                nxt = search.propose(why or "")
            except LowbitError as e:  # e.g. the budget, less GPTQ's permutations, below the smallest mix
                search.notes.append(f"stopped before trial {len(trials) + 1}: {e}")
                break
            if nxt is None:
                break
            pending = [nxt]
        alloc, reason = pending.pop(0)
        hopeless = next((b for b in batch if not b.passed and b.alloc.est_kld <= alloc.est_kld
                         and any(_kind(r) == "quality" for r in b.failed)), None)
        if hopeless is not None:  # the first batch's mix already failed its quality criteria, estimated better
            search.notes.append(f"{alloc.how} was not built: its estimated KLD ({alloc.est_kld:.4g}) is above that of "
                                f"trial {hopeless.index} ({hopeless.alloc.est_kld:.4g}), which failed the quality criteria")
            search.tried.add((alloc.key(), search.method, search.kv))
            if not pending:
                why = search.after(hopeless)
                batch = []
                if why is None:
                    break
            continue
        if deadline and time.perf_counter() > deadline:
            search.notes.append(f"time budget ({cfg.time_budget_s:.0f} s) spent before trial {len(trials) + 1}")
            break
        t = Trial(len(trials) + 1, alloc, search.method, search.kv, reason)
        trials.append(t)
        say(f"trial {t.index}: {alloc.how}, {alloc.bits:.2f} bits/weight, estimated KLD {alloc.est_kld:.4g}, "
            f"{t.method}: {reason}")
        try:
            cand = _run_trial(t, base, data, meas, sp, quality_sp, cfg, deadline, record, say)
        except _TimeUp:
            t.stopped = "time budget expired mid-trial; the trial was abandoned"
            search.notes.append(f"time budget ({cfg.time_budget_s:.0f} s) expired during trial {t.index}; "
                                f"the best trial before it is kept")
            break
        if t.passed and _better(t, best, budget is None):
            best, best_model = t, cand
        del cand
        batch.append(t)
        if pending:  # the first batch (mix, uniform) runs with the same settings before the state moves
            search.tried.add((t.alloc.key(), t.method, t.kv_cache))
            continue
        for done in batch[:-1]:
            search.tried.add((done.alloc.key(), done.method, done.kv_cache))
        why = search.after(next((b for b in batch if b.passed), min(batch, key=_closeness)))
        batch = []
        if why is None:
            break
    return _finish(base, trials, best, best_model, meas, search, cfg, out, force, t0, say)


def _better(t: Trial, best: Trial | None, smallest: bool) -> bool:
    if best is None:
        return True
    if smallest:
        return t.alloc.bytes < best.alloc.bytes
    return (t.mean_kld or math.inf) < (best.mean_kld or math.inf)


def _measurement(base: Model, data: CalibData, cfg: TuneConfig, say: Say, progress) -> Measurement:
    path = Path(cfg.measurement) if cfg.measurement else None
    digest = (base.source or {}).get("sha256")
    if path is not None and path.exists():
        meas = Measurement.load(path, digest)
        missing = [o.key for o in cfg.menu if o.key not in meas.menu]
        if missing:
            raise LowbitError(f"measurement file {path}: measured without {', '.join(missing)}; fix: drop them from "
                              f"--menu, or pass a new --measurement path to measure again")
        say(f"sensitivity: read from {path} (measured in {meas.seconds:.0f} s on {meas.calibration.get('tokens')} tokens)")
        return meas
    say(f"sensitivity: measuring {data.describe()}")
    cal = {"source": data.source, **{k: data.stats[k] for k in ("samples", "seq_len", "tokens")}}
    meas = measure(base, data.ids, cfg.menu, cal, cfg.seed, progress)
    if path is not None:
        meas.save(path)
        say(f"sensitivity: {len(meas.modules)} modules x {len(cfg.menu)} formats in {meas.seconds:.0f} s, saved to {path}")
    return meas


def _budget(cfg: TuneConfig, meas: Measurement) -> int | None:
    """The size budget in stored bytes, less what GPTQ's act-order permutations will add (int32 per input
    column of each module), so the built model does not overshoot it."""
    if cfg.max_size is not None:
        budget = int(cfg.max_size)
    elif cfg.max_bits is not None:
        budget = int(cfg.max_bits * meas.params / 8)
    elif cfg.min_memory_reduction is not None:
        budget = int(meas.float_bytes * (1 - cfg.min_memory_reduction / 100))
    else:
        return None
    if cfg.act_order and cfg.method in ("gptq", "awq-gptq"):
        budget -= sum(4 * m.cols for m in meas.modules)
    return budget


def _run_trial(t: Trial, base: Model, data: CalibData, meas: Measurement, sp: Spec, quality_sp: Spec | None,
               cfg: TuneConfig, deadline: float | None, record: bool, say: Say) -> Model:
    t0 = time.perf_counter()

    def step(msg: str) -> None:
        if deadline and time.perf_counter() > deadline:
            raise _TimeUp()
        say(f"  trial {t.index}: {msg}")

    rec = recipe_for(t.alloc, meas, t.method, t.kv_cache, name=f"tuned-trial{t.index}")
    calib = None if t.method == "rtn" else CalibConfig(method=t.method, data=data, samples=cfg.samples, seq_len=cfg.seq_len,
                                                       act_order=cfg.act_order)
    step("quantizing")
    cand = api.quantize(_float_copy(base), rec, calib=calib)
    cand.kv_cache = t.kv_cache
    t.stored_bytes = stored_bytes(cand, rec)
    run = None
    if quality_sp is not None:
        step("quality criteria")
        run = api.gate(quality_sp, base, cand, quick=cfg.quick, say=step)
        t.stage = "quality"
    if run is None or run["gate"]["passed"]:
        step("full spec")
        run = api.gate(sp, base, cand, quick=cfg.quick, say=step, reuse=run)  # the quality stage's divergence
        t.stage = "full"
    rows = run["gate"]["criteria"]
    t.passed, t.criteria, t.failed = run["gate"]["passed"], rows, [r for r in rows if r["passed"] is False]
    t.mean_kld = (run.get("divergence") or {}).get("mean_kld")
    t.p95_ms = (((run.get("bench") or {}).get("candidate") or {}).get("latency_ms") or {}).get("p95")
    t.seconds = time.perf_counter() - t0
    if record:
        from lowbit.report.registry import record as record_run

        run["tune"] = {"trial": t.index, "how": t.alloc.how, "bits": t.alloc.bits, "est_kld": t.alloc.est_kld,
                       "why": t.why}
        run["candidate"]["recipe"] = rec.to_dict()
        t.run_id = record_run(run)
    say(f"trial {t.index}: {'PASSED' if t.passed else 'failed'} in {t.seconds:.0f} s"
        + ("" if t.passed else " (" + "; ".join(t.summary()["failed"]) + ")"))
    return cand


def stored_bytes(model: Model, rec: Recipe) -> int:
    """The bytes an artifact of this model stores (lowbit.model.artifact's entries, without writing them)."""
    from lowbit.model.artifact import artifact_entries

    return sum(e.nbytes for e in artifact_entries(model.module, rec.keep_dtype))


def _float_copy(base: Model) -> Model:
    """A quantizable copy of the float model (the baseline stays as it is for the gate)."""
    return Model(copy.deepcopy(base.module), base.tokenizer, dict(base.source), base.folder)


def _finish(base, trials, best, best_model, meas, search, cfg, out, force, t0, say) -> TuneResult:
    notes = list(search.notes)
    pareto = _pareto(trials)
    closest = [] if best else sorted((t for t in trials if not t.stopped), key=_closeness)[:3]
    pick = best or (closest[0] if closest else None)
    recipe = recipe_for(pick.alloc, meas, pick.method, pick.kv_cache, "tuned") if pick else None
    if best is None:
        notes.append("no trial passed the spec" + (f"; the closest was trial {closest[0].index}: "
                                                   + "; ".join(closest[0].summary()["failed"]) if closest else ""))
    res = TuneResult(best is not None, best, trials, pareto, closest, meas, recipe, best_model, notes,
                     time.perf_counter() - t0)
    if out is not None and best_model is not None:
        best_model.recipe = replace(best_model.recipe, name="tuned", description=recipe.description)
        res.out = api.save(best_model, out, force=force)
        say(f"saved trial {best.index} to {res.out}")
    return res


def reproduce_command(res: TuneResult, model: str, cfg: TuneConfig, recipe_path: Path, out: Path | str) -> str:
    """The `lowbit quantize` line that rebuilds the chosen candidate from its recipe file."""
    t = res.best or (res.closest[0] if res.closest else None)
    calib = "" if t is None or t.method == "rtn" else (f" --method {t.method} --calib {cfg.calib} --samples {cfg.samples}"
                                                       f" --seq-len {cfg.seq_len}")
    return f"lowbit quantize --model {model} --recipe {recipe_path}{calib} --out {out}"


def write_outputs(res: TuneResult, model: str, cfg: TuneConfig, folder: str | Path, out: str | Path | None) -> dict:
    """recipe.yaml, tune.json, tune.md and tune.html in `folder` (each written atomically)."""
    import json

    from lowbit.model.artifact import move_into_place, temp_beside
    from lowbit.report.tuning import module_reasons, write_tune_report

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    pick = res.best or (res.closest[0] if res.closest else None)
    cmd = None
    if res.recipe is not None:
        paths["recipe"] = folder / "recipe.yaml"
        tmp = temp_beside(paths["recipe"])
        res.recipe.save(tmp)
        move_into_place(tmp, paths["recipe"], True)
        cmd = reproduce_command(res, model, cfg, paths["recipe"], out or "out/tuned")
    data = res.to_dict()
    meas = res.measurement.to_dict()
    choice = pick.alloc.choice if pick else None
    data["modules"] = module_reasons(meas, choice) if choice else []
    data["reproduce"] = cmd
    paths["json"] = folder / "tune.json"
    tmp = temp_beside(paths["json"])
    tmp.write_text(json.dumps(data, indent=1, default=str))
    move_into_place(tmp, paths["json"], True)
    paths["html"], paths["md"] = write_tune_report(data, meas, choice, cmd, folder)
    return paths
