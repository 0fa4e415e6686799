"""One decode step of a Llama-layout model in native code (kernels.c: lb_decoder_step).

At 135M parameters the lean Python loop spends most of a token on ~1000 small torch ops, not on
the weights. This runs the whole step (norms, projections, rotary embedding, attention over the
cache, MLP, head) in one call, on the tensors the model already holds: QLinear's kernel tensors in
lowbit's q4 / q8 layouts (layout.py), float Linear weights, the norm weights, and the LeanDecoder's own KV buffers, which
its torch prefill filled. Nothing is copied but biases (to float32).

`NativeStep.build(dec)` returns None, and `why` says why, unless: batch 1, float32 activations and KV
cache, a model the lean loop runs (Llama layout: llama, mistral, qwen2; Gemma 3 text), and every
projection on a kernel it has (int4 in lowbit's q4 layout, int8 per channel (W8A8 too: its codes on the
native int8 kernel, kernels.int8dyn_native), float32 or bf16 Linear).
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from lowbit import native
from lowbit.model import kernels
from lowbit.model.qlinear import QLinear

LIN_F32, LIN_BF16, LIN_INT4, LIN_INT8 = 1, 2, 3, 4
NAMES = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
         ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


def linear_kernel(m: nn.Module) -> tuple[int, dict] | str:
    """(kind, tensors) of a projection for the native step, or why it has none."""
    if isinstance(m, QLinear):
        if m.plan is None:
            m.prepare()
        p = m._packed
        if m.plan.name == "int4pack":
            if not kernels.native_layout(p):
                return (f"int4 rows {m.out_features} / group {m.plan.group} in torch's layout "
                        f"(lowbit's q4 layout needs rows in blocks of 32)")
            return LIN_INT4, {"w": p["w"], "s": p["p"], "group": m.plan.group, "center": m.plan.center,
                              "perm": p.get("perm")}
        if m.plan.name in ("int8pack", "int8dyn"):
            if not native.int8_supported(m.in_features):
                return f"int8 with {m.in_features} inputs (needs a multiple of 32)"
            if m.plan.name == "int8dyn":  # W8A8: its codes unpacked once (kernels.int8dyn_native says why)
                w, s = kernels.int8dyn_native(p)
                return LIN_INT8, {"w": w, "s": s}
            return LIN_INT8, {"w": p["w"], "s": p["s"]}
        return f"kernel {m.plan.name}"
    if isinstance(m, nn.Linear) and m.weight.dtype in (torch.float32, torch.bfloat16) and m.in_features % 8 == 0:
        return (LIN_F32 if m.weight.dtype == torch.float32 else LIN_BF16), {"w": m.weight.detach().contiguous()}
    return f"module {type(m).__name__}"


class NativeStep:
    def __init__(self, dec, lib: ctypes.CDLL, plans: list[list[tuple[int, dict]]], head: tuple[int, dict]) -> None:
        self.lib = lib  # (not the decoder itself: it holds this object, and a cycle would delay freeing)
        cfg = dec.model.config
        self.hidden = cfg.hidden_size
        self.vocab = dec.model.lm_head.out_features
        inter = dec.layers[0].mlp.gate_proj.out_features
        eps = float(dec.final_norm[1])
        qk = [n for pair in dec.qk_norms if pair for n in pair]
        if any(float(e) != eps for norms in dec.norms for _, e in [*norms.values(), *qk]):
            raise RuntimeError("native decoder: norms with different eps")
        scale = float(dec.layers[0].self_attn.scaling)
        self.ptr = lib.lb_decoder_new(len(dec.layers), self.hidden, dec.n_heads, dec.n_kv, dec.head_dim, inter,
                                      dec.max_len, self.vocab, eps, scale)
        if not self.ptr:
            raise RuntimeError("native decoder: shape not supported")
        self.keep: list[torch.Tensor] = []  # everything whose address the native side holds
        lib.lb_decoder_set_globals(self.ptr, self._ptr(dec.final_norm[0]), int(dec.gemma), float(dec.softcap or 0.0))
        ropes = {t: tuple(self._ptr(x) for x in cs) for t, cs in dec.rope.items()}
        for i, (layer_plans, norms) in enumerate(zip(plans, dec.norms)):
            qk = dec.qk_norms[i]
            cos, sin = ropes[dec.types[i]]
            lib.lb_decoder_set_layer(
                self.ptr, i, self._ptr(norms["input_layernorm"][0]), self._ptr(norms["post_attention_layernorm"][0]),
                self._ptr(norms.get("pre_feedforward_layernorm", (None,))[0]),
                self._ptr(norms.get("post_feedforward_layernorm", (None,))[0]),
                self._ptr(qk[0][0] if qk else None), self._ptr(qk[1][0] if qk else None), cos, sin,
                int(dec.window[i] or 0), dec.k[i].data_ptr(), dec.v[i].data_ptr())
            for j, (kind, t) in enumerate(layer_plans):
                self._set(i, j, kind, t)
        self._set(-1, 0, *head)

    def _ptr(self, t: torch.Tensor | None) -> int | None:
        """Address of a float32 copy of t (or t itself), kept alive as long as this object."""
        if t is None:
            return None
        t = t.detach().float().contiguous()
        self.keep.append(t)
        return t.data_ptr()

    def _set(self, layer: int, which: int, kind: int, t: dict) -> None:
        w, s = t["w"], t.get("s")
        bias = t.get("bias")
        perm = t.get("perm")
        if perm is not None:
            perm = perm.long().contiguous()
        self.keep += [x for x in (w, s, bias, perm) if x is not None]
        if kind == LIN_INT4 and not (w.is_contiguous() and s.is_contiguous()):
            raise RuntimeError(f"native decoder: layer {layer} projection {which} is not contiguous")
        N = w.shape[0] if kind != LIN_INT4 else w.shape[0] * 32
        K = w.shape[1] if kind != LIN_INT4 else w.shape[1] // 16
        rc = self.lib.lb_decoder_set_linear(self.ptr, layer, which, kind, N, K, t.get("group", 0),
                                            int(s is not None and s.dtype == torch.float32), t.get("center", 8), w.data_ptr(),
                                            s.data_ptr() if s is not None else None,
                                            bias.data_ptr() if bias is not None else None,
                                            perm.data_ptr() if perm is not None else None)
        if rc:
            raise RuntimeError(f"native decoder refused layer {layer} projection {which}")

    @classmethod
    def build(cls, dec) -> tuple["NativeStep | None", str]:
        if dec.batch != 1:
            return None, "batch above 1"
        if dec.kind != "none":
            return None, f"{dec.kind} KV cache"
        if dec.dtype != torch.float32:
            return None, f"{dec.dtype} activations"
        if not native.available():
            return None, native.why_not()
        lib = native._load().lib
        plans = []
        for i, layer in enumerate(dec.layers):
            row = []
            for owner, name in NAMES:
                m = getattr(getattr(layer, owner), name)
                k = linear_kernel(m)
                if isinstance(k, str):
                    return None, f"layer {i} {owner}.{name}: {k}"
                kind, t = k
                if getattr(m, "bias", None) is not None:
                    t = {**t, "bias": m.bias.detach().float().contiguous()}
                row.append((kind, t))
            plans.append(row)
        head = dec.model.lm_head
        k = linear_kernel(head)
        if isinstance(k, str):
            return None, f"lm_head: {k}"
        if getattr(head, "bias", None) is not None:
            k = (k[0], {**k[1], "bias": head.bias.detach().float().contiguous()})
        return cls(dec, lib, plans, k), ""

    def step(self, h: torch.Tensor, pos: int) -> torch.Tensor:
        """h: the new token's embedding (1, 1, hidden) float32; returns logits (1, vocab)."""
        h = h.reshape(-1).float().contiguous()
        logits = torch.empty(1, self.vocab)  # fresh each step (a copy would be a parallel torch op)
        rc = self.lib.lb_decoder_step(self.ptr, h.data_ptr(), pos, logits.data_ptr(), native.threads())
        if rc:
            raise RuntimeError(f"native decoder step failed ({rc}) at position {pos}")
        return logits

    def __del__(self) -> None:
        if getattr(self, "ptr", None):
            self.lib.lb_decoder_free(self.ptr)
            self.ptr = None
