"""Planners stay inside the data: answers beyond the pool are marked, curves that do not fall get no
floor-based answer, and M is the pool's size (not the largest k swept) — in the API and on Fit & Plan."""

import numpy as np
import pytest

from mergelab.analysis import planning
from mergelab.analysis.tables import merge_losses, plan_table, pool_size
from mergelab.analysis.fit import fit_curve
from tests.helpers import serve_cache, synthetic_results
from tests.test_app import run

EXPERTS = [f"e{i}" for i in range(9)]
FALLING = lambda k: 1.0 + 0.5 / (k + 1.0)  # noqa: E731
NON_MONOTONE = lambda k: 4.5 + 0.4 / k + 0.05 * k  # noqa: E731  falls to k ≈ 3, then rises (TIES at density 0.2)


@pytest.fixture
def results():
    # average swept only to k = 5 of 9 experts: the pool is still 9
    return synthetic_results({"average": FALLING, "ties": NON_MONOTONE}, EXPERTS, ks=range(1, 6))


def test_pool_size_is_the_family_pool_not_the_largest_k(results):
    assert merge_losses(results)["k"].max() == 5
    assert pool_size(results) == 9


def test_answers_beyond_the_pool_are_marked_as_extrapolation():
    fit = fit_curve(np.arange(1, 10), FALLING(np.arange(1, 10)))
    far = planning.k_epsilon(fit, 0.004, M=9)  # k_ε = 0.5/0.004 − 1 = 124
    assert far.value == pytest.approx(124, rel=1e-4) and far.extrapolated and "beyond the M = 9 experts" in far.note
    near = planning.k_epsilon(fit, 0.1, M=9)
    assert near.value == pytest.approx(4.0, rel=1e-4) and not near.extrapolated
    assert planning.stop_rule(fit, 1e-5, M=9).extrapolated
    defaults = planning.default_targets(fit, 9)
    for answer in (planning.k_for_target(fit, defaults["target"], 9), planning.k_epsilon(fit, defaults["epsilon"], 9),
                   planning.stop_rule(fit, defaults["tolerance"], 9)):
        assert 1 <= answer.value <= 9 and not answer.extrapolated


def test_a_curve_that_does_not_fall_gets_no_floor_based_answer():
    k = np.arange(1, 10)
    fit = fit_curve(k, NON_MONOTONE(k))
    assert "non-monotone" in planning.not_falling(fit)
    assert np.isnan(planning.k_epsilon(fit, 0.01, 9).value) and "no floor-based answer" in planning.k_epsilon(fit, 0.01).note
    assert np.isnan(planning.k_at_fraction(fit, 0.9, 9).value)
    # the measured means pass 4.79 at k = 3: said from the data, not called unreachable below a floor
    target = planning.k_for_target(fit, 4.79, 9)
    assert target.value == 3 and "not from the law" in target.note
    rising = fit_curve(k, 1.0 + 0.01 * k)
    assert "rises" in planning.not_falling(rising)


def test_plan_table_reports_M_and_refuses_non_falling_curves(results):
    table = plan_table(results)
    assert (table["M"] == 9).all()
    ties = table[table["method"] == "ties"]
    assert ties["value"].isna().all() and ties["note"].str.contains("no floor-based answer").all()
    average = table[table["method"] == "average"].set_index("quantity")
    assert 1 <= average.loc["k90", "value"] <= 9


@pytest.fixture
def page_env(results, tmp_path, monkeypatch):
    serve_cache(results, tmp_path, monkeypatch)


def fit_and_plan(method: str):
    return run("pages/3_Fit_and_Plan.py", method=method)


def test_fit_and_plan_marks_extrapolation_and_uses_the_pool(page_env):
    at = fit_and_plan("average")
    text = " ".join(c.value for c in at.caption)
    assert "M = 9 experts" in text
    metrics = {m.label: m.value for m in at.metric}
    for label in ("experts needed, k", "k within ε of the floor", "stop after k"):  # defaults inside [1, M]
        assert "extrapolated" not in metrics[label] and 1 <= float(metrics[label]) <= 9, metrics
    at.number_input[1].set_value(0.0001).run()  # ε far below the tail: k_ε beyond the pool
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["k within ε of the floor"].endswith("(extrapolated)")
    assert "beyond the M = 9 experts available" in " ".join(c.value for c in at.caption)


def test_fit_and_plan_refuses_floor_answers_for_a_non_monotone_curve(page_env):
    at = fit_and_plan("ties")
    assert any("No floor-based planning" in w.value and "non-monotone" in w.value for w in at.warning)
    metrics = {m.label: m.value for m in at.metric}
    assert set(metrics) == {"experts needed, k"}  # no ε above a floor, no stop rule: the curve has no floor
    assert not any("floor" in n.label for n in at.number_input if n.label != "target floor (nats/token)")
    assert "the curve does not fall, so it has no floor" in " ".join(c.value for c in at.caption)


def test_answers_beyond_the_largest_k_swept_are_marked():
    """Swept to k = 5 of 9: an answer between 5 and 9 is inside the pool but outside the data."""
    k = np.arange(1, 6)
    fit = fit_curve(k, FALLING(k))
    between = planning.k_epsilon(fit, 0.5 / 8, M=9)  # k_ε = 0.5/ε − 1 = 7
    assert between.value == pytest.approx(7.0, rel=1e-4) and between.extrapolated
    assert "beyond the largest k swept (5)" in between.note
    inside = planning.k_epsilon(fit, 0.5 / 4, M=9)  # k_ε = 3
    assert inside.value == pytest.approx(3.0, rel=1e-4) and not inside.extrapolated
    assert "L(M) itself is extrapolated" in planning.k_at_fraction(fit, 0.9, 9).note
    defaults = planning.default_targets(fit, 9)
    assert planning.k_for_target(fit, defaults["target"], 9).value == pytest.approx(3.0, rel=1e-3)


def test_a_draw_that_rises_never_reaches_the_target():
    """A bootstrap draw with A ≤ 0 cannot reach a target below its start: infinite, not a negative k."""
    k = np.arange(1, 10, dtype=float)
    fit = fit_curve(k, FALLING(k))
    fit.samples = np.array([[1.0, 0.5, 1.0], [1.0, -0.5, 1.0], [1.0, 0.5, 1.0]])  # L∞, A, b; the middle one rises
    est = planning.k_for_target(fit, 1.1, M=9)
    assert est.value == pytest.approx(4.0, rel=1e-4) and est.lo == pytest.approx(4.0) and est.hi == np.inf
    assert planning.k_epsilon(fit, 0.1, M=9).hi == np.inf


def test_k_answers_are_whole_experts():
    """'experts needed, k 5.0' beside 'stop after k 6': a k that counts experts is rounded up to a whole one."""
    assert planning.Estimate(4.2, 3.1, 6.0).whole() == planning.Estimate(5.0, 4.0, 6.0)
    assert planning.Estimate(5.0 + 1e-12).whole().value == 5.0  # fitting noise does not add an expert
    assert np.isinf(planning.Estimate(float("inf")).whole().value) and np.isnan(planning.Estimate(float("nan")).whole().lo)


def test_fit_and_plan_shows_k_as_integers_and_readable_form_headers(page_env):
    at = fit_and_plan("average")
    metrics = {m.label: m.value for m in at.metric}
    for label in ("experts needed, k", "k within ε of the floor", "stop after k"):
        assert metrics[label].split(" ")[0].isdigit(), metrics  # '5', not '5.0'
    forms = next(d.value for d in at.dataframe if "form" in d.value.columns)
    assert {"parameters", "AICc", "ΔAICc", "R² (unweighted)", "leave-one-k-out RMSE (nats/token)"} <= set(forms.columns)
    assert not {"n_params", "aicc", "delta_aicc", "r2_unweighted", "loko_rmse"} & set(forms.columns)
    assert not forms.astype(str).isin(["inf", "Infinity", "None", "nan"]).any().any()
    text = " ".join(m.value for m in at.markdown)
    assert "here 5 per-k means" in text and "corrected for 9 points" not in text, text  # swept k = 1..5
    captions = " ".join(c.value for c in at.caption)
    assert "[nan, nan]" not in captions
