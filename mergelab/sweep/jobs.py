"""The sweep job queue: one SQLite file (WAL, busy timeout) shared by the dashboard, which submits
jobs and reads progress, and one `mergelab worker` process, which runs them."""

from __future__ import annotations

import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mergelab.errors import MergelabError
from mergelab.paths import data_home
from mergelab.sweep.plan import SweepJob

JOBS_ENV = "MERGELAB_JOBS"
ACTIVE = ("queued", "running")
FINISHED = ("done", "failed", "cancelled")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    spec TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'queued',
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    heartbeat REAL,
    worker_pid INTEGER,
    done INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    skipped INTEGER NOT NULL DEFAULT 0,
    rows INTEGER NOT NULL DEFAULT 0,
    current TEXT,
    message TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
"""


def default_queue_path() -> Path:
    return Path(os.environ[JOBS_ENV]).expanduser() if os.environ.get(JOBS_ENV) else data_home() / "jobs.sqlite"


@dataclass
class Job:
    id: int
    spec: SweepJob
    status: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    heartbeat: float | None
    worker_pid: int | None
    done: int
    total: int
    skipped: int
    rows: int
    current: str | None
    message: str | None
    cancel_requested: bool

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else (1.0 if self.status == "done" else 0.0)

    @property
    def eta_seconds(self) -> float | None:
        """Remaining time at the rate so far (None until a merge has finished)."""
        if self.status != "running" or not self.done or not self.started_at:
            return None
        rate = (time.time() - self.started_at) / self.done
        return rate * (self.total - self.done)

    @property
    def seconds_per_merge(self) -> float | None:
        end = self.finished_at or time.time()
        return (end - self.started_at) / self.done if self.done and self.started_at else None


class JobQueue:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else default_queue_path()

    @contextmanager
    def connect(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise MergelabError(f"{self.path}: cannot open the job queue ({exc})") from exc
        try:
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA busy_timeout=30000")
            con.executescript(SCHEMA)
            yield con
        except sqlite3.DatabaseError as exc:
            raise MergelabError(f"{self.path}: job queue error ({exc})") from exc
        finally:
            con.close()

    def submit(self, job: SweepJob) -> int:
        """Queue a sweep; returns its job id."""
        if not isinstance(job, SweepJob):
            raise MergelabError(f"a job is a SweepJob, got {type(job).__name__}")
        with self.connect() as con:
            cur = con.execute("INSERT INTO jobs (spec, created_at) VALUES (?, ?)", (job.to_json(), time.time()))
            return int(cur.lastrowid)

    def get(self, job_id: int) -> Job:
        with self.connect() as con:
            row = con.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise MergelabError(f"no job {job_id} in {self.path}")
        return _job(row)

    def list(self, limit: int = 50) -> list[Job]:
        with self.connect() as con:
            return [_job(r) for r in con.execute("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,))]

    def claim_next(self, worker_pid: int) -> Job | None:
        """Atomically move the oldest queued job to running for this worker (no job runs twice)."""
        with self.connect() as con:
            con.execute("BEGIN IMMEDIATE")
            row = con.execute("SELECT id FROM jobs WHERE status = 'queued' AND cancel_requested = 0 "
                              "ORDER BY id LIMIT 1").fetchone()
            if row is None:
                con.execute("COMMIT")
                return None
            now = time.time()
            con.execute("UPDATE jobs SET status = 'running', started_at = ?, heartbeat = ?, worker_pid = ?, "
                        "done = 0, message = NULL WHERE id = ?", (now, now, worker_pid, row["id"]))
            con.execute("COMMIT")
        return self.get(row["id"])

    def progress(self, job_id: int, done: int, total: int, skipped: int, rows: int, current: str) -> bool:
        """Record progress and a heartbeat; returns True when a cancel was requested."""
        with self.connect() as con:
            con.execute("UPDATE jobs SET done = ?, total = ?, skipped = ?, rows = ?, current = ?, heartbeat = ? "
                        "WHERE id = ?", (done, total, skipped, rows, current, time.time(), job_id))
            flag = con.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(flag and flag[0])

    def finish(self, job_id: int, status: str, message: str | None = None, rows: int | None = None) -> None:
        assert status in FINISHED
        with self.connect() as con:
            con.execute("UPDATE jobs SET status = ?, message = ?, finished_at = ?, rows = COALESCE(?, rows) "
                        "WHERE id = ?", (status, message, time.time(), rows, job_id))

    def cancel(self, job_id: int) -> None:
        """Queued jobs are cancelled at once; a running job stops after the merge in flight."""
        with self.connect() as con:
            con.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            con.execute("UPDATE jobs SET status = 'cancelled', finished_at = ?, message = 'cancelled before start' "
                        "WHERE id = ? AND status = 'queued'", (time.time(), job_id))

    def resume(self, job_id: int) -> None:
        """Queue a cancelled or failed job again; cached merges are skipped, so it continues."""
        with self.connect() as con:
            con.execute("UPDATE jobs SET status = 'queued', cancel_requested = 0, finished_at = NULL, message = NULL "
                        "WHERE id = ? AND status IN ('cancelled', 'failed')", (job_id,))

    def fail_orphans(self) -> int:
        """Mark every running job failed (resumable): call only while holding the worker lock without a
        job of one's own (see worker.reap_orphans). Returns how many."""
        with self.connect() as con:
            cur = con.execute("UPDATE jobs SET status = 'failed', finished_at = ?, message = ? WHERE status = 'running'",
                              (time.time(), "the worker process died during this job (killed or out of memory); "
                                            "resume to continue from the cached merges"))
            return cur.rowcount


def _job(row: sqlite3.Row) -> Job:
    data = dict(row)
    data["spec"] = SweepJob.from_json(data["spec"])
    data["cancel_requested"] = bool(data["cancel_requested"])
    return Job(**data)
