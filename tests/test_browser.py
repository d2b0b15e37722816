"""The real Streamlit server driven by Debian's chromium through playwright."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mergelab.family import load_family
from mergelab.store import ResultStore
from mergelab.sweep import SweepSpec, run_sweep

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "artifacts" / "screenshots"
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tiny_family, tmp_path):
    """A dashboard over a cache holding two families (the tiny one swept twice under two names)."""
    db = tmp_path / "r.duckdb"
    family = load_family(tiny_family)
    run_sweep(SweepSpec(family, ["s"], {"average": {}, "ties": {}}, [1, 2, 3]), ResultStore(db), progress=False)
    renamed = tiny_family.parent / "other.toml"
    renamed.write_text(tiny_family.read_text().replace('name = "tiny"', 'name = "other"'))
    run_sweep(SweepSpec(load_family(renamed), ["s"], {"average": {}}, [1, 2]), ResultStore(db), progress=False)
    port = free_port()
    env = dict(os.environ, MERGELAB_DB=str(db))
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.address", "127.0.0.1",
                             "--server.port", str(port), "--server.headless", "true"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail(f"streamlit did not start: {proc.stdout.read().decode()[-2000:]}")
        time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    assert os.path.exists(CHROMIUM), "install Debian's chromium: apt-get install -y chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        yield browser.new_page(viewport={"width": 1400, "height": 1000})
        browser.close()


def test_overview_renders_charts_and_follows_the_family_selection(server, page):
    page.goto(server)
    page.wait_for_selector(".js-plotly-plot", timeout=60000)
    caption = page.get_by_text("merges of", exact=False)
    assert "merges of other" in caption.inner_text()  # families sorted: 'other' first
    assert page.locator(".js-plotly-plot").count() == 1  # 'other' was swept with average only
    assert page.locator('[data-testid="stException"]').count() == 0
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "overview.png"), full_page=True)
    page.locator('[data-testid="stSelectbox"]').click()
    page.get_by_role("option", name="tiny").click()
    page.wait_for_function("document.body.innerText.includes('merges of tiny')", timeout=30000)
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length == 2", timeout=30000)
    page.get_by_text("ties", exact=True).wait_for(timeout=30000)  # the second method's chart title
    assert "Traceback" not in page.inner_text("body")
    page.screenshot(path=str(ARTIFACTS / "overview_tiny.png"), full_page=True)
