"""Shared fixtures: tiny real HF checkpoints (random, no training) and a demo micro family (trained)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import DOMAINS, save_checkpoint, tiny_config, write_eval

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def tiny_family(tmp_path) -> Path:
    """A 3-expert family of random tiny Qwen2 checkpoints (experts = base + noise) with 3 eval sets."""
    from mergelab.family import write_manifest

    config = tiny_config()
    base = save_checkpoint(tmp_path / "s" / "base", config, seed=0)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    experts = {}
    for i, domain in enumerate(DOMAINS):
        save_checkpoint(tmp_path / "s" / "experts" / domain, config, seed=10 + i, noise=0.05, base_state=state)
        experts[domain] = f"s/experts/{domain}"
    evals = {}
    for i, domain in enumerate(DOMAINS):
        rows = [{"prompt": f"{domain} {j} + {i} =", "response": f" {j + i}"} for j in range(12)]
        write_eval(tmp_path / "eval" / f"{domain}.jsonl", rows)
        evals[domain] = f"eval/{domain}.jsonl"
    n_params = sum(p.numel() for p in base.parameters())
    return write_manifest(tmp_path / "family.toml", "tiny", DOMAINS, evals,
                          [{"name": "s", "n_params": n_params, "base": "s/base", "experts": experts}], token_budget=40)


@pytest.fixture(scope="session")
def micro_family(tmp_path_factory) -> Path:
    """The demo micro family, built once per test session with the real builder."""
    from mergelab.demo.build import build_family

    return build_family("micro", tmp_path_factory.mktemp("demo") / "micro", progress=False)
