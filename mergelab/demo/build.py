"""Build the demo family: a byte-level Qwen2 base per size pre-trained on the nine-domain mixture,
and one expert per domain fine-tuned from it, saved as HF safetensors dirs with a manifest.

Everything is seeded per (seed, size, stage), so a build is bitwise reproducible and building a
subset of sizes gives the same checkpoints as building them all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from mergelab.demo.domains import DOMAINS, generate
from mergelab.demo.tokenizer import build_tokenizer
from mergelab.errors import MergelabError
from mergelab.io.family import write_manifest
from mergelab.paths import OWNER_FILE, make_staging, remove_stale_staging, write_failure

logger = logging.getLogger(__name__)

# Fixed so that the same seed gives the same bits on any machine of one ISA. One thread: these models
# are too small to gain from more, and two threads on a busy 2-core machine spin (measured for a 33K
# model at batch 32: 13 ms per step on one thread, 1.8 s on two while other work ran).
BUILD_THREADS = 1
VOCAB_ROWS = 264   # 259 byte-level tokens padded to a multiple of 8, like real padded vocabularies


@dataclass(frozen=True)
class SizeConfig:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    lr: float | None = None  # pretraining learning rate for this size (None: the preset's)

    def qwen2_config(self):
        from transformers import Qwen2Config

        return Qwen2Config(
            vocab_size=VOCAB_ROWS, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            max_position_embeddings=256, tie_word_embeddings=True, rope_theta=10000.0,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )


@dataclass(frozen=True)
class Preset:
    """The recipe. Pretraining: language modelling (every token after <bos> is a target) on the
    nine-domain mixture. Experts: a short, gentle fine-tune from the base on one domain, scored on the
    response tokens only (like supervised fine-tuning), with a fraction `expert_replay` of each batch
    drawn from the whole mixture."""
    name: str
    sizes: tuple[SizeConfig, ...]
    pretrain_steps: int
    expert_steps: int
    batch_size: int = 32
    lr: float = 3e-3
    expert_lr: float = 2e-3
    expert_batch_size: int = 32
    expert_replay: float = 0.0     # fraction of each expert batch drawn from the mixture
    expert_targets: str = "response"  # "response" (prompt tokens masked) or "all"
    jobs: int = 1         # sizes built at once, in separate processes
    n_train: int = 2000   # training examples per domain
    n_eval: int = 200     # eval examples written per domain
    token_budget: int = 128  # scored tokens per domain at evaluation


PRESETS = {
    "micro": Preset("micro", (SizeConfig("xs", 16, 1, 2, 1, 48), SizeConfig("s", 32, 2, 4, 2, 96)),
                    pretrain_steps=400, expert_steps=20, expert_lr=1e-3, expert_batch_size=64,
                    n_train=2000, n_eval=80, token_budget=128),
    "standard": Preset("standard", (SizeConfig("xs", 24, 2, 2, 1, 64), SizeConfig("s", 48, 2, 4, 2, 128),
                                    SizeConfig("m", 64, 3, 4, 2, 192), SizeConfig("l", 96, 3, 4, 2, 256, lr=2e-3),
                                    SizeConfig("xl", 128, 4, 8, 4, 384, lr=2e-3)),
                       pretrain_steps=3000, expert_steps=40, expert_lr=3e-4, expert_batch_size=128,
                       n_train=10000, token_budget=256, jobs=2),
}


def stage_seed(seed: int, *parts: str) -> int:
    digest = hashlib.sha256("|".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 62) - 1)


def build_family(preset_name: str, out: Path, seed: int = 0, sizes: list[str] | None = None,
                 progress: bool = True, force: bool = False, jobs: int | None = None) -> Path:
    """Build the family into `out` atomically (a temp dir renamed at the end); returns the manifest path.

    `jobs` > 1 builds that many sizes at once in separate processes (default: the preset's `jobs`, at
    most one per CPU); every size is seeded on its own and trained on one thread, so the bits do not
    depend on it."""
    import torch

    preset = _preset(preset_name)
    chosen = [s for s in preset.sizes if sizes is None or s.name in sizes]
    unknown = sorted(set(sizes or []) - {s.name for s in preset.sizes})
    if unknown:
        raise MergelabError(f"preset {preset_name!r} has no size {unknown[0]!r} (sizes: {', '.join(s.name for s in preset.sizes)})")
    jobs = min(preset.jobs, os.cpu_count() or 1) if jobs is None else jobs
    if jobs < 1:
        raise MergelabError(f"--jobs must be >= 1, got {jobs}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise MergelabError(f"{out}: already exists and is not empty (use --force to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out)
        staging = make_staging(out)
    except OSError as exc:
        raise MergelabError(f"{out}: cannot create the family folder ({exc.strerror or exc})") from exc
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        eval_paths = _write_eval_sets(staging, preset, seed)
        if min(jobs, len(chosen)) > 1:
            size_entries = _build_sizes_in_parallel(staging, chosen, preset, seed, min(jobs, len(chosen)), progress)
        else:
            tokenizer, train = _training_data(preset, seed)
            size_entries = [_build_size(staging, size, preset, train, tokenizer, seed, progress) for size in chosen]
        write_manifest(staging / "family.toml", f"demo-{preset.name}", DOMAINS, eval_paths, size_entries,
                       preset.token_budget)
        if out.exists():
            shutil.rmtree(out)
        (staging / OWNER_FILE).unlink()
        staging.rename(out)
    except Exception as exc:  # a full disk (ENOSPC, EFBIG under a file size limit; OSError or safetensors')
        if write_failure(exc) is None:
            raise
        raise MergelabError(f"{out}: cannot write the demo family ({write_failure(exc)}); free some space or "
                            "pick another --out, then build again") from exc
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(staging, ignore_errors=True)
    return out / "family.toml"


def _training_data(preset: Preset, seed: int):
    tokenizer = build_tokenizer()
    return tokenizer, {d: _tokenize(tokenizer, generate(d, preset.n_train, 2 * seed)) for d in DOMAINS}


def _build_sizes_in_parallel(staging: Path, chosen, preset: Preset, seed: int, jobs: int, progress: bool) -> list[dict]:
    """Sizes built by `jobs` worker processes, the largest first (it takes longest); entries in preset order."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    entries = {}
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(_build_size_job, staging, size, preset, seed): size.name for size in reversed(chosen)}
        for future in as_completed(futures):
            entry, seconds = future.result()
            entries[entry["name"]] = entry
            if progress:
                logger.info("built size %s: %s parameters in %.1f s", entry["name"], f"{entry['n_params']:,}", seconds)
    return [entries[size.name] for size in chosen]


def _build_size_job(staging: Path, size: SizeConfig, preset: Preset, seed: int) -> tuple[dict, float]:
    import torch

    torch.set_num_threads(BUILD_THREADS)
    started = time.perf_counter()
    tokenizer, train = _training_data(preset, seed)
    return _build_size(staging, size, preset, train, tokenizer, seed, progress=False), time.perf_counter() - started


def _preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise MergelabError(f"unknown demo preset {name!r} (presets: {', '.join(PRESETS)})") from None


def _write_eval_sets(root: Path, preset: Preset, seed: int) -> dict[str, str]:
    (root / "eval").mkdir()
    paths = {}
    for domain in DOMAINS:
        rel = f"eval/{domain}.jsonl"
        lines = [json.dumps(ex, ensure_ascii=True) for ex in generate(domain, preset.n_eval, 2 * seed + 1)]
        (root / rel).write_text("\n".join(lines) + "\n")
        paths[domain] = rel
    return paths


def _tokenize(tokenizer, examples) -> list[tuple[list[int], int]]:
    """(ids, n_prompt) per example: <bos> prompt response <eos>, and the number of leading positions
    (<bos> and the prompt) that are not response targets, as the evaluation counts them."""
    prompts = tokenizer([ex["prompt"] for ex in examples], add_special_tokens=False)["input_ids"]
    responses = tokenizer([ex["response"] for ex in examples], add_special_tokens=False)["input_ids"]
    return [([tokenizer.bos_token_id, *p, *r, tokenizer.eos_token_id], 1 + len(p)) for p, r in zip(prompts, responses)]


def _build_size(root, size: SizeConfig, preset: Preset, train, tokenizer, seed, progress) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from mergelab.bars import progress_bar

    torch.manual_seed(stage_seed(seed, size.name, "init"))
    model = AutoModelForCausalLM.from_config(size.qwen2_config(), dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    mixture = [seq for d in DOMAINS for seq in train[d]]
    t0 = time.perf_counter()
    bar = progress_bar(preset.pretrain_steps, f"{size.name} base", "step", disable=not progress)
    _train(model, mixture, preset.pretrain_steps, size.lr or preset.lr, preset.batch_size, "all",
           stage_seed(seed, size.name, "base"), bar)
    bar.close()
    base_dir = root / size.name / "base"
    _save(model, tokenizer, base_dir)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    experts = {}
    bar = progress_bar(preset.expert_steps * len(DOMAINS), f"{size.name} experts", "step", disable=not progress)
    for domain in DOMAINS:
        model.load_state_dict(base_state)
        _train(model, train[domain], preset.expert_steps, preset.expert_lr, preset.expert_batch_size,
               preset.expert_targets, stage_seed(seed, size.name, domain), bar,
               replay=mixture, replay_fraction=preset.expert_replay)
        _save(model, tokenizer, root / size.name / "experts" / domain)
        experts[domain] = f"{size.name}/experts/{domain}"
    bar.close()
    if progress:
        logger.info("built size %s: %s parameters in %.1f s", size.name, f"{n_params:,}", time.perf_counter() - t0)
    return {"name": size.name, "n_params": n_params, "base": f"{size.name}/base", "experts": experts}


def _train(model, sequences, steps: int, lr: float, batch_size: int, targets: str, seed: int, bar,
           replay=None, replay_fraction: float = 0.0) -> None:
    """AdamW with warmup and cosine decay (to 10% of `lr`) on random batches of (ids, n_prompt).
    targets "all": every token after <bos>; "response": the response and <eos> only. With
    `replay_fraction` > 0, that share of each batch is drawn from `replay` instead of `sequences`."""
    import math

    import torch

    if targets not in ("all", "response"):
        raise ValueError(f"targets must be 'all' or 'response', got {targets!r}")
    n_replay = round(batch_size * replay_fraction) if replay else 0
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * s / steps)))
    model.train()
    for _ in range(steps):
        picks = torch.randint(len(sequences), (batch_size - n_replay,), generator=generator).tolist()
        batch = [sequences[i] for i in picks]
        if n_replay:
            batch += [replay[i] for i in torch.randint(len(replay), (n_replay,), generator=generator).tolist()]
        width = max(len(seq) for seq, _ in batch)
        ids = torch.zeros((batch_size, width), dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for r, (seq, n_prompt) in enumerate(batch):
            first = 1 if targets == "all" else n_prompt
            ids[r, :len(seq)] = torch.tensor(seq)
            labels[r, first:len(seq)] = ids[r, first:len(seq)]
            mask[r, :len(seq)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()


def _save(model, tokenizer, directory: Path) -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()  # one bar per stage is ours; no per-file shard bars
    directory.mkdir(parents=True)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
