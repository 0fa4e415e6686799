"""Calibration data: prompts from a text file, a JSONL file (a `text` field, or chat `messages`
rendered with the model's chat template) or a named built-in set, cut into `samples` windows of
`seq_len` tokens, with a short report (tokens, vocabulary coverage, duplicate share).

Documents are tokenized, joined with the end-of-sequence token and cut into consecutive windows, so
short prompts are packed rather than padded.

A calibration file is at most MAX_CALIB_BYTES (16 MB, about 4 million tokens: more than 1024 windows
of 2048 tokens), checked before it is read; a JSONL line at most MAX_LINE_CHARS (1 MB). Bytes that are
not UTF-8 are replaced, not refused, unless they and control characters are over 5% of the file's first
million characters (a binary file passed by mistake).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.datafile import iter_jsonl, read_bounded
from lowbit.errors import LowbitError

# The evaluation (lowbit.eval.run, benchmarks) reads Wikipedia articles from the start of the dump;
# the built-in calibration sets read from article HELDOUT_FROM on, so they never overlap.
HELDOUT_FROM = 40
MAX_CALIB_BYTES = 16_000_000  # the whole file is read and tokenized; refused above this before reading
MAX_LINE_CHARS = 1_000_000
BUILTIN = {
    "wikipedia": "Wikipedia articles (gensim test dump), from article 40 on: held out from lowbit's evaluation text",
    "python-docs": "Python 3.11 library documentation: technical text full of rare terms",
    "mix": "wikipedia and python-docs interleaved, one document of each in turn (the default)",
}


@dataclass
class CalibData:
    ids: torch.Tensor  # (samples, seq_len) int64
    source: str
    stats: dict

    def describe(self) -> str:
        s = self.stats
        return (f"{s['samples']} x {s['seq_len']} tokens from {self.source}: {s['tokens']} tokens, "
                f"{100 * s['coverage']:.1f}% of the vocabulary seen, {100 * s['duplicate_share']:.1f}% duplicate documents")


def builtin_texts(name: str) -> list[str]:
    from lowbit.data.corpora import python_docs, wikipedia_articles

    if name == "wikipedia":
        return [f"{t}\n\n{b}" for t, b in wikipedia_articles()[HELDOUT_FROM:]]
    if name == "python-docs":
        return [b for _, b in python_docs()[1]]
    if name == "mix":
        a, b = builtin_texts("wikipedia"), builtin_texts("python-docs")
        out = []
        for i in range(max(len(a), len(b))):
            out += ([a[i]] if i < len(a) else []) + ([b[i]] if i < len(b) else [])
        return out
    raise LowbitError(f"calibration set '{name}' is unknown; built-in sets are {', '.join(BUILTIN)}, "
                      f"or pass a .txt or .jsonl file")


def _render_messages(messages, tokenizer, where: str) -> str:
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise LowbitError(f"{where}: field 'messages' must be a list of {{role, content}} objects")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)  # no template: plain transcript


MAX_NOT_TEXT = 0.05  # share of undecodable bytes and control characters above which a file is not text


def _read(path: Path) -> str:
    """The text of a calibration file, refused before the read when it is over MAX_CALIB_BYTES."""
    raw = read_bounded(path, "calibration file", MAX_CALIB_BYTES,
                       "fix: give a .txt or .jsonl file (the first few MB of text are plenty)")
    text = raw.decode("utf-8", errors="replace")
    sample = text[:1_000_000]
    odd = sum(1 for c in sample if c == "\ufffd" or (c < " " and c not in "\t\n\r\f"))
    if sample and odd > MAX_NOT_TEXT * len(sample):
        raise LowbitError(f"calibration file {path}: {100 * odd / len(sample):.0f}% of its first "
                          f"{len(sample):,} characters are not UTF-8 text or are control characters: not a text "
                          "file (a model, an archive?); fix: give UTF-8 text (.txt) or JSON lines (.jsonl)")
    return text


def read_jsonl(path: Path, tokenizer) -> list[str]:
    texts = []
    # split("\n"), not splitlines(): a U+2028 inside a JSON string is not a line break
    for _, where, row in iter_jsonl(_read(path).split("\n"), f"calibration file {path}:", max_line_chars=MAX_LINE_CHARS):
        if not isinstance(row, dict):
            raise LowbitError(f"{where}: expected a JSON object with a 'text' or 'messages' field")
        if isinstance(row.get("text"), str):
            texts.append(row["text"])
        elif "messages" in row:
            texts.append(_render_messages(row["messages"], tokenizer, where))
        else:
            raise LowbitError(f"{where}: no 'text' (string) or 'messages' (chat) field; fix: add one of them")
    return texts


def read_texts(calib: str | Path | list[str], tokenizer) -> tuple[list[str], str]:
    """The documents of a calibration source and a description of where they came from."""
    if isinstance(calib, list):
        return [str(t) for t in calib], f"{len(calib)} given texts"
    text = str(calib)
    if text in BUILTIN:
        return builtin_texts(text), f"built-in set '{text}'"
    path = Path(text)
    if not path.is_file():
        raise LowbitError(f"calibration file {path}: not found; fix: give a .txt or .jsonl file, or a built-in set "
                          f"({', '.join(BUILTIN)})")
    if path.suffix == ".jsonl":
        return read_jsonl(path, tokenizer), f"file {path}"
    return [_read(path)], f"file {path}"


def load_calibration(calib: str | Path | list[str], tokenizer, samples: int = 128, seq_len: int = 512) -> CalibData:
    if samples < 1 or seq_len < 2:
        raise LowbitError(f"calibration: --samples ({samples}) must be >= 1 and --seq-len ({seq_len}) >= 2")
    texts, source = read_texts(calib, tokenizer)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise LowbitError(f"calibration data ({source}): empty; fix: give text to calibrate on")
    eos = tokenizer.eos_token_id
    need = samples * seq_len
    ids: list[int] = []
    used = 0
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False).input_ids + ([eos] if eos is not None else [])
        used += 1
        if len(ids) >= need:
            break
    n = min(samples, len(ids) // seq_len)
    if n == 0:
        raise LowbitError(f"calibration data ({source}): {len(ids)} tokens, fewer than one window of --seq-len {seq_len}; "
                          f"fix: give more text or a smaller --seq-len")
    windows = torch.tensor(ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)  # (samples, seq_len)
    vocab = len(tokenizer)
    docs = texts[:used]
    stats = {"samples": n, "requested_samples": samples, "seq_len": seq_len, "tokens": n * seq_len,
             "documents": len(docs), "coverage": windows.unique().numel() / vocab,
             "duplicate_share": 1 - len(set(docs)) / len(docs)}
    return CalibData(windows, source, stats)
