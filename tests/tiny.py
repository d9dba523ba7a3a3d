"""Tiny random checkpoints of each supported family, written by transformers itself (the independent side).

Tests build them with `save_pretrained`, load them with our code and compare against transformers. Nothing is
downloaded: the tokenizer is the repo's byte-level one.
"""
from __future__ import annotations

from pathlib import Path

import torch

from memrl.tokenizer import make_byte_tokenizer

FAMILIES = ("qwen2", "qwen3", "llama")


def hf_config(family: str, tied: bool = False, vocab_size: int = 272, **overrides):
    """A small config: GQA (4 q heads, 2 kv heads), 2 layers, vocab above the byte tokenizer's 259 tokens."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=tied, rms_norm_eps=1e-6,
        eos_token_id=258, bos_token_id=None, pad_token_id=256,
    )
    if family == "qwen2":
        cfg = Qwen2Config(**{**common, "rope_theta": 10000.0, **overrides})
    elif family == "qwen3":  # explicit head_dim different from hidden/heads, as in real Qwen3 models
        cfg = Qwen3Config(**{**common, "head_dim": 24, "rope_theta": 1e6, **overrides})
    elif family == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        cfg = LlamaConfig(**{**common, "rope_scaling": rope, **overrides})
    else:
        raise ValueError(family)
    return cfg


def make_tiny_checkpoint(out_dir, family: str, tied: bool = False, seed: int = 0, vocab_size: int = 272,
                         dtype=torch.float32, **overrides) -> Path:
    """Random weights (biases and norms randomised too, so a dropped term cannot hide) saved by transformers."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(family, tied=tied, vocab_size=vocab_size, **overrides)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.08)
    out = Path(out_dir)
    model.save_pretrained(str(out))
    make_byte_tokenizer(out)
    return out
