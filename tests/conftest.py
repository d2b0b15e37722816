"""Shared fixtures: tiny real HF checkpoints (random, no training) and a demo micro family (trained)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import build_tiny_family

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def tiny_family(tmp_path) -> Path:
    """A 3-expert family of random tiny Qwen2 checkpoints (experts = base + noise) with 3 eval sets."""
    return build_tiny_family(tmp_path)


@pytest.fixture(scope="session")
def micro_family(tmp_path_factory) -> Path:
    """The demo micro family, built once per test session with the real builder."""
    from mergelab.demo.build import build_family

    return build_family("micro", tmp_path_factory.mktemp("demo") / "micro", progress=False)
