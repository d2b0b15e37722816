"""Tiny random checkpoints with real Hugging Face architectures, stored as real families are.

Each family has a base and experts (base + small random deltas) saved with `save_pretrained` in
shards (an index plus several files), in bf16 unless asked otherwise, a tokenizer AutoTokenizer
loads from the directory, eval JSONL and a family.toml. Configs use the real config classes with
tiny dimensions, keeping what makes each architecture different:
  qwen2   tied embeddings (no lm_head.weight in the files), attention biases
  llama   an untied lm_head
  gemma2  tied embeddings scaled by √hidden, (1 + w) norms, and logit soft-capping (set low here so
          that skipping it would change the loss visibly)
  gemma3  tied embeddings, q/k norms, sliding-window layers
and, outside ARCHS, granite: a logit scale the evaluator's fast LM-head path does not apply itself.
"""

from __future__ import annotations

from pathlib import Path

from tests.helpers import DOMAINS, save_checkpoint, write_eval

ARCHS = ("qwen2", "llama", "gemma2", "gemma3")
VOCAB_ROWS = 272   # padded beyond the tokenizer (259 byte-level tokens + 2 chat markers), as Qwen pads 151665 to 151936
SHARD = "20KB"     # several shards for these ~50K-parameter models
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def real_config(arch: str, vocab_size: int = VOCAB_ROWS):
    from transformers import Gemma2Config, Gemma3TextConfig, GraniteConfig, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "gemma2":
        return Gemma2Config(**common, head_dim=8, final_logit_softcapping=0.1, sliding_window=8)
    if arch == "gemma3":
        return Gemma3TextConfig(**common, head_dim=8, sliding_window=8)
    if arch == "granite":
        return GraniteConfig(**common, logits_scaling=0.25)
    raise ValueError(arch)


def chat_tokenizer():
    """The demo's byte-level tokenizer plus ChatML turn markers and a ChatML chat template (as Qwen's)."""
    from mergelab.demo.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def resized(state: dict, rows: int, vocab_rows: int, seed: int) -> dict:
    """`state` with every tensor whose first dim is the vocabulary cut or extended (random rows) to `rows`."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        if t.ndim and t.shape[0] == vocab_rows and rows != vocab_rows:
            extra = 0.02 * torch.randn((max(0, rows - vocab_rows), *t.shape[1:]), generator=gen)
            t = torch.cat([t[:rows], extra])
        out[name] = t.clone()
    return out


def plain_rows(domain: str, i: int, n: int = 6) -> list[dict]:
    return [{"prompt": f"{domain} {j} + {i} =", "response": f" {j + i} because {j} plus {i}"} for j in range(n)]


def chat_rows(domain: str, i: int, n: int = 6) -> list[dict]:
    """Conversations as the paper evaluates them: system, user, then the assistant turn that is scored."""
    return [{"messages": [{"role": "system", "content": f"You solve {domain} problems."},
                          {"role": "user", "content": f"What is {j} + {i}?"},
                          {"role": "assistant", "content": f"{j + i}, since {j} plus {i} is {j + i}."}]}
            for j in range(n)]


def build_family(root: Path, arch: str, dtype: str = "bfloat16", expert_rows: dict[str, int] | None = None,
                 vocab_policy: str | None = None, chat: bool = False, domains=DOMAINS, noise: float = 0.01,
                 token_budget: int = 60) -> Path:
    """base + one expert per domain under root/<arch>/, eval sets and root/family.toml; returns the manifest.
    `expert_rows` gives experts whose embedding (and untied lm_head) rows were resized."""
    import torch

    from mergelab.io.family import write_manifest

    config = real_config(arch)
    tokenizer = chat_tokenizer() if chat else None
    store = dict(dtype=getattr(torch, dtype), max_shard_size=SHARD, tokenizer=tokenizer)
    base = save_checkpoint(root / arch / "base", config, seed=0, **store)
    state = base.state_dict()
    experts, evals = {}, {}
    for i, domain in enumerate(domains):
        rows = (expert_rows or {}).get(domain, VOCAB_ROWS)
        save_checkpoint(root / arch / "experts" / domain, real_config(arch, rows), seed=10 + i, noise=noise,
                        base_state=resized(state, rows, VOCAB_ROWS, seed=i), **store)
        experts[domain] = f"{arch}/experts/{domain}"
        rows_of = chat_rows if chat else plain_rows
        evals[domain] = str(write_eval(root / "eval" / f"{domain}.jsonl", rows_of(domain, i)).relative_to(root))
    n_params = sum(p.numel() for p in base.parameters())
    sizes = [{"name": arch, "n_params": n_params, "base": f"{arch}/base", "experts": experts}]
    return write_manifest(root / "family.toml", f"real-{arch}", domains, evals, sizes, token_budget,
                          vocab_policy=vocab_policy)
