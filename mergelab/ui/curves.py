"""Per-curve computations the Curves and Fit & Plan pages share (no streamlit here)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mergelab.analysis.fit import FitError, FitFailure, fit_curve
from mergelab.analysis.intervals import expert_bootstrap
from mergelab.analysis.means import mean_by_k, per_k_means
from mergelab.analysis.variance import fit_variance, subset_variance
from mergelab.names import PARAMS_PER_BILLION, billions, params_label


def curve_groups(merges: pd.DataFrame):
    """(size, setting), rows per curve of `merges` (with n_params), smallest size first: tables and legends
    list sizes by parameter count (xs, s, m, l, xl), not alphabetically."""
    groups = merges.groupby(["size", "setting"])
    return sorted(groups, key=lambda item: (item[1]["n_params"].iat[0], item[0][1])) if "n_params" in merges else list(groups)


def fit_groups(merges: pd.DataFrame, n_boot: int = 0, seed: int = 0) -> dict:
    """{(size, setting): CurveFit, or FitFailure with the reason}, one curve per method setting (mergelab.analysis.tables:
    method + hyperparameters); with n_boot the fits carry expert-bootstrap draws."""
    fits = {}
    for (size, setting), group in curve_groups(merges):
        try:
            if n_boot:
                fits[size, setting] = expert_bootstrap(group["experts_key"], group["loss"], n_boot=n_boot, seed=seed)
            else:
                fits[size, setting] = fit_curve(*per_k_means(group["k"], group["loss"]))
        except FitError as exc:
            fits[size, setting] = FitFailure(str(exc))
    return fits


def bands(fits: dict, merges: pd.DataFrame) -> dict:
    out = {}
    for key, fit in fits.items():
        if not fit.ok or fit.samples is None:
            continue
        ks = merges[(merges["size"] == key[0]) & (merges["setting"] == key[1])]["k"]
        grid = np.linspace(ks.min(), ks.max(), 60)
        lo, hi = fit.band(grid)
        out[key] = (grid, lo, hi)
    return out


DISPLAY = {"L_inf": "L∞ (nats/token)", "A": "A (nats/token)"}
CI_LABEL = "95% CI (expert bootstrap)"


def floor_problem(fit, metric=None) -> str:
    """Why a fitted curve has no floor to show ('' when it has one): it failed, is not L∞ + A/(k+b), or
    does not fall with k (rises, is flat or non-monotone; mergelab.analysis.planning.not_falling)."""
    from mergelab.analysis.planning import not_falling

    if not fit.ok:
        return fit.reason
    if fit.form != "floor_tail":
        return f"a {fit.form} fit has no floor L∞"
    return not_falling(fit, metric)


def has_floor(fit) -> bool:
    """Whether a fit's L∞ is a floor worth drawing: a floor–tail curve that falls with k, with no parameter
    on its bound and every parameter identified. A floor the data do not pin down (b stuck at 100 gave
    L∞ = 1.12 under data at 2.3) would set the y axis and squash the data into a strip."""
    if floor_problem(fit):
        return False
    return not any(getattr(fit, "at_bound", {}).values()) and not getattr(fit, "not_identified", {})


def _bound_text(fit, name: str, lo: float, hi: float) -> str:
    """An interval as text, '(bound)' after an end that sits on the parameter's bound."""
    from mergelab.analysis.fit import BOUND_TOL

    text = f"[{lo:.4g}, {hi:.4g}]"
    spec = fit.spec
    if spec is not None and name in spec.nonlinear:
        b_lo, b_hi = spec.bounds[spec.nonlinear.index(name)]
        tol = BOUND_TOL * max(1.0, abs(b_hi))
        if lo - b_lo <= tol or b_hi - hi <= tol:
            text += " (bound)"
    return text


def display_names(metric=None) -> dict:
    """Table headers of L∞ and A in the metric's words: 'L∞ (nats/token)' for CE, 'ceiling C (fraction)'
    for accuracy (mergelab.metrics)."""
    if metric is None or (not metric.higher_better and metric.name == "ce"):
        return DISPLAY
    bound = "ceiling C" if metric.higher_better else "floor L∞"
    return {"L_inf": f"{bound} ({metric.units})", "A": f"A ({metric.units})"}


def fit_summary(fits: dict, metric=None) -> pd.DataFrame:
    """One row per curve for the pages: L∞, A, b, R² and, with expert-bootstrap draws, each parameter's 95%
    interval (the uncertainty to report; '(bound)' marks an end on the parameter's bound, where the data do
    not pin it down). No standard errors: they treat the per-k means as independent and understate it. A
    curve that does not fall gets no L∞ (it is no floor), and the note says why. Fits of a higher-is-better
    `metric` (made on negated values) show their bound as a ceiling, in the metric's own sign."""
    names = display_names(metric)
    sign = metric.sign if metric is not None else 1
    rows = []
    for (size, setting), fit in fits.items():
        if not fit.ok:
            rows.append({"size": size, "setting": setting, "note": fit.reason})
            continue
        no_floor = floor_problem(fit, metric)
        row = {"size": size, "setting": setting, names["L_inf"]: np.nan if no_floor else sign * fit.L_inf,
               names["A"]: fit.A, "b": fit.b, "R² (k-weighted)": fit.r2, "R² (unweighted)": fit.r2_unweighted}
        if fit.samples is not None:
            for name, (lo, hi) in fit.param_ci().items():
                if not (no_floor and name == "L_inf"):
                    if name == "L_inf" and sign < 0:  # a mirrored interval: negated, ends swapped
                        lo, hi = -hi, -lo
                    row[f"{names.get(name, name)} {CI_LABEL}"] = _bound_text(fit, name, lo, hi)
        bound = metric.bound if metric is not None else "floor"
        row["note"] = "; ".join(([f"no {bound}: {no_floor}"] if no_floor else []) + list(fit.notes))
        rows.append(row)
    return pd.DataFrame(rows)


NORMALISED = {"cross-entropy": None, "L(k) − L(1)": "difference", "L(k) / L(1)": "ratio"}
NORMALISED_AXIS = {None: "cross-entropy (nats/token)", "difference": "L(k) − L(1) (nats/token)",
                   "ratio": "L(k) / L(1)"}


def scale_options(metric=None) -> dict:
    """The Curves page's y-axis choices {option: how} (NORMALISED), the first named after the metric ('cross-entropy',
    'accuracy'): the option is what the URL's y= keeps, so a link never names CE for another metric."""
    first = "cross-entropy" if metric is None or metric.name == "ce" else (metric.label or metric.name)
    return {first: None, **{o: h for o, h in NORMALISED.items() if h is not None}}


def axis_title(how: str | None, metric=None) -> str:
    """The y axis title of the Curves page for a normalisation `how` and a metric (default CE)."""
    if metric is None or metric.name == "ce":
        return NORMALISED_AXIS[how]
    unit = f" ({metric.unit})" if metric.unit else ""
    return {None: metric.axis, "difference": f"value(k) − value(1){unit}", "ratio": "value(k) / value(1)"}[how]


def normalisers(merges: pd.DataFrame, fits: dict, how: str | None, sign: int = 1) -> dict:
    """{(size, setting): (offset, scale)} that puts each curve on a common scale (curve_figure's
    `normalise`): 'difference' draws L(k) − L(1), 'ratio' L(k)/L(1), None the loss itself. L(1) is the
    curve's measured mean at k = 1, or its fitted value at k = 1 when k = 1 was not merged. Curves with
    neither are left out (drawn as they are). `sign` −1: the curves hold negated values of a higher-is-better
    metric (mergelab.metrics.oriented), drawn back in the metric's own sign."""
    if how is None:
        if sign > 0:
            return {}
        return {key: (0.0, -1.0) for key, _ in merges.groupby(["size", "setting"])}
    out = {}
    for (size, setting), rows in merges.groupby(["size", "setting"]):
        at_one = rows.loc[rows["k"] == 1, "loss"]
        fit = fits.get((size, setting))
        L1 = float(at_one.mean()) if len(at_one) else (float(fit.predict([1.0])[0]) if fit is not None and fit.ok
                                                      else np.nan)
        if np.isfinite(L1) and L1 != 0:
            out[size, setting] = (L1, float(sign)) if how == "difference" else (0.0, L1)
    return out


def normalise_curve(k, loss, how: str | None) -> np.ndarray:
    """A curve given at k = 1, 2, … (a paper law) on the same scale as `normalisers`: loss − loss(1) or
    loss/loss(1), with loss(1) its value at k = 1 (the first point)."""
    loss = np.asarray(loss, dtype=float)
    if how is None:
        return loss
    return loss - loss[0] if how == "difference" else loss / loss[0]


def variance_tables(merges: pd.DataFrame, rows: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Across-subset variance per k and its two laws per (size, setting); the finite-pool factor uses
    M, the size's pool of experts in the family's `rows` (as Fit & Plan does), not the largest k swept.
    A curve whose laws cannot be fitted gets {"reason": …} instead of its fits."""
    from mergelab.analysis.tables import pool_size

    frames, fits = [], {}
    pools = {size: pool_size(rows[rows["size"] == size]) for size in merges["size"].unique()}
    for (size, setting), group in curve_groups(merges):
        var = subset_variance(group["k"], group["loss"]).assign(size=size, setting=setting)
        frames.append(var)
        try:
            fits[size, setting] = fit_variance(var["k"], var["var"], pools[size])
        except FitError as exc:  # the figure draws the points alone; the page says why
            fits[size, setting] = {"reason": str(exc)}
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), fits


def size_points(merges: pd.DataFrame, k: int) -> pd.DataFrame:
    """Mean loss at one k per setting and size, with N in billions of parameters."""
    return mean_by_k(merges[merges["k"] == k], ["setting", "size", "n_params"]).assign(
        N=lambda f: billions(f["n_params"])).sort_values("N")


HELD_OUT_COLUMNS = {"observed": "observed mean (nats/token)",
                    "predicted": "predicted (nats/token)", "error": "error (nats/token)",
                    "error_rel_loss": "error / observed", "error_rel_drop": "error / drop L(1) − L(k max)",
                    "held_out": "held out"}


def held_out_columns(metric=None) -> dict:
    """The held-out table's headers in the metric's name and unit (CE: HELD_OUT_COLUMNS); for a
    higher-is-better metric the drop L(1) − L(k max) is the gain v(k max) − v(1)."""
    if metric is None or metric.name == "ce":
        return HELD_OUT_COLUMNS
    name, unit = metric.label or metric.name, metric.units
    gain = (f"error / gain {name}(k max) − {name}(1)" if metric.higher_better else
            f"error / drop {name}(1) − {name}(k max)")
    return {"observed": f"observed mean {name} ({unit})", "predicted": f"predicted ({unit})",
            "error": f"error ({unit})", "error_rel_loss": "error / observed", "error_rel_drop": gain,
            "held_out": "held out"}


def held_out_table(table: pd.DataFrame, metric=None) -> pd.DataFrame:
    """A held-out table (mergelab.analysis.heldout, already in `metric`'s own values) for display: the
    metric's name and unit in the headers (default CE, nats/token), and the interval as one column that
    says what it covers."""
    out = table.rename(columns=held_out_columns(metric))
    for column in out.select_dtypes("float").columns:  # 4e-17 is an exact fit, not a number to print in full
        out[column] = out[column].round(6) + 0.0
    if "N" in out:  # the laws take N in billions; people read model sizes as 19.2K, 625K, 1.5B
        at = out.columns.get_loc("N")
        out.insert(at, "N (parameters)", [params_label(n * PARAMS_PER_BILLION) for n in out.pop("N")])
    if "lo" in out:
        unit = "nats/token" if metric is None else metric.units
        out[f"population mean at k, 95% CI ({unit})"] = [f"[{lo:.4f}, {hi:.4f}]" if lo == lo else "—"
                                                         for lo, hi in zip(out.pop("lo"), out.pop("hi"))]
    return out


def forms_table(forms: pd.DataFrame, units: str = "nats/token") -> pd.DataFrame:
    """The alternative-forms table (mergelab.analysis.heldout.compare_forms) for display: readable
    headers with units (`units`: the metric's), "—" where a criterion is undefined (AICc when a form has
    as many parameters as k values allow) and "not ranked" in place of its ΔAICc; parameters dropped."""
    out = forms.drop(columns=["params", "n"], errors="ignore").copy()
    for column in ("aicc", "aic", "bic", "r2", "r2_unweighted", "loko_rmse"):
        if column in out:
            out[column] = [f"{v:.4f}" if v == v and np.isfinite(v) else "—" for v in out[column]]
    if "delta_aicc" in out:
        out["delta_aicc"] = [f"{v:.2f}" if v == v else "not ranked" for v in out["delta_aicc"]]
    if "n_params" in out:
        out["n_params"] = [str(int(v)) if v == v else "—" for v in out["n_params"]]
    if "note" in out:
        out["note"] = out["note"].fillna("")
    return out.rename(columns={"n_params": "parameters", "aicc": "AICc", "delta_aicc": "ΔAICc", "aic": "AIC",
                               "bic": "BIC", "r2": "R² (k-weighted)", "r2_unweighted": "R² (unweighted)",
                               "loko_rmse": f"leave-one-k-out RMSE ({units})"})
