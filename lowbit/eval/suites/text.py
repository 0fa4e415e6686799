"""Text suites scored on identical token streams: general text, domain jargon, long context.

general       perplexity/KLD on Wikipedia articles (taken from the divergence pass)
jargon        technical documentation: next-token accuracy and KLD on jargon tokens (words that are
              not ordinary English) reported apart from common tokens, since averages hide rare terms
long_context  perplexity by position bucket over one long stream, plus needle retrieval: a fact
              planted early in a long haystack, asked about at the end
"""

from __future__ import annotations

import random
import re

import torch

from lowbit.data.corpora import common_words, python_docs, wikipedia_text
from lowbit.eval import metrics
from lowbit.eval.basecache import cached
from lowbit.eval.types import Case, SuiteResult

TOPK = 256  # the baseline's log-probs are kept on its top 256 tokens plus one tail bucket (as divergence does)


def _digest(texts: list[str]) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "replace") + b"\0")
    return h.hexdigest()[:24]


def general(div: dict) -> SuiteResult:
    return SuiteResult(
        name="general", metric="ppl", baseline=div["ppl_baseline"], candidate=div["ppl_candidate"],
        higher_is_better=False, n=div["samples"],
        metrics={"ppl": {"baseline": div["ppl_baseline"], "candidate": div["ppl_candidate"]},
                 "mean_kld": {"baseline": 0.0, "candidate": div["mean_kld"]},
                 "top1_agreement": {"baseline": 1.0, "candidate": div["top1"]}},
        worst=[Case(**c) for c in div["worst"]],
        notes=f"{div['tokens']} tokens of Wikipedia (gensim wheel)")


# -- jargon ---------------------------------------------------------------------------------------
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


def jargon_mask(text: str, offsets: list[tuple[int, int]], vocab: frozenset[str]) -> torch.Tensor:
    """True for tokens inside a jargon word: an identifier-like word (dotted, snake_case, camelCase)
    or a word of 3+ letters not in the ordinary-English vocabulary."""
    spans = []
    for m in _IDENT.finditer(text):
        w = m.group(0)
        odd = "_" in w or "." in w or re.search(r"[a-z][A-Z]", w) is not None
        if odd or (len(w) >= 3 and w.lower() not in vocab):
            spans.append((m.start(), m.end()))
    mask = torch.zeros(len(offsets), dtype=torch.bool)
    j = 0
    for i, (a, b) in enumerate(offsets):
        while j < len(spans) and spans[j][1] <= a:
            j += 1
        if j < len(spans) and b > spans[j][0] and a < spans[j][1] and b > a:
            mask[i] = True
    return mask


@torch.no_grad()
def jargon(baseline, candidate, quick: bool = False, n: int = 8, seq_len: int = 256) -> SuiteResult:
    source, docs = python_docs()
    rng = random.Random(0)
    docs = rng.sample(docs, min(len(docs), 3 if quick else n))
    vocab = common_words()
    tok = baseline.tokenizer
    stats = {k: {"baseline": [0, 0], "candidate": [0, 0]} for k in ("jargon", "common")}  # [correct, total]
    kld_sum = {"jargon": 0.0, "common": 0.0}
    rows = []
    encs = [tok(text, return_offsets_mapping=True, add_special_tokens=False, truncation=True, max_length=seq_len)
            for _, text in docs]

    def base_side():  # the baseline's top-k log-probs per document (cached between runs: basecache)
        out = []
        for enc in encs:
            lp, idx = metrics.topk_logprobs(baseline.module(torch.tensor([enc["input_ids"]])).logits[0, :-1], TOPK)
            out.append({"lp": lp, "idx": idx})
        return out

    bside = cached("jargon", baseline, {"docs": _digest([t for _, t in docs]), "seq_len": seq_len, "topk": TOPK},
                   base_side)
    for (name, text), enc, b in zip(docs, encs, bside):
        ids = torch.tensor(enc["input_ids"])
        mask = jargon_mask(text, enc["offset_mapping"], vocab)[1:]  # class of each predicted token
        lc = candidate.module(ids[None]).logits[0, :-1]
        k = metrics.kld_topk(b["lp"].float(), b["idx"], lc)
        target = ids[1:]
        row = {"name": name, "text": text[:300]}
        for who, top1 in (("baseline", b["idx"][:, 0].long()), ("candidate", lc.argmax(-1))):
            correct = top1 == target
            for cls, m in (("jargon", mask), ("common", ~mask)):
                stats[cls][who][0] += correct[m].sum().item()
                stats[cls][who][1] += m.sum().item()
            row[who] = correct[mask].float().mean().item() if mask.any() else 0.0
        for cls, m in (("jargon", mask), ("common", ~mask)):
            kld_sum[cls] += k[m].sum().item()
        rows.append(row)

    def acc(cls: str, who: str) -> float:
        c, t = stats[cls][who]
        return 100 * c / max(t, 1)

    n_j, n_c = stats["jargon"]["baseline"][1], stats["common"]["baseline"][1]
    worst = sorted(rows, key=lambda r: r["baseline"] - r["candidate"], reverse=True)[:5]
    return SuiteResult(
        name="jargon", metric="jargon_acc_pct", baseline=acc("jargon", "baseline"), candidate=acc("jargon", "candidate"),
        higher_is_better=True, n=len(docs),
        metrics={"jargon_acc_pct": {"baseline": acc("jargon", "baseline"), "candidate": acc("jargon", "candidate")},
                 "common_acc_pct": {"baseline": acc("common", "baseline"), "candidate": acc("common", "candidate")},
                 "jargon_kld": {"baseline": 0.0, "candidate": kld_sum["jargon"] / max(n_j, 1)},
                 "common_kld": {"baseline": 0.0, "candidate": kld_sum["common"] / max(n_c, 1)}},
        worst=[Case(r["name"], r["text"], round(100 * r["baseline"], 1), round(100 * r["candidate"], 1),
                    r["baseline"] - r["candidate"]) for r in worst],
        notes=f"{source}; {n_j} jargon and {n_c} common tokens; accuracy = greedy next-token prediction of the text")


# -- long context ---------------------------------------------------------------------------------
BUCKETS = (0, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768)


def context_length(model, requested: int | None, quick: bool) -> int:
    limit = getattr(model.config, "max_position_embeddings", 2048) or 2048
    want = requested or (512 if quick else 2048)
    return max(128, min(want, limit))


def _needles(tok, haystack_ids: torch.Tensor, length: int, count: int, seed: int = 0) -> list[tuple[torch.Tensor, str, float]]:
    """(prompt ids, answer, depth) with a code planted at a shallow depth of a haystack of ~length tokens."""
    rng = random.Random(seed)
    out = []
    question = tok("\n\nQuestion: What is the secret code mentioned above?\nAnswer: The secret code is",
                   return_tensors="pt", add_special_tokens=False).input_ids[0]
    for i in range(count):
        code = str(rng.randint(10000, 99999))
        fact = tok(f" The secret code is {code}. Remember it. ", return_tensors="pt", add_special_tokens=False).input_ids[0]
        depth = 0.1 + 0.15 * i  # planted early: 10%, 25%, 40% into the context
        body = length - fact.numel() - question.numel() - 8  # room for the answer within the context
        at = int(depth * body)
        ids = torch.cat([haystack_ids[:at], fact, haystack_ids[at:body], question])
        out.append((ids, code, depth))
    return out


@torch.no_grad()
def _retrieves(model, tok, ids: torch.Tensor, code: str) -> tuple[bool, str]:
    from lowbit.model.kvcache import cache_kwargs

    out = model.generate(ids[None], max_new_tokens=6, do_sample=False, temperature=None, top_p=None, top_k=None,
                         pad_token_id=tok.eos_token_id, **cache_kwargs(model))
    text = tok.decode(out[0, ids.numel():], skip_special_tokens=True)
    return code in text, text


@torch.no_grad()
def long_context(baseline, candidate, quick: bool = False, context: int | None = None, needles: int = 3) -> SuiteResult:
    tok = baseline.tokenizer
    length = context_length(baseline.module, context, quick)
    ids = tok(wikipedia_text(), return_tensors="pt", add_special_tokens=False).input_ids[0][:length]
    length = ids.numel()
    n_needles = 1 if quick else needles
    planted = _needles(tok, ids, length, n_needles)

    def side(loaded) -> dict:
        return {"nll": metrics.nll(loaded.module(ids[None]).logits[0, :-1], ids[1:]),  # (length-1,)
                "needles": [list(_retrieves(loaded.module, tok, n_ids, code)) for n_ids, code, _ in planted]}

    base_side = cached("long_context", baseline, {"ids": _digest([str(ids.tolist())]), "needles": n_needles},
                       lambda: side(baseline))
    sides = {"baseline": base_side, "candidate": side(candidate)}
    nll = {who: s["nll"] for who, s in sides.items()}
    pos = torch.arange(1, length)  # position of each predicted token
    m: dict[str, dict[str, float]] = {}
    edges = [b for b in BUCKETS if b < length] + [length]
    last = None
    for a, b in zip(edges[:-1], edges[1:]):
        sel = (pos >= a) & (pos < b)
        if sel.any():
            last = f"ppl_{a}_{b}"
            m[last] = {who: metrics.perplexity_from_nll(nll[who][sel].sum().item(), int(sel.sum())) for who in nll}
    m["ppl_all"] = {who: metrics.perplexity_from_nll(nll[who].sum().item(), length - 1) for who in nll}
    hits = {"baseline": 0, "candidate": 0}
    worst = []
    for i, (n_ids, code, depth) in enumerate(planted):
        got = {who: tuple(s["needles"][i]) for who, s in sides.items()}
        for who in hits:
            hits[who] += got[who][0]
        if got["baseline"][0] and not got["candidate"][0]:
            worst.append(Case(f"needle@{depth:.0%}", f"code {code} planted at {depth:.0%} of {n_ids.numel()} tokens",
                              got["baseline"][1], got["candidate"][1], 1.0))
    m["needle_pct"] = {who: 100 * hits[who] / n_needles for who in hits}
    return SuiteResult(
        name="long_context", metric=last, baseline=m[last]["baseline"], candidate=m[last]["candidate"],
        higher_is_better=False, n=length, metrics=m, worst=worst,
        notes=f"one {length}-token Wikipedia stream; {n_needles} needle(s) planted at 10-40% depth, asked at the end")
