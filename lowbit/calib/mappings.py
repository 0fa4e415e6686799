"""Architecture mappings for scale folding (AWQ, SmoothQuant), as data: per model family, which op
feeds which Linear layers of a decoder block.

A scale s (per input channel) multiplies the weights of `layers` and divides the output of `prev`,
so the block computes the same function before quantization. `prev` is either a norm (its gain is
divided; Gemma's RMSNorm computes x * (1 + weight), hence `offset`) or a Linear (its output rows
are divided). A Linear-to-Linear mapping applies only when the shapes line up one to one (with
grouped-query attention v_proj's outputs are shared by several o_proj inputs, so it is skipped).
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class Mapping:
    prev: str  # module path inside the decoder block
    layers: tuple[str, ...]
    offset: float = 0.0  # norms only: the gain is (offset + weight)


_LLAMA = (
    Mapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    Mapping("self_attn.v_proj", ("self_attn.o_proj",)),
    Mapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    Mapping("mlp.up_proj", ("mlp.down_proj",)),
)

_GEMMA3 = (
    Mapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), offset=1.0),
    Mapping("self_attn.v_proj", ("self_attn.o_proj",)),
    Mapping("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), offset=1.0),
    Mapping("mlp.up_proj", ("mlp.down_proj",)),
)

# model_type (config.json) -> mappings; families sharing Llama's block layout share its table.
MAPPINGS: dict[str, tuple[Mapping, ...]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma3_text": _GEMMA3,
    "gemma3": _GEMMA3,
}


def mappings_for(model_type: str, method: str) -> tuple[Mapping, ...]:
    try:
        return MAPPINGS[model_type]
    except KeyError:
        raise LowbitError(
            f"config.json field 'model_type': '{model_type}' has no scale-folding table, which {method} needs; "
            f"known families: {', '.join(sorted(MAPPINGS))}; fix: use --method gptq or rtn (or, for --method learned, "
            f"--learn-init rtn or gptq), or add the family's "
            f"(norm -> projections) rows to lowbit/calib/mappings.py") from None
