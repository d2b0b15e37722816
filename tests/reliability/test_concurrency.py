"""Readers (the dashboard and a CLI-style reader, in their own processes) query continuously while a
sweep writes; writers are never starved; two workers on one queue never run a job twice."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mergelab.sweep.jobs import JobQueue
from mergelab.store import ResultStore
from mergelab.sweep.plan import SweepJob
from tests.reliability.faults import check_whole_merges, finish, start_worker

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def start_readers(db: Path, stop: Path, kinds=("store", "dashboard")) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-m", "tests.reliability.readers", kind, str(db), str(stop)],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
            for kind in kinds]


def stop_readers(readers, stop: Path) -> list[dict]:
    stop.touch()
    results = []
    for reader in readers:
        out, err = reader.communicate(timeout=300)
        assert reader.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_dashboard_and_reader_query_while_a_sweep_writes(micro_family, tmp_path, tally):
    db, stop = tmp_path / "r.duckdb", tmp_path / "stop"
    # No cache file yet: the dashboard says so (a cache named by MERGELAB_DB is never filled with the
    # shipped demo rows), then follows the sweep from its first rows.
    readers = start_readers(db, stop)
    time.sleep(3)
    sweep = subprocess.run([sys.executable, "-m", "mergelab", "sweep", "--family", str(micro_family), "--sizes", "xs",
                            "--methods", "average", "--k", "1-3", "--db", str(db), "--device", "cpu"],
                           capture_output=True, text=True, timeout=600)
    results = stop_readers(readers, stop)
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    rows = check_whole_merges(db, n_domains=9)
    assert set(rows["family"]) == {"demo-micro"}  # nothing but the sweep's rows
    mine = rows
    assert mine["experts_key"].nunique() == 1 + 9 + 36 + 84  # base, singles, pairs, triples: every merge landed
    for result in results:
        assert result["errors"] == [], result
        assert result["reads"] > 0
    tally["concurrent reads during a sweep"] += sum(r["reads"] for r in results)
    tally["rows written under concurrent reads"] += len(rows)


def write_batches(db: str, n: int, first: int = 0) -> list[float]:
    """Upsert n single-merge batches as fast as possible; returns each write's latency."""
    store, latencies = ResultStore(db), []
    for i in range(first, first + n):
        rows = [dict(family="f", size="s", method="average", hparams="{}", experts_key=f"e{i:04d}", domain=d,
                     eval_hash="h", metric_version=1, n_params=1, loss=1.0 + i, n_tokens=1, device="cpu")
                for d in ("alpha", "beta", "gamma")]
        started = time.perf_counter()
        assert store.upsert(rows) == 3
        latencies.append(time.perf_counter() - started)
    return latencies


def test_a_stream_of_readers_does_not_starve_a_writer(tmp_path, tally):
    db, stop = tmp_path / "r.duckdb", tmp_path / "stop"
    write_batches(str(db), 1)
    readers = start_readers(db, stop, kinds=("store", "store", "store"))
    time.sleep(2)
    latencies = write_batches(str(db), 150, first=1)
    results = stop_readers(readers, stop)
    assert all(r["errors"] == [] for r in results), results
    assert len(ResultStore(db).results()) == 3 * 151
    # The writer holds the turnstile while it waits, so readers queue behind it: no write waits for seconds.
    assert max(latencies) < ResultStore(db).lock_timeout / 4, max(latencies)
    tally["concurrent reads during fast writes"] += sum(r["reads"] for r in results)
    tally["writes under three readers"] += len(latencies)


def claim_all(queue_path: str, out, start) -> None:
    queue, claimed = JobQueue(queue_path), []
    start.wait(timeout=120)  # every process claims from the same moment: a slow spawn cannot miss the race
    while (job := queue.claim_next(os.getpid())) is not None:
        claimed.append(job.id)
    out.put(claimed)


def test_racing_claims_never_hand_a_job_out_twice(tmp_path, tally):
    queue = JobQueue(tmp_path / "jobs.sqlite")
    ids = [queue.submit(SweepJob(f"f{i}")) for i in range(60)]
    spawn = multiprocessing.get_context("spawn")
    out, start = spawn.Queue(), spawn.Barrier(4)
    procs = [spawn.Process(target=claim_all, args=(str(queue.path), out, start)) for _ in range(4)]
    for p in procs:
        p.start()
    claimed = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    flat = [i for c in claimed for i in c]
    assert sorted(flat) == ids  # every job claimed, none twice
    assert sum(1 for c in claimed if c) >= 2, "the claims did not actually race"
    tally["racing job claims"] += len(flat)


def test_two_workers_on_one_queue_run_each_job_once(tiny_family, tmp_path, tally):
    queue = JobQueue(tmp_path / "jobs.sqlite")
    db = tmp_path / "r.duckdb"
    ids = [queue.submit(SweepJob(str(tiny_family), {m: {}}, db=str(db), device="cpu"))
           for m in ("average", "task_arithmetic", "ties")]
    first, second = start_worker(queue.path, "--idle-exit", "2"), start_worker(queue.path, "--idle-exit", "2")
    outputs = [finish(w, timeout=300) for w in (first, second)]
    codes = sorted(w.returncode for w in (first, second))
    assert codes == [0, 1], outputs  # one ran the queue, the other found it taken
    assert any("another worker is already running" in o for o in outputs)
    jobs = [queue.get(i) for i in ids]
    assert all(j.status == "done" for j in jobs), jobs
    assert len({j.worker_pid for j in jobs}) == 1
    rows = check_whole_merges(db, n_domains=3)
    assert all(j.done == j.total > 0 for j in jobs)
    assert sum(j.rows for j in jobs) == len(rows)  # each job's rows landed once
    tally["jobs run by two competing workers"] += len(jobs)
