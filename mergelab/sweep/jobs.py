"""The sweep job queue: one SQLite file (WAL, busy timeout) shared by the dashboard, which submits
jobs and reads progress, and one `mergelab worker` process, which runs them.

Who runs what is recorded as processes, not only as a lock file someone could delete: the worker
registers its pid and start time in the queue, and each running job names the process running it.
A job is orphaned (its worker died) exactly when that process is gone; a reused pid has another start time."""

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
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    worker_started TEXT,
    not_cached INTEGER NOT NULL DEFAULT 0,
    done_before INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS worker (
    slot INTEGER PRIMARY KEY CHECK (slot = 1),
    pid INTEGER NOT NULL,
    started TEXT,
    since REAL NOT NULL
);
"""
# Columns added after the first release: a queue written before them gets them on open.
ADDED_COLUMNS = {"worker_started": "TEXT", "not_cached": "INTEGER NOT NULL DEFAULT 0",
                 "done_before": "INTEGER NOT NULL DEFAULT 0"}
FIX_HINT = "move the file aside (a new queue is made in its place) or point MERGELAB_JOBS at another file"


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
    worker_started: str | None = None  # start time of process worker_pid (process_start), None if unknown
    not_cached: int = 0                # merges evaluated but not cached (weights or loss not finite)
    done_before: int = 0               # of `done`, the merges finished before the job's latest (re)start

    @property
    def done_this_run(self) -> int:
        """Merges finished since the job last started (its rate; `done` counts a resumed job's earlier runs too)."""
        return max(0, self.done - self.done_before)

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else (1.0 if self.status == "done" else 0.0)

    @property
    def eta_seconds(self) -> float | None:
        """Remaining time at the rate so far (None until a merge has finished)."""
        if self.status != "running" or not self.done_this_run or not self.started_at:
            return None
        rate = (time.time() - self.started_at) / self.done_this_run
        return rate * (self.total - self.done)

    @property
    def seconds_per_merge(self) -> float | None:
        end = self.finished_at or time.time()
        return (end - self.started_at) / self.done_this_run if self.done_this_run and self.started_at else None


class JobQueue:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else default_queue_path()

    @contextmanager
    def connect(self):
        """An open connection, the schema ensured. Raises MergelabError, one line naming the file and
        what to do, for a file that cannot be opened or is not a job queue."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise MergelabError(f"{self.path}: cannot open the job queue ({exc}); {FIX_HINT}") from exc
        try:
            try:
                con.row_factory = sqlite3.Row
                con.execute("PRAGMA journal_mode=WAL")
                con.execute("PRAGMA busy_timeout=30000")
                con.executescript(SCHEMA)
                self._upgrade(con)
            except sqlite3.DatabaseError as exc:
                raise MergelabError(f"{self.path}: not a usable job queue ({exc}); {FIX_HINT}") from exc
            try:
                yield con
            except sqlite3.DatabaseError as exc:
                raise MergelabError(f"{self.path}: job queue error ({exc}); {FIX_HINT}") from exc
        finally:
            con.close()

    def _upgrade(self, con) -> None:
        """Add the columns newer than the queue; refuse a `jobs` table that is not ours."""
        columns = {r["name"] for r in con.execute("PRAGMA table_info(jobs)")}
        core = set(Job.__dataclass_fields__) - set(ADDED_COLUMNS)
        if not core <= columns:
            raise MergelabError(f"{self.path}: its 'jobs' table is not a mergelab job queue (no column "
                                f"{sorted(core - columns)[0]!r}); {FIX_HINT}")
        for name, declaration in ADDED_COLUMNS.items():
            if name not in columns:
                try:
                    con.execute(f"ALTER TABLE jobs ADD COLUMN {name} {declaration}")
                except sqlite3.OperationalError as exc:  # another process added it meanwhile
                    if "duplicate column" not in str(exc):
                        raise

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
        return self._job(row)

    def list(self, limit: int = 50) -> list[Job]:
        with self.connect() as con:
            rows = con.execute("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [self._job(r) for r in rows]

    def _job(self, row: sqlite3.Row) -> Job:
        try:
            return _job(row)
        except (MergelabError, ValueError, TypeError) as exc:  # a spec this mergelab cannot read
            raise MergelabError(f"{self.path}: job {row['id']} is not a readable sweep job ({exc}); "
                                f"{FIX_HINT}") from exc

    def claim_next(self, worker_pid: int) -> Job | None:
        """Atomically move the oldest queued job to running for the worker process `worker_pid` (no job
        runs twice), recording that process's start time so its death can be told from pid reuse. A
        resumed job keeps its counts: the merges it finished and cached before (`done` less those not
        cached, which it tries again) become `done_before`, and its rows written stay."""
        with self.connect() as con:
            con.execute("BEGIN IMMEDIATE")
            row = con.execute("SELECT id FROM jobs WHERE status = 'queued' AND cancel_requested = 0 "
                              "ORDER BY id LIMIT 1").fetchone()
            if row is None:
                con.execute("COMMIT")
                return None
            now = time.time()
            con.execute("UPDATE jobs SET status = 'running', started_at = ?, heartbeat = ?, worker_pid = ?, "
                        "worker_started = ?, done = MAX(done - not_cached, 0), done_before = MAX(done - not_cached, 0), "
                        "not_cached = 0, message = NULL WHERE id = ?",
                        (now, now, worker_pid, process_start(worker_pid), row["id"]))
            con.execute("COMMIT")
        return self.get(row["id"])

    def progress(self, job_id: int, done: int, total: int, skipped: int, rows: int, current: str,
                 not_cached: int = 0) -> bool:
        """Record progress and a heartbeat; returns True when a cancel was requested."""
        with self.connect() as con:
            con.execute("UPDATE jobs SET done = ?, total = ?, skipped = ?, rows = ?, current = ?, heartbeat = ?, "
                        "not_cached = ? WHERE id = ?",
                        (done, total, skipped, rows, current, time.time(), not_cached, job_id))
            flag = con.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(flag and flag[0])

    def finish(self, job_id: int, status: str, message: str | None = None, rows: int | None = None,
               not_cached: int | None = None) -> None:
        assert status in FINISHED
        with self.connect() as con:
            con.execute("UPDATE jobs SET status = ?, message = ?, finished_at = ?, rows = COALESCE(?, rows), "
                        "not_cached = COALESCE(?, not_cached) WHERE id = ?",
                        (status, message, time.time(), rows, not_cached, job_id))

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

    def fail_orphans(self, worker_present: bool = False) -> int:
        """Mark failed (resumable) every running job whose worker process is gone: its recorded pid is
        not alive, or alive with another start time (the pid was reused). A job whose start time was not
        recorded (claimed by an older mergelab) counts as orphaned too unless `worker_present`. Returns how many."""
        with self.connect() as con:
            con.execute("BEGIN IMMEDIATE")
            running = con.execute("SELECT id, worker_pid, worker_started FROM jobs WHERE status = 'running'").fetchall()
            dead = [r["id"] for r in running
                    if not process_alive(r["worker_pid"], r["worker_started"])
                    or (r["worker_started"] is None and not worker_present)]
            con.executemany("UPDATE jobs SET status = 'failed', finished_at = ?, message = ? WHERE id = ? "
                            "AND status = 'running'",
                            [(time.time(), "the worker process died during this job (killed or out of memory); "
                                           "resume to continue from the cached merges", i) for i in dead])
            con.execute("COMMIT")
            return len(dead)

    def register_worker(self, pid: int) -> None:
        """Record `pid` (with its start time) as the queue's worker."""
        with self.connect() as con:
            con.execute("INSERT OR REPLACE INTO worker (slot, pid, started, since) VALUES (1, ?, ?, ?)",
                        (pid, process_start(pid), time.time()))

    def unregister_worker(self, pid: int) -> None:
        with self.connect() as con:
            con.execute("DELETE FROM worker WHERE pid = ?", (pid,))

    def live_worker(self) -> int | None:
        """The pid of the registered worker if that process is still alive (same start time), else None."""
        with self.connect() as con:
            row = con.execute("SELECT pid, started FROM worker WHERE slot = 1").fetchone()
        return row["pid"] if row is not None and process_alive(row["pid"], row["started"]) else None


def process_start(pid: int | None) -> str | None:
    """When process `pid` started (clock ticks after boot, /proc/PID/stat), or None when no such
    process is alive; an exited process its parent has not reaped yet (a zombie) is not alive. Where
    /proc is missing (not Linux), "" for any live pid: alive, start time unknown."""
    if pid is None or pid <= 0:
        return None
    if not os.path.exists("/proc/self/stat"):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return None if fields[0] in ("Z", "X") else fields[19]


def process_alive(pid: int | None, started: str | None) -> bool:
    """Whether process `pid` is alive and, when `started` is known, is the process that started then."""
    now = process_start(pid)
    return now is not None and (not started or not now or now == started)


def _job(row: sqlite3.Row) -> Job:
    data = dict(row)
    data["spec"] = SweepJob.from_json(data["spec"])
    data["cancel_requested"] = bool(data["cancel_requested"])
    return Job(**data)
