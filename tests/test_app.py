"""The dashboard entry page with Streamlit's AppTest on a real cache."""

from pathlib import Path

from streamlit.testing.v1 import AppTest

from mergelab.family import load_family
from mergelab.store import ResultStore
from mergelab.sweep import SweepSpec, run_sweep

APP = str(Path(__file__).resolve().parent.parent / "app.py")


def run_app(monkeypatch, db):
    monkeypatch.setenv("MERGELAB_DB", str(db))
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


def test_one_chart_per_method_from_the_cache(monkeypatch, tiny_family, tmp_path):
    db = tmp_path / "r.duckdb"
    run_sweep(SweepSpec(load_family(tiny_family), ["s"], {"average": {}, "dare": {}}, [1, 2, 3]),
              ResultStore(db), progress=False)
    at = run_app(monkeypatch, db)
    charts = at.get("plotly_chart")
    assert len(charts) == 2
    assert "tiny" in at.selectbox[0].options
    assert "merges of tiny on 3 domains" in at.caption[0].value


def test_empty_cache_explains_how_to_get_data(monkeypatch, tmp_path):
    monkeypatch.setattr("mergelab.demo.up.SHIPPED_RESULTS", "demo/absent.parquet")
    at = run_app(monkeypatch, tmp_path / "empty.duckdb")
    assert "mergelab demo up" in at.info[0].value and not at.get("plotly_chart")


def test_corrupt_cache_shows_a_message_not_a_traceback(monkeypatch, tmp_path):
    db = tmp_path / "bad.duckdb"
    db.write_bytes(b"garbage" * 1000)
    at = run_app(monkeypatch, db)
    assert "Cannot read the results cache" in at.error[0].value


def test_first_run_loads_shipped_demo_results(monkeypatch, tmp_path):
    db = tmp_path / "fresh.duckdb"
    at = run_app(monkeypatch, db)
    assert ResultStore(db).count() > 0
    assert at.selectbox[0].value == "demo-standard" and len(at.get("plotly_chart")) == 4
