"""The fault suite's tally: each test adds what it tried (kill points, concurrent reads and writes, bad
inputs, rows lost); the totals are printed at the end of the run and written to artifacts/reliability.json."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

TALLY: Counter = Counter()
ARTIFACT = Path(__file__).resolve().parents[2] / "artifacts" / "reliability.json"


@pytest.fixture
def tally() -> Counter:
    return TALLY


def pytest_terminal_summary(terminalreporter):
    if not TALLY:
        return
    terminalreporter.section("reliability tally")
    for key, value in sorted(TALLY.items()):
        terminalreporter.write_line(f"{key}: {value}")
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    ARTIFACT.write_text(json.dumps(dict(sorted(TALLY.items())), indent=2) + "\n")
