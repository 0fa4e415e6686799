"""Orchestration of eval / gate runs: load both models, compare them, build the run dict."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowbit import __version__
from lowbit.data.corpora import wikipedia_articles
from lowbit.errors import LowbitError
from lowbit.bench.latency import weight_bytes
from lowbit.eval import divergence
from lowbit.eval.suites import text as text_suites
from lowbit.model.load import Loaded, load_model

SUITES = ("general", "jargon", "long_context", "json")  # plus "user:<file>"
Say = Callable[[str], None]


@dataclass
class EvalOptions:
    suites: tuple[str, ...] = SUITES
    user_files: tuple[str, ...] = ()
    quick: bool = False
    samples: int | None = None
    seq_len: int | None = None
    context: int | None = None
    worst: int = 5
    json_n: int | None = None
    kv_cache: str | None = None  # the candidate's KV-cache format (none, int8, fp8); None: its recipe's

    @property
    def n_samples(self) -> int:
        return self.samples or (4 if self.quick else 16)

    @property
    def n_seq(self) -> int:
        return self.seq_len or (128 if self.quick else 256)


def identity(loaded: Loaded) -> dict:
    recipe = getattr(loaded.model, "lowbit_recipe", None)
    src = loaded.source or {}
    # an artifact is named by its folder (its source dict names the float model it came from)
    name = loaded.folder.name if loaded.meta else src.get("name", str(loaded.folder))
    return {"name": name, "kind": "lowbit" if loaded.meta else src.get("kind", "?"),
            "path": str(loaded.folder), "sha256": src.get("sha256"), "weight_bytes": weight_bytes(loaded.model),
            "recipe": recipe.name if recipe is not None else None}


def check_user_files(paths: tuple[str, ...]) -> None:
    """Validate user JSONL suites before any model is loaded, so a bad line fails in a second."""
    from lowbit.eval.suites import user

    for path in paths:
        user.load_items(path)


def load_pair(baseline: str, candidate: str, say: Say) -> tuple[Loaded, Loaded]:
    say(f"loading baseline {baseline}")
    base = load_model(baseline, progress=say)
    say(f"loading candidate {candidate}")
    cand = load_model(candidate, progress=say)
    divergence.check_same_tokenizer(base.tokenizer, cand.tokenizer, baseline, candidate)
    return base, cand


def evaluate(base: Loaded, cand: Loaded, opts: EvalOptions, say: Say = lambda s: None) -> dict:
    from lowbit.runtime.kvcache import attach, kv_of

    if opts.kv_cache is not None:  # before anything runs: every pass of the candidate reads this cache
        attach(cand.model, opts.kv_cache)
    t0 = time.perf_counter()
    run: dict = {"kind": "eval", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "lowbit_version": __version__, "quick": opts.quick,
                 "baseline": identity(base), "candidate": {**identity(cand), "kv_cache": kv_of(cand.model)}, "suites": []}
    texts = [(title, body) for title, body in wikipedia_articles()]
    samples = divergence.make_samples(base.tokenizer, texts, opts.n_seq, opts.n_samples)
    say(f"divergence: {len(samples)} Wikipedia samples x {opts.n_seq} tokens")
    with torch.no_grad():
        run["divergence"] = divergence.compare(base.model, cand.model, samples, base.source.get("sha256"), opts.worst)
    for name in opts.suites:
        say(f"suite: {name}")
        result = text_suites.general(run["divergence"]) if name == "general" else run_suite(name, base, cand, opts)
        run["suites"].append(result.to_dict())
    for path in opts.user_files:
        say(f"suite: user {path}")
        from lowbit.eval.suites import user

        run["suites"].append(user.run(base, cand, path, quick=opts.quick).to_dict())
    run["seconds"] = time.perf_counter() - t0
    return run


def run_suite(name: str, base: Loaded, cand: Loaded, opts: EvalOptions):
    if name == "jargon":
        return text_suites.jargon(base, cand, quick=opts.quick)
    if name == "long_context":
        return text_suites.long_context(base, cand, quick=opts.quick, context=opts.context)
    if name == "json":
        from lowbit.eval.suites import tool_calling

        kw = {"n": opts.json_n} if opts.json_n else {}
        return tool_calling.run(base, cand, quick=opts.quick, **kw)
    raise LowbitError(f"suite '{name}' is unknown; suites are {', '.join(SUITES)} (and user JSONL files via --user)")


def parse_suites(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """'general,jargon,user:my.jsonl' -> (suites, user files)."""
    names, files = [], []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        if part.startswith("user:"):
            files.append(part[5:])
        elif part in SUITES:
            names.append(part)
        else:
            raise LowbitError(f"--suites: '{part}' is unknown; use any of {', '.join(SUITES)}, or user:FILE.jsonl")
    return tuple(names), tuple(files)
