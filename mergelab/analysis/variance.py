"""Across-subset variance of the merged loss vs k, and its 1/(k+b) law with and without the
finite-pool factor (M−k)/(M−1): with exhaustive subsets from a pool of M experts, the variance of
the subset mean is exactly 0 at k = M, which the plain law cannot express."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mergelab.analysis.fit import B_MAX, CurveFit, Form, design_columns, param_grid, fit_curve


def subset_variance(k, loss, ddof: int = 0) -> pd.DataFrame:
    """Variance of the loss across merged subsets at each k. ddof=0: with exhaustive subsets the
    subsets are the whole population, so at k = M (one subset) the variance is exactly 0."""
    frame = pd.DataFrame({"k": np.asarray(k, dtype=float), "loss": np.asarray(loss, dtype=float)})
    out = frame.groupby("k")["loss"].agg(n_subsets="size", mean="mean", var=lambda x: x.var(ddof=ddof))
    return out.reset_index().fillna({"var": 0.0})


# A variance floor cannot be negative: V∞ ≥ 0 in both laws. (Unconstrained, the plain law mimics
# the finite-pool curve σ²(M−k)/((M−1)k) with the unphysical floor V∞ = −σ²/(M−1).)


def plain_law() -> Form:
    return Form("variance", "V∞ + C/(k+b)", ("V_inf", "C"), ("b",), ((0.0, B_MAX),),
                lambda k, b: design_columns(1.0, 1.0 / (k + b)), (param_grid(0.0, B_MAX, 48),), nonneg=("V_inf",))


def finite_pool_law(M: int) -> Form:
    def pool(k):
        return (M - k) / (M - 1)

    return Form("variance_finite_pool", f"(M−k)/(M−1)·(V∞ + C/(k+b)), M={M}", ("V_inf", "C"), ("b",),
                ((0.0, B_MAX),), lambda k, b: design_columns(pool(k), pool(k) / (k + b)), (param_grid(0.0, B_MAX, 48),),
                nonneg=("V_inf",))


def fit_variance(k, var, M: int, *, weights="k") -> dict[str, CurveFit]:
    """Both variance laws fitted to per-k variances; `best` is the one with the lower AICc."""
    fits = {"plain": fit_curve(k, var, weights=weights, form=plain_law()),
            "finite_pool": fit_curve(k, var, weights=weights, form=finite_pool_law(M))}
    fits["best"] = min(fits.values(), key=lambda f: (f.aicc, f.aic))
    return fits
