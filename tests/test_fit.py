"""The law fits: exact recovery, standard errors withheld at bounds, 3-point forecast, held-out checks,
alternative forms, the finite-pool variance law and clear errors on degenerate input."""

import itertools
import math

import numpy as np
import pytest

from mergelab.analysis.fit import FORMS, FitError, fit_curve, fit_curves, fit_joint
from mergelab.analysis.heldout import CLOSED_FORM, LEAST_SQUARES, compare_forms, forecast_errors, leave_one_k_out, leave_one_size_out, three_point_forecast
from mergelab.analysis.variance import fit_variance, subset_variance

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


def test_weights_change_the_fit_and_are_validated():
    y = law(K) + np.array([0.01, -0.01, 0, 0, 0, 0, 0, 0, 0.01])
    assert fit_curve(K, y, weights="k").params != fit_curve(K, y, weights="uniform").params
    with pytest.raises(FitError, match="positive finite"):
        fit_curve(K, y, weights=np.zeros(9))
    with pytest.raises(FitError, match="expected 'k', 'uniform'"):
        fit_curve(K, y, weights="sqrt")


def test_three_point_closed_form_matches_least_squares_on_exact_data():
    forecast = three_point_forecast(*law([1, 2, 4]))
    fit = fit_curve(K, law(K))
    assert forecast.notes[0] == CLOSED_FORM and forecast.r2 == pytest.approx(1.0)
    for name in ("L_inf", "A", "b"):
        assert forecast.params[name] == pytest.approx(fit.params[name], abs=1e-5)
    check = forecast_errors(K, law(K))
    errors = check.table
    assert check.fit.params == forecast.params and errors["held_out"].sum() == 6 and errors["error"].abs().max() < 1e-9


def test_three_point_falls_back_when_r_is_outside_the_closed_form_range():
    # r = (L1−L2)/(L2−L4) = 3 > 2 would need b < 0: constrained least squares instead, b on its bound.
    forecast = three_point_forecast(1.0, 0.7, 0.6)
    assert forecast.notes[0] == LEAST_SQUARES and forecast.b == pytest.approx(0.0, abs=1e-9)


def test_leave_one_k_out_and_size_out():
    loko = leave_one_k_out(K, law(K))
    assert list(loko["k"]) == list(K) and loko["error"].abs().max() < 1e-4
    sizes = [0.5, 1.5, 3.0, 7.0, 32.0]
    N = np.repeat(sizes, 9)
    k = np.tile(K, 5)
    loss = 0.2 + 0.1 * N ** -0.4 + 0.05 * N ** -0.1 / (k + 0.3)
    loso = leave_one_size_out(N, k, loss)
    assert set(loso.table["N"]) == {32.0} and loso.table["error"].abs().max() < 1e-6 and loso.fit.identified
    with pytest.raises(FitError, match="at least 5 model sizes .*this family has 4"):  # 3 training sizes fix the floor exactly
        leave_one_size_out(N[N < 32], k[N < 32], loss[N < 32])


def test_joint_fit_recovers_parameters_and_per_size_floors():
    N = np.repeat([0.5, 1.5, 7.0, 32.0], 9)
    k = np.tile(K, 4)
    truth = dict(L_star=0.2, B=0.1, beta=0.4, A0=0.05, gamma=0.1, b=0.3)
    loss = truth["L_star"] + truth["B"] * N ** -truth["beta"] + truth["A0"] * N ** -truth["gamma"] / (k + truth["b"])
    fit = fit_joint(N, k, loss)
    for name, value in truth.items():
        assert fit.params[name] == pytest.approx(value, rel=2e-3, abs=2e-4), name
    assert fit.r2 > 0.99999 and fit.identified  # 4 sizes: one more than the floor's 3 parameters
    assert fit.floor(7.0) == pytest.approx(0.2 + 0.1 * 7 ** -0.4, rel=1e-4)
    assert fit.tail(7.0) == pytest.approx(0.05 * 7 ** -0.1, rel=1e-3)


@pytest.mark.parametrize("k, loss, fragment", [
    ([1, 2, 1, 2], [1.0, 0.9, 1.1, 0.8], "need at least 3 distinct k to fit, got 2 (k = 1, 2)"),
    (K, np.full(9, 0.5), "loss is constant"),
    (K, np.r_[law(K)[:8], np.nan], "1 of 9 rows have NaN/Inf"),
    ([0, 1, 2, 3], [1, 0.9, 0.8, 0.7], "k must be >= 1"),
    (K, law(K)[:5], "differ in length"),
])
def test_degenerate_input_gets_a_clear_error(k, loss, fragment):
    with pytest.raises(FitError) as err:
        fit_curve(k, loss)
    assert fragment in str(err.value)


def test_single_size_joint_fit_is_refused_and_non_monotone_is_noted():
    with pytest.raises(FitError, match="at least 2 sizes, got 1"):
        fit_joint(np.full(9, 0.5), K, law(K))
    bumpy = law(K) + np.array([0, 0, 0.05, 0, 0, 0, 0, 0, 0])
    assert "mean loss is not monotone in k" in fit_curve(K, bumpy).notes
    rising = 1.0 - 0.3 / (K + 0.5)
    assert "A < 0: the fitted loss rises with k" in fit_curve(K, rising).notes


def test_bound_flags():
    fit = fit_curve(K, law(K, b=0.0))
    assert fit.at_bound["b"] and "b sits on its bound" in fit.notes


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


# -- one result protocol ------------------------------------------------------------------------


def test_curve_and_joint_fits_share_one_result_protocol():
    from mergelab.analysis.fit import JOINT, FitFailure, FitResult, fit_joint
    from mergelab.analysis.intervals import expert_bootstrap

    curve = fit_curve(K, law(K))
    N = np.repeat([0.5, 1.5, 3.0, 7.0, 32.0], 9)
    k = np.tile(K, 5)
    joint = fit_joint(N, k, 0.2 + 0.1 * N ** -0.4 + 0.05 * N ** -0.1 / (k + 0.3) + 1e-4 * np.sin(7 * k * N))
    for fit in (curve, joint):
        assert isinstance(fit, FitResult) and fit.ok
        assert set(fit.se) == set(fit.params) and set(fit.at_bound) <= set(fit.params)
        assert all(np.isfinite([fit.r2, fit.r2_unweighted, fit.aic, fit.bic])) and isinstance(fit.notes, list)
        with pytest.raises(FitError, match="no expert-bootstrap draws"):
            fit.param_ci()
        row = fit.to_dict()
        assert {"r2", "aic", "aicc", "bic", "at_bound", "notes"} <= set(row) and any(c.startswith("se_") for c in row)
    assert joint.predict(7.0, 3) == pytest.approx(0.2 + 0.1 * 7 ** -0.4 + 0.05 * 7 ** -0.1 / 3.3, abs=1e-3)
    assert joint.spec is JOINT and set(JOINT.linear + JOINT.nonlinear) == set(joint.params)
    assert all(np.isfinite(v) for v in joint.se.values())  # interior, identified: Jacobian SEs for all six
    subsets = [f"e{i}" for i in range(9)]
    boot = expert_bootstrap(["+".join(subsets[:k]) for k in range(1, 10) for _ in range(1)], law(K), n_boot=20)
    assert boot.ok and "no interval" in boot.notes[-1]  # one subset per k: a fit with a note, not a string
    failure = FitFailure("loss is constant")
    assert not failure.ok and str(failure) == "loss is constant" and failure.to_dict() == {"notes": ["loss is constant"]}


def test_aicc_undefined_forms_are_not_ranked():
    """4 k values: AICc of a 3-parameter form divides by n − p − 1 = 0. Shown as '—', 'not ranked', with the
    number of k values needed; the 2-parameter form is the only ranked one."""
    from mergelab.ui.curves import forms_table

    table = compare_forms([1, 2, 3, 9], [2.4, 2.33, 2.30, 2.26])
    by_form = table.set_index("form")
    assert table.iloc[0]["form"] == "log" and by_form.loc["log", "delta_aicc"] == 0.0
    for name in ("floor_tail", "power", "exponential"):
        assert np.isnan(by_form.loc[name, "aicc"]) and np.isnan(by_form.loc[name, "delta_aicc"])
        assert "AICc needs at least 5 k values, got 4: not ranked" in by_form.loc[name, "note"]
    assert (table["n"].dropna() == 4).all()
    shown = forms_table(table).set_index("form")
    assert shown.loc["floor_tail", "AICc"] == "—" and shown.loc["floor_tail", "ΔAICc"] == "not ranked"
    assert shown.loc["floor_tail_interference", "parameters"] == "—"  # not fitted: no 'None'
    assert "needs at least 6 distinct k values" in shown.loc["floor_tail_interference", "note"]
    assert not shown.astype(str).isin(["inf", "None", "nan"]).any().any()


def test_held_out_messages_are_one_clear_sentence():
    with pytest.raises(FitError, match=r"^the 3-point forecast needs k = 1, 2 and 4; k = 4 is missing: sweep it$"):
        forecast_errors([1, 2, 3, 9], [2.4, 2.33, 2.30, 2.26])
    with pytest.raises(FitError, match=r"^leave-one-size-out needs at least 5 model sizes \(4 to fit the joint law, "
                                       r"1 to predict\); this family has 1$"):
        leave_one_size_out([0.5] * 4, [1, 2, 3, 4], [2.4, 2.33, 2.30, 2.26])
