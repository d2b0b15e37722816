"""The job queue and the worker process: run, progress, cancel, resume, one worker per queue."""

import subprocess
import sys
import threading

from mergelab.sweep.jobs import JobQueue
from mergelab.sweep.plan import SweepJob
from mergelab.store import ResultStore
from mergelab.sweep.worker import ensure_worker, reap_orphans, run_job, worker_running
from tests.helpers import wait_until

METHODS = {"average": {}, "task_arithmetic": {}, "ties": {}, "dare": {}}


class RecordingQueue(JobQueue):
    """The real queue, noting each progress report's (done, total) as the worker sends it."""

    def __init__(self, path, seen):
        super().__init__(path)
        self.seen = seen

    def progress(self, job_id, done, total, *args, **kwargs):
        self.seen.append((done, total))
        return super().progress(job_id, done, total, *args, **kwargs)


def spec(family, db, **over):
    return SweepJob(**{"family": str(family), "methods": METHODS, "db": str(db), "device": "cpu", **over})


def test_worker_runs_a_job_to_completion(tiny_family, tmp_path):
    queue = JobQueue(tmp_path / "jobs.sqlite")
    job_id = queue.submit(spec(tiny_family, tmp_path / "r.duckdb"))
    proc = subprocess.run([sys.executable, "-m", "mergelab", "worker", "--queue", queue.path, "--once"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    job = queue.get(job_id)
    assert job.status == "done" and job.done == job.total == 4 + 4 * 7 and job.fraction == 1.0
    assert job.rows == 32 * 3 == ResultStore(tmp_path / "r.duckdb").count()
    assert "32 merges evaluated" in job.message and job.seconds_per_merge > 0


def test_cancel_keeps_rows_and_resume_completes_without_duplicates(tiny_family, tmp_path):
    queue = JobQueue(tmp_path / "jobs.sqlite")
    db = tmp_path / "r.duckdb"
    job_id = queue.submit(spec(tiny_family, db))
    job = queue.claim_next(worker_pid=1)
    runner = threading.Thread(target=run_job, args=(queue, job))
    runner.start()
    assert wait_until(lambda: queue.get(job_id).done >= 3, poll=0.002)
    queue.cancel(job_id)
    runner.join(timeout=120)
    cancelled = queue.get(job_id)
    assert cancelled.status == "cancelled" and "resume to continue" in cancelled.message
    assert 3 <= cancelled.done < cancelled.total
    kept = ResultStore(db).count()
    assert kept == cancelled.rows and kept % 3 == 0  # whole merges only
    queue.resume(job_id)
    assert queue.get(job_id).status == "queued"
    claimed = queue.claim_next(worker_pid=1)
    # a resumed job counts on from the merges it did, not from 0 (its rate and ETA from this run's only)
    assert (claimed.done, claimed.done_before, claimed.rows) == (cancelled.done, cancelled.done, kept)
    seen = []
    recording = RecordingQueue(queue.path, seen)
    run_job(recording, claimed)
    resumed = queue.get(job_id)
    assert resumed.status == "done" and resumed.done == resumed.total == 32 and resumed.rows == 32 * 3
    assert resumed.skipped == 0 and f"32 merges evaluated ({32 - cancelled.done} after resuming)" in resumed.message
    assert seen[0] == (cancelled.done, 32) and all(total == 32 for _, total in seen)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)  # never back to 0
    assert resumed.done_this_run == 32 - cancelled.done and resumed.seconds_per_merge > 0
    store = ResultStore(db)
    assert store.count() == 32 * 3 and not store.results().duplicated(["method", "hparams", "experts_key", "domain"]).any()


def test_failed_job_records_the_reason(tmp_path):
    queue = JobQueue(tmp_path / "jobs.sqlite")
    job_id = queue.submit(spec(tmp_path / "missing.toml", tmp_path / "r.duckdb"))
    run_job(queue, queue.claim_next(worker_pid=1))
    job = queue.get(job_id)
    assert job.status == "failed" and "missing.toml: family manifest not found" in job.message


def test_queued_job_cancels_at_once_and_orphans_are_failed(tmp_path):
    queue = JobQueue(tmp_path / "jobs.sqlite")
    first, second = queue.submit(SweepJob("x")), queue.submit(SweepJob("y"))
    queue.cancel(first)
    assert queue.get(first).status == "cancelled"
    claimed = queue.claim_next(worker_pid=999_999_999)
    assert claimed.id == second and queue.claim_next(worker_pid=1) is None  # claimed once only
    assert reap_orphans(queue) == 1  # no worker holds the queue lock: the running job lost its worker
    assert queue.get(second).status == "failed" and "worker process died" in queue.get(second).message


def test_one_worker_per_queue_and_ensure_worker(tiny_family, tmp_path):
    queue = JobQueue(tmp_path / "jobs.sqlite")
    assert not worker_running(queue)
    assert ensure_worker(queue, idle_exit=20)
    assert wait_until(lambda: worker_running(queue), timeout=60)
    assert not ensure_worker(queue)  # already running: nothing started
    second = subprocess.run([sys.executable, "-m", "mergelab", "worker", "--queue", queue.path, "--once"],
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 1 and "another worker is already running" in second.stderr
    job_id = queue.submit(spec(tiny_family, tmp_path / "r.duckdb", methods={"average": {}}))
    assert wait_until(lambda: queue.get(job_id).status == "done", timeout=120), queue.get(job_id)
    assert queue.get(job_id).total == 4 + 7
