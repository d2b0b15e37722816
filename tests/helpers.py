"""Builders of tiny real HF checkpoints and eval sets for tests."""

from __future__ import annotations

import json
import time
from pathlib import Path

DOMAINS = ("alpha", "beta", "gamma")


def tiny_config(**overrides):
    from transformers import Qwen2Config

    args = dict(vocab_size=264, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    args.update(overrides)
    return Qwen2Config(**args)


def save_checkpoint(path: Path, config, seed: int, noise: float = 0.0, base_state=None, max_shard_size=None,
                    dtype=None, tokenizer=None):
    """A real HF safetensors dir: config, weights (base_state + noise, or a fresh init) stored in `dtype`
    (default fp32), and a tokenizer (default: the demo's byte-level one). Returns the fp32 model."""
    import torch
    from transformers import AutoModelForCausalLM

    from mergelab.demo.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if base_state is not None:
        model.load_state_dict(base_state)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
    path.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    stored = model if dtype in (None, torch.float32) else AutoModelForCausalLM.from_config(config, dtype=dtype)
    if stored is not model:
        stored.load_state_dict(model.state_dict())  # rounds to the storage dtype
    stored.save_pretrained(str(path), **kwargs)
    (tokenizer or build_tokenizer()).save_pretrained(str(path))
    return model


def write_eval(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reference_ce(model, tokenizer, path, budget=None):
    """Token-weighted mean of per-example HF losses (`model(input_ids, labels=…)`, one unpadded example
    at a time) with the prompt masked by labels = -100; returns (CE, scored tokens)."""
    import torch

    from mergelab.engine.evaluate import load_eval_set, tokenize_row

    total = count = 0
    for example in load_eval_set(path):
        ids, n_prompt = tokenize_row(tokenizer, example, path)
        labels = list(ids)
        labels[:n_prompt] = [-100] * n_prompt
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
        total, count = total + loss * (len(ids) - n_prompt), count + len(ids) - n_prompt
        if budget and count >= budget:
            break
    return total / count, count


def build_tiny_family(root: Path, domains: tuple[str, ...] = DOMAINS) -> Path:
    """A family of random tiny Qwen2 checkpoints, one expert (base + noise) and eval set per domain."""
    from mergelab.io.family import write_manifest

    config = tiny_config()
    base = save_checkpoint(root / "s" / "base", config, seed=0)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    experts = {}
    for i, domain in enumerate(domains):
        save_checkpoint(root / "s" / "experts" / domain, config, seed=10 + i, noise=0.05, base_state=state)
        experts[domain] = f"s/experts/{domain}"
    evals = {}
    for i, domain in enumerate(domains):
        rows = [{"prompt": f"{domain} {j} + {i} =", "response": f" {j + i}"} for j in range(12)]
        write_eval(root / "eval" / f"{domain}.jsonl", rows)
        evals[domain] = f"eval/{domain}.jsonl"
    n_params = sum(p.numel() for p in base.parameters())
    return write_manifest(root / "family.toml", "tiny", domains, evals,
                          [{"name": "s", "n_params": n_params, "base": "s/base", "experts": experts}], token_budget=40)


def wait_until(predicate, timeout: float = 120.0, poll: float = 0.02) -> bool:
    """Poll `predicate` until it holds or `timeout` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return predicate()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_logged(args, log: Path, **kwargs):
    """Start `args` with stdout and stderr going to the file `log`, never to a pipe: a pipe nobody reads
    fills at 64 KiB and then blocks the server (and every worker it spawned) on its next write."""
    import subprocess

    out = open(log, "ab")
    proc = subprocess.Popen([str(a) for a in args], stdout=out, stderr=subprocess.STDOUT, **kwargs)
    out.close()  # the child holds its own copy
    proc.log = Path(log)
    return proc


def log_tail(proc, n: int = 3000) -> str:
    """The last `n` characters a process started by start_logged wrote."""
    return proc.log.read_text(errors="replace")[-n:] if proc.log.exists() else ""


def wait_for_dashboard(url: str, proc, timeout: float = 60.0) -> None:
    """Wait until the Streamlit server at `url` (started by start_logged) answers /_stcore/health; fail the
    test with its output (and stop it) if it exits or does not answer within `timeout` seconds."""
    import urllib.request

    import pytest

    deadline = time.monotonic() + timeout
    while True:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                return
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail(f"streamlit did not start: {log_tail(proc)}")
        time.sleep(0.3)


def synthetic_results(curves: dict, experts: list[str], *, family: str = "syn", size: str = "s",
                      n_params: int = 1_000_000, ks=None, domains=("x", "y"), seed: int = 0):
    """Cache rows of one family and size: per method in `curves`, every subset of `experts` with k in
    `ks` (default 1..M) and loss curves[method](k) + a per-expert effect; plus the base (k = 0) and
    single-expert reference rows, so the pool size M = len(experts) is known to the cache."""
    import itertools

    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    effect = dict(zip(experts, rng.normal(0, 0.01, len(experts))))
    ks = list(ks or range(1, len(experts) + 1))
    merges = [("base", ())] + [("expert", (e,)) for e in experts]
    merges += [(m, s) for m in curves for k in ks for s in itertools.combinations(experts, k)]
    rows = []
    for spec, subset in merges:
        method, hparams = spec if isinstance(spec, tuple) else (spec, "{}")  # a key may be (method, hparams JSON)
        k = len(subset)
        law = curves.get(spec, curves[next(iter(curves))])
        loss = law(k) + np.mean([effect[e] for e in subset]) if k else law(0.5)
        for d, domain in enumerate(domains):
            rows.append({"family": family, "size": size, "n_params": n_params, "method": method, "hparams": hparams, "k": k,
                         "experts_key": "+".join(subset), "domain": domain, "loss": loss + 0.1 * d, "n_tokens": 100,
                         "eval_hash": f"h{domain}", "metric_version": 1, "device": "cpu"})
    return pd.DataFrame(rows)


def serve_cache(rows, tmp_path: Path, monkeypatch) -> Path:
    """Write `rows` into a fresh results cache and point the dashboard at it (private home and queue)."""
    from mergelab.store import ResultStore

    db = tmp_path / "r.duckdb"
    ResultStore(db).upsert(rows)
    monkeypatch.setenv("MERGELAB_DB", str(db))
    monkeypatch.setenv("MERGELAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MERGELAB_JOBS", str(tmp_path / "jobs.sqlite"))
    return db
