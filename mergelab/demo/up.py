"""`mergelab demo up`, the main job: a demo family on disk, the shipped results in the cache, the
dashboard served, and the family's default sweep run in the background worker.

The dashboard starts before the sweep, which goes to the job queue like a sweep launched on the Sweep
page, so the page shows its progress. The default sweep is queued again on every run (cached merges are
skipped), so a run stopped half-way is completed by the next one. A stop signal (Ctrl-C, SIGTERM,
SIGHUP) stops the dashboard and the worker this command started, and says what was kept.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mergelab.paths import data_home, repo_data_dir

SHIPPED_RESULTS = "demo/results.parquet"
DEFAULT_METHODS = {"average": {}}  # the default sweep: every subset of every size, plain averaging
SECONDS_PER_MERGE_GUESS = 0.05     # a micro merge+eval on one thread of a busy 2-core machine (bench/README.md)
REPORT_EVERY = 15.0                # seconds between progress lines in the terminal
STOP_WAIT = 20.0                   # seconds a child gets to exit on SIGTERM before it is killed
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def shipped_results_path() -> Path:
    return repo_data_dir() / SHIPPED_RESULTS


def load_shipped_results(store) -> int:
    """Load the shipped demo results into an empty cache; returns the number of rows added. The marker
    beside the cache remembers it, so a cache deleted later is not refilled behind the user's back."""
    path = shipped_results_path()
    if store.count() or not path.is_file():
        return 0
    added = store.import_parquet(path)
    if added:
        _seeded_marker(store).write_text(f"{added} shipped demo rows loaded\n")
    return added


def _seeded_marker(store) -> Path:
    return store.path.with_name(store.path.name + ".seeded")


def seed_first_cache(store) -> int:
    """The dashboard's first run: load the shipped demo results into `store` only when it is the
    default cache (MERGELAB_DB unset) and is created for the first time (a marker beside it remembers
    the seeding, so a cache deleted later is not filled again). A cache the user named (MERGELAB_DB,
    --db) is never created or filled unasked, so a mistyped or deleted path is reported instead of
    silently becoming a cache of demo rows; `mergelab demo up` seeds any cache, on request.
    Returns the number of rows added (0 when it did nothing)."""
    import os

    from mergelab.paths import DB_ENV

    if os.environ.get(DB_ENV) or store.exists() or _seeded_marker(store).exists():
        return 0
    return load_shipped_results(store)


def missing_cache_note(store) -> str | None:
    """Why `store` (which does not exist) is not created on the pages, for the user; None on a first run."""
    import os

    from mergelab.paths import DB_ENV

    if store.exists():
        return None
    if os.environ.get(DB_ENV):
        return (f"The results cache {store.path} ({DB_ENV}) does not exist: check the path. It is not created "
                f"here; a sweep creates it, and `mergelab demo up --db PATH` fills it with the demo results.")
    if _seeded_marker(store).exists():
        return (f"The results cache {store.path} was deleted after its first run; it is not refilled with the demo "
                f"results here: a sweep creates it again, and `mergelab demo up` reloads the demo results.")
    return None


class DemoStopped(BaseException):
    """A stop signal (Ctrl-C, SIGTERM, SIGHUP) to `mergelab demo up`; a BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.how = "interrupted (Ctrl-C)" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"


class _StopSignals:
    """Within the block, the first stop signal raises DemoStopped and later ones are ignored (so the
    cleanup runs to its end); the previous handlers are back afterwards."""

    def __enter__(self):
        def stop(signum, frame):
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
            raise DemoStopped(signum)

        self.saved = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


def ensure_family(preset: str = "micro", progress: bool = True) -> Path:
    """The demo family `preset` in the data dir (built there first if absent); returns its manifest."""
    from mergelab.demo.build import build_family

    family_dir = data_home() / f"demo-{preset}"
    if not (family_dir / "family.toml").is_file():
        print(f"building the {preset} demo family in {family_dir} (a minute on a laptop) ...", flush=True)
        started = time.perf_counter()
        try:
            build_family(preset, family_dir, progress=progress, force=True)
        except (KeyboardInterrupt, DemoStopped):  # the build writes to a staging folder: nothing half-built stays
            print("interrupted while building the demo family: nothing was kept; `mergelab demo up` builds it "
                  "again", file=sys.stderr, flush=True)
            raise
        print(f"built the {preset} demo family in {time.perf_counter() - started:.0f} s", flush=True)
    return family_dir / "family.toml"


def default_job(manifest: Path, store):
    """The demo's default sweep as a queue job: every size, every subset (k = 1..M), averaging, with the
    base and single-expert reference rows, into `store` (a ResultStore)."""
    from mergelab.sweep.plan import SweepJob

    return SweepJob(str(manifest), dict(DEFAULT_METHODS), db=str(store.path))


def prepare_demo(preset: str = "micro", db: Path | None = None, progress: bool = True) -> Path:
    """`demo up --no-ui`: build the demo family if absent, seed the cache, and run the default sweep here,
    in the foreground (cached merges are skipped, so a run stopped half-way is completed by the next).
    Returns the family's manifest. On Ctrl-C (KeyboardInterrupt) or another stop signal (DemoStopped),
    says what was cached and that a rerun resumes, then re-raises."""
    from mergelab.store import ResultStore
    from mergelab.sweep.runner import run_sweep

    manifest = ensure_family(preset, progress)
    store = ResultStore(db)
    added = load_shipped_results(store)
    if added:
        print(f"loaded {added} shipped demo result rows into {store.path}")
    seen = {}

    def announce(report, total, item):
        seen["report"], seen["total"] = report, total
        if item is None:
            print(_plan_line(report.planned, report.skipped, total) + (f", on {report.threads_note()}" if total else ""),
                  flush=True)

    try:
        run_sweep(default_job(manifest, store).sweep_spec(), store, progress=progress, on_progress=announce)
    except (KeyboardInterrupt, DemoStopped) as exc:
        how = exc.how if isinstance(exc, DemoStopped) else "interrupted (Ctrl-C)"
        report = seen.get("report")
        done = f"{report.merged:,} of {seen['total']:,} merges done and cached" if report else "before the first merge"
        print(f"{how}: the default sweep stopped, {done} in {store.path}; `mergelab demo up` again resumes it "
              "(cached merges are skipped)", file=sys.stderr, flush=True)
        raise
    return manifest


def run_foreground(preset: str = "micro", db: Path | None = None) -> int:
    """`demo up --no-ui`: `prepare_demo` with Ctrl-C, SIGTERM and SIGHUP turned into a clean stop (rows
    kept, what happened said); returns the exit code (0, or 128 + the signal's number)."""
    with _StopSignals():
        try:
            prepare_demo(preset, db)
        except DemoStopped as stop:
            return 128 + stop.signum
    return 0


def _plan_line(planned: int, skipped: int, todo: int) -> str:
    if not todo:
        return f"default sweep: complete, all {planned:,} merges cached"
    return f"default sweep: {todo:,} merges to run ({skipped:,} of {planned:,} already cached)"


def dashboard_command(port: int, host: str) -> list[str]:
    """`streamlit run` of the shipped app with the shipped options (no file watcher, no usage stats)."""
    from mergelab.paths import app_path, streamlit_options

    return [sys.executable, "-m", "streamlit", "run", str(app_path()), *streamlit_options(), "--server.address",
            host, "--server.port", str(port), "--server.headless", "true"]


def check_port_free(host: str, port: int) -> None:
    """Raise MergelabError when `port` on `host` is taken (another dashboard?), before anything is built."""
    import errno
    import socket

    from mergelab.errors import MergelabError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return  # an unresolvable host: streamlit says so itself
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: TIME_WAIT is no conflict
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise MergelabError(f"--port {port}: already in use on {host} (another dashboard?); stop it or pick "
                                    "another --port") from None
            if exc.errno == errno.EACCES:
                raise MergelabError(f"--port {port}: not allowed on {host} (ports below 1024 need privileges); pick "
                                    "another --port") from None


def _health_url(host: str, port: int) -> str:
    local = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://{'[' + local + ']' if ':' in local else local}:{port}/_stcore/health"


def _answers(url: str) -> bool:
    import urllib.request

    try:
        return urllib.request.urlopen(url, timeout=1).read() == b"ok"
    except OSError:
        return False


def queue_default_sweep(manifest: Path, store, queue):
    """Queue the default sweep unless every merge of it is cached: an identical job still queued or
    running is kept, the latest identical one that was cancelled or failed is resumed (its counts go on),
    else a new job is submitted. Returns (job id or None, merges to run, merges planned)."""
    from mergelab.sweep.jobs import ACTIVE
    from mergelab.sweep.runner import plan_sweep
    from mergelab.sweep.worker import reap_orphans

    job = default_job(manifest, store)
    report, todo, _ = plan_sweep(job.sweep_spec(), store)
    n_todo = sum(map(len, todo.values()))
    if not n_todo:
        return None, 0, report.planned
    reap_orphans(queue)  # a job whose worker died (an earlier run killed) shows as failed: resumable
    latest = next((j for j in queue.list(limit=200) if j.spec == job), None)
    if latest is not None and latest.status in ACTIVE:
        return latest.id, n_todo, report.planned
    if latest is not None and latest.status in ("cancelled", "failed"):
        queue.resume(latest.id)
        return latest.id, n_todo, report.planned
    return queue.submit(job), n_todo, report.planned


def _seconds_per_merge(queue, family: str) -> float | None:
    """The rate of the latest finished job on this family, if any."""
    rates = [j.seconds_per_merge for j in queue.list(limit=50)
             if j.status == "done" and j.spec.family == family and j.seconds_per_merge]
    return rates[0] if rates else None


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _stop(process: subprocess.Popen | None) -> None:
    """SIGTERM `process`, then SIGKILL after STOP_WAIT seconds; reaps it."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_WAIT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def serve_demo(preset: str = "micro", db: Path | None = None, port: int = 8501, host: str = "127.0.0.1",
               progress: bool = True) -> int:
    """`mergelab demo up`: build the demo family if absent, load the shipped results, start the dashboard,
    then queue the default sweep for a worker (started here unless one runs) and print the URL and the
    estimate at once. Runs until the dashboard exits or a stop signal; then stops the dashboard and the
    worker it started (the job in flight ends as cancelled, resumable) and says what was kept. Returns
    the exit code: the dashboard's, or 128 + the signal's number."""
    from mergelab.store import ResultStore
    from mergelab.sweep.jobs import JobQueue
    from mergelab.sweep.worker import start_worker

    with _StopSignals():
        try:
            manifest = ensure_family(preset, progress)
        except DemoStopped as stop:
            return 128 + stop.signum
        store, queue = ResultStore(db), JobQueue()
        server = worker = None
        job_id, queued, code, how = None, False, 0, None
        try:
            added = load_shipped_results(store)
            if added:
                print(f"loaded {added} shipped demo result rows into {store.path}", flush=True)
            started = time.monotonic()
            env = dict(os.environ, **({"MERGELAB_DB": str(store.path)} if db else {}))
            server = subprocess.Popen(dashboard_command(port, host), env=env, stdin=subprocess.DEVNULL)
            url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
            print(f"dashboard: {url} (starting)", flush=True)
            job_id, n_todo, planned = queue_default_sweep(manifest, store, queue)
            queued = True
            if job_id is None:
                print(_plan_line(planned, planned, 0), flush=True)
            else:
                worker = start_worker(queue)  # idle-exits like the page's, should this process be killed
                rate = _seconds_per_merge(queue, str(manifest))
                print(f"{_plan_line(planned, planned - n_todo, n_todo)}: job {job_id}, about "
                      f"{_duration(n_todo * (rate or SECONDS_PER_MERGE_GUESS))}"
                      + ("" if rate else " (a first guess)") + " in the background "
                      + ("worker" if worker else f"worker already running (pid {queue.live_worker()})")
                      + "; progress on the Sweep page", flush=True)
            code = _watch(server, queue, job_id, _health_url(host, port), url, started)
            how = f"the dashboard exited with code {code}"
        except DemoStopped as stop:
            code, how = 128 + stop.signum, stop.how
        finally:
            for sig in STOP_SIGNALS:  # the cleanup runs to its end
                signal.signal(sig, signal.SIG_IGN)
            _stop(server)
            _stop(worker)
        print(_farewell(how, queue, job_id if queued else -1, worker is not None, store), file=sys.stderr, flush=True)
        return code


def _watch(server: subprocess.Popen, queue, job_id: int | None, health: str, url: str, started: float) -> int:
    """Until the dashboard exits: say once when it answers, report the sweep's progress every
    REPORT_EVERY seconds and each time it ends (a job cancelled on the Sweep page may be resumed there).
    Returns the dashboard's exit code."""
    from mergelab.sweep.jobs import FINISHED

    ready, last, status = False, time.monotonic(), None
    while server.poll() is None:
        time.sleep(0.5)
        if not ready and _answers(health):
            ready = True
            print(f"dashboard ready: {url} ({time.monotonic() - started:.0f} s after its start); Ctrl-C stops it "
                  "and the sweep", flush=True)
        if job_id is None:
            continue
        job = queue.get(job_id)
        if job.status in FINISHED and job.status != status:
            print(f"sweep: job {job_id} {job.status}: {job.message}", flush=True)
        elif job.status == "running" and time.monotonic() - last >= REPORT_EVERY:
            last = time.monotonic()
            eta = f", about {_duration(job.eta_seconds)} left" if job.eta_seconds is not None else ""
            print(f"sweep: job {job_id} running: {job.done:,} / {job.total:,} merges{eta}", flush=True)
        status = job.status
    return server.returncode


def _farewell(how: str, queue, job_id: int | None, owned_worker: bool, store) -> str:
    """What `demo up` says as it ends: how, what the sweep kept, and that a rerun resumes it (`job_id`
    None: nothing to sweep; -1: stopped before the sweep was planned)."""
    if job_id == -1:
        return f"{how} before the default sweep was queued; `mergelab demo up` again serves the dashboard and runs it"
    if job_id is None:
        return f"{how}: dashboard stopped; the default sweep is complete"
    job = queue.get(job_id)
    if job.status == "done":
        return f"{how}: dashboard stopped; the default sweep is complete ({job.total:,} merges)"
    if not owned_worker:
        return (f"{how}: dashboard stopped; job {job_id} of the default sweep goes on in the worker that was "
                f"already running ({job.done:,} / {job.total:,} merges so far)")
    return (f"{how}: dashboard and sweep worker stopped; the default sweep (job {job_id}) stopped at "
            f"{job.done:,} of {job.total:,} merges, their rows kept in {store.path}; `mergelab demo up` again "
            "resumes it (cached merges are skipped)")
