"""Helpers of the fault suite: real worker processes, real kills, row-for-row cache comparison."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mergelab.store import KEY_COLUMNS, ResultStore
from tests.helpers import log_tail, start_logged


def start_worker(queue_path: Path, *extra: str) -> subprocess.Popen:
    """A worker process whose output goes to its own log file next to the queue (see start_logged)."""
    log = queue_path.parent / f"worker-{time.monotonic_ns()}.log"
    return start_logged([sys.executable, "-m", "mergelab", "worker", "--queue", queue_path, *extra], log, env=dict(os.environ))


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    """Wait for a start_worker process to exit; its whole output."""
    process.wait(timeout=timeout)
    return log_tail(process, n=10**7)


def kill_9(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def check_whole_merges(db: Path, n_domains: int):
    """Every cached merge has a row for every domain (no half-written merge) and no key appears twice."""
    rows = ResultStore(db).results()
    assert not rows.duplicated(KEY_COLUMNS).any()
    per_merge = rows.groupby(["family", "size", "method", "hparams", "experts_key"]).size()
    assert (per_merge == n_domains).all(), per_merge[per_merge != n_domains]
    return rows


def compare_caches(got, want, exact_methods=()):
    """Same keys; losses bitwise equal for `exact_methods`, else within fp32 rounding. Returns max |Δloss|."""
    got = got.set_index(KEY_COLUMNS).sort_index()
    want = want.set_index(KEY_COLUMNS).sort_index()
    assert got.index.equals(want.index), (len(got), len(want))
    diff = (got["loss"] - want["loss"]).abs()
    exact = got.index.get_level_values("method").isin(exact_methods)
    assert (diff[exact] == 0).all(), diff[exact].max()
    assert diff.max() < 1e-5, diff.max()
    assert (got["n_tokens"] == want["n_tokens"]).all()
    return float(diff.max())


def unpack_cache(name: str, tmp_path: Path) -> Path:
    """A cache written by an older mergelab, shipped gzipped in tests/reliability/data, copied to tmp_path."""
    import gzip
    import shutil

    db = tmp_path / name.removesuffix(".gz")
    with gzip.open(Path(__file__).resolve().parent / "data" / name) as src, open(db, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return db
