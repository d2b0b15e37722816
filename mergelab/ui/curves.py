"""Per-curve computations the Curves and Fit & Plan pages share (no streamlit here)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mergelab.analysis.fit import FitError, FitFailure, fit_curve
from mergelab.analysis.intervals import expert_bootstrap
from mergelab.analysis.means import mean_by_k, per_k_means
from mergelab.analysis.variance import fit_variance, subset_variance
from mergelab.names import billions


def fit_groups(merges: pd.DataFrame, n_boot: int = 0, seed: int = 0) -> dict:
    """{(size, setting): CurveFit, or FitFailure with the reason}, one curve per method setting (mergelab.analysis.tables:
    method + hyperparameters); with n_boot the fits carry expert-bootstrap draws."""
    fits = {}
    for (size, setting), group in merges.groupby(["size", "setting"]):
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


def fit_summary(fits: dict) -> pd.DataFrame:
    rows = []
    for (size, setting), fit in fits.items():
        if not fit.ok:
            rows.append({"size": size, "setting": setting, "note": fit.reason})
            continue
        row = {"size": size, "setting": setting, DISPLAY["L_inf"]: fit.L_inf, DISPLAY["A"]: fit.A, "b": fit.b,
               "R² (k-weighted)": fit.r2, "R² (unweighted)": fit.r2_unweighted}
        if fit.samples is not None:
            for name, (lo, hi) in fit.param_ci().items():
                row[f"{DISPLAY.get(name, name)} 95% CI"] = f"[{lo:.4g}, {hi:.4g}]"
        row["note"] = "; ".join(fit.notes)
        rows.append(row)
    return pd.DataFrame(rows)


def variance_tables(merges: pd.DataFrame, rows: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Across-subset variance per k and its two laws per (size, setting); the finite-pool factor uses
    M, the size's pool of experts in the family's `rows` (as Fit & Plan does), not the largest k swept.
    A curve whose laws cannot be fitted gets {"reason": …} instead of its fits."""
    from mergelab.analysis.tables import pool_size

    frames, fits = [], {}
    pools = {size: pool_size(rows[rows["size"] == size]) for size in merges["size"].unique()}
    for (size, setting), group in merges.groupby(["size", "setting"]):
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


HELD_OUT_COLUMNS = {"N": "N (billions of parameters)", "observed": "observed mean (nats/token)",
                    "predicted": "predicted (nats/token)", "error": "error (nats/token)",
                    "error_rel_loss": "error / observed", "error_rel_drop": "error / drop L(1) − L(k max)",
                    "held_out": "held out"}


def held_out_table(table: pd.DataFrame) -> pd.DataFrame:
    """A held-out table (mergelab.analysis.heldout) for display: units in the headers, and the
    interval as one column that says what it covers."""
    out = table.rename(columns=HELD_OUT_COLUMNS)
    if "lo" in out:
        out["population mean at k, 95% CI (nats/token)"] = [f"[{lo:.4f}, {hi:.4f}]" if lo == lo else "—"
                                                           for lo, hi in zip(out.pop("lo"), out.pop("hi"))]
    return out
