"""Shared fixtures: a tiny random Llama with a byte-level tokenizer, built in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests never reach a hub; make transformers fail fast if anything tries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<s>", "</s>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def make_tiny_llama(seed: int = 0, tie: bool = True, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie, bos_token_id=256,
               eos_token_id=257, pad_token_id=257)
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    with torch.no_grad():  # larger-than-init weights so quantization error is visible in logits
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
    return model


def save_hf(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A Hugging Face folder (safetensors + tokenizer) holding a tiny random Llama."""
    return save_hf(make_tiny_llama(), tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture()
def ids() -> torch.Tensor:
    return torch.tensor([[256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 10, 84, 104]])
