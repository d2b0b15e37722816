"""How fast the dashboard opens on the shipped demo data, in Debian's chromium via playwright:
time to the title, to the metrics and to the first drawn chart, for a first and a second visit, on
the overview and the Curves page. Also the server-side script time of a warm rerun (AppTest).

    python bench/ui_open.py
"""

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    from playwright.sync_api import sync_playwright
    from streamlit.testing.v1 import AppTest

    home = Path(tempfile.mkdtemp())
    env = dict(os.environ, MERGELAB_HOME=str(home))  # the default cache there: seeded with the shipped rows
    env.pop("MERGELAB_DB", None)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port", str(port),
                               "--server.headless", "true"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                if urllib.request.urlopen(url + "/_stcore/health", timeout=1).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.2)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            for label, path in [("overview, first visit (loads the shipped rows)", ""), ("overview, second visit", ""),
                                ("Curves page", "/Curves")]:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                start = time.perf_counter()
                page.goto(url + path)
                page.wait_for_selector("h1", timeout=60000)
                title = time.perf_counter() - start
                page.wait_for_function("document.querySelector('.js-plotly-plot .main-svg')", timeout=60000)
                print(f"{label}: title {title:.2f} s, first chart drawn {time.perf_counter() - start:.2f} s")
                page.close()
            browser.close()
    finally:
        server.terminate()
    os.environ.update(env)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    start = time.perf_counter()
    at.run()
    print(f"server-side overview script, warm rerun: {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
