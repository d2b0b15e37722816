"""Response-only, token-weighted cross-entropy per domain, deterministic, with sequences packed end to end
without padding (padded batches by length for models that do not keep packed sequences apart).

Each example is [bos] + prompt + response + [eos]; only the response tokens and the eos are scored
(the prompt is masked as labels = −100 would mask it). A conversation (`messages`, ending with the
assistant turn) is rendered by the tokenizer's chat template instead: the prompt is the conversation
before the last turn with the generation prompt added, and the scored tokens are the assistant reply
with its end-of-turn marker as the template renders it. A domain's loss is the sum of the token NLLs
over its first examples up to a fixed budget of scored tokens, divided by their number.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from mergelab.errors import EvalSetError
from mergelab.io.family import DEFAULT_MAX_LENGTH
from mergelab.io.jsonl import json_objects

METRIC_VERSION = 1
DEFAULT_BATCH_TOKENS = 16384
DEFAULT_MAX_PADDING = 0.1  # padded positions per batch beyond its real tokens, as a share of them
LOGITS_PER_CHUNK = 1 << 26  # positions × vocabulary per LM-head call: 256 MiB of fp32 logits, whatever the vocabulary
ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_LINE_CHARS = 1 << 20  # one example; far beyond any max_length, so a longer line is a broken file


def load_eval_set(path: str | Path) -> list[dict]:
    """Read a JSONL eval set: one object per line with `prompt` and `response`, or `text` (every token
    scored), or `messages` (a conversation whose last message is the assistant's reply)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a leading byte-order mark is not part of line 1
    except FileNotFoundError as exc:
        raise EvalSetError(f"{path}: eval set not found") from exc
    except OSError as exc:  # a symlink loop (ELOOP), a directory, no permission
        raise EvalSetError(f"{path}: cannot read the eval set ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise EvalSetError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    examples = []
    for lineno, row in json_objects(text, EvalSetError, lambda n: f"{path}:{n}", MAX_LINE_CHARS):
        if "messages" in row:
            examples.append({"messages": _check_messages(row["messages"], f"{path}:{lineno}")})
            continue
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


def _check_messages(messages, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise EvalSetError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise EvalSetError(f"{where}: messages[{i}] must have a 'role' ({', '.join(ROLES)}) and a string 'content'")
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"]:
        raise EvalSetError(f"{where}: the last message must be a non-empty 'assistant' reply (the scored tokens)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


@dataclass
class Batch:
    input_ids: object      # [B, T] long
    attention_mask: object  # [B, T] long; None in a packed batch (its sequences are told apart by position_ids)
    rows: object           # [n] batch row of each scored position
    cols: object           # [n] position whose next-token prediction is scored
    targets: object        # [n] the token to predict
    domains: object        # [n] domain index of each scored token
    position_ids: object = None  # [B, T] long, packed batches only: each sequence counts its positions from 0


@dataclass
class EvalData:
    """Tokenized eval sets of a family, ready to run: fixed order, fixed budget, fixed batches."""

    domains: tuple[str, ...]
    batches: list[Batch]
    n_tokens: dict[str, int]
    n_truncated: dict[str, int]      # examples cut to max_length (those cut before their reply are dropped)
    hashes: dict[str, str] = field(default_factory=dict)
    max_length: int = DEFAULT_MAX_LENGTH
    packed: list[Batch] = field(default_factory=list)  # the same sequences packed without padding (`_pack`)

    def to(self, device) -> "EvalData":
        def move(batches):
            return [Batch(*(None if getattr(b, f) is None else getattr(b, f).to(device) for f in Batch.__dataclass_fields__))
                    for b in batches]

        return EvalData(self.domains, move(self.batches), self.n_tokens, self.n_truncated, self.hashes, self.max_length,
                        move(self.packed))

    def truncation_note(self) -> str | None:
        """One line for the user when examples were cut to max_length, per domain; None when none were."""
        cut = {d: n for d, n in self.n_truncated.items() if n}
        if not cut:
            return None
        per_domain = ", ".join(f"{d} {n}" for d, n in cut.items())
        return f"{sum(cut.values())} eval examples cut to {self.max_length} tokens ({per_domain})"


def tokenize_example(tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """Token ids of one example and the number of leading positions that are not scored."""
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_ids = head + tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else head
    tail = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + tail
    return prompt_ids + response_ids, len(prompt_ids)


def tokenize_chat(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], int]:
    """Token ids of one conversation rendered by the chat template and the number of prompt positions.

    The prompt is the template applied to the messages before the last one with the generation prompt
    (what a model answering the conversation sees); the reply is what the full rendering adds after it,
    less trailing whitespace (the layout between turns, not part of the answer). Both are tokenized as
    the template's text, with no extra special tokens (templates place bos themselves)."""
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False).rstrip()
    if not full.startswith(prompt) or len(full) == len(prompt):
        raise ValueError("the chat template does not render the conversation as the generation prompt followed "
                         "by the assistant reply")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return prompt_ids + tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"], len(prompt_ids)


def tokenize_row(tokenizer, example: dict, path: Path) -> tuple[list[int], int]:
    """One row of `load_eval_set` as (ids, number of unscored leading positions); errors name `path`."""
    if "messages" not in example:
        return tokenize_example(tokenizer, example["prompt"], example["response"])
    if not getattr(tokenizer, "chat_template", None):
        raise EvalSetError(f"{path}: rows with 'messages' need a chat template, but the tokenizer in "
                           f"{tokenizer.name_or_path} has none (add chat_template.jinja or tokenizer_config.json's chat_template)")
    try:
        return tokenize_chat(tokenizer, example["messages"])
    except ValueError as exc:
        raise EvalSetError(f"{path}: {exc} (tokenizer in {tokenizer.name_or_path})") from exc
    except Exception as exc:  # the template's own error (jinja raise_exception, undefined variables)
        raise EvalSetError(f"{path}: the chat template of {tokenizer.name_or_path} failed: {str(exc).splitlines()[0]}") from exc


def prepare_eval(eval_sets: dict[str, Path], tokenizer, token_budget: int, max_length: int = DEFAULT_MAX_LENGTH,
                 batch_tokens: int = DEFAULT_BATCH_TOKENS, max_padding: float = DEFAULT_MAX_PADDING) -> EvalData:
    """Tokenize each domain's first examples up to `token_budget` scored tokens (any number: no cap beyond
    the eval set's length) and batch them twice: padded batches by length (`batches`, for models that do
    not honour packing) and packed rows without padding (`packed`). `batch_tokens` bounds the positions
    of one forward; `max_padding` the padding of a padded batch (share of its real tokens).
    Raises EvalSetError for an unreadable eval set or one with nothing to score."""
    domains = tuple(eval_sets)
    sequences, n_tokens, n_truncated, hashes = [], {}, {}, {}
    for d_index, (domain, path) in enumerate(eval_sets.items()):
        digest = hashlib.sha256(f"metric={METRIC_VERSION};budget={token_budget};max_length={max_length}".encode())
        scored = truncated = 0
        for example in load_eval_set(path):
            ids, n_prompt = tokenize_row(tokenizer, example, path)
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
    batches = _batch_by_length(sequences, tokenizer.pad_token_id or 0, batch_tokens, max_padding)
    packed = _pack(sequences, tokenizer.pad_token_id or 0, batch_tokens)
    return EvalData(domains, batches, n_tokens, n_truncated, hashes, max_length, packed)


def _batch_by_length(sequences, pad_id: int, batch_tokens: int, max_padding: float) -> list[Batch]:
    """Group length-sorted sequences so each padded batch holds at most `batch_tokens` tokens, of which
    at most a `max_padding` share (beyond the real tokens) is padding: padded positions cost as much
    compute as real ones, and one batch over a wide spread of lengths is mostly padding."""
    import torch

    groups, current, real = [], [], 0
    for seq in sorted(sequences, key=lambda s: (s[0], s[2])):
        padded = (len(current) + 1) * seq[0]
        if current and (padded > batch_tokens or padded > (1 + max_padding) * (real + seq[0])):
            groups.append(current)
            current, real = [], 0
        current.append(seq)
        real += seq[0]
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


def _pack(sequences, pad_id: int, batch_tokens: int) -> list[Batch]:
    """Lay the sequences end to end in rows as wide as the longest one (best fit, longest first), each
    sequence counting its positions from 0 and the row's tail a padding sequence of its own: no padded
    position beyond one row's tail, and one forward for up to `batch_tokens` positions (≥ 1 row).
    transformers turns such position_ids into a block-diagonal causal mask (sdpa, eager, flex) or varlen
    flash attention, as for padding-free training; `_packing_honoured` checks that a model does."""
    import bisect

    import torch

    width = max(s[0] for s in sequences)
    rows: list[list] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted: the tightest row that fits is a bisect away
    for seq in sorted(sequences, key=lambda s: (-s[0], s[2])):
        i = bisect.bisect_left(free, (seq[0], -1))
        room, r = free.pop(i) if i < len(free) else (width, len(rows))
        if r == len(rows):
            rows.append([])
        rows[r].append(seq)
        if room > seq[0]:
            bisect.insort(free, (room - seq[0], r))
    per_batch = max(1, batch_tokens // width)
    batches = []
    for lo in range(0, len(rows), per_batch):
        group = rows[lo:lo + per_batch]
        input_ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        positions = torch.zeros((len(group), width), dtype=torch.long)
        b_rows, cols, targets, domains = [], [], [], []
        for r, row in enumerate(group):
            offset = 0
            for length, d_index, _, ids, n_prompt in row:
                input_ids[r, offset:offset + length] = torch.tensor(ids)
                positions[r, offset:offset + length] = torch.arange(length)
                for t in range(max(n_prompt, 1), length):  # token t is predicted at position t-1
                    b_rows.append(r), cols.append(offset + t - 1), targets.append(ids[t]), domains.append(d_index)
                offset += length
            positions[r, offset:] = torch.arange(width - offset)
        batches.append(Batch(input_ids, None, *(torch.tensor(x) for x in (b_rows, cols, targets, domains)),
                             position_ids=positions))
    return batches


def evaluate(model, data: EvalData, packed: bool | None = None) -> dict[str, float]:
    """Mean response-token CE per domain (nats).

    The decoder runs once per batch and the LM head only on the scored positions, in chunks of at most
    LOGITS_PER_CHUNK logits (a 150K vocabulary would otherwise need GBs per batch), followed by the
    logit soft-capping of architectures that have it (Gemma 2/3). Whether this reproduces the model's
    own forward is checked once per model; architectures that transform logits some other way are
    evaluated through their full forward instead (slower, same numbers).

    The sequences run packed without padding (`EvalData.packed`) where the model honours packing
    (checked once per model, `_packing_honoured`), else in padded batches; `packed` forces one or the
    other (None: choose). Same numbers either way, within float rounding."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    sums = torch.zeros(len(data.domains), dtype=torch.float64, device=device)
    with torch.inference_mode():
        fast = _head_matches_forward(model, data.batches[0])
        if packed is None:
            packed = bool(data.packed) and _packing_honoured(model, data.packed)
        for b in data.packed if packed else data.batches:
            for part, logits in _scored_logits(model, b, fast):
                nll = F.cross_entropy(logits, b.targets[part], reduction="none")
                sums.index_add_(0, b.domains[part], nll.double())
    totals = sums.cpu().tolist()
    return {d: totals[i] / data.n_tokens[d] for i, d in enumerate(data.domains)}


def _scored_logits(model, b: Batch, fast: bool):
    """fp32 logits at the batch's scored positions, chunk by chunk: yields (slice of positions, logits)."""
    # no KV cache: nothing is generated, and a cache makes transformers ignore packed position_ids
    inputs = {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "use_cache": False}
    if b.position_ids is not None:
        inputs = {"input_ids": b.input_ids, "position_ids": b.position_ids, "use_cache": False}
    if fast:
        hidden = model.get_decoder()(**inputs).last_hidden_state
        hidden = hidden[b.rows, b.cols]
    else:
        full = model(**inputs).logits[b.rows, b.cols]
    step = max(1, LOGITS_PER_CHUNK // model.get_output_embeddings().weight.shape[0])
    for start in range(0, len(b.targets), step):
        part = slice(start, start + step)
        yield part, _head_logits(model, hidden[part]) if fast else full[part].float()


def _head_logits(model, hidden):
    """fp32 logits from final hidden states: the LM head, then soft-capping where the config has it."""
    import torch

    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return cap * torch.tanh(logits / cap) if cap else logits


_FAST_HEAD: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> does _head_logits match forward


def _head_matches_forward(model, batch) -> bool:
    """Compare decoder + _head_logits with the model's own forward on one sequence, once per model
    (weights change between merges, the architecture does not). bf16 rounding stays well inside the
    tolerance; a missing logit transform (a scale, a cap) does not."""
    import torch

    if model not in _FAST_HEAD:
        ids = batch.input_ids[:1, : int(batch.attention_mask[0].sum())]
        ours = _head_logits(model, model.get_decoder()(input_ids=ids).last_hidden_state[0])
        theirs = model(input_ids=ids).logits[0].float()
        if not (torch.isfinite(ours).all() and torch.isfinite(theirs).all()):
            return False  # diverged weights tell nothing about the architecture: decide on the next merge
        _FAST_HEAD[model] = bool((ours - theirs).abs().max() <= 1e-2 * (1 + theirs.abs().max()))
    return _FAST_HEAD[model]


_PACKING: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> does it honour packed position_ids
PACKING_CHECK_SEGMENTS = 8  # sequences of one packed row run alone for the check


def _packing_honoured(model, packed: list[Batch]) -> bool:
    """Whether the decoder keeps the sequences of a packed row apart (each attends only to itself, at its
    own positions): decided once per model on the first row holding two or more sequences, by running
    its sequences alone and comparing the final hidden states (mean per-token relative difference, 1e-4
    in fp32, 5e-2 in 16-bit types; a leak between sequences changes them by far more). Older
    transformers, or architectures whose positions come from the attention mask (ALiBi, OPT), fail it
    and are evaluated in padded batches instead. Diverged (non-finite) weights decide nothing."""
    import torch

    if model in _PACKING:
        return _PACKING[model]
    decoder = model.get_decoder()
    for b in packed:
        starts = b.position_ids == 0
        counts = starts.sum(1)
        if int(counts.max()) < 2:
            continue
        r = int(counts.argmax())
        bounds = starts[r].nonzero().flatten().tolist() + [b.position_ids.shape[1]]
        ids = b.input_ids[r:r + 1]
        try:
            together = decoder(input_ids=ids, position_ids=b.position_ids[r:r + 1], use_cache=False)
        except (TypeError, ValueError):  # a decoder that takes no position_ids (remote code, old classes)
            _PACKING[model] = False
            return False
        together = together.last_hidden_state[0].float()
        errors = []
        for lo, hi in list(zip(bounds, bounds[1:]))[:PACKING_CHECK_SEGMENTS]:
            alone = decoder(input_ids=ids[:, lo:hi], use_cache=False).last_hidden_state[0].float()
            errors.append((together[lo:hi] - alone).norm(dim=-1) / alone.norm(dim=-1).clamp_min(1e-6))
        errors = torch.cat(errors)
        if not torch.isfinite(errors).all():
            return False  # diverged weights tell nothing about the architecture: decide on the next merge
        tolerance = 1e-4 if next(model.parameters()).dtype == torch.float32 else 5e-2
        _PACKING[model] = bool(errors.mean() <= tolerance)
        return _PACKING[model]
    _PACKING[model] = True  # one sequence per row: nothing to keep apart
    return True
