"""Builders of tiny real HF checkpoints and eval sets for tests."""

from __future__ import annotations

import json
from pathlib import Path

DOMAINS = ("alpha", "beta", "gamma")


def tiny_config(**overrides):
    from transformers import Qwen2Config

    args = dict(vocab_size=264, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    args.update(overrides)
    return Qwen2Config(**args)


def save_checkpoint(path: Path, config, seed: int, noise: float = 0.0, base_state=None, max_shard_size=None):
    """A real HF safetensors dir: config, weights (base_state + noise, or a fresh init) and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from mergelab.demo.tokenizer import save_tokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if base_state is not None:
        model.load_state_dict(base_state)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
    path.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kwargs)
    save_tokenizer(path)
    return model


def write_eval(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
