"""Every page renders for every state the cache can be in (empty, one k, one size, one expert, rising
curves, NaN columns, only reference rows, only stale rows), and the selections, display settings and live
refresh behave as a user expects: a family switch falls back to that family's defaults, the URL carries
display settings and Back/Forward restore them, new methods and sizes appear as they land."""

from __future__ import annotations

import ast
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mergelab.store import ResultStore
from mergelab.sweep.jobs import JobQueue
from mergelab.sweep.plan import SweepJob
from tests.helpers import build_tiny_family, serve_cache, synthetic_results
from tests.test_app import PAGES, ROOT, env, run  # noqa: F401 - env: the tiny family swept, as a fixture

FALLING = lambda k: 2.0 + 0.5 / (k + 1.0)  # noqa: E731
RISING = lambda k: 2.0 + 0.05 * k  # noqa: E731
E3 = ["a", "b", "c"]


def two_sizes(**kwargs) -> pd.DataFrame:
    return pd.concat([synthetic_results({"average": FALLING}, E3, size="s", n_params=19_224, **kwargs),
                      synthetic_results({"average": FALLING}, E3, size="m", n_params=625_000, **kwargs)])


def stale_only(db: Path) -> None:
    store = ResultStore(db)
    store.upsert(synthetic_results({"average": FALLING}, E3))
    # a sweep recorded other inputs since: every cached row was computed from a base that is gone
    store.record_inputs("syn", "s", "another-base", {e: "fp" for e in E3}, {"x": "hx", "y": "hy"}, 1)


STATES = {
    "empty": lambda: synthetic_results({"average": FALLING}, E3).iloc[:0],
    "one k": lambda: two_sizes(ks=[1]),  # the first seconds of a sweep, or `mergelab sweep --k 1`
    "one size": lambda: synthetic_results({"average": FALLING, "ties": FALLING}, E3),
    "one expert": lambda: synthetic_results({"average": FALLING}, ["a"]),
    "rising": lambda: synthetic_results({"average": RISING}, ["a", "b", "c", "d"]),
    "NaN columns": lambda: two_sizes().assign(n_truncated=np.nan, device=None),
    "only reference rows": lambda: (lambda r: r[r["method"].isin(["base", "expert"])])(two_sizes()),
    "only stale rows": stale_only,
}

# What each page must say (a substring of its messages and captions) or draw ("chart") in each state.
EXPECT = {
    ("empty", "app.py"): "The results cache is empty",
    ("only reference rows", "app.py"): "only its base and single experts",
    ("only stale rows", "app.py"): "are stale and shown nowhere",
    ("one k", "pages/3_Fit_and_Plan.py"): "cannot be fitted yet",
    ("one expert", "pages/3_Fit_and_Plan.py"): "cannot be fitted yet",
    ("one k", "pages/4_Synergy.py"): "Synergy needs merges that differ by one expert",
    ("one expert", "pages/4_Synergy.py"): "Synergy needs merges that differ by one expert",
    ("rising", "pages/3_Fit_and_Plan.py"): "No floor-based planning",
    ("one k", "pages/1_Curves.py"): "chart",
    ("rising", "pages/1_Curves.py"): "chart",
}
for page in PAGES[1:]:
    EXPECT.setdefault(("empty", page), "No family yet" if "Sweep" in page else "mergelab demo up")
    if "Sweep" not in page:
        EXPECT[("only reference rows", page)] = "No merges for syn yet"
        EXPECT[("only stale rows", page)] = "are stale and shown nowhere"


def values(array) -> list:
    """A plotly JSON array as a list (plotly ≥ 6 writes numeric arrays as base64 'bdata')."""
    import base64

    if isinstance(array, dict) and "bdata" in array:
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"]).tolist()
    return list(array)


def shown(at) -> str:
    parts = [e.value for kind in ("info", "warning", "error", "caption", "markdown", "success") for e in getattr(at, kind)]
    return " ".join(parts)


@pytest.fixture
def state_cache(request, tmp_path, monkeypatch):
    build = STATES[request.param]
    if request.param == "only stale rows":
        db = serve_cache(synthetic_results({"average": FALLING}, E3).iloc[:0], tmp_path, monkeypatch)
        build(db)
    else:
        serve_cache(build(), tmp_path, monkeypatch)
    return request.param


@pytest.mark.parametrize("page", PAGES)
@pytest.mark.parametrize("state_cache", list(STATES), indirect=True)
def test_every_page_renders_in_every_cache_state(state_cache, page):
    at = run(page)  # asserts no exception
    expected = EXPECT.get((state_cache, page))
    if expected == "chart":
        assert at.get("plotly_chart"), (state_cache, page)
    elif expected:
        assert expected in shown(at), (state_cache, page, shown(at)[:500])
    else:  # a chart or a message, never a blank page
        assert at.get("plotly_chart") or at.info or at.warning or at.error, (state_cache, page)
    if "Sweep" in page:
        assert "Jobs" in [h.value for h in at.subheader]


def test_stale_rows_are_listed_when_nothing_else_is_current(tmp_path, monkeypatch):
    db = serve_cache(synthetic_results({"average": FALLING}, E3).iloc[:0], tmp_path, monkeypatch)
    stale_only(db)
    at = run("pages/1_Curves.py")
    table = at.dataframe[0].value
    assert set(table["why stale"]) == {"cached before fingerprints (`mergelab adopt` if its checkpoints are unchanged)"}
    assert table["rows"].sum() == len(synthetic_results({"average": FALLING}, E3))
    assert "The results cache is empty" not in shown(run("app.py"))


def test_curves_with_only_k_1_has_no_k_slider_and_says_why_no_fit(tmp_path, monkeypatch):
    serve_cache(two_sizes(ks=[1]), tmp_path, monkeypatch)
    at = run("pages/1_Curves.py")
    assert not [s for s in at.select_slider if s.label == "k for the size panel"]
    notes = " ".join(at.dataframe[0].value["note"])
    assert "need at least 3 distinct k" in notes


def test_sweep_page_with_one_expert_per_size(tmp_path, monkeypatch):
    family = build_tiny_family(tmp_path / "home" / "one", domains=("alpha",))
    serve_cache(synthetic_results({"average": FALLING}, E3).iloc[:0], tmp_path, monkeypatch)
    monkeypatch.setenv("MERGELAB_ROOTS", str(tmp_path))
    at = run("pages/2_Sweep.py")
    assert at.selectbox(key="sweep-family").value == str(family)
    assert "**tiny** · 1 domain · 1 expert per size" in shown(at)
    assert not at.slider and "k = 1: one expert per size" in shown(at)
    next(b for b in at.button if b.label == "Estimate").click().run()
    assert not at.exception and any("to run" in i.value for i in at.info)


def test_sweep_jobs_stay_listed_when_the_family_field_is_invalid(env):  # noqa: F811
    JobQueue().submit(SweepJob(str(env), {"average": {}}, device="cpu"))
    at = run("pages/2_Sweep.py")
    at.selectbox(key="sweep-family").set_value("other path…").run()
    for bad in ("/nonexistent/family.toml", str(env.parent / "nope.toml")):
        at.text_input[0].input(bad).run()
        assert not at.exception and at.error
        assert any(m.value.startswith("**Job 1**") for m in at.markdown), bad
    at.text_input[0].input("").run()
    assert any(m.value.startswith("**Job 1**") for m in at.markdown) and "No family yet" in shown(at)


def test_no_widget_label_has_doubled_brackets(env):  # noqa: F811
    at = run("pages/2_Sweep.py")
    at.selectbox(key="sweep-family").set_value("other path…").run()
    at.text_input[0].input(str(env)).run()
    labels = [w.label for kind in ("number_input", "checkbox", "selectbox", "multiselect", "slider", "text_input")
              for w in getattr(at, kind)]
    assert "density ∈ (0.0, 1.0]" in labels and "p ∈ [0.0, 1.0)" in labels
    assert not [label for label in labels if re.search(r"[(\[]\s*[(\[]|[)\]]\s*[)\]]", label)], labels


# -- selections and display settings -----------------------------------------------------------------


@pytest.fixture
def two_families(tmp_path, monkeypatch):
    rows = pd.concat([synthetic_results({"average": FALLING}, E3, family="fa", size="s", n_params=19_224),
                      synthetic_results({"average": FALLING}, E3, family="fa", size="m", n_params=625_000),
                      synthetic_results({"ties": FALLING}, E3, family="fb", size="xs", n_params=7_376),
                      synthetic_results({"ties": FALLING}, E3, family="fb", size="xl", n_params=1_500_000_000)])
    return serve_cache(rows, tmp_path, monkeypatch)


def test_family_switch_falls_back_to_the_new_familys_defaults(two_families):
    at = run("pages/1_Curves.py", family="fa")
    assert at.multiselect(key="w:sizes").value == ["s", "m"] and at.multiselect(key="w:methods").value == ["average"]
    at.selectbox(key="w:family").set_value("fb").run()
    assert not at.exception and "Pick at least one" not in shown(at)
    assert at.multiselect(key="w:sizes").value == ["xs", "xl"] and at.multiselect(key="w:methods").value == ["ties"]
    assert at.query_params["sizes"] == "xs,xl" and at.query_params["methods"] == "ties"
    at.selectbox(key="w:family").set_value("fa").run()
    assert at.multiselect(key="w:sizes").value == ["s", "m"]


def test_a_chosen_subset_survives_while_the_options_hold_it(two_families):
    at = run("pages/1_Curves.py", family="fa")
    at.multiselect(key="w:sizes").set_value(["m"]).run()
    at.selectbox(key="w:domain").set_value("x").run()
    assert at.multiselect(key="w:sizes").value == ["m"]
    at.multiselect(key="w:sizes").set_value([]).run()  # emptied by the user: stays empty, the page says what to do
    assert at.multiselect(key="w:sizes").value == [] and "Pick at least one method and one size" in shown(at)


def test_size_labels_use_si_parameter_counts(two_families):
    at = run("pages/1_Curves.py", family="fb")
    assert at.multiselect(key="w:sizes").options == ["xs (7.38K params)", "xl (1.5B params)"]  # as displayed
    size_panel = json.loads(at.get("plotly_chart")[-1].proto.spec)["layout"]
    assert size_panel["xaxis"]["ticktext"] == ["7.38K", "1.5B"] and "billions" not in json.dumps(size_panel)


def test_display_settings_live_in_the_url_and_back_restores_them(two_families):
    at = run("pages/1_Curves.py", family="fa")
    assert at.checkbox(key="w:logx").value is False
    at.checkbox(key="w:logx").check().run()
    at.radio(key="w:y").set_value("L(k) / L(1)").run()
    assert at.query_params["logx"] == "1" and at.query_params["y"] == "L(k) / L(1)"
    # Back: the frontend reruns the page with the previous query string; the URL wins over the widget
    at.query_params["logx"] = "0"
    at.query_params["y"] = "cross-entropy"
    at.run()
    assert at.checkbox(key="w:logx").value is False and at.radio(key="w:y").value == "cross-entropy"
    # a shared link restores every display setting on a fresh session
    fresh = run("pages/1_Curves.py", family="fa", logx="1", points="0", y="L(k) − L(1)", boot="0")
    assert fresh.checkbox(key="w:logx").value is True and fresh.checkbox(key="w:points").value is False
    assert fresh.radio(key="w:y").value == "L(k) − L(1)" and fresh.select_slider(key="w:boot").value == 0
    garbage = run("pages/1_Curves.py", family="fa", logx="maybe", boot="7")  # falls back to the defaults
    assert garbage.checkbox(key="w:logx").value is False and garbage.select_slider(key="w:boot").value == 200


def test_normalised_views_start_every_curve_at_zero_or_one(two_families):
    for view, at_one in (("L(k) − L(1)", 0.0), ("L(k) / L(1)", 1.0)):
        at = run("pages/1_Curves.py", family="fa", y=view, paper="1", boot="0")
        fig = json.loads(at.get("plotly_chart")[0].proto.spec)
        means = [t for t in fig["data"] if t.get("mode") == "markers" and t.get("showlegend", True)]
        assert means and all(values(t["y"])[0] == pytest.approx(at_one, abs=1e-9) for t in means)
        paper = [t for t in fig["data"] if t["name"].startswith("paper average")]
        assert paper and values(paper[0]["y"])[0] == pytest.approx(at_one)
        assert fig["layout"]["yaxis"]["title"]["text"].startswith(view)


# -- live refresh -------------------------------------------------------------------------------------


def test_new_methods_and_sizes_appear_in_the_pickers_as_they_land(tmp_path, monkeypatch):
    db = serve_cache(synthetic_results({"average": FALLING}, E3, size="s", n_params=19_224), tmp_path, monkeypatch)
    at = run("pages/1_Curves.py")
    assert at.multiselect(key="w:sizes").options == ["s (19.2K params)"]
    assert at.multiselect(key="w:methods").options == ["average"]
    ResultStore(db).upsert(synthetic_results({"ties": FALLING, "average": FALLING}, E3, size="m", n_params=625_000))
    at.run()  # what the page's poll does when the cache stamp changes
    assert not at.exception
    assert at.multiselect(key="w:sizes").options == ["s (19.2K params)", "m (625K params)"]
    assert at.multiselect(key="w:methods").options == ["average", "ties"]
    assert at.multiselect(key="w:sizes").value == ["s", "m"]  # the default (every size) follows the new sizes


def test_the_live_poll_never_creates_the_job_queue(tmp_path, monkeypatch):
    serve_cache(synthetic_results({"average": FALLING}, E3), tmp_path, monkeypatch)
    run("pages/1_Curves.py")
    run("app.py")
    assert not (tmp_path / "jobs.sqlite").exists()


def test_every_page_polls_for_new_rows_whatever_the_jobs_state():
    """Each page that reads the cache goes through load_results, which starts the poll; no page gates it
    on a running job any more."""
    from mergelab.ui import dashboard

    source = Path(dashboard.__file__).read_text()
    body = source[source.index("def load_results"):source.index("def running_jobs")]
    assert "live_refresh(stamp)" in body and "st.fragment(run_every=every)" in source
    for page in sorted((ROOT / "pages").glob("*.py")):
        text = page.read_text()
        assert "live_refresh(" not in text, page  # none runs its own, gated one
        if "Sweep" not in page.name and "Import" not in page.name:  # Import reads uploads, not the cache
            assert "load_results()" in text or "family_with_merges()" in text, page


# -- synergy, export, navigation, warnings -------------------------------------------------------------


def harmful_cache():
    """Additive synergy with known signs: 'b' hurts 'c' (−0.05) and 'c' hurts 'a' (−0.03); the rest help."""
    import itertools

    names = ["a", "b", "c", "d"]
    G = pd.DataFrame(0.02, index=names, columns=names)
    G.loc["b", "c"], G.loc["c", "a"], G.loc["a", "b"] = -0.05, -0.03, 0.06
    rows = []
    for k in range(0, 5):
        for subset in itertools.combinations(names, k):
            method = "average" if k else "base"
            for e in names:
                rows.append({"family": "syn", "size": "s", "n_params": 19_224, "method": method, "hparams": "{}", "k": k,
                             "experts_key": "+".join(subset), "domain": e, "n_tokens": 100, "eval_hash": f"h{e}",
                             "metric_version": 1, "device": "cpu",
                             "loss": 2.0 - sum(G.loc[d, e] for d in subset)})
            if k == 1:
                rows += [dict(r, method="expert") for r in rows[-len(names):]]
    return pd.DataFrame(rows), G


def test_top_pairs_show_the_harmful_tail():
    from mergelab.analysis.synergy import synergy_matrix, top_pairs

    rows, G = harmful_cache()
    S = synergy_matrix(rows[rows["method"] == "average"])
    pairs = top_pairs(S, n=3)
    harmful = pairs[pairs["synergy"] < 0]
    assert list(zip(harmful["donor"], harmful["receiver"])) == [("c", "a"), ("b", "c")]
    assert harmful["synergy"].to_list() == pytest.approx([-0.03, -0.05])
    assert pairs["synergy"].notna().all() and pairs["synergy"].iloc[0] == pytest.approx(0.06)
    assert len(pairs) == 5  # three helpful, and only two pairs hurt


def test_synergy_page_draws_harmful_pairs_in_red(tmp_path, monkeypatch):
    rows, _ = harmful_cache()
    serve_cache(rows, tmp_path, monkeypatch)
    at = run("pages/4_Synergy.py", boot="0")
    bars = json.loads(at.get("plotly_chart")[1].proto.spec)
    assert "8 helpful pairs (blue) and 2 harmful (red)" in shown(at)
    assert "with 95% intervals" in shown(at)
    at.select_slider[0].set_value(0).run()  # 0 bootstrap draws: no intervals, so none claimed
    assert "8 helpful pairs (blue) and 2 harmful (red)." in shown(at) and "with 95% intervals" not in shown(at)
    data = bars["data"][0]
    negative = [x for x, y in zip(values(data["x"]), values(data["y"])) if y < 0]
    assert sorted(negative) == ["b → c", "c → a"]


def test_export_settings_filter_the_tables(tmp_path, monkeypatch):
    serve_cache(synthetic_results({"average": FALLING, "ties": FALLING}, E3), tmp_path, monkeypatch)
    at = run("pages/5_Export.py")
    counts = [c.value for c in at.caption if c.value.endswith(" rows")]
    at.multiselect(key="w:export").set_value(["ties"]).run()
    assert not at.exception
    fewer = [c.value for c in at.caption if c.value.endswith(" rows")]
    n = lambda text: int(text.split()[0].replace(",", ""))  # noqa: E731
    assert n(fewer[0]) * 2 == n(counts[0])  # fits: one setting of two
    assert at.selectbox(key="w:method").options == ["ties"]
    assert "1 of 2 method settings: ties" in shown(at)


def test_the_sidebar_names_the_first_page_overview():
    tree = ast.parse((ROOT / "app.py").read_text())
    pages = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "PAGES")
    assert list(pages.values())[0] == "Overview" and "app" not in pages.values()
    assert all((ROOT / path).is_file() for path in pages)
    assert sorted(pages) == sorted(f"pages/{p.name}" for p in (ROOT / "pages").glob("*.py"))


def test_overview_runs_through_app_py(two_families):
    at = run("app.py", family="fa")
    assert at.title[0].value == "mergelab: model-merging scaling curves" and at.get("plotly_chart")
    assert "s (19.2K params), m (625K params)" in shown(at)


def test_no_page_stores_objects_in_dataframe_attrs(tmp_path, monkeypatch):
    """pyarrow warns 'Could not serialize pd.DataFrame.attrs' for every frame a page shows whose attrs hold
    an object (a JointFit once did)."""
    rows, _ = harmful_cache()
    serve_cache(pd.concat([rows, synthetic_results({"average": FALLING}, ["a", "b", "c", "d"], size="m",
                                                    n_params=625_000, domains=("a", "b", "c", "d"))]), tmp_path, monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for page in PAGES:
            run(page, boot="100", boot_export="100")
    assert not [str(w.message) for w in caught if "attrs" in str(w.message)]


# -- labels and figures ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n, label", [(7, "7"), (7_376, "7.38K"), (19_224, "19.2K"), (625_000, "625K"),
                                      (822_400, "822K"), (999_999, "1M"), (1_500_000_000, "1.5B"), (72e9, "72B")])
def test_parameter_counts_read_as_model_sizes(n, label):
    from mergelab.names import params_label

    assert params_label(n) == label


def fits_for(curves: dict, sizes=("s",)):
    from mergelab.analysis.tables import merge_losses
    from mergelab.ui.curves import fit_groups

    rows = pd.concat([synthetic_results(curves, ["a", "b", "c", "d"], size=s, n_params=10_000 * (i + 1))
                      for i, s in enumerate(sizes)])
    merges = merge_losses(rows)
    return merges, fit_groups(merges)


@pytest.mark.parametrize("law, floor", [(FALLING, True), (RISING, False), (lambda k: 2.0 + 0.001 * np.cos(np.pi * k), False),
                                        (lambda k: 2.0 + 0.4 / k + 0.05 * k, False)], ids=["falling", "rising", "flat",
                                                                                         "non-monotone"])
def test_only_a_falling_curve_gets_a_floor(law, floor):
    from mergelab.ui.curves import fit_summary
    from mergelab.ui.figures import curve_figure

    merges, fits = fits_for({"average": law})
    fig = curve_figure(merges, fits, sizes_in_order=["s"], title="t")
    assert len(fig.layout.shapes) == (1 if floor else 0)  # the dashed floor line
    row = fit_summary(fits).iloc[0]
    assert np.isnan(row["L∞ (nats/token)"]) != floor
    assert row["note"].startswith("no floor: ") != floor


def test_variance_and_residual_panels_tell_settings_apart():
    from mergelab.ui.curves import variance_tables
    from mergelab.ui.figures import residual_figure, variance_figure

    rng = np.random.default_rng(0)
    curves = {"average": lambda k: FALLING(k) + rng.normal(0, 0.01), "ties": lambda k: FALLING(k) + rng.normal(0, 0.02)}
    for sizes, differ in ((("s",), "color"), (("s", "m"), "symbol")):
        merges, fits = fits_for(curves, sizes)
        variances, var_fits = variance_tables(merges, merges.assign(experts_key=merges["experts_key"]))
        for fig in (variance_figure(variances, var_fits, sizes_in_order=list(sizes)),
                    residual_figure(merges, fits, sizes_in_order=list(sizes))):
            points = [t for t in fig.data if t.showlegend is not False and t.name and "law" not in t.name]
            by_size = {}
            for t in points:
                style = (t.marker.color or t.line.color) if differ == "color" else t.marker.symbol
                by_size.setdefault(t.name.split(" · ")[1], set()).add(style)
            # two settings of one size never share a colour (one size) or a marker (several sizes)
            assert all(len(styles) == 2 for styles in by_size.values()), (sizes, by_size)


def test_a_floor_on_its_bound_is_not_drawn_and_fitted_lines_are_solid():
    """The walkthrough's Overview: model_stock's b stuck at its bound 100 gave L∞ = 1.12 under data at
    2.3, and its dashed floor squashed every curve into a strip. Only the identified floor is drawn; at one
    size colour and marker tell the methods apart, so every fitted line is solid."""
    from mergelab.ui.curves import has_floor
    from mergelab.ui.figures import curve_figure

    merges, fits = fits_for({"average": FALLING, "model_stock": lambda k: 2.4 - 0.015 * k})
    stuck = fits[("s", "model_stock")]
    assert stuck.ok and stuck.at_bound["b"] and not has_floor(stuck) and has_floor(fits[("s", "average")])
    fig = curve_figure(merges, fits, sizes_in_order=["s"], title="t")
    assert [s.y0 for s in fig.layout.shapes] == [pytest.approx(fits[("s", "average")].L_inf)]
    lines = [t for t in fig.data if t.mode == "lines"]
    assert len(lines) == 2 and {t.line.dash for t in lines} == {"solid"}
    assert len({t.line.color for t in lines}) == 2
    merges2, fits2 = fits_for({"average": FALLING, "ties": FALLING}, ("s", "m"))  # colour is the size: dash is the method
    lines = [t for t in curve_figure(merges2, fits2, sizes_in_order=["s", "m"], title="t").data if t.mode == "lines"]
    assert len({t.line.dash for t in lines}) == 2


def test_a_method_has_one_colour_in_every_panel():
    """The walkthrough's size panel and fractional return used plotly's default palette, so average and
    model_stock were both purple there while the curves drew them blue and teal."""
    from mergelab.ui.figures import curve_figure, fractional_return_figure, method_colours, size_figure

    colours = method_colours(["model_stock", "average", "ties lambda=0.5", "ties lambda=1.0", "custom"])
    assert colours["average"] == "#4c78a8" and colours["model_stock"] == "#72b7b2"
    assert len(set(colours.values())) == 5  # a second ties setting and an unknown method get spare colours
    assert method_colours(["average"]) == {"average": "#4c78a8"}  # the same colour with or without the others
    merges, fits = fits_for({"average": FALLING, "model_stock": FALLING})
    curves = {t.name: t.marker.color for t in curve_figure(merges, fits, sizes_in_order=["s"], title="t").data
              if t.showlegend is not False}
    assert curves == {"average · s": "#4c78a8", "model_stock · s": "#72b7b2"}
    points = merges[merges["k"] == 2].groupby(["setting", "size"], as_index=False)["loss"].mean().assign(n_params=1e4)
    sizes = {t.name: t.line.color for t in size_figure(points, k=2).data}
    assert sizes == {"average, k=2": "#4c78a8", "model_stock, k=2": "#72b7b2"}
    ks = np.linspace(1, 4, 5)
    r = fractional_return_figure({"model_stock · s": (ks, ks), "b = 0 (form alone)": (ks, ks)}, 4,
                                 colours={"model_stock · s": method_colours(["model_stock"])["model_stock"]})
    assert [t.line.color for t in r.data] == ["#72b7b2", "#888"]
