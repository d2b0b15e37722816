"""The long-lived `mergelab worker` process: claims queued sweep jobs one at a time, runs them,
reports progress and heartbeats to the queue, stops between merges when asked to cancel.

Only one worker runs per queue: it holds an exclusive lock on `<queue>.lock` for its lifetime (taken
again on a new file if that one is removed) and registers its pid and start time in the queue, so a
removed lock file neither makes a live worker look dead nor lets a second one start.

SIGTERM, SIGINT or SIGHUP stop the worker cleanly: the job in flight ends as cancelled after the rows
merged so far are written (resume continues it), the worker unregisters and exits with code 0."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
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


class WorkerStopped(BaseException):
    """Raised in the worker's main thread by SIGTERM, SIGINT or SIGHUP (`_Stopper`): a
    BaseException, like KeyboardInterrupt, so that no `except Exception` of a sweep swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signal = signal.Signals(signum).name


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class _Stopper:
    """The worker's stop signals. The first one raises WorkerStopped at once, except while merges are
    being evaluated (`deferred`), where it is only noted and raised between two merges (`check`), so a
    merge's rows and the job's counts always agree; later signals are ignored, so the cleanup (the job
    marked cancelled, the worker unregistered) runs to its end."""

    def __init__(self):
        self.signum: int | None = None
        self.deferred = False

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # not in a test's thread
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        self.signum = signum
        if not self.deferred:
            raise WorkerStopped(signum)

    def check(self) -> None:
        """Raise WorkerStopped if a stop signal came meanwhile."""
        if self.signum is not None:
            raise WorkerStopped(self.signum)


_STOPPER = _Stopper()


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


def run_worker(queue: JobQueue, poll: float = 0.5, idle_exit: float | None = None, once: bool = False,
               adaptive_runner=None) -> int:
    """Run jobs until idle for `idle_exit` seconds (forever if None), or until the queue is empty with
    once, or until a stop signal (SIGTERM, SIGINT, SIGHUP: the job in flight ends as cancelled). Returns
    the exit code: 0, or 1 when another worker already serves the queue. adaptive_runner(job_spec,
    on_progress) -> report runs adaptive jobs (`mergelab.analysis.adaptive_sweep.run_adaptive_job`, passed
    in by `mergelab worker`: the policy lives in the analysis layer, above this one)."""
    _STOPPER.install()
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
                run_job(queue, job, adaptive_runner)
                _STOPPER.check()  # a signal noted while the job's last merges ran
                idle_since = time.monotonic()
        except WorkerStopped as stop:
            logger.info("worker %d: stopped by %s", os.getpid(), stop.signal)
            return 0
        finally:
            queue.unregister_worker(os.getpid())
    finally:
        lock.close()


def run_job(queue: JobQueue, job: Job, adaptive_runner=None) -> None:
    """Run one job to done, cancelled or failed (with the reason); never raises, except WorkerStopped
    (after marking the job cancelled). A resumed job counts on from its earlier runs: the merges it
    finished before (`job.done_before`) and the rows it wrote stay in its counts."""
    before, rows_before = job.done_before, job.rows
    state = {"report": None}

    def counts(report):
        # merges this job cached in earlier runs are among those its plan finds cached now
        return before + report.merged, max(0, report.skipped - before), rows_before + report.rows_written

    def on_progress(report, total, item):
        state["report"] = report
        _STOPPER.deferred = True  # from the plan to the end of the sweep, stop signals wait for a merge's end
        if item is None:  # the plan is known, and the threads chosen: say so in the worker's log
            logger.info("job %d: %s merges to run (%s cached) on %s", job.id, f"{total:,}", f"{report.skipped:,}",
                        report.threads_note())
        current = f"{item.size} · {item.method} · {'+'.join(item.subset) or 'base'}" if item else "planning"
        if getattr(report, "adaptive_note", ""):  # an adaptive job: the target's interval so far
            current = f"{current} | {report.adaptive_note}"
        done, skipped, rows = counts(report)
        if queue.progress(job.id, done, before + total, skipped, rows, current, len(report.not_cached)):
            raise JobCancelled
        _STOPPER.check()  # between two merges, counted: a stop signal noted meanwhile ends the job here

    def finish(status, message):
        """End the job; `message(done, skipped)` says how it ended, the threads it ran on are added."""
        report = state["report"]
        done, skipped, rows = counts(report) if report else (before, 0, rows_before)
        queue.finish(job.id, status, message(done, skipped) + (f"; ran on {report.threads_note()}" if report else ""),
                     rows=rows, not_cached=len(report.not_cached) if report else 0)

    logger.info("job %d started: family %s, methods %s, sizes %s", job.id, job.spec.family,
                ",".join(job.spec.methods), ",".join(job.spec.sizes) or "all")
    try:
        try:
            if job.spec.adaptive:  # the policy picks the subsets; the cache holds its state (a resume continues)
                if adaptive_runner is None:
                    raise MergelabError(f"job {job.id} is an adaptive sweep ({job.spec.adaptive}) and this worker was "
                                        "started without the adaptive policy; run `mergelab worker`")
                report = adaptive_runner(job.spec, on_progress)
            else:
                report = run_sweep(job.spec.sweep_spec(), ResultStore(job.spec.db), device=job.spec.device,
                                   progress=False, on_progress=on_progress)
        finally:
            _STOPPER.deferred = False
        state["report"] = report
        note = report.not_cached_note()
        message = (lambda done, skipped: f"{done} merges evaluated" + (f" ({report.merged} after resuming)" if before else "")
                   + f", {skipped} already cached" + (f"; {note}" if note else "")
                   + (f"; {report.adaptive_summary}" if getattr(report, "adaptive_summary", "") else ""))
        finish("done", message)
        done, skipped, rows = counts(report)
        logger.info("job %d done: %s, %d rows written", job.id, message(done, skipped), rows)
    except JobCancelled:
        finish("cancelled", lambda done, _: f"cancelled after {done} merges; resume to continue")
        logger.info("job %d cancelled", job.id)
    except WorkerStopped as stop:
        finish("cancelled", lambda done, _: f"stopped with its worker ({stop.signal}) after {done} merges; "
                                            "resume to continue")
        logger.info("job %d stopped with its worker (%s)", job.id, stop.signal)
        raise
    except MergelabError as exc:
        queue.finish(job.id, "failed", str(exc))
        logger.error("job %d failed: %s", job.id, exc)
    except Exception as exc:  # e.g. out of memory: the job fails with the reason, the worker goes on
        queue.finish(job.id, "failed", f"{type(exc).__name__}: {exc}; resume to continue")
        logger.exception("job %d failed: %s", job.id, type(exc).__name__)


def start_worker(queue: JobQueue, idle_exit: float | None = None) -> subprocess.Popen | None:
    """Start a worker process in its own session (a terminal's Ctrl-C does not reach it; whoever keeps
    the Popen stops it with SIGTERM) unless one is running; returns it, or None when one runs already.
    It writes to worker.log beside the queue and exits after `idle_exit` idle seconds (default
    MERGELAB_WORKER_IDLE or 900), so one whose owner was killed does not linger."""
    idle_exit = idle_exit if idle_exit is not None else float(os.environ.get("MERGELAB_WORKER_IDLE", 900))
    if worker_running(queue):
        return None
    log = queue.path.with_name("worker.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "mergelab", "worker", "--queue", str(queue.path),
                                 "--idle-exit", str(idle_exit)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                env=dict(os.environ))


def ensure_worker(queue: JobQueue, idle_exit: float | None = None) -> bool:
    """Start a detached worker unless one is running (`start_worker`); returns True if one was started."""
    return start_worker(queue, idle_exit) is not None
