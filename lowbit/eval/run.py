"""One evaluation: compare a candidate with its baseline on identical tokens and build the run dict."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowbit.data.corpora import wikipedia_articles
from lowbit.errors import LowbitError
from lowbit.eval import divergence
from lowbit.eval.basecache import baseline_key
from lowbit.eval.suites import text as text_suites
from lowbit.model.handle import Model
from lowbit.model.load import load_model
from lowbit.version import __version__

SUITES = ("general", "jargon", "long_context", "json", "structured", "json_tasks")  # plus "user:<file>"
Say = Callable[[str], None]


@dataclass
class EvalConfig:
    """Which suites and how many samples; None means the default (smaller with quick)."""

    suites: tuple[str, ...] = SUITES
    user_files: tuple[str, ...] = ()
    quick: bool = False
    samples: int | None = None
    seq_len: int | None = None
    context: int | None = None
    worst: int = 5
    json_n: int | None = None
    kv_cache: str | None = None  # the candidate's KV-cache format (none, int8, fp8); None: its recipe's
    structured_file: str | None = None  # the structured suite's own prompts and JSON answers (JSONL)

    @property
    def n_samples(self) -> int:
        return self.samples or (4 if self.quick else 16)

    @property
    def n_seq(self) -> int:
        return self.seq_len or (128 if self.quick else 256)


def identity(model: Model) -> dict:
    src = model.source or {}
    return {"name": model.name, "kind": "lowbit" if model.meta else src.get("kind", "?"),
            "path": str(model.folder), "sha256": src.get("sha256"), "weight_bytes": model.weight_bytes,
            "recipe": model.recipe.name if model.recipe is not None else None}


def check_user_files(paths: tuple[str, ...], structured_file: str | None = None) -> None:
    """Validate user JSONL suites (and the structured suite's own file) before any model is loaded, so a
    bad line fails at once."""
    from lowbit.eval.suites import user

    for path in paths:
        user.load_items(path)
    if structured_file is not None:
        from lowbit.eval.suites import structured

        structured.load_samples(structured_file)


def load_pair(baseline: str | Model, candidate: str | Model, say: Say) -> tuple[Model, Model]:
    """Both models (paths are loaded; handles pass through), refused unless their tokenizers match."""
    def get(which: str, m):
        if isinstance(m, Model):
            m.need_tokenizer(f"evaluate: the {which}")
            return m
        say(f"loading {which} {m}")
        return load_model(m, progress=say)

    base, cand = get("baseline", baseline), get("candidate", candidate)
    label = lambda given, m: m.name if isinstance(given, Model) else str(given)  # noqa: E731
    divergence.check_same_tokenizer(base.tokenizer, cand.tokenizer, label(baseline, base), label(candidate, cand))
    return base, cand


def evaluate(base: Model, cand: Model, opts: EvalConfig, say: Say = lambda s: None,
             reuse_divergence: dict | None = None) -> dict:
    """Divergence on Wikipedia samples, then each suite. reuse_divergence: the "divergence" of an earlier
    run of this same candidate under the same eval settings (the tuner's quality stage), taken as it is
    instead of measured again."""
    if opts.kv_cache is not None:  # before anything runs: every pass of the candidate reads this cache
        cand.kv_cache = opts.kv_cache
    t0 = time.perf_counter()
    run: dict = {"kind": "eval", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "lowbit_version": __version__, "quick": opts.quick,
                 "baseline": identity(base), "candidate": {**identity(cand), "kv_cache": cand.kv_cache}, "suites": []}
    texts = [(title, body) for title, body in wikipedia_articles()]
    if reuse_divergence is not None:
        say("divergence: measured by the earlier stage, reused")
        run["divergence"] = reuse_divergence
    else:
        samples = divergence.make_samples(base.tokenizer, texts, opts.n_seq, opts.n_samples)
        say(f"divergence: {len(samples)} Wikipedia samples x {opts.n_seq} tokens")
        with torch.no_grad():
            # cached only for a float baseline: an artifact's source sha256 names its float model, not itself
            run["divergence"] = divergence.compare(base.module, cand.module, samples, baseline_key(base), opts.worst)
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


def run_suite(name: str, base: Model, cand: Model, opts: EvalConfig):
    if name == "jargon":
        return text_suites.jargon(base, cand, quick=opts.quick)
    if name == "long_context":
        return text_suites.long_context(base, cand, quick=opts.quick, context=opts.context)
    if name == "json_tasks":
        from lowbit.eval.suites import json_tasks

        return json_tasks.run(base, cand, quick=opts.quick)
    if name == "structured":
        from lowbit.eval.suites import structured

        return structured.run(base, cand, quick=opts.quick, file=opts.structured_file)
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
