"""Every dashboard page with Streamlit's AppTest on a real cache: logic paths, empty and error states."""

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from mergelab.io.family import load_family
from mergelab.store import ResultStore
from mergelab.sweep.plan import SweepSpec
from mergelab.sweep.runner import run_sweep

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["app.py", "pages/1_Curves.py", "pages/2_Sweep.py", "pages/3_Fit_and_Plan.py", "pages/4_Synergy.py",
         "pages/5_Export.py"]


@pytest.fixture
def env(monkeypatch, tiny_family, tmp_path):
    """A cache with the tiny family swept (average, ties, dare over k = 1..3), a private job queue and home."""
    db = tmp_path / "r.duckdb"
    run_sweep(SweepSpec(load_family(tiny_family), ["s"], {"average": {}, "ties": {}, "dare": {}}, [1, 2, 3]),
              ResultStore(db), progress=False)
    monkeypatch.setenv("MERGELAB_DB", str(db))
    monkeypatch.setenv("MERGELAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MERGELAB_ROOTS", str(tiny_family.parent))
    monkeypatch.setenv("MERGELAB_JOBS", str(tmp_path / "jobs.sqlite"))
    return tiny_family


def run(page, **query):
    at = AppTest.from_file(str(ROOT / page), default_timeout=120)
    for key, value in query.items():
        at.query_params[key] = value
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def captions(at):
    return " ".join(c.value for c in at.caption)


def test_overview_headline_chart_with_every_method(env):
    at = run("app.py")
    assert len(at.get("plotly_chart")) == 1
    assert at.selectbox[0].value == "tiny"
    assert "merges of tiny on 3 domains" in captions(at)
    assert [m.value for m in at.metric][3] == "21"  # 3 methods × 7 subsets


def test_curves_refit_on_selection_and_remember_it(env):
    at = run("pages/1_Curves.py")
    assert len(at.get("plotly_chart")) >= 3 and at.dataframe
    at.multiselect(key="w:methods").set_value(["average", "ties"]).run()
    assert not at.exception
    table = at.dataframe[0].value
    assert set(table["setting"]) == {"average", "ties"}
    at.selectbox(key="w:domain").set_value("beta").run()
    assert at.query_params["domain"] == "beta" and at.query_params["methods"] == "average,ties"
    assert at.session_state["sel:domain"] == "beta"


def test_curves_page_reads_selection_from_the_url(env):
    at = run("pages/1_Curves.py", methods="dare", domain="gamma")
    assert at.multiselect(key="w:methods").value == ["dare"] and at.selectbox(key="w:domain").value == "gamma"


def test_fit_and_plan_shows_parameters_validation_and_planner(env):
    at = run("pages/3_Fit_and_Plan.py")
    headers = [h.value for h in at.subheader]
    assert headers == ["Parameters per size", "Held-out validation", "Plan"]
    # the tiny family's random experts make the loss rise with k: no floor, so no ε or stop-rule answers
    assert any("No floor-based planning" in w.value for w in at.warning)
    assert {m.label for m in at.metric} == {"experts needed, k"}
    assert "the curve does not fall, so it has no floor" in captions(at)
    assert any("needs k = 1, 2 and 4" in i.value for i in at.info)  # k only goes to 3 here: said, not crashed


def test_synergy_heatmap_and_tables(env):
    at = run("pages/4_Synergy.py")
    assert len(at.get("plotly_chart")) == 4
    # alpha, beta, gamma are in none of the math / science / code blocks: said, not a table of blanks
    assert not at.dataframe and "none of this family's domains is in the math / science / code blocks" in captions(at)


def test_export_offers_every_download(env):
    at = run("pages/5_Export.py")
    labels = [b.label for b in at.get("download_button")]
    assert labels.count("CSV") == 6 and "PARQUET" in labels and labels.count("LATEX") == 4 and "HTML (interactive)" in labels
    assert [h.value for h in at.subheader][0].startswith("Paper table")  # LaTeX + CSV, intervals on by default
    assert at.select_slider[0].value == 200 and {"PNG", "PDF", "SVG"} <= set(labels)


@pytest.mark.parametrize("page, charts", [("app.py", 1), ("pages/1_Curves.py", 3), ("pages/4_Synergy.py", 2)])
def test_pages_offer_their_charts_for_a_paper(env, page, charts, monkeypatch):
    labels = [b.label for b in run(page).get("download_button")]
    assert [labels.count(f) for f in ("PNG", "PDF", "SVG")] == [charts] * 3
    monkeypatch.setenv("BROWSER_PATH", "/nonexistent/chrome")  # no browser: say what to install, offer nothing broken
    at = run(page)
    assert "PNG" not in [b.label for b in at.get("download_button")]
    assert "apt-get install chromium" in captions(at)


def test_sweep_form_estimates_before_launch(env):
    at = run("pages/2_Sweep.py")
    at.selectbox(key="sweep-family").set_value("other path…").run()
    at.text_input[0].input(str(env)).run()
    assert "tiny" in at.markdown[0].value or any("tiny" in m.value for m in at.markdown)
    at.button[0].click().run()  # Estimate
    assert not at.exception
    assert any("already cached" in i.value and "to run" in i.value for i in at.info), [i.value for i in at.info]
    assert any(c.value.startswith("Memory plan: size ") for c in at.caption), [c.value for c in at.caption]


def test_sweep_form_lists_every_method_with_its_defaults_and_takes_weights(env):
    """Every registered method (issue 17's included) has its settings with the pinned defaults and says
    whether it is incremental; per-expert weights and filters from the form reach the plan (a weight for
    an expert the family lacks is refused with its name)."""
    from mergelab.engine.methods import METHODS

    at = run("pages/2_Sweep.py")
    at.selectbox(key="sweep-family").set_value("other path…").run()
    at.text_input[0].input(str(env)).run()
    labels = [e.label for e in at.expander]
    assert labels == [f"{name} settings" for name in METHODS]
    for name, method in METHODS.items():
        for pname, p in method.params.items():
            widget = at.checkbox(key=f"hp-{name}-{pname}") if p.kind is bool else at.number_input(key=f"hp-{name}-{pname}")
            assert widget.value == p.default, (name, pname)
    text = captions(at)
    assert "not incremental: combined per subset (whole tensors)" in text and "incremental: linear" in text
    at.multiselect[1].set_value(["breadcrumbs", "tsv_m"])
    at.text_input(key="hp-weights").input("alpha:2,omega:3")
    at.button[0].click().run()  # Estimate
    assert any("breadcrumbs.weights names expert 'omega', which is not an expert of size 's'" in e.value for e in at.error)
    at.text_input(key="hp-weights").input("alpha:2")
    at.text_input(key="hp-exclude").input("*embed_tokens*")
    at.button[0].click().run()
    assert not at.error and any("to run" in i.value for i in at.info)


def test_sweep_refuses_paths_outside_the_allowed_folders(env, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere")
    (outside / "family.toml").write_text(env.read_text())
    home = Path(env.parent / "home")
    home.mkdir(exist_ok=True)
    (home / "link").symlink_to(outside, target_is_directory=True)
    at = run("pages/2_Sweep.py")
    at.selectbox(key="sweep-family").set_value("other path…").run()
    for path in (outside / "family.toml", env.parent / ".." / outside.name / "family.toml", home / "link" / "family.toml"):
        at.text_input[0].input(str(path)).run()
        assert not at.exception
        assert any("outside the allowed folders" in e.value for e in at.error), path
    at.text_input[0].input(str(env)).run()
    assert not at.error


def test_empty_cache_explains_how_to_get_data(monkeypatch, tmp_path):
    monkeypatch.setattr("mergelab.demo.up.SHIPPED_RESULTS", "demo/absent.parquet")
    monkeypatch.setenv("MERGELAB_DB", str(tmp_path / "empty.duckdb"))
    monkeypatch.setenv("MERGELAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MERGELAB_JOBS", str(tmp_path / "jobs.sqlite"))
    for page in PAGES:
        at = run(page)
        text = " ".join(i.value for i in at.info)
        assert "mergelab demo up" in text or "No family yet" in text, page


def test_corrupt_cache_shows_a_message_not_a_traceback(monkeypatch, tmp_path):
    db = tmp_path / "bad.duckdb"
    db.write_bytes(b"garbage" * 1000)
    monkeypatch.setenv("MERGELAB_DB", str(db))
    for page in ["app.py", "pages/1_Curves.py", "pages/4_Synergy.py"]:
        at = run(page)
        assert "Cannot read the results cache" in at.error[0].value


def test_first_run_loads_shipped_demo_results(monkeypatch, tmp_path):
    monkeypatch.delenv("MERGELAB_DB", raising=False)  # the default cache, in a fresh data home
    monkeypatch.setenv("MERGELAB_HOME", str(tmp_path / "home"))
    db = tmp_path / "home" / "results.duckdb"
    at = run("app.py")
    assert ResultStore(db).count() > 0
    assert at.selectbox[0].value == "demo-standard" and len(at.get("plotly_chart")) == 1
    assert at.selectbox(key="w:size").value == "xl"  # the largest size by default


def test_curves_show_the_new_methods_and_weighted_settings(monkeypatch, tiny_family, tmp_path):
    """Issue 17's methods, swept with and without per-expert weights, are curves on the Curves page,
    each setting labelled by what tells it apart."""
    db = tmp_path / "new.duckdb"
    spec = SweepSpec(load_family(tiny_family), ["s"], {"breadcrumbs": {}, "tsv_m": {}, "model_stock": {}}, [1, 2, 3])
    run_sweep(spec, ResultStore(db), progress=False)
    spec = SweepSpec(load_family(tiny_family), ["s"], {"breadcrumbs": {"weights": "alpha:2"}}, [1, 2, 3],
                     reference_rows=False)
    run_sweep(spec, ResultStore(db), progress=False)
    monkeypatch.setenv("MERGELAB_DB", str(db))
    monkeypatch.setenv("MERGELAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MERGELAB_JOBS", str(tmp_path / "jobs.sqlite"))
    at = run("pages/1_Curves.py")
    wanted = {"breadcrumbs", 'breadcrumbs weights="alpha:2.0"', "tsv_m", "model_stock"}
    assert set(at.multiselect(key="w:methods").options) == wanted  # settings: an absent option is not 'null'
    at.multiselect(key="w:methods").set_value(sorted(wanted)).run()
    assert not at.exception and len(at.get("plotly_chart")) >= 3
    assert set(at.dataframe[0].value["setting"]) == wanted
