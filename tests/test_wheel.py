"""A built wheel carries the data and the UI: installed from it (not editable) into a fresh venv outside
the repository, `mergelab.analysis.reference`, `mergelab demo up` (with and without the dashboard) and
`mergelab fit` work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.helpers import free_port, start_logged, wait_for_dashboard

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
SKIP = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "artifacts", "__pycache__", "*.egg-info", "*.duckdb*")


def run(cmd, **kw):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python, mergelab script, environment, working folder) of a fresh venv with the wheel installed."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    shutil.copytree(ROOT, source, ignore=SKIP)  # a clean tree: no stale build/ can leak into the wheel
    run([sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist"])
    [wheel] = (tmp / "dist").glob("mergelab-*.whl")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # the dependencies (torch, streamlit, …) come from this interpreter's environment, mergelab only from the wheel
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "zz_mergelab_test_deps.pth").write_text("\n".join(deps) + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MERGELAB_DB", "MERGELAB_PAPER_DIR")}
    env.update(MERGELAB_HOME=str(tmp / "home"), MERGELAB_JOBS=str(tmp / "jobs.sqlite"), HF_HUB_OFFLINE="1")
    work = tmp / "elsewhere"
    work.mkdir()
    return wheel, python, venv / "bin" / "mergelab", env, work


def test_the_wheel_carries_app_pages_data_and_config(installed):
    wheel = installed[0]
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = "mergelab/_shipped/"
    for rel in ["app.py", "pages/1_Curves.py", "pages/5_Export.py", ".streamlit/config.toml",
                "data/paper/joint_fits_tables_3_4_5.csv", "data/demo/results.parquet"]:
        assert shipped + rel in names, rel
    assert "mergelab/analysis/fit.py" in names and "mergelab/sweep/runner.py" in names
    assert not any(n.startswith("mergelab/") and n.endswith("/sweep.py") for n in names)


def test_reference_and_app_resolve_from_the_installed_package(installed):
    _, python, _, env, work = installed
    code = ("import mergelab, mergelab.paths as p; from mergelab.analysis import reference as r; "
            "print(mergelab.__file__); print(p.app_path()); print(r.law_loss('average', 'macro', 7, 4))")
    out = run([python, "-c", code], env=env, cwd=work).stdout.splitlines()
    assert "site-packages" in out[0] and str(ROOT) not in out[0]
    assert out[1].endswith("mergelab/_shipped/app.py") and "site-packages" in out[1]
    assert 0 < float(out[2]) < 5


def test_demo_up_and_fit_from_the_wheel(installed):
    _, python, mergelab, env, work = installed
    db = work / "results.duckdb"
    out = run([mergelab, "demo", "up", "--no-ui", "--db", db], env=env, cwd=work).stdout
    assert "loaded" in out and "shipped demo result rows" in out  # the shipped results came with the wheel
    fits = json.loads(run([mergelab, "fit", "--db", db, "--family", "demo-micro", "--method", "average",
                           "--domain", "macro", "--format", "json"], env=env, cwd=work).stdout)
    assert len(fits["rows"]) == 2 and all(row["A"] > 0 for row in fits["rows"])  # sizes xs and s
    port = free_port()
    server = start_logged([mergelab, "demo", "up", "--db", db, "--port", port], work / "demo-up.log", env=env, cwd=work,
                          start_new_session=True)
    try:
        wait_for_dashboard(f"http://127.0.0.1:{port}", server, timeout=90)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    # the app script itself, and its pages, run from the installed copy against the cache demo up filled
    check = ("from streamlit.testing.v1 import AppTest; from mergelab.paths import app_path; "
             "at = AppTest.from_file(str(app_path()), default_timeout=120).run(); "
             "assert not at.exception, at.exception; print(len(at.get('plotly_chart')))")
    assert int(run([python, "-c", check], env=dict(env, MERGELAB_DB=str(db)), cwd=work).stdout.strip()) >= 1
