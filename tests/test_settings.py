"""A curve is (family, size, method, hyperparameters, domain) everywhere: two settings of one method
are never fitted as one curve, and every table, legend and picker names the setting."""

import json

import pytest
from mergelab.analysis.tables import fit_table, merge_losses, plan_table, setting_labels
from mergelab.store import ResultStore
from tests.helpers import serve_cache, synthetic_results
from tests.test_app import run as page
from tests.test_sweep import cli

EXPERTS = [f"e{i}" for i in range(6)]
LOW = json.dumps({"density": 0.2, "lambda": 0.5}, separators=(",", ":"), sort_keys=True)
HIGH = json.dumps({"density": 0.2, "lambda": 1.0}, separators=(",", ":"), sort_keys=True)
# the same method at two settings whose true floors are 2.0 and 3.0: one curve through both would give ~2.5
CURVES = {("ties", LOW): lambda k: 2.0 + 0.5 / (k + 1.0), ("ties", HIGH): lambda k: 3.0 + 0.5 / (k + 1.0),
          ("average", "{}"): lambda k: 2.5 + 0.4 / (k + 1.0)}


@pytest.fixture
def results():
    return synthetic_results(CURVES, EXPERTS, domains=("x",))


def test_labels_name_only_what_differs(results):
    labels = set(setting_labels(results[results["method"] != "base"]))
    assert labels >= {"ties lambda=0.5", "ties lambda=1.0", "average"}


def test_each_setting_is_its_own_curve_in_tables(results):
    fits = fit_table(results, domains=["macro"]).set_index("setting")
    assert fits.loc["ties lambda=0.5", "L_inf"] == pytest.approx(2.0, abs=0.02)
    assert fits.loc["ties lambda=1.0", "L_inf"] == pytest.approx(3.0, abs=0.02)
    assert set(plan_table(results)["setting"]) == {"ties lambda=0.5", "ties lambda=1.0", "average"}
    assert set(merge_losses(results)["setting"]) == {"ties lambda=0.5", "ties lambda=1.0", "average"}


def test_cli_fit_lists_both_settings(results, tmp_path, capsys):
    db = tmp_path / "r.duckdb"
    ResultStore(db).upsert(results)
    code, out, err = cli(capsys, "fit", "--db", db, "--domain", "macro")
    assert code == 0, err
    assert "ties lambda=0.5" in out and "ties lambda=1.0" in out


@pytest.fixture
def page_env(results, tmp_path, monkeypatch):
    serve_cache(results, tmp_path, monkeypatch)


def test_curves_page_fits_one_curve_per_setting(page_env):
    at = page("pages/1_Curves.py", methods="ties lambda=0.5,ties lambda=1.0", domain="x")
    table = at.dataframe[0].value.set_index("setting")
    assert table.loc["ties lambda=0.5", "L∞ (nats/token)"] == pytest.approx(2.0, abs=0.02)
    assert table.loc["ties lambda=1.0", "L∞ (nats/token)"] == pytest.approx(3.0, abs=0.02)


@pytest.mark.parametrize("name", ["app.py", "pages/3_Fit_and_Plan.py", "pages/4_Synergy.py", "pages/5_Export.py"])
def test_every_page_offers_settings_not_methods(page_env, name):
    at = page(name, method="ties lambda=0.5")
    pickers = [s for s in at.selectbox if s.label == "Method"]
    if pickers:
        assert "ties lambda=0.5" in pickers[0].options and "ties" not in pickers[0].options
    if name == "pages/3_Fit_and_Plan.py":
        table = at.dataframe[0].value
        assert list(table["setting"]) == ["ties lambda=0.5"]
        assert table["L∞ (nats/token)"].iloc[0] == pytest.approx(2.0, abs=0.02)


def test_labels_do_not_change_with_the_rows_at_hand():
    """λ = 0.5 lacks rows on domain y: λ = 1.0 keeps its full label there, as in the pickers."""
    rows = synthetic_results(CURVES, EXPERTS, domains=("x", "y"))
    rows = rows[~((rows["hparams"] == LOW) & (rows["domain"] == "y"))]
    assert set(merge_losses(rows, "y")["setting"]) == {"ties lambda=1.0", "average"}
    assert set(merge_losses(rows, "x")["setting"]) == {"ties lambda=0.5", "ties lambda=1.0", "average"}
