"""`mergelab demo up` as real processes: the dashboard answers before the default sweep ends, the sweep
runs as a job in the worker, SIGTERM and Ctrl-C stop the dashboard and the worker it started and say
what was kept, and a rerun resumes the half-swept family to the end."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mergelab.demo.up import queue_default_sweep
from mergelab.io.family import load_family
from mergelab.store import ResultStore
from mergelab.sweep.jobs import JobQueue
from tests.helpers import free_port, log_tail, start_logged, wait_for_dashboard, wait_until

pytestmark = pytest.mark.slow

XS_MERGES = 1 + 9 + 511  # the default sweep of one size of nine experts: base, experts, every subset k >= 2


@pytest.fixture
def home(micro_family, tmp_path) -> Path:
    """A data dir holding the demo micro family as an earlier `demo up` built it, cut to its size xs
    (real checkpoints; a 521-merge default sweep keeps the test short)."""
    home = tmp_path / "home"
    shutil.copytree(micro_family.parent, home / "demo-micro")
    manifest = home / "demo-micro" / "family.toml"
    text = manifest.read_text()
    manifest.write_text(text[:text.index("[sizes.s]")])
    assert load_family(manifest).size_names == ("xs",)
    return home


def demo_up(home: Path, port: int, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("MERGELAB_DB", "MERGELAB_JOBS")}
    env["MERGELAB_HOME"] = str(home)
    return start_logged([sys.executable, "-m", "mergelab", "demo", "up", "--port", port], log, env=env,
                        start_new_session=True)


def processes_of(home: Path, port: int) -> list[str]:
    """Command lines of live processes that serve this test's dashboard or queue (by /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X") and (str(home) in cmd or f"--server.port {port}" in cmd):
            found.append(f"{entry.name}: {cmd}")
    return found


def stop(proc: subprocess.Popen, sig: int) -> int:
    """Send `sig` to `demo up` alone (not its process group, as a supervisor would) and wait for it."""
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"demo up did not exit on {sig}: {log_tail(proc)}")


def test_demo_up_serves_first_sweeps_in_the_worker_and_a_rerun_after_sigterm_completes(home, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    queue, store = JobQueue(home / "jobs.sqlite"), ResultStore(home / "results.duckdb")

    def micro_rows() -> int:
        return len(store.results(family="demo-micro")) if store.exists() else 0

    first = demo_up(home, port, tmp_path / "first.log")
    try:
        wait_for_dashboard(url, first, timeout=180)
        # the dashboard answers while the default sweep has not ended (before, it answered only after)
        assert micro_rows() < XS_MERGES * 9, "the sweep ended before the dashboard answered"
        assert wait_until(lambda: queue.list() and queue.list()[0].done >= 40, timeout=300, poll=0.1), log_tail(first)
        out = log_tail(first)
        assert f"dashboard: {url}" in out and f"{XS_MERGES:,} merges to run (0 of {XS_MERGES:,} already cached)" in out
        [job] = queue.list()
        worker_pid = job.worker_pid
        assert job.status == "running" and job.total == XS_MERGES and worker_pid != first.pid
        assert processes_of(home, port)  # the dashboard and the worker
        code = stop(first, signal.SIGTERM)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    out = log_tail(first)
    assert code == 128 + signal.SIGTERM, out
    assert not processes_of(home, port), processes_of(home, port)  # no dashboard nor worker left behind
    stopped = queue.get(job.id)
    assert stopped.status == "cancelled" and "stopped with its worker (SIGTERM)" in stopped.message
    assert 40 <= stopped.done < XS_MERGES and micro_rows() == stopped.rows == stopped.done * 9
    assert (f"stopped by SIGTERM: dashboard and sweep worker stopped; the default sweep (job {job.id}) stopped at "
            f"{stopped.done:,} of {XS_MERGES:,} merges") in out and "`mergelab demo up` again resumes it" in out

    second = demo_up(home, port, tmp_path / "second.log")
    try:
        wait_for_dashboard(url, second, timeout=180)
        assert wait_until(lambda: queue.get(job.id).status == "done", timeout=600, poll=0.2), log_tail(second)
        out = log_tail(second)
        assert f"{XS_MERGES - stopped.done:,} merges to run ({stopped.done:,} of {XS_MERGES:,} already cached)" in out
        code = stop(second, signal.SIGINT)  # Ctrl-C
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
    out = log_tail(second)
    assert code == 128 + signal.SIGINT and "interrupted (Ctrl-C): dashboard stopped; the default sweep is complete" in out
    assert not processes_of(home, port), processes_of(home, port)
    [resumed] = queue.list()  # the same job resumed, not a second one, and it counted on from where it stopped
    assert resumed.id == job.id and resumed.done == resumed.total == XS_MERGES
    assert resumed.done_before == stopped.done and resumed.rows == XS_MERGES * 9
    assert micro_rows() == XS_MERGES * 9
    rows = store.results(family="demo-micro")
    assert not rows.duplicated(["size", "method", "hparams", "experts_key", "domain"]).any()
    # a third run finds the plan complete: nothing is queued
    assert queue_default_sweep(home / "demo-micro" / "family.toml", store, queue) == (None, 0, XS_MERGES)


def test_demo_up_refuses_a_port_in_use_before_building(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(os.environ, MERGELAB_HOME=str(tmp_path / "home"))
        proc = subprocess.run([sys.executable, "-m", "mergelab", "demo", "up", "--port", str(port)], env=env,
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: --port {port}: already in use on 127.0.0.1 (another dashboard?); stop it "
                                   "or pick another --port")
    assert not (tmp_path / "home").exists()  # refused before anything was built


def test_demo_up_no_ui_sweeps_in_the_foreground_says_what_ctrl_c_kept_and_a_rerun_completes(home, tmp_path):
    store = ResultStore(home / "results.duckdb")
    args = [sys.executable, "-m", "mergelab", "demo", "up", "--no-ui"]
    env = {k: v for k, v in os.environ.items() if k not in ("MERGELAB_DB", "MERGELAB_JOBS")}
    env["MERGELAB_HOME"] = str(home)

    def micro_rows() -> int:
        return len(store.results(family="demo-micro")) if store.exists() else 0

    first = start_logged(args, tmp_path / "first.log", env=env, start_new_session=True)
    try:
        assert wait_until(lambda: micro_rows() >= 20 * 9, timeout=300, poll=0.2), log_tail(first)
        code = stop(first, signal.SIGINT)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    out, kept = log_tail(first), micro_rows() // 9
    assert code == 128 + signal.SIGINT and 20 <= kept < XS_MERGES, out
    assert f"default sweep: {XS_MERGES:,} merges to run (0 of {XS_MERGES:,} already cached), on 1 torch thread" in out
    assert (f"interrupted (Ctrl-C): the default sweep stopped, {kept:,} of {XS_MERGES:,} merges done and cached in "
            f"{store.path}; `mergelab demo up` again resumes it") in out
    second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert f"default sweep: {XS_MERGES - kept:,} merges to run ({kept:,} of {XS_MERGES:,} already cached)" in second.stdout
    assert micro_rows() == XS_MERGES * 9
    assert not JobQueue(home / "jobs.sqlite").path.exists()  # the foreground sweep queues nothing
