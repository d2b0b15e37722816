"""Held-out validation of the merging law: 3-point forecasts, leave-one-k-out, leave-one-size-out,
and ranking alternative forms by information criteria and held-out error."""

from __future__ import annotations

from dataclasses import dataclass

import math

import numpy as np
import pandas as pd

from mergelab.analysis.fit import FLOOR_SIZES, FORMS, CurveFit, FitError, FitResult, fit_at, fit_curve, fit_joint
from mergelab.analysis.means import per_k_means

CLOSED_FORM = "3-point closed form from k = 1, 2, 4"
LEAST_SQUARES = "3-point constrained least squares on k = 1, 2, 4 (r outside (0.5, 2], or L2 = L4)"


@dataclass(frozen=True)
class HeldOut:
    """A held-out check: `fit`, the law fitted without the held-out points (CurveFit or JointFit), and
    `table`, its predictions against the observed per-k means (errors in the loss's units)."""

    fit: FitResult
    table: pd.DataFrame


def three_point_forecast(L1: float, L2: float, L4: float) -> CurveFit:
    """The floor-tail law L∞ + A/(k+b) through the mean losses at k = 1, 2, 4 (nats per token).

    Closed form (DESIGN §3): r = (L1−L2)/(L2−L4), b = (4−2r)/(2r−1), A = (L1−L2)(1+b)(2+b),
    L∞ = L1 − A/(1+b), valid when r ∈ (0.5, 2] (so that b ≥ 0); otherwise a least-squares fit with b ≥ 0.
    The first note says which. Raises FitError on non-finite input."""
    params, how = _three_point(L1, L2, L4)
    fit = fit_at(params, [1.0, 2.0, 4.0], [L1, L2, L4], weights="uniform")
    fit.notes.insert(0, how)
    return fit


def _three_point(L1: float, L2: float, L4: float) -> tuple[dict[str, float], str]:
    """(L_inf, A, b) of the 3-point forecast and how it was found (the bootstrap calls this per draw)."""
    values = np.array([L1, L2, L4], dtype=float)
    if not np.all(np.isfinite(values)):
        raise FitError("three_point_forecast needs finite L1, L2, L4")
    if L2 != L4:
        r = (L1 - L2) / (L2 - L4)
        if 0.5 < r <= 2.0:
            b = (4 - 2 * r) / (2 * r - 1)
            A = (L1 - L2) * (1 + b) * (2 + b)
            return {"L_inf": L1 - A / (1 + b), "A": A, "b": b}, CLOSED_FORM
    fit = fit_curve([1.0, 2.0, 4.0], values, weights="uniform")
    return {"L_inf": fit.L_inf, "A": fit.A, "b": fit.b}, LEAST_SQUARES


def forecast_errors(k, loss, subsets=None, *, n_boot: int = 400, seed: int = 0, level: float = 0.95,
                    metric=None) -> HeldOut:
    """Forecast the whole curve from k ∈ {1, 2, 4} and compare with every other observed k.

    Errors are given in nats and relative to the observed loss and to the curve's drop
    L(1) − L(k_max) (a forecast is only useful if its error is small against what merging gains).
    With `subsets` (one experts_key per row) each prediction gets a 95% expert-bootstrap interval
    (`lo`, `hi`) for the *population* mean loss at k (new pools of experts at k = 1, 2, 4, forecast
    again; mergelab.analysis.intervals), not for the observed mean, which carries its own pool's
    error (at k = M it is one subset). When no interval can be given, the fit's notes say why.

    `loss` is oriented (mergelab.metrics.oriented: a higher-is-better metric negated); with such a
    `metric` (mergelab.metrics.Metric) the table comes back in the metric's own values (`in_metric`),
    while `fit` stays oriented (its L∞ is minus the ceiling)."""
    ks, means = per_k_means(k, loss)
    missing = [x for x in (1, 2, 4) if x not in ks]
    if missing:
        raise FitError(f"the 3-point forecast needs k = 1, 2 and 4; k = {', '.join(map(str, missing))} "
                       f"{'is' if len(missing) == 1 else 'are'} missing: sweep {'it' if len(missing) == 1 else 'them'}")
    forecast = three_point_forecast(*(means[ks == x][0] for x in (1, 2, 4)))
    p = forecast.params
    predicted = p["L_inf"] + p["A"] / (ks + p["b"])
    out = pd.DataFrame({"k": ks, "observed": means, "predicted": predicted, "error": predicted - means})
    out["error_rel_loss"] = out["error"] / out["observed"]
    out["error_rel_drop"] = out["error"] / (means[0] - means[-1])
    out["held_out"] = ~out["k"].isin([1, 2, 4])
    if subsets is not None:
        try:
            out["lo"], out["hi"] = _forecast_interval(k, loss, subsets, p, ks, n_boot, seed, level)
        except FitError as exc:
            out["lo"] = out["hi"] = np.nan
            forecast.notes.append(f"no interval: {exc}")
    return HeldOut(forecast, in_metric(out, metric))


def in_metric(table: pd.DataFrame, metric=None) -> pd.DataFrame:
    """A held-out table computed on oriented values, back in `metric`'s own values (unchanged for a
    lower-is-better one, e.g. CE): observed, predicted and the interval negated (its ends swapped), the
    error predicted − observed in the metric's sign. The relative errors keep their values: error / observed
    is a ratio of two negated numbers, and the drop L(1) − L(k max) becomes the gain v(k max) − v(1), the
    same number, so error / drop is negated with the error."""
    if metric is None or not metric.higher_better:
        return table
    out = table.copy()
    for column in ("observed", "predicted", "error", "error_rel_drop"):
        if column in out:
            out[column] = -out[column]
    if "lo" in out and "hi" in out:
        out["lo"], out["hi"] = -out["hi"], -out["lo"]
    return out


def _forecast_interval(k, loss, subsets, p, ks, n_boot, seed, level):
    from mergelab.analysis.intervals import mean_draws

    k, loss, subsets = np.asarray(k, dtype=float), np.asarray(loss, dtype=float), np.asarray(subsets)
    used = np.isin(k, (1, 2, 4))
    law = lambda x: p["L_inf"] + p["A"] / (x + p["b"])  # noqa: E731
    _, draws = mean_draws(subsets[used], loss[used], law, n_boot=n_boot, seed=seed)
    curves = []
    for L1, L2, L4 in draws:
        q, _ = _three_point(L1, L2, L4)
        curves.append(q["L_inf"] + q["A"] / (ks + q["b"]))
    return np.percentile(np.array(curves), [50 * (1 - level), 50 * (1 + level)], axis=0)


def leave_one_k_out(k, loss, *, weights="k", form: str = "floor_tail") -> pd.DataFrame:
    """Fit the per-k means without each k in turn and predict it."""
    ks, means = per_k_means(k, loss)
    if len(ks) < FORMS[form].n_params + 1:
        raise FitError(f"form {form!r} needs at least {FORMS[form].n_params + 1} distinct k values to be tested "
                       f"leaving one out, got {len(ks)}")
    rows = []
    for i, held in enumerate(ks):
        keep = np.arange(len(ks)) != i
        fit = fit_curve(ks[keep], means[keep], weights=weights, form=form)
        pred = float(fit.predict([held])[0])
        rows.append({"k": held, "observed": means[i], "predicted": pred, "error": pred - means[i]})
    return pd.DataFrame(rows)


def leave_one_size_out(N, k, loss, *, weights="k", metric=None) -> HeldOut:
    """Fit the joint law L(N,k) = L* + B·N^(−β) + A0·N^(−γ)/(k+b) (arXiv 2509.24244 §3) on all but the
    largest size and predict the largest size's per-k means. N in billions of parameters, loss in
    nats/token (any unit: errors come back in it).

    Extrapolating in N needs the training sizes to identify the law: at least FLOOR_SIZES (4) of them,
    so 5 sizes in all, and a training fit with every parameter identified (`JointFit.not_identified`);
    otherwise raises FitError with the reason. Returns the training fit and the table of predictions
    (in a higher-is-better `metric`'s own values when given, `loss` being oriented: see `in_metric`)."""
    N, k, loss = (np.asarray(a, dtype=float) for a in (N, k, loss))
    sizes = np.unique(N)
    if len(sizes) < FLOOR_SIZES + 1:
        # 4 to fit because the floor L* + B·N^−β has 3 parameters: 3 sizes fix it exactly, untested
        raise FitError(f"leave-one-size-out needs at least {FLOOR_SIZES + 1} model sizes ({FLOOR_SIZES} to fit the joint "
                       f"law, 1 to predict); this family has {len(sizes)}")
    train = N < sizes[-1]
    fit = fit_joint(N[train], k[train], loss[train], weights=weights)
    if not fit.identified:
        raise FitError(f"leave-one-size-out: the joint law fitted on the {len(sizes) - 1} smaller sizes is not "
                       "identified, so its prediction for the largest is not a test of the law: " + "; ".join(fit.reasons()))
    ks, means = per_k_means(k[~train], loss[~train])
    predicted = fit.predict(sizes[-1], ks)
    out = pd.DataFrame({"N": sizes[-1], "k": ks, "observed": means, "predicted": predicted, "error": predicted - means})
    return HeldOut(fit, in_metric(out, metric))


def compare_forms(k, loss, *, weights="k", forms=None) -> pd.DataFrame:
    """Every form fitted to the per-k means, ranked by AICc (AIC corrected for small samples: with
    9 points and up to 5 parameters plain AIC favours the largest form), with AIC, BIC, the weighted
    and unweighted R² and the leave-one-k-out RMSE. `n` is the number of per-k means fitted. AICc is
    undefined (NaN) when n ≤ p + 1: such a form is not ranked (`delta_aicc` NaN, sorted last among the
    fitted forms) and its note says how many points it needs. `delta_aicc` is each form's AICc minus the best."""
    ks, means = per_k_means(k, loss)
    rows = []
    for name in forms or FORMS:
        try:
            fit = fit_curve(ks, means, weights=weights, form=name)
            loko = leave_one_k_out(ks, means, weights=weights, form=name)
            rmse = float(np.sqrt(np.mean(loko["error"] ** 2)))
        except FitError as exc:
            rows.append({"form": name, "formula": FORMS[name].formula, "note": str(exc)})
            continue
        p = FORMS[name].n_params
        notes = list(fit.notes)
        aicc = fit.aicc if math.isfinite(fit.aicc) else math.nan  # the correction divides by n − p − 1
        if math.isnan(aicc):
            notes.insert(0, f"AICc needs at least {p + 2} k values, got {len(ks)}: not ranked")
        rows.append({"form": name, "formula": FORMS[name].formula, "n_params": p, "n": len(ks), "aicc": aicc,
                     "aic": fit.aic, "bic": fit.bic, "r2": fit.r2, "r2_unweighted": fit.r2_unweighted,
                     "loko_rmse": rmse, "params": fit.params, "note": "; ".join(notes)})
    table = pd.DataFrame(rows)
    if "aicc" not in table.columns:  # no form could be fitted: the notes say why
        return table
    # fitted forms first (ranked by AICc, then unranked ones by AIC), forms that could not be fitted last
    table = table.sort_values(["aicc", "aic"], na_position="last").reset_index(drop=True)
    table.insert(table.columns.get_loc("aicc") + 1, "delta_aicc", table["aicc"] - table["aicc"].min())
    return table
