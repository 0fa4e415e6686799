"""Perplexity on fixed token windows (the full harness with KLD and suites builds on this)."""

from __future__ import annotations

import math

import torch

from lowbit.errors import LowbitError


def token_windows(tokenizer, text: str, n_tokens: int = 4096, seq_len: int = 512) -> torch.Tensor:
    """The first n_tokens of text as (n_windows, seq_len) non-overlapping windows."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = min(n_tokens, ids.numel()) // seq_len * seq_len
    if n == 0:
        raise LowbitError(f"perplexity: the text has {ids.numel()} tokens, fewer than one window of {seq_len}; give more text")
    return ids[:n].reshape(-1, seq_len)  # (n_windows, seq_len)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over every predicted token of every window."""
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size]
        logits = model(ids).logits[:, :-1].float()  # (b, seq-1, vocab)
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)
