"""A reader process for the concurrency tests: `python -m tests.reliability.readers KIND DB STOPFILE`.

KIND is `store` (ResultStore queries, as the CLI and exports do) or `dashboard` (the Overview and Curves
pages run by Streamlit's AppTest, as a browser would). It reads until STOPFILE exists, then prints a JSON
line with how many reads it made and every error a user would have seen."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def store_reads(db: str):
    from mergelab.store import ResultStore

    store = ResultStore(db)

    def read():
        store.results()
        store.macro(method="average")
        return []
    return read


def dashboard_reads(db: str):
    from streamlit.testing.v1 import AppTest

    os.environ["MERGELAB_DB"] = db

    def read():
        errors = []
        for script in ("app.py", "pages/1_Curves.py"):
            app = AppTest.from_file(str(ROOT / script), default_timeout=120).run()
            errors += [e.value for e in app.exception] + [e.value for e in app.error if "launch a sweep" not in e.value]
        return errors
    return read


def main(kind: str, db: str, stop: str) -> None:
    read = {"store": store_reads, "dashboard": dashboard_reads}[kind](db)
    reads, errors = 0, []
    give_up = time.monotonic() + 900  # never outlive a test that died without touching STOPFILE
    while not Path(stop).exists() and Path(stop).parent.exists() and time.monotonic() < give_up:
        try:
            errors += read()
        except Exception as exc:  # noqa: BLE001 - anything escaping a read is what a user would see
            errors.append(f"{type(exc).__name__}: {exc}")
        reads += 1
        time.sleep(0.01)
    print(json.dumps({"kind": kind, "reads": reads, "errors": [str(e) for e in errors]}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
