"""Shared fixtures: tiny real HF checkpoints (random, no training) and a demo micro family (trained)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import build_tiny_family

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _keep_main_module():
    """Streamlit's AppTest runs a page as the __main__ module and leaves it there; a later test that
    spawns processes (the demo build's parallel sizes) would then re-run that page in every child."""
    import sys

    main = sys.modules.get("__main__")
    yield
    if main is not None:
        sys.modules["__main__"] = main


@pytest.fixture
def tiny_family(tmp_path) -> Path:
    """A 3-expert family of random tiny Qwen2 checkpoints (experts = base + noise) with 3 eval sets."""
    return build_tiny_family(tmp_path)


@pytest.fixture(scope="session")
def micro_family(tmp_path_factory) -> Path:
    """The demo micro family, built once per test session with the real builder."""
    from mergelab.demo.build import build_family

    return build_family("micro", tmp_path_factory.mktemp("demo") / "micro", progress=False)
