"""Text generation with streaming output.

The lean loop (lowbit.runtime.decode) runs Llama-layout models; others go through transformers'
generate. Both use the model's QLinear kernels and either KV-cache format (none, int8, fp8).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowbit.errors import LowbitError


class _Streamer:
    """Decodes the new tokens incrementally and hands each new piece of text to a callback."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]) -> None:
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.printed = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        self.on_text(text[self.printed:])
        self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.printed:
            self.on_text(text[self.printed:])
        self.printed = len(text)


def encode_prompt(tokenizer, prompt: str, chat: bool) -> dict:
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             return_dict=True, return_tensors="pt")
    return dict(tokenizer(prompt, return_tensors="pt"))


ENGINES = ("auto", "lean", "hf")
MAX_NEW_TOKENS = 16384  # whatever the context: the KV cache and the time grow with it
MAX_PROMPT_CHARS = 1_000_000  # checked before tokenizing


def context_length(config) -> int | None:
    """The context a model was trained for: max_position_embeddings of its (text) config, a config
    object or config.json's dict; None where it does not say."""
    if config is None:
        return None
    if isinstance(config, dict):
        text = config.get("text_config")
        found = [config.get("max_position_embeddings"), text.get("max_position_embeddings") if isinstance(text, dict) else None]
    else:
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else None
        found = [getattr(config, "max_position_embeddings", None), getattr(text, "max_position_embeddings", None)]
    for n in found:
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return None


def check_max_new_tokens(max_new_tokens, context: int | None = None, where: str = "") -> None:
    """max_new_tokens is a whole number in 1..MAX_NEW_TOKENS that leaves room for a prompt in the context."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise LowbitError(f"--max-new-tokens: must be a whole number of at least 1, not {max_new_tokens!r}")
    if max_new_tokens > MAX_NEW_TOKENS:
        raise LowbitError(f"--max-new-tokens: {max_new_tokens} is more than lowbit generates in one call "
                          f"({MAX_NEW_TOKENS}); fix: pass --max-new-tokens {MAX_NEW_TOKENS} or less")
    if context is not None and max_new_tokens >= context:
        raise LowbitError(f"--max-new-tokens: {max_new_tokens} new tokens do not fit the model's context of {context} "
                          f"tokens ({where or 'max_position_embeddings'}) with any prompt; "
                          f"fix: pass --max-new-tokens {context - 1} or less")


def check_length(config, prompt_tokens: int, max_new_tokens: int) -> None:
    """Prompt tokens + max_new_tokens fit the model's context (beyond it the model only produces garbage)."""
    check_max_new_tokens(max_new_tokens)
    context = context_length(config)
    if context is None or prompt_tokens + max_new_tokens <= context:
        return
    room = context - max_new_tokens
    fix = (f"shorten the prompt to at most {room} tokens, or pass --max-new-tokens {context - prompt_tokens} or less"
           if prompt_tokens < context else f"shorten the prompt to fewer than {context} tokens")
    raise LowbitError(f"--prompt: {prompt_tokens} prompt tokens + --max-new-tokens {max_new_tokens} = "
                      f"{prompt_tokens + max_new_tokens} tokens, more than the model's context of {context} "
                      f"(config max_position_embeddings); fix: {fix}")


def pick_engine(model, engine: str = "auto") -> str:
    from lowbit.errors import LowbitError
    from lowbit.runtime.decode import supports

    if engine not in ENGINES:
        raise LowbitError(f"--engine: '{engine}' is unknown; use one of {', '.join(ENGINES)}")
    ok, why = supports(model)
    if engine == "lean" and not ok:
        raise LowbitError(f"--engine lean: {why}; fix: use --engine hf (or auto)")
    return "lean" if engine == "auto" and ok else engine if engine != "auto" else "hf"


def eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                  chat: bool = True, on_text: Callable[[str], None] | None = None, kv_cache: str | None = None,
                  engine: str = "auto") -> int:
    """Generate and stream; returns the number of new tokens. kv_cache None: the format attached to
    the module (lowbit.model.kvcache.attach, as a handle's kv_cache sets it; an artifact's recipe sets
    it on load), else none / int8 / fp8."""
    from lowbit.model.kvcache import QuantizedKVCache, check_kind, kv_of

    kv_cache = check_kind(kv_of(model) if kv_cache is None else kv_cache, "--kv-cache")
    check_max_new_tokens(max_new_tokens)
    if len(prompt) > MAX_PROMPT_CHARS:
        raise LowbitError(f"--prompt: {len(prompt)} characters, more than lowbit generates from ({MAX_PROMPT_CHARS}); "
                          f"fix: shorten the prompt")
    inputs = encode_prompt(tokenizer, prompt, chat)
    check_length(model.config, inputs["input_ids"].shape[1], max_new_tokens)  # before any cache is allocated
    if pick_engine(model, engine) == "lean":
        from lowbit.runtime.decode import lean_generate

        streamer = _Streamer(tokenizer, on_text) if on_text else None
        if streamer:
            streamer.prompt_seen = True  # the lean loop hands over new tokens only
        stop = eos_ids(model, tokenizer)
        new = lean_generate(model, inputs["input_ids"], max_new_tokens, kv_cache=kv_cache, temperature=temperature,
                            repetition_penalty=1.1, eos_token_id=stop,
                            on_token=(lambda t: streamer.put(t[0])) if streamer else None)
        if streamer:
            streamer.end()
        return new.shape[1]
    sample = temperature > 0
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sample, repetition_penalty=1.1,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if sample:
        kwargs.update(temperature=temperature, top_p=0.95)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if kv_cache != "none":
        kwargs["cache"] = QuantizedKVCache(kv_cache, model.config)
    streamer = _Streamer(tokenizer, on_text) if on_text else None
    out = model.generate(**inputs, streamer=streamer, **kwargs)
    return out.shape[1] - inputs["input_ids"].shape[1]


def complete(model, tokenizer, prompt: str, max_new_tokens: int = 32, chat: bool = True) -> str:
    """Greedy completion as a string (for tests and scripts)."""
    pieces: list[str] = []
    generate_text(model, tokenizer, prompt, max_new_tokens, 0.0, chat, pieces.append)
    return "".join(pieces)


@torch.no_grad()
def greedy_batch(model, tokenizer, prompts: list[torch.Tensor], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy continuations of several prompts (1-D id tensors), batched with left padding.

    Decoding on a CPU is bound by reading the weights, and one step reads them once for the whole
    batch, so a batch costs little more per step than one sequence: suites that generate for many
    prompts batch them rather than decode one prompt at a time.
    """
    from lowbit.model.kvcache import cache_kwargs, kv_of

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lean = pick_engine(model) == "lean"
    texts: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        width = max(p.numel() for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, p in enumerate(chunk):
            ids[row, width - p.numel():] = p
            mask[row, width - p.numel():] = 1
        if lean:
            from lowbit.runtime.decode import lean_generate

            new = lean_generate(model, ids, max_new_tokens, attention_mask=mask, eos_token_id=eos_ids(model, tokenizer),
                                kv_cache=kv_of(model))
        else:
            new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad, temperature=None, top_p=None, top_k=None,
                                 **cache_kwargs(model))[:, width:]
        texts += [tokenizer.decode(row, skip_special_tokens=True) for row in new]
    return texts
