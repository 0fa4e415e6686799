"""Structured-output divergence: teacher-forced scoring of real JSON answers under the model's prompt format.

Greedy generation only shows damage to JSON when the model writes JSON on its own, which a small
model rarely does (the bundled SmolLM2 writes no valid BFCL call, baseline or candidate, so a
generation check reads 0 -> 0 whatever happens). Here the answer is given: each sample is a prompt
in the model's chat format followed by a correct JSON answer, and both models are scored on every
answer token. A candidate that no longer puts its probability on `{`, a quote, a key or a comma
where the baseline did is caught even if neither model would have produced the answer greedily.

Samples:
  - BFCL questions with their ground-truth call, rendered as {"name": ..., "arguments": {...}} after
    the same prompt the json suite uses (when bfcl-eval is installed);
  - extraction tasks on real Wikipedia articles (always available): the article's opening, a request
    for a JSON object with fixed keys, and the object built from the article itself.

Each answer character is structural (braces, brackets, colons, commas, the quotes around strings and
the whitespace between them), part of a key, or part of a value; a token is "structure" when all its
answer characters are structural or key characters. Reported for structure and value tokens apart:
mean KL divergence (baseline || candidate; the baseline's distribution on its top 256 tokens plus
one tail bucket, so that its side can be cached between runs: a lower bound of the exact KLD), NLL of
the given answer, top-1 agreement with it, and
`struct_top1_loss_pct`, the share of structure positions where the baseline's top-1 was the given
token and the candidate's is not.
"""

from __future__ import annotations

import hashlib
import json
import random

import torch

from lowbit.data.corpora import wikipedia_articles
from lowbit.errors import LowbitError
from lowbit.eval import metrics
from lowbit.eval.basecache import cached
from lowbit.eval.types import Case, SuiteResult

STRUCT_CHARS = set('{}[]:,"')
TOPK = 256  # the baseline's log-probs are kept on its top 256 tokens plus one tail bucket (as divergence does)
MAX_ANSWER_TOKENS = 192
MAX_SAMPLE_TOKENS = 768  # prompt + answer: longer BFCL prompts (many functions) are skipped, to bound the time


def char_classes(answer: str) -> list[str]:
    """'s' (structural), 'k' (key) or 'v' (value) for every character of a JSON text."""
    out = ["v"] * len(answer)
    i, n = 0, len(answer)
    while i < n:
        ch = answer[i]
        if ch == '"':  # a string: find its end, then whether a colon follows (a key)
            j = i + 1
            while j < n and answer[j] != '"':
                j += 2 if answer[j] == "\\" else 1
            k = j + 1
            while k < n and answer[k] in " \t\r\n":
                k += 1
            inner = "k" if k < n and answer[k] == ":" else "v"
            out[i] = "s"
            for p in range(i + 1, min(j, n)):
                out[p] = inner
            if j < n:
                out[j] = "s"
            i = j + 1
            continue
        out[i] = "s" if ch in STRUCT_CHARS or ch.isspace() else "v"
        i += 1
    return out


def _wiki_samples(n: int, seed: int) -> list[dict]:
    arts = wikipedia_articles()  # bodies of 2000+ characters
    rng = random.Random(seed)
    out = []
    for title, body in rng.sample(arts, min(n, len(arts))):
        opening = " ".join(body.split())[:500]
        first = opening.split(". ")[0].strip()[:160]
        words = len(body.split())
        prompt = (f"Read this encyclopedia article opening and answer with one JSON object with the keys "
                  f'"title" (string), "first_sentence" (string) and "word_count" (integer). Write nothing else.\n\n'
                  f"Title: {title}\nWord count: {words}\nText: {opening}")
        answer = json.dumps({"title": title, "first_sentence": first, "word_count": words}, ensure_ascii=False)
        out.append({"id": f"wiki:{title[:40]}", "prompt": prompt, "answer": answer, "kind": "extraction"})
    return out


def _bfcl_samples(tokenizer, n: int, seed: int) -> list[dict]:
    from lowbit.eval.suites import tool_calling

    try:
        questions = tool_calling.load_questions(4 * n, seed=seed)
    except LowbitError:  # bfcl-eval is not installed: the extraction tasks stand alone
        return []
    out = []
    for q in questions:
        if not q.get("answer"):
            continue
        (name, args), = q["answer"][0].items()
        call = {"name": name, "arguments": {k: v[0] for k, v in args.items() if v and v[0] != ""}}
        out.append({"id": q["id"], "prompt_text": tool_calling.prompt_text(tokenizer, q), "answer": json.dumps(call),
                    "kind": "tool call"})
        if len(out) == n:
            break
    return out


def _prompt_text(tokenizer, prompt: str) -> str:
    """The prompt in the model's chat format, or plain with a newline when it has none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
    return prompt + "\n"


def _encode(tokenizer, prompt_text: str, answer: str, templated: bool):
    """ids of prompt + answer, and each answer token's class ('s', 'k' or 'v'); None if the answer's
    tokens cannot be told apart from the prompt's."""
    text = prompt_text + answer
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=not templated)
    classes = char_classes(answer)
    start = len(prompt_text)
    ids, cls = enc["input_ids"], []
    first = None
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        if b <= start or a == b:
            if first is None:
                continue
            cls.append("s")
            continue
        if a < start:  # a token straddles prompt and answer: start scoring after it
            continue
        if first is None:
            first = i
        chars = classes[a - start:b - start]
        cls.append("v" if "v" in chars else ("k" if "k" in chars else "s"))
    if first is None:
        return None
    cls = cls[:MAX_ANSWER_TOKENS]
    return torch.tensor(ids[: first + len(cls)]), first, cls


MAX_FILE_SAMPLES = 1000


def load_samples(path) -> list[dict]:
    """The structured suite's own samples: a JSON-lines file of {"prompt": str, "answer": JSON text or
    a JSON value} (optional "id"). Refused, naming the line and field, when a line is malformed or an
    answer is not JSON, and as a whole when no answer has any structural character to score."""
    from pathlib import Path

    from lowbit.datafile import MAX_DATA_FILE_BYTES, decode_utf8, iter_jsonl, read_bounded

    p = Path(path)
    what = f"structured suite file {p}"
    text = decode_utf8(read_bounded(p, what, MAX_DATA_FILE_BYTES, "fix: a smaller file"), what, p)
    out = []
    for line, where, obj in iter_jsonl(text.splitlines(), f"{what}:"):
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise LowbitError(f"{where}: field 'prompt' is missing or not text; fix: "
                              '{"prompt": "...", "answer": {...}} on every line')
        if "answer" not in obj:
            raise LowbitError(f"{where}: field 'answer' is missing; fix: the JSON the model should write")
        ans = obj["answer"]
        if isinstance(ans, str):
            try:
                json.loads(ans)
            except ValueError as e:
                raise LowbitError(f"{where}: field 'answer' is text that is not JSON ({e}); fix: a JSON value, or "
                                  f"its JSON text") from None
        else:
            ans = json.dumps(ans, ensure_ascii=False)
        out.append({"id": str(obj.get("id") or f"line {line}"), "prompt": obj["prompt"], "answer": ans, "kind": "file"})
        if len(out) > MAX_FILE_SAMPLES:
            raise LowbitError(f"{what}: more than {MAX_FILE_SAMPLES} samples; fix: a smaller sample")
    if not out:
        raise LowbitError(f"{what}: no samples; fix: one JSON object per line with 'prompt' and 'answer'")
    if not any(c != "v" for s in out for c in char_classes(s["answer"])):
        raise LowbitError(f"{what}: no answer has structural content (braces, brackets, quotes, colons, commas or "
                          f"keys): every answer is a bare number, true/false or null, so there is nothing for this "
                          f"suite to score; fix: answers that are JSON objects or arrays")
    return out


@torch.no_grad()
def run(baseline, candidate, quick: bool = False, n: int | None = None, seed: int = 0, file=None) -> SuiteResult:
    tok = baseline.tokenizer
    n_each = n or (2 if quick else 8)
    templated = bool(getattr(tok, "chat_template", None))
    if file is not None:  # the user's own prompts and answers replace the built-in ones
        samples = load_samples(file)
        samples = samples[: 2 * n_each] if quick else samples
    else:
        samples = _wiki_samples(n_each, seed)
    for s in samples:
        s["prompt_text"] = _prompt_text(tok, s["prompt"])
    if file is None:
        samples += _bfcl_samples(tok, n_each, seed)
    context = getattr(baseline.module.config, "max_position_embeddings", None) or MAX_SAMPLE_TOKENS
    limit = min(MAX_SAMPLE_TOKENS, context)  # prompt + answer must fit the model: longer samples are skipped
    sums = {c: {"kld": 0.0, "nll_b": 0.0, "nll_c": 0.0, "top1_b": 0, "top1_c": 0, "lost": 0, "n": 0}
            for c in ("structure", "value")}
    rows = []
    encoded = []
    for s in samples:
        enc = _encode(tok, s["prompt_text"], s["answer"], templated)
        if enc is not None and enc[0].numel() <= limit:
            encoded.append((s, *enc))

    def logits(model, ids, cls):  # the head runs on the answer's positions only: logits at p predict token p + 1
        return model.module(ids[None], logits_to_keep=len(cls) + 1).logits[0, :-1].float()

    def base_side():  # per answer: the baseline's top-k log-probs, NLL and top-1 hits (cached: basecache)
        out = []
        for _, ids, first, cls in encoded:
            b = logits(baseline, ids, cls)
            target = ids[first:first + len(cls)]
            lp, idx = metrics.topk_logprobs(b, TOPK)
            out.append({"lp": lp, "idx": idx, "nll": metrics.nll(b, target), "hit": b.argmax(-1) == target})
        return out

    digest = hashlib.sha256(json.dumps([[ids.tolist(), first, cls] for _, ids, first, cls in encoded]).encode())
    bside = cached("structured", baseline, {"samples": digest.hexdigest()[:24], "topk": TOPK}, base_side)
    for (s, ids, first, cls), b in zip(encoded, bside):
        c = logits(candidate, ids, cls)
        target = ids[first:first + len(cls)]
        k = metrics.kld_topk(b["lp"].float(), b["idx"], c)
        nb, nc = b["nll"], metrics.nll(c, target)
        hb, hc = b["hit"], c.argmax(-1) == target
        is_struct = torch.tensor([x != "v" for x in cls])
        for name, m in (("structure", is_struct), ("value", ~is_struct)):
            acc = sums[name]
            acc["kld"] += k[m].sum().item()
            acc["nll_b"] += nb[m].sum().item()
            acc["nll_c"] += nc[m].sum().item()
            acc["top1_b"] += hb[m].sum().item()
            acc["top1_c"] += hc[m].sum().item()
            acc["lost"] += (hb & ~hc)[m].sum().item()
            acc["n"] += int(m.sum())
        rows.append({"id": s["id"], "kind": s["kind"], "answer": s["answer"],
                     "kld": k[is_struct].mean().item() if is_struct.any() else 0.0,
                     "lost": int((hb & ~hc)[is_struct].sum()), "n": int(is_struct.sum())})
    st, va = sums["structure"], sums["value"]
    if st["n"] == 0:  # nothing measured: criteria on this suite fail as "not measured"; the rest of the run goes on
        return SuiteResult(name="structured", metric="struct_kld", baseline=0.0, candidate=0.0, higher_is_better=False,
                           n=0, notes=f"not measured: no sample fits the model's {limit}-token limit here, or the "
                                      f"tokenizer's offsets do not separate prompt and answer (a fast tokenizer, "
                                      f"tokenizer.json, is needed)")

    def mean(acc, key):
        return acc[key] / max(acc["n"], 1)

    struct_kld = mean(st, "kld")
    metrics_out = {
        "struct_kld": {"baseline": 0.0, "candidate": struct_kld},
        "value_kld": {"baseline": 0.0, "candidate": mean(va, "kld")},
        "struct_nll": {"baseline": mean(st, "nll_b"), "candidate": mean(st, "nll_c")},
        "value_nll": {"baseline": mean(va, "nll_b"), "candidate": mean(va, "nll_c")},
        "struct_top1_pct": {"baseline": 100 * mean(st, "top1_b"), "candidate": 100 * mean(st, "top1_c")},
        "struct_top1_loss_pct": {"baseline": 0.0, "candidate": 100 * mean(st, "lost")},
    }
    worst = sorted(rows, key=lambda r: r["kld"], reverse=True)[:5]
    kinds = sorted({r["kind"] for r in rows})
    return SuiteResult(
        name="structured", metric="struct_kld", baseline=0.0, candidate=struct_kld, higher_is_better=False,
        n=len(rows), metrics=metrics_out,
        worst=[Case(r["id"], r["answer"][:240], f"{r['n']} structure tokens", f"{r['lost']} lost", r["kld"])
               for r in worst],
        notes=(f"{len(rows)} answers ({', '.join(kinds)}), {st['n']} structure and {va['n']} value tokens, teacher-forced; "
               + ("prompts in the model's chat template" if templated else
                  "the tokenizer has no chat template: plain prompts")))
