"""kill -9 of the sweep worker at 20 points of a real micro sweep: resuming completes it, and the cache
equals an uninterrupted run row for row, with no duplicate and no half-written merge."""

from __future__ import annotations

import random
import signal

import pytest

from mergelab.io.family import load_family
from mergelab.sweep.jobs import JobQueue
from mergelab.store import ResultStore
from mergelab.sweep.plan import SweepSpec
from mergelab.sweep.runner import run_sweep
from mergelab.sweep.plan import SweepJob
from mergelab.sweep.worker import reap_orphans
from tests.helpers import wait_until
from tests.reliability.faults import check_whole_merges, compare_caches, finish, kill_9, start_worker

pytestmark = pytest.mark.slow

KILLS_BEFORE_FIRST_MERGE = 4   # while importing, reading checkpoints, tokenizing, planning
KILLS_DURING_MERGES = 16       # at random merge counts, so at random points relative to the 2 s flushes
METHODS = {"average": {}, "ties": {"density": 0.5}}


def running_past(queue: JobQueue, job_id: int, merges: int) -> bool:
    job = queue.get(job_id)
    return job.status == "running" and job.done_this_run >= merges  # merges since this worker started it


def test_kill_9_at_20_points_then_resume_equals_an_uninterrupted_run(micro_family, tmp_path, tally):
    rng = random.Random(7)
    family = load_family(micro_family)
    spec = SweepJob(str(micro_family), METHODS, sizes=("xs",), ks=(1, 2, 3, 4), subsets="all", device="cpu",
                    db=str(tmp_path / "killed.duckdb"))
    queue = JobQueue(tmp_path / "jobs.sqlite")
    job_id = queue.submit(spec)
    n_domains = len(family.domains)

    kills, rows_seen = [], []
    for round_ in range(KILLS_BEFORE_FIRST_MERGE + KILLS_DURING_MERGES):
        reap_orphans(queue)  # what the Sweep page does: the killed job shows as failed …
        job = queue.get(job_id)
        assert job.status in ("queued", "failed"), job
        if job.status == "failed":
            assert "worker process died" in job.message
            queue.resume(job_id)  # … and its Resume button queues it again
        worker = start_worker(queue.path, "--once")
        if round_ < KILLS_BEFORE_FIRST_MERGE:
            wait_until(lambda: worker.poll() is not None, timeout=rng.uniform(0.3, 3.0))
        else:
            target = rng.randint(1, 25)
            assert wait_until(lambda: running_past(queue, job_id, target), timeout=120, poll=0.05), queue.get(job_id)
        assert worker.poll() is None, "the sweep finished before the planned kill: make it longer"
        kill_9(worker)
        kills.append(queue.get(job_id).done_this_run)
        rows_seen.append(len(check_whole_merges(spec.db, n_domains)) if (tmp_path / "killed.duckdb").exists() else 0)
    assert rows_seen == sorted(rows_seen), "a kill lost rows that were already written"

    reap_orphans(queue)
    queue.resume(job_id)
    final = start_worker(queue.path, "--once")
    output = finish(final)
    assert final.returncode == 0, output
    assert queue.get(job_id).status == "done", queue.get(job_id)
    killed = check_whole_merges(spec.db, n_domains)

    reference_db = tmp_path / "uninterrupted.duckdb"
    run_sweep(SweepSpec(family, ["xs"], METHODS, [1, 2, 3, 4]), ResultStore(reference_db), device="cpu", progress=False)
    reference = ResultStore(reference_db).results()
    max_diff = compare_caches(killed, reference, exact_methods=["ties"])

    tally["kill -9 points survived"] += len(kills)
    tally["kill -9 points after the first merge"] += sum(d > 0 for d in kills)
    tally["rows compared after kills"] += len(reference)
    tally["rows lost"] += len(reference) - len(killed)
    tally["max |loss diff| after kills (incremental merges, fp32)"] = max_diff


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal_ends_the_job_in_flight_as_cancelled_and_resume_counts_on(micro_family, tmp_path, sig, tally):
    """SIGTERM (a supervisor, `demo up`), SIGINT (Ctrl-C) or SIGHUP (a closed terminal) to the worker:
    the job in flight stops between two merges with its rows and counts agreeing, the worker
    unregisters and exits 0, and the resumed job counts on from where it stopped."""
    spec = SweepJob(str(micro_family), {"average": {}}, sizes=("xs",), ks=(1, 2, 3, 4), device="cpu",
                    db=str(tmp_path / "r.duckdb"))
    planned = 1 + 9 + 9 + 36 + 84 + 126
    queue = JobQueue(tmp_path / "jobs.sqlite")
    job_id = queue.submit(spec)
    worker = start_worker(queue.path)
    assert wait_until(lambda: running_past(queue, job_id, 5), timeout=120, poll=0.05), queue.get(job_id)
    worker.send_signal(sig)
    output = finish(worker, timeout=60)
    assert worker.returncode == 0 and f"stopped by {sig.name}" in output, output
    stopped = queue.get(job_id)
    assert stopped.status == "cancelled" and f"stopped with its worker ({sig.name}) after {stopped.done} merges" in stopped.message
    assert 5 <= stopped.done < planned and stopped.rows == stopped.done * 9 == ResultStore(spec.db).count()
    assert queue.live_worker() is None and reap_orphans(queue) == 0  # unregistered; nothing left running
    queue.resume(job_id)
    assert finish(start_worker(queue.path, "--once"), timeout=300) is not None
    resumed = queue.get(job_id)
    assert resumed.status == "done" and resumed.done == resumed.total == planned and resumed.done_before == stopped.done
    check_whole_merges(spec.db, 9)
    tally["stop signals to the worker (job cancelled, counts kept)"] += 1
