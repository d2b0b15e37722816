"""The real Streamlit server driven by Debian's chromium through playwright: every page renders,
selections update charts, a sweep launched from the UI runs to 100%, an export downloads."""

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from mergelab.export import read_provenance
from mergelab.io.family import load_family
from mergelab.store import ResultStore
from mergelab.sweep.plan import SweepSpec
from mergelab.sweep.runner import run_sweep
from tests.helpers import free_port, log_tail, start_logged, wait_for_dashboard

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "artifacts" / "screenshots"
PAGES = {"overview": "", "curves": "Curves", "sweep": "Sweep", "fit_and_plan": "Fit_and_Plan",
         "synergy": "Synergy", "export": "Export"}
pytestmark = pytest.mark.slow


@contextmanager
def dashboard(env: dict, tmp_path: Path, drop=()):
    """A real Streamlit server of app.py with this environment plus `env`, less the variables in `drop`
    (logged to a file); yields (url, process) and stops it after."""
    full = {k: v for k, v in os.environ.items() if k not in drop}
    full.update(env)
    port = free_port()
    proc = start_logged([sys.executable, "-m", "streamlit", "run", ROOT / "app.py", "--server.address", "127.0.0.1",
                         "--server.port", port, "--server.headless", "true"], tmp_path / "streamlit.log",
                        env=full, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    wait_for_dashboard(url, proc)
    try:
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"streamlit did not stop within 30 s of SIGTERM; its output ends: {log_tail(proc)}")


@pytest.fixture
def server(tiny_family, micro_family, tmp_path):
    """A dashboard over a cache holding two families (the tiny one swept under two names); the demo
    micro family sits in the data home so the Sweep page offers it."""
    db = tmp_path / "r.duckdb"
    run_sweep(SweepSpec(load_family(tiny_family), ["s"], {"average": {}, "ties": {}}, [1, 2, 3]), ResultStore(db), progress=False)
    renamed = tiny_family.parent / "other.toml"
    renamed.write_text(tiny_family.read_text().replace('name = "tiny"', 'name = "other"'))
    run_sweep(SweepSpec(load_family(renamed), ["s"], {"average": {}}, [1, 2]), ResultStore(db), progress=False)
    home = tmp_path / "home"
    shutil.copytree(micro_family.parent, home / "demo-micro")
    env = dict(MERGELAB_DB=str(db), MERGELAB_HOME=str(home), MERGELAB_JOBS=str(tmp_path / "jobs.sqlite"),
               MERGELAB_WORKER_IDLE="10")
    with dashboard(env, tmp_path) as (url, proc):
        yield {"url": url, "db": db, "proc": proc}


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    assert os.path.exists(CHROMIUM), "install Debian's chromium: apt-get install -y chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        yield context.new_page()
        browser.close()


def settle(page, timeout=60000):
    """Wait until Streamlit has finished running the script."""
    page.wait_for_selector('[data-testid="stApp"]', timeout=timeout)
    page.wait_for_function("!document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=timeout)
    page.wait_for_timeout(300)


def no_exception(page):
    assert page.locator('[data-testid="stException"]').count() == 0
    assert "Traceback" not in page.inner_text("body")


def shoot(page, name):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_every_page_renders_and_selection_updates_the_chart(server, page):
    for name, path in PAGES.items():
        page.goto(f"{server['url']}/{path}?family=tiny")
        settle(page)
        if name == "fit_and_plan":  # the tiny family's curve rises: no fractional-return chart, only tables
            page.wait_for_selector('[data-testid="stDataFrame"]', timeout=60000)
        elif name != "sweep":
            page.wait_for_selector(".js-plotly-plot", timeout=60000)
        no_exception(page)
        shoot(page, name)
    page.goto(f"{server['url']}/Curves?family=tiny")
    settle(page)
    page.get_by_text("tiny · macro", exact=True).wait_for(timeout=30000)
    page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').nth(1).click()  # Domain
    page.get_by_role("option", name="beta").click()
    page.get_by_text("tiny · beta", exact=True).wait_for(timeout=30000)
    assert "domain=beta" in page.url
    no_exception(page)


def test_launch_a_micro_sweep_watch_it_finish_and_see_the_points(server, page):
    page.goto(f"{server['url']}/Sweep")
    settle(page)
    page.get_by_text("demo-micro · 9 domains", exact=False).wait_for(timeout=30000)
    page.get_by_text("N random per k").click()
    page.get_by_role("button", name="Estimate").click()
    page.get_by_text("to run", exact=False).wait_for(timeout=60000)
    page.get_by_role("button", name="Launch sweep").click()
    page.get_by_text("queued", exact=False).first.wait_for(timeout=60000)
    page.wait_for_function("document.body.innerText.includes('Job 1 · done')", timeout=180000)
    text = page.inner_text("body")
    assert "merges evaluated" in text and "ETA" in text
    shoot(page, "sweep_done")
    rows = ResultStore(server["db"]).results(family="demo-micro")
    assert len(rows) > 0 and set(rows["size"]) == {"xs"}
    page.goto(f"{server['url']}/Curves?family=demo-micro&methods=average&domain=macro")
    settle(page)
    page.get_by_text("demo-micro · macro", exact=True).wait_for(timeout=60000)
    no_exception(page)
    shoot(page, "curves_after_sweep")
    assert "Inotify" not in log_tail(server["proc"], n=10**6)  # the server watches no files while a sweep writes


def test_export_downloads_fits_with_provenance(server, page, tmp_path):
    page.goto(f"{server['url']}/Export?family=tiny")
    settle(page)
    # Keyed widgets carry an st-key-<key> class: pick the fits CSV button itself, not whichever CSV renders first.
    button = page.locator(".st-key-dl-fits-csv button")
    button.wait_for(timeout=60000)
    with page.expect_download() as info:
        button.click()
    path = tmp_path / info.value.suggested_filename
    info.value.save_as(path)
    assert path.name == "tiny_fits.csv"
    assert read_provenance(path)["families"] == ["tiny"]
    body = path.read_text()
    assert "L_inf" in body and "macro" in body and read_provenance(path)["options"]["bootstrap"] == 200
    # the paper table and the chart for a paper are rendered on click (deferred), in the server's threads
    with page.expect_download() as info:
        page.locator(".st-key-dl-paper-latex button").click()
    tex = tmp_path / info.value.suggested_filename
    info.value.save_as(tex)
    text = tex.read_text()
    assert text.isascii() and "\\toprule" in text and "bootstrap off" not in text  # 200 draws asked for:
    assert ("200 draws" in text) != ("No intervals: " in text)  # intervals, or why the tiny family has none
    page.get_by_role("button", name="Download for a paper").last.click()
    button = page.locator(".st-key-dl-chart-pdf button")
    button.wait_for(timeout=30000)
    with page.expect_download(timeout=120000) as info:
        button.click()
    pdf = tmp_path / info.value.suggested_filename
    info.value.save_as(pdf)
    assert pdf.name.endswith("_1col.pdf") and pdf.read_bytes().startswith(b"%PDF") and b"/FontFile" in pdf.read_bytes()


@pytest.fixture
def live_server(tmp_path):
    """A dashboard over a small synthetic cache (one family, one method) and no job queue at all."""
    from tests.helpers import synthetic_results

    db = tmp_path / "r.duckdb"
    ResultStore(db).upsert(synthetic_results({"average": lambda k: 2 + 0.5 / (k + 1)}, ["a", "b", "c"], family="live"))
    env = dict(MERGELAB_DB=str(db), MERGELAB_HOME=str(tmp_path / "home"), MERGELAB_JOBS=str(tmp_path / "jobs.sqlite"))
    with dashboard(env, tmp_path) as (url, proc):
        yield {"url": url, "db": db, "proc": proc}


def test_pages_update_live_without_a_job_and_back_restores_display_settings(live_server, page):
    from tests.helpers import synthetic_results

    # a fresh server whose first visitor opens a page directly (a bookmark): the sidebar still names the
    # first page Overview, not "app" (Streamlit would build the list from the pages/ folder)
    page.goto(f"{live_server['url']}/Curves")
    page.wait_for_function("[...document.querySelectorAll('[data-testid=stSidebarNav] a')].map(e => e.innerText.trim())"
                           ".join('|') === 'Overview|Curves|Sweep|Fit & Plan|Synergy|Export'", timeout=60000)
    page.get_by_text("live · macro", exact=True).wait_for(timeout=60000)
    page.goto(live_server["url"])
    settle(page)
    nav = page.locator('[data-testid="stSidebarNav"] a')
    assert [t.strip() for t in nav.all_inner_texts()] == ["Overview", "Curves", "Sweep", "Fit & Plan", "Synergy", "Export"]
    page.get_by_text("method settings").wait_for()
    metric = page.locator('[data-testid="stMetric"]').nth(2)
    assert metric.locator('[data-testid="stMetricValue"]').inner_text() == "1"
    # rows land while the tab is open and no job has ever run (the queue file does not even exist)
    ResultStore(live_server["db"]).upsert(synthetic_results({"ties": lambda k: 2 + 0.4 / (k + 1)}, ["a", "b", "c"],
                                                            family="live"))
    page.wait_for_function("[...document.querySelectorAll('[data-testid=\"stMetricValue\"]')].map(e => e.innerText)[2] === '2'",
                           timeout=60000)
    no_exception(page)
    # display settings are in the URL; Back undoes a change
    page.goto(f"{live_server['url']}/Curves")
    settle(page)
    page.get_by_text("log k axis").click()
    page.wait_for_function("location.search.includes('logx=1')", timeout=30000)
    settle(page)
    page.go_back()
    page.wait_for_function("location.search.includes('logx=0')", timeout=30000)
    settle(page)
    assert page.url.split("?")[0].endswith("/Curves")
    box = page.locator('[data-testid="stCheckbox"]', has_text="log k axis").locator("input")
    assert not box.is_checked()
    no_exception(page)


def full_height_shot(page, name: str, width: int, timeout: float = 240.0) -> None:
    """Wait until the page's charts, tables and height stop changing and no spinner says it is computing,
    then save the whole page: Streamlit scrolls inside its main container, so the viewport is made as
    tall as the content instead of using full_page."""
    import time

    page.set_viewport_size({"width": width, "height": 1000})
    deadline, stable, last, height = time.monotonic() + timeout, 0, None, 1000
    while stable < 5 and time.monotonic() < deadline:
        page.wait_for_timeout(1000)
        busy = page.evaluate("/Bootstrapping|Fitting…|Computing|Preparing…/.test(document.body.innerText)")
        height = page.evaluate("Math.max(...[...document.querySelectorAll('[data-testid=stMain], section')]"
                               ".map(e => e.scrollHeight))")
        state = (height, page.locator(".js-plotly-plot, [data-testid=stDataFrame]").count())
        stable, last = (0 if busy or state != last else stable + 1), state
    page.set_viewport_size({"width": width, "height": min(int(height) + 40, 12000)})
    page.wait_for_timeout(1500)
    shoot(page, name)
    page.set_viewport_size({"width": width, "height": 1000})


@pytest.fixture
def demo_server(tmp_path):
    """The dashboard as a new user gets it: the default cache, filled with the shipped demo results."""
    home = tmp_path / "home"
    env = dict(MERGELAB_HOME=str(home), MERGELAB_JOBS=str(home / "jobs.sqlite"))
    with dashboard(env, tmp_path, drop=("MERGELAB_DB",)) as (url, _):
        yield url


def test_screenshots_of_every_page_on_the_demo_data(demo_server, page):
    """artifacts/screenshots/demo_<page>_<width>.png at 1440 and 800 px, for a person to look at; each page
    renders without an exception and draws what it should."""
    for width in (1440, 800):
        for name, path in PAGES.items():
            page.goto(f"{demo_server}/{path}")
            settle(page)
            if name not in ("sweep", "export"):
                page.wait_for_selector(".js-plotly-plot", timeout=120000)
            full_height_shot(page, f"demo_{name}_{width}", width)
            no_exception(page)
            assert (ARTIFACTS / f"demo_{name}_{width}.png").stat().st_size > 10_000


def test_upload_an_accuracy_csv_import_it_and_see_its_curve(tmp_path, page):
    """The Import page in a real browser: upload, preview, import, then the accuracy curve on Curves
    (screenshots import_preview.png and curves_accuracy.png)."""
    from tests.test_app_import import accuracy_csv

    src = tmp_path / "acc.csv"
    src.write_bytes(accuracy_csv())
    db = tmp_path / "r.duckdb"
    env = dict(MERGELAB_DB=str(db), MERGELAB_HOME=str(tmp_path / "home"), MERGELAB_JOBS=str(tmp_path / "jobs.sqlite"))
    with dashboard(env, tmp_path) as (url, _):
        page.goto(f"{url}/Import")
        settle(page)
        page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(str(src))
        page.get_by_role("button", name="Import 30 rows").wait_for(timeout=60000)
        page.wait_for_selector(".js-plotly-plot", timeout=60000)
        no_exception(page)
        shoot(page, "import_preview")
        page.get_by_role("button", name="Import 30 rows").click()
        page.get_by_text("Imported 30 rows into acc-fam", exact=False).wait_for(timeout=60000)
        assert len(ResultStore(db).results()) == 30
        page.goto(f"{url}/Curves?family=acc-fam")
        settle(page)
        page.get_by_text("acc-fam · macro", exact=True).wait_for(timeout=60000)
        page.wait_for_selector(".js-plotly-plot", timeout=60000)
        no_exception(page)
        assert "accuracy (fraction)" in page.inner_text(".js-plotly-plot >> nth=0") or \
            page.locator("text=accuracy (fraction)").count() > 0
        shoot(page, "curves_accuracy")
