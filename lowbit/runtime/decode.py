"""The lean decode loop: generation without transformers' per-token machinery.

At 135M parameters a token costs less in memory traffic than in Python: transformers' generate
spends most of each step building masks, cache objects and logits processors.
This loop runs a Llama-layout decoder with:

- static KV buffers per layer (float, or int8/fp8 with a scale per token and head), written in place;
- the model's own modules for every matmul (so QLinear's fast kernels are used; q/k/v and gate/up
  of a quantized model share one kernel call where their formats match) and its own rotary
  embedding to precompute cos/sin once (so every rope-scaling variant the model supports is right);
- F.rms_norm and F.scaled_dot_product_attention (GQA without repeating K/V);
- logits for the last position only.

Supported: the Llama layout (llama, mistral, qwen2) and Gemma 3 text models (gemma3_text: (1 + w)
norms, q/k norms, norms after attention and MLP, tanh-GELU, sliding-window layers with their own
rotary table). Anything else runs through transformers' generate with the same kernels
(`supports()` says why).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.model.qlinear import fused
from lowbit.model.kvcache import check_kind, dequantize_kv, quantize_kv

LLAMA_LAYOUT = ("llama", "mistral", "qwen2")
GEMMA3 = ("gemma3_text",)


def supports(model) -> tuple[bool, str]:
    cfg = model.config
    mt = getattr(cfg, "model_type", "?")
    if mt not in LLAMA_LAYOUT + GEMMA3:
        return False, f"model type '{mt}' is not one the lean loop runs ({', '.join(LLAMA_LAYOUT + GEMMA3)})"
    if mt in LLAMA_LAYOUT and getattr(cfg, "hidden_act", "silu") != "silu":
        return False, f"activation '{cfg.hidden_act}' (the lean loop implements silu for this layout)"
    if mt in GEMMA3 and getattr(cfg, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        return False, f"activation '{cfg.hidden_activation}'"
    if mt in GEMMA3 and (getattr(cfg, "attn_logit_softcapping", None) or getattr(cfg, "use_bidirectional_attention", False)):
        return False, "attention soft-capping or bidirectional attention"
    if mt in LLAMA_LAYOUT and getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", mt == "mistral"):
        return False, "sliding-window attention in a Llama-layout model"
    if not hasattr(model, "model") or not hasattr(model.model, "rotary_emb"):
        return False, "no model.rotary_emb module"
    return True, ""


def _norm_weight(norm) -> tuple[torch.Tensor, float]:
    """(effective weight, eps) of an RMSNorm module: Gemma's scale by (1 + w), Llama's by w."""
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    if type(norm).__name__.startswith("Gemma"):
        return (1.0 + norm.weight.float()), eps
    return norm.weight, eps


class LeanDecoder:
    """Holds static KV buffers for `batch` sequences of up to `max_len` tokens."""

    def __init__(self, model, batch: int, max_len: int, kv_cache: str = "none") -> None:
        ok, why = supports(model)
        if not ok:
            raise LowbitError(f"lean decode: {why}")
        self.model, self.kind = model, check_kind(kv_cache)
        cfg = model.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.layers = list(model.model.layers)
        self.dtype = model.model.embed_tokens.weight.dtype
        self.batch, self.max_len = batch, max_len
        shape = (batch, self.n_kv, max_len, self.head_dim)
        if self.kind == "none":
            self.k = [torch.zeros(shape, dtype=self.dtype) for _ in self.layers]
            self.v = [torch.zeros(shape, dtype=self.dtype) for _ in self.layers]
        else:
            code = torch.int8 if self.kind == "int8" else torch.float8_e4m3fn
            self.k = [torch.zeros(shape, dtype=code) for _ in self.layers]
            self.v = [torch.zeros(shape, dtype=code) for _ in self.layers]
            self.ks = [torch.ones(*shape[:3], 1) for _ in self.layers]
            self.vs = [torch.ones(*shape[:3], 1) for _ in self.layers]
        pos = torch.arange(max_len).unsqueeze(0)
        dummy = torch.zeros(1, 1, self.head_dim, dtype=self.dtype)
        self.gemma = cfg.model_type in GEMMA3
        types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * len(self.layers))
        self.window = [cfg.sliding_window if t == "sliding_attention" else None for t in types]
        self.rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        with torch.no_grad():
            for t in sorted(set(types)):
                cos, sin = (model.model.rotary_emb(dummy, pos, t) if self.gemma else model.model.rotary_emb(dummy, pos))
                self.rope[t] = (cos[0].to(self.dtype), sin[0].to(self.dtype))  # (max_len, head_dim)
        self.types = types
        # norm weights once: Gemma's (1 + w) would otherwise be recomputed for every token
        self.norms = [{n: _norm_weight(getattr(layer, n)) for n in ("input_layernorm", "post_attention_layernorm",
                                                                    "pre_feedforward_layernorm", "post_feedforward_layernorm")
                       if hasattr(layer, n)} for layer in self.layers]
        self.qk_norms = [(_norm_weight(layer.self_attn.q_norm), _norm_weight(layer.self_attn.k_norm))
                         if hasattr(layer.self_attn, "q_norm") else None for layer in self.layers]
        self.final_norm = _norm_weight(model.model.norm)
        # q/k/v and gate/up of quantized models as one kernel call each, where their formats allow
        self.qkv = [fused(layer.self_attn, ("q_proj", "k_proj", "v_proj")) for layer in self.layers]
        self.gate_up = [fused(layer.mlp, ("gate_proj", "up_proj")) for layer in self.layers]
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.length = 0
        self.key_mask: torch.Tensor | None = None  # (batch, max_len) bool, with left padding
        # batch-1 steps of a Llama-layout model run as one native call (lowbit/native), when it can
        from lowbit.runtime.native_step import NativeStep

        self.native, self.native_why = NativeStep.build(self)

    @property
    def kv_bytes(self) -> int:
        tensors = self.k + self.v + (self.ks + self.vs if self.kind != "none" else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rot * sin

    def _write(self, i: int, k: torch.Tensor, v: torch.Tensor, start: int, end: int):
        """Store the new keys/values and return all cached ones (dequantized) up to `end`."""
        if self.kind == "none":
            self.k[i][:, :, start:end] = k
            self.v[i][:, :, start:end] = v
            return self.k[i][:, :, :end], self.v[i][:, :, :end]
        kq, ks = quantize_kv(k, self.kind)
        vq, vs = quantize_kv(v, self.kind)
        self.k[i][:, :, start:end], self.ks[i][:, :, start:end] = kq, ks
        self.v[i][:, :, start:end], self.vs[i][:, :, start:end] = vq, vs
        return (dequantize_kv(self.k[i][:, :, :end], self.ks[i][:, :, :end], k.dtype),
                dequantize_kv(self.v[i][:, :, :end], self.vs[i][:, :, :end], v.dtype))

    @staticmethod
    def _rms(x: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
        w, eps = norm
        if w.dtype != x.dtype:  # Gemma: normalise and scale in fp32, then back
            return F.rms_norm(x.float(), (x.shape[-1],), w, eps).to(x.dtype)
        return F.rms_norm(x, (x.shape[-1],), w, eps)

    def _masks(self, B: int, T: int, start: int, end: int) -> dict:
        """Per window size: (attn_mask or None, is_causal, first key index) for this step."""
        out = {}
        for window in set(self.window):
            lo = 0 if window is None else max(0, end - T - window + 1)  # oldest key any query here can see
            q = torch.arange(start, end)[:, None]
            k = torch.arange(lo, end)[None, :]
            allowed = k <= q
            if window is not None:
                allowed = allowed & (q - k < window)
            if self.key_mask is not None:
                allowed = self.key_mask[:, None, None, lo:end] & allowed
                out[window] = (allowed, False, lo)
            elif T == 1 and (window is None or lo == end - min(end, window)):
                out[window] = (None, False, lo)  # one query, every key in range visible
            elif start == 0 and lo == 0 and (window is None or T <= window):
                out[window] = (None, True, lo)
            else:
                out[window] = (allowed, False, lo)
        return out

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Run `ids` (batch, T) after what is cached; returns the last position's logits (batch, vocab)."""
        B, T = ids.shape
        start, end = self.length, self.length + T
        if end > self.max_len:
            raise LowbitError(f"lean decode: {end} tokens exceed the cache of {self.max_len}; raise max_len")
        m = self.model.model
        h = m.embed_tokens(ids)
        ropes = {}
        for t, (cos, sin) in self.rope.items():
            if positions is None:  # (T, D), broadcast over batch and heads
                ropes[t] = (cos[start:end], sin[start:end])
            else:  # per-row positions (left padding): (B, 1, T, D)
                ropes[t] = (cos[positions].unsqueeze(1), sin[positions].unsqueeze(1))
        masks = self._masks(B, T, start, end)
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        for i, layer in enumerate(self.layers):
            attn, norms = layer.self_attn, self.norms[i]
            x = self._rms(h, norms["input_layernorm"])
            if self.qkv[i] is not None:
                q, k, v = self.qkv[i](x)
            else:
                q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            q = q.view(B, T, H, D).transpose(1, 2)
            k = k.view(B, T, KV, D).transpose(1, 2)
            v = v.view(B, T, KV, D).transpose(1, 2)
            if self.qk_norms[i] is not None:
                q, k = self._rms(q, self.qk_norms[i][0]), self._rms(k, self.qk_norms[i][1])
            cos, sin = ropes[self.types[i]]
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            K, V = self._write(i, k, v, start, end)
            mask, causal, lo = masks[self.window[i]]
            if lo:
                K, V = K[:, :, lo:], V[:, :, lo:]
            o = F.scaled_dot_product_attention(q, K, V, attn_mask=mask, is_causal=causal, scale=attn.scaling,
                                               enable_gqa=KV != H)
            o = attn.o_proj(o.transpose(1, 2).reshape(B, T, H * D))
            mlp = layer.mlp
            if self.gemma:
                h = h + self._rms(o, norms["post_attention_layernorm"])
                x = self._rms(h, norms["pre_feedforward_layernorm"])
                g, u = self.gate_up[i](x) if self.gate_up[i] is not None else (mlp.gate_proj(x), mlp.up_proj(x))
                y = mlp.down_proj(F.gelu(g, approximate="tanh") * u)
                h = h + self._rms(y, norms["post_feedforward_layernorm"])
            else:
                h = h + o
                x = self._rms(h, norms["post_attention_layernorm"])
                g, u = self.gate_up[i](x) if self.gate_up[i] is not None else (mlp.gate_proj(x), mlp.up_proj(x))
                h = h + mlp.down_proj(F.silu(g) * u)
        self.length = end
        logits = self.model.lm_head(self._rms(h[:, -1], self.final_norm)).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Start new sequences. With left padding pass attention_mask (batch, T) of 0/1."""
        self.length = 0
        if attention_mask is None or bool(attention_mask.all()):
            self.key_mask = None
            return self.forward(ids)
        self.key_mask = torch.zeros(self.batch, self.max_len, dtype=torch.bool)
        self.key_mask[:, : ids.shape[1]] = attention_mask.bool()
        self.key_mask[:, ids.shape[1]:] = True
        self._pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        return self.forward(ids, self._pos)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """One new token per sequence, ids (batch, 1)."""
        if self.key_mask is None and self.native is not None:
            if self.length + 1 > self.max_len:
                raise LowbitError(f"lean decode: {self.length + 1} tokens exceed the cache of {self.max_len}; raise max_len")
            with torch.no_grad():
                logits = self.native.step(self.model.model.embed_tokens(ids), self.length)
            self.length += 1
            return logits
        if self.key_mask is None:
            return self.forward(ids)
        self._pos = self._pos[:, -1:] + 1
        return self.forward(ids, self._pos)


def pick_next(logits: torch.Tensor, seen: torch.Tensor | None, temperature: float, top_p: float,
              repetition_penalty: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch, vocab) -> (batch, 1). Repetition penalty as in transformers (divide positive logits of
    seen tokens, multiply negative ones); greedy when temperature is 0."""
    if repetition_penalty != 1.0 and seen is not None:
        picked = logits.gather(1, seen)
        picked = torch.where(picked > 0, picked / repetition_penalty, picked * repetition_penalty)
        logits = logits.scatter(1, seen, picked)
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p > top_p
    sorted_p = sorted_p.masked_fill(drop, 0)
    choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=generator)
    return order.gather(1, choice)


def uses_native_kernels(model) -> bool:
    """Whether some QLinear of `model` sends small batches to lowbit's native products."""
    from lowbit import native
    from lowbit.model.kernels import NATIVE_KERNELS
    from lowbit.model.qlinear import QLinear

    return native.available() and any(isinstance(m, QLinear) and m.plan is not None and m.plan.name in NATIVE_KERNELS
                                      for m in model.modules())


def engine_label(model, kv_cache: str = "none") -> str:
    """How the lean loop will decode one sequence: 'lean, native step (path)' or 'lean, torch ops (why)'."""
    from lowbit import native

    why = LeanDecoder(model, 1, 1, kv_cache).native_why
    return f"lean, native step ({native.isa()})" if not why else f"lean, torch ops ({why})"


class decoding:
    """Around a loop of decode steps: torch on one thread while lowbit's native code does the heavy work
    (two thread pools spinning on the same cores slow each other down), and Python's garbage collector
    paused (a full collection walks every object of the loaded model, which showed up in a decode
    profile). Outside the loop everything is as it was."""

    def __init__(self, dec: "LeanDecoder") -> None:
        from lowbit import native

        self.threads = None
        if dec.native is not None or uses_native_kernels(dec.model):
            self.threads = native.single_threaded_torch()

    def __enter__(self):
        import gc

        self.gc = gc.isenabled()
        gc.disable()
        if self.threads:
            self.threads.__enter__()
        return self

    def __exit__(self, *exc):
        import gc

        if self.threads:
            self.threads.__exit__(*exc)
        if self.gc:
            gc.enable()
        return False


@torch.no_grad()
def lean_generate(model, ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
                  kv_cache: str = "none", temperature: float = 0.0, top_p: float = 0.95,
                  repetition_penalty: float = 1.0, eos_token_id: int | list[int] | None = None,
                  on_token: Callable[[torch.Tensor], None] | None = None, decoder: LeanDecoder | None = None) -> torch.Tensor:
    """Generate up to max_new_tokens for a (batch, T) prompt; returns the new ids (batch, n)."""
    B, T = ids.shape
    dec = decoder or LeanDecoder(model, B, T + max_new_tokens, kv_cache)
    logits = dec.prefill(ids, attention_mask)
    seen = ids
    out = []
    done = torch.zeros(B, 1, dtype=torch.bool)
    stop = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []), dtype=torch.long)
    with decoding(dec):
        for i in range(max_new_tokens):
            nxt = pick_next(logits, seen if repetition_penalty != 1.0 else None, temperature, top_p, repetition_penalty)
            if stop.numel():  # finished rows keep emitting their end token, as transformers pads them
                nxt = torch.where(done, torch.full_like(nxt, int(stop[0])), nxt)
                done = done | torch.isin(nxt, stop)
            out.append(nxt)
            if on_token:
                on_token(nxt)
            if bool(done.all()) or i == max_new_tokens - 1:
                break
            if repetition_penalty != 1.0:
                seen = torch.cat([seen, nxt], dim=1)
            logits = dec.step(nxt)
    return torch.cat(out, dim=1) if out else ids[:, :0]
