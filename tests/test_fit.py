"""The law fits: exact recovery, recovery within bootstrap CIs, 3-point forecast, held-out checks,
alternative forms, the finite-pool variance law and clear errors on degenerate input."""

import itertools
import math

import numpy as np
import pytest

from mergelab.fit import FORMS, FitError, fit_curve, fit_curves, fit_joint
from mergelab.heldout import compare_forms, forecast_errors, leave_one_k_out, leave_one_size_out, three_point_forecast
from mergelab.variance import fit_variance, subset_variance

K = np.arange(1, 10, dtype=float)
M = 9


def law(k, L_inf=0.7, A=0.3, b=0.5):
    return L_inf + A / (np.asarray(k, dtype=float) + b)


def exhaustive_subsets(seed=0, noise=0.02, M=M, **params):
    """Per-subset losses: the law plus the mean of per-expert effects (finite-pool structure) plus
    independent per-merge noise. Averaged over all subsets of a size, the effects add their mean."""
    rng = np.random.default_rng(seed)
    effects = rng.normal(0, noise, M)
    ks, losses = [], []
    for k in range(1, M + 1):
        for subset in itertools.combinations(range(M), k):
            ks.append(k)
            losses.append(law(k, **params) + effects[list(subset)].mean() + rng.normal(0, noise / 4))
    return np.array(ks, dtype=float), np.array(losses), effects.mean()


def test_exact_data_is_recovered():
    fit = fit_curve(K, law(K))
    assert fit.L_inf == pytest.approx(0.7, abs=1e-7) and fit.A == pytest.approx(0.3, abs=1e-6)
    assert fit.b == pytest.approx(0.5, abs=1e-5) and fit.r2 == pytest.approx(1.0)
    assert not any(fit.at_bound.values()) and fit.notes == []
    assert np.allclose(fit.predict([1, 20]), law([1, 20]), atol=1e-7)


def test_batched_fits_equal_single_fits():
    rng = np.random.default_rng(1)
    Y = law(K) + rng.normal(0, 0.003, (5, 9))
    batched = fit_curves(K, Y)
    for row, fit in zip(Y, batched):
        single = fit_curve(K, row)
        assert fit.params == pytest.approx(single.params, rel=1e-9, abs=1e-12)


def test_no_standard_errors_at_a_bound():
    """Jacobian SEs assume an interior optimum: with b on its bound 0 none is reported, and the note
    says which interval to report instead."""
    fit = fit_curve(K, 0.7 + 0.3 / (K - 0.3))  # the best b would be −0.3
    assert fit.at_bound["b"] and "b sits on its bound" in fit.notes
    assert all(math.isnan(v) for v in fit.se.values())
    assert any("expert-bootstrap interval" in n for n in fit.notes)
    interior = fit_curve(K, law(K) + np.random.default_rng(0).normal(0, 1e-3, 9))
    assert not any(interior.at_bound.values()) and all(np.isfinite(v) for v in interior.se.values())


def test_alternative_forms_ranked_with_the_true_form_first():
    rng = np.random.default_rng(5)
    y = law(K) + rng.normal(0, 1e-4, 9)
    table = compare_forms(K, y)
    assert set(table["form"]) == set(FORMS)
    assert table.iloc[0]["form"] in ("floor_tail", "floor_tail_interference")
    by_form = table.set_index("form")
    assert by_form.loc["floor_tail", "loko_rmse"] < by_form.loc["exponential", "loko_rmse"]
    assert by_form.loc["floor_tail", "aic"] < by_form.loc["log", "aic"]


def test_interference_form_captures_a_non_monotone_ties_curve():
    y = 0.7 + 0.3 / (K + 0.5) + 0.2 * K / (K + 3.0)
    fit = fit_curve(K, y, form="floor_tail_interference")
    assert fit.r2 > 0.9999 and fit.params["D"] > 0
    assert fit_curve(K, y, form="floor_tail_interference").aic < fit_curve(K, y).aic


def test_finite_pool_variance_is_zero_at_M_and_fits_better():
    ks, losses, _ = exhaustive_subsets(seed=2, noise=0.05)
    var = subset_variance(ks, losses)
    assert var.loc[var["k"] == M, "var"].iloc[0] == 0.0
    assert list(var["n_subsets"]) == [math.comb(M, k) for k in range(1, M + 1)]
    fits = fit_variance(var["k"], var["var"], M)
    assert fits["best"] is fits["finite_pool"]
    assert fits["finite_pool"].predict([M])[0] == pytest.approx(0.0, abs=1e-15)
    assert fits["finite_pool"].r2 > max(0.95, fits["plain"].r2)


def test_compare_forms_reports_when_no_form_fits():
    table = compare_forms([1, 2, 3], [1.0, 0.8, 0.7])
    assert "aic" not in table.columns and table["note"].str.contains("at least").all()
