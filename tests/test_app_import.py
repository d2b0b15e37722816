"""The Import page (AppTest): upload, preview of the mapped rows and of what will be written, the import, then an
accuracy curve drawn in accuracy's own sign on the Curves page."""

import pytest

from mergelab.store import ResultStore
from tests.test_app import run
from tests.test_app_states import values


def accuracy_csv() -> bytes:
    """An accuracy that rises with k toward 0.8: acc(k) = 0.8 − 0.3/(k + 0.5), two domains, every subset of 4."""
    import itertools

    lines = ["family,size,method,experts,domain,accuracy"]
    for k in range(1, 5):
        for subset in itertools.combinations("abcd", k):
            for d, domain in enumerate(("arc", "piqa")):
                value = 0.8 - 0.3 / (k + 0.5) + 0.01 * (ord(subset[0]) - 97) - 0.02 * d
                lines.append(f"acc-fam,7B,average,{'+'.join(subset)},{domain},{value:.4f}")
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    db = tmp_path / "r.duckdb"
    monkeypatch.setenv("MERGELAB_DB", str(db))
    monkeypatch.setenv("MERGELAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MERGELAB_JOBS", str(tmp_path / "jobs.sqlite"))
    return db


def test_upload_preview_import_then_an_accuracy_curve(empty_cache):
    at = run("pages/6_Import.py")
    assert at.info and "Upload one or more files" in at.info[0].value
    at.file_uploader(key="import-files").set_value(("acc.csv", accuracy_csv(), "text/csv")).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    preview, summary = at.dataframe[0].value, at.dataframe[1].value
    # user-facing columns only, the metric and its unit in the value's header (no experts_key, n_tokens, "{}")
    assert len(preview) == 2 * 15 and list(preview.columns) == ["size", "method", "experts", "k", "domain",
                                                                "accuracy (fraction)"]
    assert preview["experts"].iat[-1] == "a + b + c + d"
    assert summary.to_dict("records") == [{"family": "acc-fam", "size": "7B", "method": "average", "metric": "accuracy",
                                           "merges": 15, "domains": 2, "k_min": 1, "k_max": 4, "rows": 30}]
    assert not ResultStore(empty_cache).exists()  # a preview writes nothing
    chart = at.get("plotly_chart")[0].proto.spec
    assert "accuracy (fraction)" in chart
    at.button(key="import-go").click().run()
    assert not at.exception and "Imported 30 rows into acc-fam" in at.success[0].value
    rows = ResultStore(empty_cache).results()
    assert len(rows) == 30 and rows["eval_hash"].str.startswith("import:acc.csv:").all()

    curves = run("pages/1_Curves.py", family="acc-fam")
    import json

    fig = json.loads(curves.get("plotly_chart")[0].proto.spec)
    assert fig["layout"]["yaxis"]["title"]["text"] == "accuracy (fraction)"
    table = curves.dataframe[0].value
    ceiling = table["ceiling C (fraction)"].iloc[0]
    assert 0.75 < ceiling < 0.85  # the ceiling in accuracy's own sign, not −0.8
    ys = [y for trace in fig["data"] if "markers" in str(trace.get("mode")) and trace.get("y") is not None
          for y in values(trace["y"])]
    assert ys and min(ys) > 0  # points drawn as accuracies
    charts = {c.proto.spec and json.loads(c.proto.spec)["layout"]["title"]["text"]: json.loads(c.proto.spec)
              for c in curves.get("plotly_chart")}
    variance = next(f for t, f in charts.items() if t.startswith("Variance"))
    assert variance["layout"]["yaxis"]["title"]["text"] == "variance of accuracy (fraction²)"
    sizes = next(f for t, f in charts.items() if "vs model size" in t)  # one size: one point, its range around it
    low, high = sizes["layout"]["yaxis"]["range"]
    assert 0 < low < values(sizes["data"][0]["y"])[0] < high < 1
    assert curves.radio(key="w:y").value == "accuracy" and curves.query_params["y"] == "accuracy"  # not y=cross-entropy
    paper = run("pages/1_Curves.py", family="acc-fam", paper="1")  # the paper's overlay ticked: nothing to draw, and why
    assert any("The paper's overlay is not drawn" in c.value and "cross-entropy laws" in c.value for c in paper.caption)
    assert not any(str(t.get("name", "")).startswith("paper ")
                   for t in json.loads(paper.get("plotly_chart")[0].proto.spec)["data"])

    plan = run("pages/3_Fit_and_Plan.py", family="acc-fam")
    target = plan.number_input[0]
    assert target.label == "target accuracy (fraction)" and 0.5 < target.value < 0.8  # in accuracy's own values
    assert not any("No ceiling-based planning" in w.value for w in plan.warning)  # it rises: a ceiling to plan for
    assert "ceiling C (fraction)" in plan.dataframe[0].value.columns
    forecast = plan.dataframe[1].value  # the 3-point forecast: accuracies, not their negatives; no nats
    assert (forecast["observed mean accuracy (fraction)"] > 0).all() and (forecast["predicted (fraction)"] > 0).all()
    assert "error (fraction)" in forecast and not any("nats" in c for c in forecast.columns)
    synergy = run("pages/4_Synergy.py", family="acc-fam")
    assert "accuracy gain (fraction)" in synergy.get("plotly_chart")[0].proto.spec
    overview = run("app.py", family="acc-fam")
    said = " ".join(c.value for c in overview.caption)
    assert "Accuracy (fraction, higher is better)" in said and "fitted C − A/(k+b), dashed lines the ceilings" in said
    assert "floors" not in said.split("Accuracy (fraction")[1]
    exported = run("pages/5_Export.py", family="acc-fam")
    assert any("metric: accuracy (fraction, higher is better)" in c.value for c in exported.caption)
    assert not any("CE in nats" in c.value for c in exported.caption)
    heat = json.loads(synergy.get("plotly_chart")[0].proto.spec)
    assert heat["data"][0]["colorbar"]["title"]["text"] == "fraction"  # not nats
    captions = " ".join(c.value for c in synergy.caption[1:])  # after the page's header, which names both kinds
    assert "each expert raises the accuracy of the other domains" in captions and "CE" not in captions


def test_a_bad_upload_names_line_and_column_and_writes_nothing(empty_cache):
    at = run("pages/6_Import.py")
    bad = b"family,experts,domain,ce\nf,a,x,2.5\nf,a+b,x,two\n"
    at.file_uploader(key="import-files").set_value(("bad.csv", bad, "text/csv")).run()
    assert not at.exception
    assert "bad.csv line 3, column 'ce': 'two' is not a finite number" in at.error[0].value
    assert not at.button and not ResultStore(empty_cache).exists()


def test_uploads_over_the_limit_are_refused(empty_cache, monkeypatch):
    monkeypatch.setenv("MERGELAB_UPLOAD_MB", "0.00001")
    at = run("pages/6_Import.py")
    at.file_uploader(key="import-files").set_value(("acc.csv", accuracy_csv(), "text/csv")).run()
    assert "acc.csv: larger than 1e-05 MB" in at.error[0].value and not at.dataframe


def test_a_pickle_is_never_unpickled(empty_cache, tmp_path):
    import pickle

    flag = tmp_path / "ran"
    payload = pickle.dumps(type("X", (), {"__reduce__": lambda self: (flag.touch, ())})())
    at = run("pages/6_Import.py")
    at.file_uploader(key="import-files").set_value(("rows.json", payload, "application/json")).run()
    assert not at.exception and at.error and not flag.exists()
