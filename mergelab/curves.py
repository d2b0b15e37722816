"""Per-curve computations the Curves and Fit & Plan pages share (no streamlit here)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mergelab.fit import FitError, fit_curve
from mergelab.intervals import expert_bootstrap
from mergelab.variance import fit_variance, subset_variance


def fit_groups(merges: pd.DataFrame, n_boot: int = 0, seed: int = 0) -> dict:
    """{(size, method): CurveFit or error text}; with n_boot the fits carry expert-bootstrap draws."""
    fits = {}
    for (size, method), group in merges.groupby(["size", "method"]):
        try:
            if n_boot:
                fits[size, method] = expert_bootstrap(group["experts_key"], group["loss"], n_boot=n_boot, seed=seed)
            else:
                means = group.groupby("k")["loss"].mean()
                fits[size, method] = fit_curve(means.index.to_numpy(dtype=float), means.to_numpy())
        except FitError as exc:
            fits[size, method] = str(exc)
    return fits


def bands(fits: dict, merges: pd.DataFrame) -> dict:
    out = {}
    for key, fit in fits.items():
        if isinstance(fit, str) or fit.samples is None:
            continue
        ks = merges[(merges["size"] == key[0]) & (merges["method"] == key[1])]["k"]
        grid = np.linspace(ks.min(), ks.max(), 60)
        lo, hi = fit.band(grid)
        out[key] = (grid, lo, hi)
    return out


DISPLAY = {"L_inf": "L∞"}


def fit_summary(fits: dict) -> pd.DataFrame:
    rows = []
    for (size, method), fit in fits.items():
        if isinstance(fit, str):
            rows.append({"size": size, "method": method, "note": fit})
            continue
        row = {"size": size, "method": method, "L∞": fit.L_inf, "A": fit.A, "b": fit.b, "R² (k-weighted)": fit.r2,
               "R² (unweighted)": fit.r2_unweighted}
        if fit.samples is not None:
            for name, (lo, hi) in fit.param_ci().items():
                row[f"{DISPLAY.get(name, name)} 95% CI"] = f"[{lo:.4g}, {hi:.4g}]"
        row["note"] = "; ".join(fit.notes)
        rows.append(row)
    return pd.DataFrame(rows)


def variance_tables(merges: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    frames, fits = [], {}
    for (size, method), group in merges.groupby(["size", "method"]):
        var = subset_variance(group["k"], group["loss"]).assign(size=size, method=method)
        frames.append(var)
        try:
            fits[size, method] = fit_variance(var["k"], var["var"], int(group["k"].max()))
        except FitError:
            pass
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), fits


def size_points(merges: pd.DataFrame, k: int) -> pd.DataFrame:
    """Mean loss at one k per method and size, with N in billions of parameters."""
    at_k = merges[merges["k"] == k]
    return (at_k.groupby(["method", "size", "n_params"], as_index=False)["loss"].mean()
            .assign(N=lambda f: f["n_params"] / 1e9).sort_values("N"))
