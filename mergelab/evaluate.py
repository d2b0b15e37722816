"""Response-only, token-weighted cross-entropy per domain, batched by length and deterministic.

Each example is [bos] + prompt + response + [eos]; only the response tokens and the eos are scored
(the prompt is masked as labels = −100 would mask it). A domain's loss is the sum of the token NLLs
over its first examples up to a fixed budget of scored tokens, divided by their number.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from mergelab.errors import EvalSetError

METRIC_VERSION = 1
DEFAULT_MAX_LENGTH = 512
DEFAULT_BATCH_TOKENS = 16384


def load_eval_set(path: str | Path) -> list[dict[str, str]]:
    """Read a JSONL eval set: one object per line with `prompt` and `response` (or `text`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalSetError(f"{path}: eval set not found") from None
    except UnicodeDecodeError as exc:
        raise EvalSetError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    examples = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalSetError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise EvalSetError(f"{path}:{lineno}: expected an object with 'prompt' and 'response'")
        if "text" in row and "response" not in row:
            row = {"prompt": "", "response": row["text"]}
        for key in ("prompt", "response"):
            if not isinstance(row.get(key), str):
                raise EvalSetError(f"{path}:{lineno}: field {key!r} missing or not a string")
        if not row["response"]:
            raise EvalSetError(f"{path}:{lineno}: empty 'response'")
        examples.append({"prompt": row["prompt"], "response": row["response"]})
    if not examples:
        raise EvalSetError(f"{path}: eval set is empty")
    return examples


@dataclass
class Batch:
    input_ids: object      # [B, T] long
    attention_mask: object  # [B, T] long
    rows: object           # [n] batch row of each scored position
    cols: object           # [n] position whose next-token prediction is scored
    targets: object        # [n] the token to predict
    domains: object        # [n] domain index of each scored token


@dataclass
class EvalData:
    """Tokenized eval sets of a family, ready to run: fixed order, fixed budget, fixed batches."""

    domains: tuple[str, ...]
    batches: list[Batch]
    n_tokens: dict[str, int]
    n_truncated: dict[str, int]
    hashes: dict[str, str] = field(default_factory=dict)

    def to(self, device) -> "EvalData":
        moved = [Batch(*(getattr(b, f).to(device) for f in Batch.__dataclass_fields__)) for b in self.batches]
        return EvalData(self.domains, moved, self.n_tokens, self.n_truncated, self.hashes)


def tokenize_example(tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """Token ids of one example and the number of leading positions that are not scored."""
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_ids = head + tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else head
    tail = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + tail
    return prompt_ids + response_ids, len(prompt_ids)


def prepare_eval(eval_sets: dict[str, Path], tokenizer, token_budget: int,
                 max_length: int = DEFAULT_MAX_LENGTH, batch_tokens: int = DEFAULT_BATCH_TOKENS) -> EvalData:
    """Tokenize each domain's first examples up to `token_budget` scored tokens and batch them by length."""
    domains = tuple(eval_sets)
    sequences, n_tokens, n_truncated, hashes = [], {}, {}, {}
    for d_index, (domain, path) in enumerate(eval_sets.items()):
        digest = hashlib.sha256(f"metric={METRIC_VERSION};budget={token_budget};max_length={max_length}".encode())
        scored = truncated = 0
        for example in load_eval_set(path):
            ids, n_prompt = tokenize_example(tokenizer, example["prompt"], example["response"])
            if len(ids) > max_length:
                ids, truncated = ids[:max_length], truncated + 1
            n_scored = max(0, len(ids) - max(n_prompt, 1))
            if n_scored == 0:
                continue
            digest.update(json.dumps([ids, n_prompt]).encode())
            sequences.append((len(ids), d_index, len(sequences), ids, n_prompt))
            scored += n_scored
            if scored >= token_budget:
                break
        if scored == 0:
            raise EvalSetError(f"{path}: no scorable response tokens")
        n_tokens[domain], n_truncated[domain], hashes[domain] = scored, truncated, digest.hexdigest()[:16]
    batches = _batch_by_length(sequences, tokenizer.pad_token_id or 0, batch_tokens)
    return EvalData(domains, batches, n_tokens, n_truncated, hashes)


def _batch_by_length(sequences, pad_id: int, batch_tokens: int) -> list[Batch]:
    """Group length-sorted sequences so each padded batch holds at most `batch_tokens` tokens."""
    import torch

    groups, current = [], []
    for seq in sorted(sequences, key=lambda s: (s[0], s[2])):
        if current and (len(current) + 1) * seq[0] > batch_tokens:
            groups.append(current)
            current = []
        current.append(seq)
    if current:
        groups.append(current)
    batches = []
    for group in groups:
        width = max(s[0] for s in group)
        input_ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(group), width), dtype=torch.long)
        rows, cols, targets, domains = [], [], [], []
        for r, (length, d_index, _, ids, n_prompt) in enumerate(group):
            input_ids[r, :length] = torch.tensor(ids)
            attention[r, :length] = 1
            for t in range(max(n_prompt, 1), length):  # token t is predicted at position t-1
                rows.append(r), cols.append(t - 1), targets.append(ids[t]), domains.append(d_index)
        batches.append(Batch(input_ids, attention, *(torch.tensor(x) for x in (rows, cols, targets, domains))))
    return batches


def evaluate(model, data: EvalData) -> dict[str, float]:
    """Mean response-token CE per domain (nats). The LM head runs only on the scored positions."""
    import torch
    import torch.nn.functional as F

    decoder, head = model.get_decoder(), model.get_output_embeddings()
    device = next(model.parameters()).device
    sums = torch.zeros(len(data.domains), dtype=torch.float64, device=device)
    with torch.inference_mode():
        for b in data.batches:
            hidden = decoder(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
            logits = head(hidden[b.rows, b.cols]).float()
            nll = F.cross_entropy(logits, b.targets, reduction="none")
            sums.index_add_(0, b.domains, nll.double())
    totals = sums.cpu().tolist()
    return {d: totals[i] / data.n_tokens[d] for i, d in enumerate(data.domains)}
