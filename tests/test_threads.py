"""The torch thread policy (mergelab.engine.threads): its choices, and that real sweep and worker
processes run with the threads it chose; progress written off a terminal as plain lines."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from mergelab.bars import PlainProgress, progress_bar
from mergelab.engine.threads import (PARAMS_PER_THREAD, SMALL_MODEL, ThreadChoice, available_cores, choose_threads,
                                     torch_threads)
from mergelab.errors import MergelabError
from mergelab.sweep.jobs import JobQueue
from mergelab.sweep.plan import SweepJob


def test_small_models_get_one_thread_whatever_the_cores():
    for n_params in (7_376, 33_312, 625_000, SMALL_MODEL - 1):  # the demo's sizes and the threshold
        assert choose_threads(n_params, cores=64, environ={}).threads == 1
    assert choose_threads(7_376, cores=8, environ={}).reason == "7,376 parameters: one thread for a model this small"


def test_larger_models_get_a_thread_per_share_of_parameters_up_to_the_cores():
    assert choose_threads(SMALL_MODEL, cores=64, environ={}).threads == 1
    assert choose_threads(5 * PARAMS_PER_THREAD, cores=64, environ={}).threads == 5
    assert choose_threads(5 * PARAMS_PER_THREAD + 1, cores=64, environ={}).threads == 6
    assert choose_threads(500_000_000, cores=16, environ={}) == ThreadChoice(16, "500,000,000 parameters, 16 cores available")
    assert choose_threads(500_000_000, cores=2, environ={}).threads == 2  # the 2-core machine
    assert choose_threads(500_000_000, cores=0, environ={}).threads == 1  # never fewer than one


def test_overrides_mergelab_threads_then_a_user_set_omp_num_threads():
    assert choose_threads(7_376, cores=2, environ={"MERGELAB_THREADS": "3"}) == ThreadChoice(3, "MERGELAB_THREADS=3")
    both = {"MERGELAB_THREADS": "2", "OMP_NUM_THREADS": "4"}
    assert choose_threads(500_000_000, cores=16, environ=both).threads == 2
    assert choose_threads(500_000_000, cores=16, environ={"OMP_NUM_THREADS": "4"}) == ThreadChoice(4, "OMP_NUM_THREADS=4")
    for ignored in ("", "0", "x"):  # torch ignores these too: the policy decides
        assert choose_threads(7_376, cores=2, environ={"OMP_NUM_THREADS": ignored}).threads == 1
    assert choose_threads(7_376, cores=2, environ={"MERGELAB_THREADS": " "}).threads == 1  # blank: unset


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5", "1e3"])
def test_a_bad_mergelab_threads_is_refused_in_one_line(bad):
    with pytest.raises(MergelabError) as info:
        choose_threads(7_376, environ={"MERGELAB_THREADS": bad})
    assert str(info.value) == (f"MERGELAB_THREADS={bad!r}: expected a positive whole number of threads (or unset it "
                               "to let mergelab choose from the model size)")


def test_available_cores_follow_the_affinity():
    assert 1 <= available_cores() <= len(os.sched_getaffinity(0))


def test_torch_threads_restores_the_previous_count(monkeypatch):
    import torch

    monkeypatch.setenv("MERGELAB_THREADS", "2")
    before = torch.get_num_threads()
    with torch_threads(7_376) as choice:
        assert torch.get_num_threads() == choice.threads == 2
    assert torch.get_num_threads() == before


def sweep_env(**extra) -> dict:
    """The environment of a child process with no thread setting of the caller's (OMP_NUM_THREADS is
    set for the test run): the policy alone decides, unless `extra` sets one."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MERGELAB_THREADS")}
    return {**env, **extra}


@pytest.mark.parametrize("extra, expected", [
    ({}, "1 torch thread ("),  # tiny checkpoints: one thread, though torch would take every core
    ({"MERGELAB_THREADS": "2"}, "2 torch threads (MERGELAB_THREADS=2)"),
    ({"OMP_NUM_THREADS": "2"}, "2 torch threads (OMP_NUM_THREADS=2)"),
])
def test_a_real_worker_process_runs_its_job_on_the_chosen_threads(tiny_family, tmp_path, extra, expected):
    queue = JobQueue(tmp_path / "jobs.sqlite")
    job_id = queue.submit(SweepJob(str(tiny_family), {"average": {}}, device="cpu", db=str(tmp_path / "r.duckdb")))
    proc = subprocess.run([sys.executable, "-m", "mergelab", "worker", "--queue", queue.path, "--once"],
                          capture_output=True, text=True, timeout=300, env=sweep_env(**extra))
    assert proc.returncode == 0, proc.stderr
    job = queue.get(job_id)
    # the count is read back from torch.get_num_threads() in the worker while the merges ran
    assert job.status == "done" and f"; ran on {expected}" in job.message, job.message
    assert f"job {job_id}: 11 merges to run (0 cached) on {expected}" in proc.stderr
    if not extra:
        assert "parameters: one thread for a model this small)" in job.message


def test_the_cli_sweep_reports_its_threads_and_writes_no_cursor_codes_to_a_file(tiny_family, tmp_path):
    log = tmp_path / "sweep.log"
    with open(log, "wb") as out:  # not a terminal: no tqdm bar
        code = subprocess.call([sys.executable, "-m", "mergelab", "sweep", "--family", tiny_family, "--methods",
                                "average", "--db", tmp_path / "r.duckdb", "--device", "cpu"], stdout=out,
                               stderr=subprocess.STDOUT, env=sweep_env())
    text = log.read_text()
    assert code == 0, text
    assert "11 merges evaluated, 0 already cached, 33 rows written" in text and " s on 1 torch thread (" in text
    assert "\r" not in text and "\x1b[" not in text


def test_the_cli_sweep_refuses_a_bad_mergelab_threads_before_planning(tiny_family, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mergelab", "sweep", "--family", tiny_family, "--db",
                           tmp_path / "r.duckdb"], capture_output=True, text=True, timeout=300,
                          env=sweep_env(MERGELAB_THREADS="lots"))
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: MERGELAB_THREADS='lots': expected a positive whole number of threads (or unset it to let mergelab "
        "choose from the model size)")
    assert not (tmp_path / "r.duckdb").exists()


def test_plain_progress_lines_off_a_terminal(monkeypatch):
    stream = io.StringIO()
    bar = PlainProgress(1_042, "merge+eval", "merge", stream=stream, every=0.0)
    bar.update(400)
    bar.set_postfix(loss="1.234", refresh=False)
    bar.update(642)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("merge+eval: 400/1,042 merge (38%), ") and lines[0].endswith(" s")
    assert lines[1].startswith("merge+eval: 1,042/1,042 merge (100%), ") and lines[1].endswith(" s, loss=1.234")
    assert len(lines) == 2 and "\r" not in stream.getvalue()
    quiet = io.StringIO()
    with PlainProgress(9, "load xs", "expert", stream=quiet) as short:  # done within PLAIN_EVERY: silent
        short.update(9)
    assert quiet.getvalue() == ""


def test_progress_bar_is_tqdm_on_a_terminal_only(monkeypatch):
    from tqdm.auto import tqdm

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress_bar(10, "x"), PlainProgress)
    primary, secondary = os.openpty()
    with os.fdopen(secondary, "w") as terminal:
        monkeypatch.setattr(sys, "stderr", terminal)
        bar = progress_bar(10, "x", disable=True)
        assert isinstance(bar, tqdm)
        bar.close()
    os.close(primary)
