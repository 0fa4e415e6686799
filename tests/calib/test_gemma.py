"""Gemma 3 through the loop: per-layer masks and rotary tables are captured, and scales fold into its
(1 + weight) RMSNorms without changing the function (checked at 8 bits, where rounding is tiny)."""

import pytest
import torch

from lowbit.calib import load_calibration
from lowbit.recipe import Recipe, _int
from tests.calib.test_sequential import TEXTS, in_memory
from tests.conftest import make_tokenizer


def tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=16,
                           layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256,
                           pad_token_id=257, bos_token_id=256, eos_token_id=257)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08) if p.ndim == 2 else p.uniform_(-0.5, 0.5)  # norms away from their zero init
    return model


@pytest.mark.slow
@pytest.mark.parametrize("method", ["awq", "smoothquant", "gptq"])
def test_gemma3_folding_keeps_the_function(method):
    data = load_calibration(TEXTS, make_tokenizer(), samples=2, seq_len=48)
    w8 = Recipe(name="w8", scheme=_int(8, "channel"))
    ref = tiny_gemma3()
    q = in_memory(w8, method, data, model=tiny_gemma3()).module
    with torch.no_grad():
        a, b = ref(data.ids).logits, q(data.ids).logits
    rel = ((a - b).norm() / a.norm()).item()
    assert rel < 0.02, rel  # measured ~0.003; folding the gain without its offset gives 0.2-0.3
    if method != "gptq":
        g = q.model.layers[0].input_layernorm.weight
        assert not torch.equal(g, ref.model.layers[0].input_layernorm.weight)  # a scale was folded in
