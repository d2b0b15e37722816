"""Queue states the Sweep page and the worker meet in the field: a garbage, foreign or unopenable
jobs.sqlite (one line naming the file and what to do, never a traceback); a worker lock file removed
under a live worker (the job stays running, no second worker starts); a dead worker whose pid is a
zombie or was reused (its job is failed and resumable); a cache path that does not exist (reported,
never silently filled with the shipped demo rows); a job with diverging merges (counted and shown)."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from mergelab.io.family import load_family
from mergelab.store import ResultStore
from mergelab.sweep.jobs import JobQueue, process_start
from mergelab.sweep.plan import SweepJob, SweepSpec
from mergelab.sweep.runner import run_sweep
from mergelab.sweep.worker import _try_lock, ensure_worker, lock_path, reap_orphans, run_job, worker_running
from tests.helpers import build_tiny_family, wait_until
from tests.reliability.faults import finish, start_worker
from tests.test_app import run

pytestmark = pytest.mark.slow

OLD_SCHEMA = """CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, spec TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'queued', created_at REAL NOT NULL, started_at REAL, finished_at REAL,
    heartbeat REAL, worker_pid INTEGER, done INTEGER NOT NULL DEFAULT 0, total INTEGER NOT NULL DEFAULT 0,
    skipped INTEGER NOT NULL DEFAULT 0, rows INTEGER NOT NULL DEFAULT 0, current TEXT, message TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0);"""


@pytest.fixture
def home(monkeypatch, tmp_path, tiny_family):
    """A private data home, cache and queue; the tiny family allowed on the Sweep page."""
    monkeypatch.setenv("MERGELAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MERGELAB_DB", str(tmp_path / "r.duckdb"))
    monkeypatch.setenv("MERGELAB_JOBS", str(tmp_path / "jobs.sqlite"))
    monkeypatch.setenv("MERGELAB_ROOTS", str(tiny_family.parent))
    return tmp_path


def sweep_page_with_family(family):
    at = run("pages/2_Sweep.py")
    if any(s.key == "sweep-family" for s in at.selectbox):
        at.selectbox(key="sweep-family").set_value("other path…").run()
    if at.text_input:
        at.text_input[0].input(str(family)).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def break_queue(kind: str, path):
    if kind == "garbage bytes":
        path.write_bytes(b"\x00\x01 not a database at all " * 400)
    elif kind == "a folder":
        path.mkdir()
    elif kind == "another program's SQLite file":
        with sqlite3.connect(path) as con:
            con.execute("CREATE TABLE jobs (name TEXT, salary REAL)")
    elif kind == "a job this mergelab cannot read":
        queue = JobQueue(path)
        with queue.connect() as con:
            con.execute("INSERT INTO jobs (spec, created_at) VALUES ('{not json', 0)")
    elif kind == "the worker lock is a folder":
        JobQueue(path).list()
        lock_path(JobQueue(path)).mkdir()


@pytest.mark.parametrize("kind", ["garbage bytes", "a folder", "another program's SQLite file",
                                  "a job this mergelab cannot read", "the worker lock is a folder"])
def test_a_broken_job_queue_is_one_line_on_the_page_and_in_the_cli(home, tiny_family, kind, tally):
    path = home / "jobs.sqlite"
    break_queue(kind, path)
    at = sweep_page_with_family(tiny_family)
    errors = [e.value for e in at.error]
    named = lock_path(JobQueue(path)) if kind == "the worker lock is a folder" else path
    assert any(str(named) in e and ("move the file aside" in e or "remove it" in e) for e in errors), errors
    assert all("\n" not in e for e in errors)
    worker = subprocess.run([sys.executable, "-m", "mergelab", "worker", "--queue", str(path), "--once"],
                            capture_output=True, text=True, timeout=120)
    *logged, last = worker.stderr.splitlines()  # the worker's own timestamped lines may come first (worker.log)
    assert worker.returncode == 2 and last.startswith("error: ") and str(named) in last, worker.stderr
    assert all(re.match(r"\d{4}-\d\d-\d\d [\d:,]+ INFO mergelab\.", line) for line in logged), worker.stderr
    assert worker.stderr.endswith("\n") and "Traceback" not in worker.stderr
    tally["queue states: broken job queue files"] += 1


def test_a_queue_written_before_the_worker_columns_is_upgraded_in_place(tmp_path, tally):
    path = tmp_path / "jobs.sqlite"
    with sqlite3.connect(path) as con:
        con.executescript(OLD_SCHEMA)
        con.execute("INSERT INTO jobs (spec, status, created_at, worker_pid) VALUES (?, 'running', 0, 999999999)",
                    (SweepJob("fam/family.toml").to_json(),))
    queue = JobQueue(path)
    [job] = queue.list()
    assert job.status == "running" and job.worker_started is None and job.not_cached == 0
    assert reap_orphans(queue) == 1 and queue.get(job.id).status == "failed"  # its worker is long gone
    tally["queue states: old queue upgraded"] += 1


def test_a_dead_worker_is_told_by_its_process_not_its_pid(tmp_path, tally):
    """The job records its worker's pid and start time: a zombie (killed, not yet reaped by the server
    that spawned it) is dead, and so is a live process that only reuses the pid."""
    queue = JobQueue(tmp_path / "jobs.sqlite")
    ids = [queue.submit(SweepJob("x")) for _ in range(2)]
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        assert queue.claim_next(worker_pid=sleeper.pid).id == ids[0]
        assert queue.claim_next(worker_pid=os.getpid()).id == ids[1]
        assert queue.get(ids[0]).worker_started == process_start(sleeper.pid) is not None
        assert reap_orphans(queue) == 0  # both workers alive
        sleeper.send_signal(signal.SIGKILL)
        assert wait_until(lambda: process_start(sleeper.pid) is None, timeout=30)  # a zombie: not waited for
        assert os.path.exists(f"/proc/{sleeper.pid}") or sys.platform != "linux"
        with queue.connect() as con:  # the second job's pid now names another process (reused)
            con.execute("UPDATE jobs SET worker_started = '1' WHERE id = ?", (ids[1],))
        assert reap_orphans(queue) == 2
        assert [queue.get(i).status for i in ids] == ["failed", "failed"]
        assert "worker process died" in queue.get(ids[0]).message
    finally:
        sleeper.kill()
        sleeper.wait()
    tally["queue states: dead workers told by pid and start time"] += 2


def test_removing_the_lock_file_neither_kills_a_live_job_nor_starts_a_second_worker(micro_family, home, monkeypatch,
                                                                                    tally):
    queue = JobQueue()
    monkeypatch.setenv("MERGELAB_ROOTS", str(micro_family.parent))
    job_id = queue.submit(SweepJob(str(micro_family), {"average": {}, "ties": {}}, device="cpu",
                                   db=str(home / "r.duckdb")))  # 2 sizes x (10 + 2 x 511) merges: long enough
    worker = start_worker(queue.path, "--idle-exit", "3")
    try:
        assert wait_until(lambda: queue.get(job_id).done >= 2, timeout=300), queue.get(job_id)
        lock_path(queue).unlink()  # someone cleans up "stale" files
        at = sweep_page_with_family(micro_family)
        job = queue.get(job_id)
        assert job.status == "running" and job.worker_pid == worker.pid, job
        assert not any("worker process died" in e.value for e in at.error)
        assert not any(b.label == "Resume" for b in at.button) and any(b.label == "Cancel" for b in at.button)
        assert worker_running(queue) and not ensure_worker(queue)  # no second worker
        second = subprocess.run([sys.executable, "-m", "mergelab", "worker", "--queue", str(queue.path), "--once"],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 1 and f"another worker (pid {worker.pid}) is already running" in second.stderr
        queue.cancel(job_id)
        assert wait_until(lambda: queue.get(job_id).status == "cancelled", timeout=120), queue.get(job_id)
        # between jobs the worker takes its lock again, on a new file
        assert wait_until(lambda: lock_path(queue).exists() and _try_lock(queue) is None, timeout=30)
    finally:
        out = finish(worker, timeout=120)
    assert worker.returncode == 0, out
    assert queue.live_worker() is None and not worker_running(queue)  # it left the queue on exit
    tally["queue states: lock file removed under a live worker"] += 1


def test_a_named_cache_that_does_not_exist_is_reported_not_filled_with_demo_rows(monkeypatch, tmp_path, tally):
    for name in ("typo.duckdb", "deleted/results.duckdb"):
        db = tmp_path / name
        monkeypatch.setenv("MERGELAB_DB", str(db))
        monkeypatch.setenv("MERGELAB_HOME", str(tmp_path / "home"))
        monkeypatch.setenv("MERGELAB_JOBS", str(tmp_path / "jobs.sqlite"))
        for page in ("app.py", "pages/1_Curves.py"):
            at = run(page)
            assert any(f"The results cache {db} (MERGELAB_DB) does not exist" in w.value for w in at.warning), page
            assert not db.exists() and not db.parent.joinpath(db.name + ".writer-lock").exists()
        tally["queue states: missing cache paths not filled"] += 1


def test_a_job_with_diverging_merges_is_done_with_the_count_and_reasons(tiny_family, home, tally):
    queue = JobQueue()
    job_id = queue.submit(SweepJob(str(tiny_family), {"average": {}, "ties": {"lambda": 1e30}}, device="cpu",
                                   db=str(home / "r.duckdb")))
    run_job(queue, queue.claim_next(worker_pid=os.getpid()))
    job = queue.get(job_id)
    assert job.status == "done" and job.not_cached == 7 and job.rows == (4 + 7) * 3
    assert "7 merge(s) not cached" in job.message and "ties density=0.2 lambda=1e+30 {alpha} (size s): loss is NaN" in job.message
    at = sweep_page_with_family(tiny_family)
    assert any("7 merge(s) not cached: weights or loss not finite" in w.value for w in at.warning)
    tally["non-finite merges: diverging hyperparameters swept"] += 1


def test_the_first_run_seeds_only_the_default_cache(monkeypatch, tmp_path):
    from mergelab.demo.up import seed_first_cache

    source = ResultStore(tmp_path / "src.duckdb")
    run_sweep(SweepSpec(load_family(build_tiny_family(tmp_path / "f")), ["s"], {"average": {}}, [1]), source,
              progress=False)
    source.export_parquet(tmp_path / "shipped.parquet")
    monkeypatch.setattr("mergelab.demo.up.SHIPPED_RESULTS", str(tmp_path / "shipped.parquet"))
    monkeypatch.setenv("MERGELAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MERGELAB_DB", str(tmp_path / "named.duckdb"))
    assert seed_first_cache(ResultStore()) == 0 and not (tmp_path / "named.duckdb").exists()
    monkeypatch.delenv("MERGELAB_DB")
    assert seed_first_cache(ResultStore()) == source.count() > 0  # the default cache, first run
    assert seed_first_cache(ResultStore()) == 0  # exists now: never again
    ResultStore().path.unlink()  # the user deletes it to start afresh: not refilled with demo rows
    assert seed_first_cache(ResultStore()) == 0 and not ResultStore().exists()
    at = run("app.py")
    assert any("was deleted after its first run" in w.value for w in at.warning) and not ResultStore().exists()


def test_pages_follow_a_first_sweep_from_its_first_rows(tiny_family, monkeypatch, tmp_path, tally):
    """A new cache is no longer pre-filled with demo rows, so the pages meet a first sweep's early
    states: only base and single-expert rows, then merges of k = 1 only. Each is a message, not a crash
    (the Overview drew an empty curve, the Curves page built a k slider from 1 to 1)."""
    family = load_family(tiny_family)
    monkeypatch.setenv("MERGELAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MERGELAB_JOBS", str(tmp_path / "jobs.sqlite"))
    for name, methods, ks in (("reference", {}, [1]), ("k1", {"average": {}}, [1])):
        db = tmp_path / f"{name}.duckdb"
        run_sweep(SweepSpec(family, ["s"], methods, ks), ResultStore(db), progress=False)
        monkeypatch.setenv("MERGELAB_DB", str(db))
        overview, curves = run("app.py"), run("pages/1_Curves.py")  # `run` asserts no exception
        if not methods:
            assert any("No merges of tiny yet" in i.value for i in overview.info)
        else:
            assert len(curves.get("plotly_chart")) >= 3
        tally["queue states: pages during a first sweep"] += 2
