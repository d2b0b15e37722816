"""A metric per row (mergelab.metrics): a higher-is-better metric is fitted mirrored, its bound reads as a
ceiling, planners reach a target accuracy from below, and gains keep the sign of 'better'."""

import math

import numpy as np
import pytest

from mergelab import export, metrics
from mergelab.analysis import planning
from mergelab.analysis.fit import fit_curve
from mergelab.analysis.means import per_k_means
from mergelab.errors import MergelabError
from mergelab.store import ResultStore
from tests.helpers import synthetic_results

EXPERTS = list("abcdef")


def accuracy_rows(ceiling=0.8, A=0.3, b=0.5):
    """Accuracy rising to `ceiling`: acc(k) = C − A/(k+b), as rows of metric 'accuracy'."""
    rows = synthetic_results({"average": lambda k: ceiling - A / (k + b)}, EXPERTS, domains=("x",))
    return rows.assign(metric="accuracy", higher_better=True, unit="fraction")


def test_registry_and_specs():
    assert metrics.get(None) is metrics.CE and metrics.CE.direction == "lower" and metrics.CE.unit == "nats/token"
    acc = metrics.get("accuracy")
    assert acc.higher_better and acc.bound == "ceiling" and acc.axis == "accuracy (fraction)"
    bleu = metrics.parse("bleu:higher:points")
    assert (bleu.name, bleu.higher_better, bleu.unit) == ("bleu", True, "points")
    with pytest.raises(MergelabError, match="'bleu' is not known.*bleu:higher"):
        metrics.get("bleu")
    with pytest.raises(MergelabError, match="accuracy is higher is better"):
        metrics.parse("accuracy:lower")
    with pytest.raises(MergelabError, match="NAME:higher\\|lower"):
        metrics.parse("bleu:up")


def test_a_rising_accuracy_is_fitted_as_a_ceiling():
    rows = accuracy_rows()
    fits = export.table("fits", rows, domain="x")
    fit = fits.iloc[0]
    assert (fit["metric"], fit["direction"], fit["unit"]) == ("accuracy", "higher", "fraction")
    assert fit["L_inf"] == pytest.approx(0.8, abs=0.02)  # the ceiling, in accuracy's own sign
    assert fit["A"] > 0 and fit["formula"] == "C − A/(k+b)"
    # CE rows beside it are fitted on their own, as a floor
    ce = synthetic_results({"average": lambda k: 2.0 + 0.5 / (k + 0.5)}, EXPERTS, domains=("x",))
    both = export.table("fits", __import__("pandas").concat([ce, rows]), domain="x")
    by = both.set_index("metric")
    assert by.loc["ce", "L_inf"] == pytest.approx(2.0, abs=0.02) and by.loc["ce", "formula"] == "L∞ + A/(k+b)"
    assert by.loc["accuracy", "L_inf"] == pytest.approx(0.8, abs=0.02)


def test_a_planner_reaches_a_target_accuracy_from_below():
    rows = metrics.oriented(accuracy_rows())
    merges = rows[(rows["method"] == "average")]
    fit = fit_curve(*per_k_means(merges["k"], merges["loss"]))
    acc = metrics.get("accuracy")
    # acc(k) = 0.8 − 0.3/(k + 0.5) reaches 0.7 at k = 2.5; a lower target is reached earlier
    est = planning.k_for_target(fit, 0.7, M=6, metric=acc)
    assert est.value == pytest.approx(2.5, abs=0.2)
    assert planning.k_for_target(fit, 0.65, M=6, metric=acc).value < est.value
    above = planning.k_for_target(fit, 0.85, M=6, metric=acc)
    assert math.isinf(above.value) and "at or above the ceiling C = 0.8" in above.note
    assert planning.not_falling(fit, acc) == ""
    # the gain of one more expert is positive: accuracy goes up
    assert planning.marginal_gain(fit, 2).value == pytest.approx(0.3 / (2.5 * 3.5), rel=0.05)


def test_a_falling_accuracy_is_refused_in_its_own_words():
    rows = metrics.oriented(accuracy_rows(A=-0.3))  # accuracy that drops as experts are added
    fit = fit_curve(*per_k_means(rows["k"][rows["k"] >= 1], rows["loss"][rows["k"] >= 1]))
    reason = planning.not_falling(fit, metrics.get("accuracy"))
    # acc(1) = 0.8 + 0.3/1.5 = 1.0, acc(6) = 0.8 + 0.3/6.5 ≈ 0.846: in accuracy's values, not negated
    assert reason.startswith("the measured accuracy falls from 1.0") and "to 0.847" in reason
    assert "ceiling–tail law" in reason


def test_synergy_of_an_accuracy_is_positive_when_a_donor_helps():
    rows = accuracy_rows()
    table = export.table("synergy", rows)
    assert set(table["metric"]) == {"accuracy"}
    assert np.nanmean(table["synergy"]) > 0  # adding experts raises accuracy: a gain, not a loss


def test_export_of_results_keeps_each_rows_metric(tmp_path):
    db = tmp_path / "r.duckdb"
    ResultStore(db).upsert(accuracy_rows())
    got = ResultStore(db).results()
    assert set(got["metric"]) == {"accuracy"} and got["higher_better"].all() and set(got["unit"]) == {"fraction"}
    assert export.table("results", got) is got


def test_paper_figures_and_macro_means_keep_metrics_apart(tmp_path):
    import pandas as pd

    from mergelab import figures
    from tests.test_app_states import values

    ce = synthetic_results({"average": lambda k: 2.0 + 0.5 / (k + 0.5)}, EXPERTS, domains=("x",))
    db = tmp_path / "r.duckdb"
    ResultStore(db).upsert(pd.concat([ce, accuracy_rows()], ignore_index=True))
    macro = ResultStore(db).macro(method="average", experts_key="a+b")
    assert sorted(macro["metric"]) == ["accuracy", "ce"]  # one mean per metric, never across them
    only_acc = ResultStore(db).results(metric="accuracy")
    fig = figures.curves(only_acc)
    assert fig.layout.yaxis.title.text == "accuracy (fraction)"
    ys = [y for trace in fig.data if trace.y is not None for y in values(trace.y)]
    assert min(ys) > 0.4 and max(ys) < 0.85  # accuracies, not their negation
    sizes = figures.sizes(only_acc)
    assert sizes.layout.yaxis.title.text == "accuracy (fraction)" and min(sizes.data[0].y) > 0
    both = figures.curves(ResultStore(db).results())  # CE first when a family holds both
    assert both.layout.yaxis.title.text == "cross-entropy (nats/token)"


def test_the_paper_table_of_an_accuracy_reads_as_a_ceiling():
    from mergelab.export import render

    table = export.table("paper", accuracy_rows(), n_boot=30)
    row = table.iloc[0]
    assert 0.75 < row["L_inf"] < 0.85 and row["L_inf_lo"] <= row["L_inf"] <= row["L_inf_hi"]  # ends swapped back
    tex = render(table, "latex", {"options": {"what": "paper"}}, "paper")
    assert "$C$" in tex and r"$y(k) = C - A/(k+b)$" in tex and "accuracy in fraction" in tex
    assert "cross-entropy" not in tex


def test_the_3_point_forecast_of_a_rising_accuracy_comes_back_in_accuracys_values():
    # acc(k) = 0.8 − 0.3/(k + 0.5) + per-expert effects: fitted mirrored, the table shown un-mirrored
    from mergelab.analysis.heldout import forecast_errors
    from mergelab.ui.curves import held_out_table

    rows = metrics.oriented(accuracy_rows())
    merges = rows[(rows["method"] == "average") & (rows["domain"] == "x")]
    acc = metrics.get("accuracy")
    check = forecast_errors(merges["k"], merges["loss"], merges["experts_key"], n_boot=50, metric=acc)
    table = check.table
    observed = -merges.groupby("k")["loss"].mean()  # the accuracies measured, per k
    assert table["observed"].to_numpy() == pytest.approx(observed.to_numpy())
    assert (table["observed"] > 0).all() and (table["predicted"] > 0).all()  # accuracies, not their negatives
    low, high = observed.min() - 0.02, observed.max() + 0.02
    assert table["predicted"].between(low, high).all() and table["lo"].between(low, high).all()
    assert (table["lo"] <= table["hi"]).all() and table["hi"].between(low, high).all()
    assert table["error"].to_numpy() == pytest.approx((table["predicted"] - table["observed"]).to_numpy())
    assert -check.fit.L_inf == pytest.approx(0.8, abs=0.03)  # the fit stays mirrored: minus the ceiling
    shown = held_out_table(table, acc)
    assert "observed mean accuracy (fraction)" in shown and "error (fraction)" in shown
    assert "error / gain accuracy(k max) − accuracy(1)" in shown
    assert "population mean at k, 95% CI (fraction)" in shown
    assert not any("nats" in c for c in shown.columns)
    # CE is untouched by the metric: the same numbers and headers as before
    ce = forecast_errors(merges["k"], -merges["loss"], metric=metrics.CE).table
    assert "observed mean (nats/token)" in held_out_table(ce) and ce["observed"].to_numpy() == pytest.approx(observed.to_numpy())
