"""The long-lived `mergelab worker` process: claims queued sweep jobs one at a time, runs them,
reports progress and heartbeats to the queue, stops between merges when asked to cancel.

Only one worker runs per queue: it holds an exclusive lock on `<queue>.lock` for its lifetime (taken
again on a new file if that one is removed) and registers its pid and start time in the queue, so a
removed lock file neither makes a live worker look dead nor lets a second one start."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from mergelab.errors import MergelabError
from mergelab.locks import flock_until
from mergelab.store import ResultStore
from mergelab.sweep.jobs import Job, JobQueue
from mergelab.sweep.runner import run_sweep

# Lines of the worker (and of the sweeps it runs) carry a timestamp and a level: `mergelab worker` logs
# with mergelab.logs.WORKER_FORMAT to its stderr, which ensure_worker sends to worker.log.
logger = logging.getLogger(__name__)


class JobCancelled(Exception):
    """Raised from the progress callback to stop a sweep between merges."""


def lock_path(queue: JobQueue) -> Path:
    return queue.path.with_name(queue.path.name + ".lock")


def _try_lock(queue: JobQueue, wait: float = 0.0):
    """An open file holding the worker lock, or None when another worker holds it (after `wait` seconds).
    Raises MergelabError when the lock file cannot be opened."""
    path = lock_path(queue)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
    except OSError as exc:
        raise MergelabError(f"{path}: cannot open the worker lock of the job queue ({exc.strerror}); "
                            f"remove it or point MERGELAB_JOBS at another file") from exc
    if flock_until(handle, exclusive=True, deadline=time.monotonic() + wait, poll=0.05):
        return handle
    handle.close()
    return None


def worker_running(queue: JobQueue) -> bool:
    """Whether a worker serves this queue: one holds its lock file, or the registered worker process is
    alive (its lock file may have been removed)."""
    handle = _try_lock(queue)
    if handle is None:
        return True
    handle.close()
    return queue.live_worker() is not None


def reap_orphans(queue: JobQueue) -> int:
    """Mark running jobs failed whose worker process is gone (killed, out of memory, machine
    restarted): the process recorded with the job, pid and start time, decides, so neither a reused
    pid nor a removed lock file fools it. Returns how many."""
    return queue.fail_orphans(worker_present=worker_running(queue))


def _keep_lock(queue: JobQueue, lock):
    """The worker's lock file, taken anew if someone removed or replaced it (so it goes on telling
    other processes that a worker runs); the old handle if the new file cannot be locked."""
    try:
        current = os.stat(lock_path(queue))
        held = os.fstat(lock.fileno())
        if (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            return lock
    except OSError:
        pass
    try:
        fresh = _try_lock(queue)
    except MergelabError:
        return lock
    if fresh is None:
        return lock
    fresh.truncate(0)
    fresh.write(str(os.getpid()))
    fresh.flush()
    lock.close()
    return fresh


def run_worker(queue: JobQueue, poll: float = 0.5, idle_exit: float | None = None, once: bool = False) -> int:
    """Run jobs until idle for `idle_exit` seconds (forever if None), or until the queue is empty with once."""
    # Wait a moment for the lock: the dashboard takes it briefly to check whether a worker is alive.
    lock = _try_lock(queue, wait=3.0)
    if lock is None:
        logger.error("another worker is already running on %s", queue.path)
        return 1
    try:
        other = queue.live_worker()
        if other is not None and other != os.getpid():  # alive, though its lock file was removed
            logger.error("another worker (pid %d) is already running on %s", other, queue.path)
            return 1
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        queue.register_worker(os.getpid())
        orphans = queue.fail_orphans()  # jobs whose worker process is gone
        logger.info("worker pid %d serving %s", os.getpid(), queue.path)
        if orphans:
            logger.warning("%d running job(s) had lost their worker: marked failed", orphans)
        idle_since = time.monotonic()
        try:
            while True:
                lock = _keep_lock(queue, lock)
                job = queue.claim_next(os.getpid())
                if job is None:
                    if once or (idle_exit is not None and time.monotonic() - idle_since > idle_exit):
                        logger.info("queue empty%s: exiting", "" if once else f" for {idle_exit:g} s")
                        return 0
                    time.sleep(poll)
                    continue
                run_job(queue, job)
                idle_since = time.monotonic()
        finally:
            queue.unregister_worker(os.getpid())
    finally:
        lock.close()


def run_job(queue: JobQueue, job: Job) -> None:
    """Run one job to done, cancelled or failed (with the reason); never raises."""
    state = {"report": None}

    def on_progress(report, total, item):
        state["report"] = report
        current = f"{item.size} · {item.method} · {'+'.join(item.subset) or 'base'}" if item else "planning"
        if queue.progress(job.id, report.merged, total, report.skipped, report.rows_written, current,
                          len(report.not_cached)):
            raise JobCancelled

    logger.info("job %d started: family %s, methods %s, sizes %s", job.id, job.spec.family,
                ",".join(job.spec.methods), ",".join(job.spec.sizes) or "all")
    try:
        report = run_sweep(job.spec.sweep_spec(), ResultStore(job.spec.db), device=job.spec.device, progress=False,
                           on_progress=on_progress)
        note = report.not_cached_note()
        message = f"{report.merged} merges evaluated, {report.skipped} already cached" + (f"; {note}" if note else "")
        queue.finish(job.id, "done", message, rows=report.rows_written, not_cached=len(report.not_cached))
        logger.info("job %d done: %s, %d rows written", job.id, message, report.rows_written)
    except JobCancelled:
        report = state["report"]
        queue.finish(job.id, "cancelled", f"cancelled after {report.merged} merges; resume to continue",
                     rows=report.rows_written, not_cached=len(report.not_cached))
        logger.info("job %d cancelled after %d merges", job.id, report.merged)
    except MergelabError as exc:
        queue.finish(job.id, "failed", str(exc))
        logger.error("job %d failed: %s", job.id, exc)
    except Exception as exc:  # e.g. out of memory: the job fails with the reason, the worker goes on
        queue.finish(job.id, "failed", f"{type(exc).__name__}: {exc}; resume to continue")
        logger.exception("job %d failed: %s", job.id, type(exc).__name__)


def ensure_worker(queue: JobQueue, idle_exit: float | None = None) -> bool:
    """Start a detached worker unless one is running; returns True if one was started. It exits after
    `idle_exit` idle seconds (default MERGELAB_WORKER_IDLE or 900)."""
    idle_exit = idle_exit if idle_exit is not None else float(os.environ.get("MERGELAB_WORKER_IDLE", 900))
    if worker_running(queue):
        return False
    log = queue.path.with_name("worker.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        subprocess.Popen([sys.executable, "-m", "mergelab", "worker", "--queue", str(queue.path),
                          "--idle-exit", str(idle_exit)], stdout=out, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True, env=dict(os.environ))
    return True
