"""Planning with a fitted law: how many experts for a target loss, when to stop adding experts,
which size is needed. Every answer is an Estimate: the value at the fitted parameters plus a
percentile interval over the fit's expert-bootstrap draws (mergelab.intervals; NaN bounds when the
fit has none)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from mergelab.fit import CurveFit, FitError, JointFit


@dataclass(frozen=True)
class Estimate:
    value: float
    lo: float = float("nan")
    hi: float = float("nan")
    note: str = ""

    def as_dict(self) -> dict:
        return {"value": self.value, "lo": self.lo, "hi": self.hi, "note": self.note}


def _estimate(fit: "CurveFit | JointFit", fn: Callable[[dict], float], note: str = "", level: float = 0.95) -> Estimate:
    value = float(fn(fit.params))
    if fit.samples is None or not len(fit.samples):
        return Estimate(value, note=note)
    names = list(fit.params)
    draws = np.array([fn(dict(zip(names, s))) for s in fit.samples], dtype=float)
    draws = draws[~np.isnan(draws)]
    if not len(draws):
        return Estimate(value, note=note)
    # sample quantiles without interpolation: draws may be infinite (target unreachable in that draw)
    lo, hi = np.percentile(draws, [50 * (1 - level), 50 * (1 + level)], method="inverted_cdf")
    return Estimate(value, float(lo), float(hi), note)


def _require_floor_tail(fit: CurveFit) -> None:
    if fit.form != "floor_tail":
        raise FitError(f"planning needs a floor_tail fit L∞ + A/(k+b), got {fit.form!r}")


def k_for_target(fit: CurveFit, target: float) -> Estimate:
    """k_req = A/(L_target − L∞) − b; infinite when the target is at or below the floor."""
    _require_floor_tail(fit)

    def k_req(p):
        gap = target - p["L_inf"]
        return p["A"] / gap - p["b"] if gap > 0 else math.inf

    note = "" if target > fit.L_inf else f"target {target:g} is at or below the floor L∞ = {fit.L_inf:.4g}: unreachable"
    return _estimate(fit, k_req, note)


def k_epsilon(fit: CurveFit, eps: float) -> Estimate:
    """k_ε = A/ε − b: where the loss is within ε of the floor."""
    _require_floor_tail(fit)
    if not eps > 0:
        raise FitError(f"epsilon must be > 0, got {eps!r}")
    return _estimate(fit, lambda p: p["A"] / eps - p["b"])


def marginal_gain(fit: CurveFit, k: float) -> Estimate:
    """ΔL(k) = L(k) − L(k+1) = A/((k+b)(k+1+b)): what the (k+1)-th expert buys."""
    _require_floor_tail(fit)
    return _estimate(fit, lambda p: p["A"] / ((k + p["b"]) * (k + 1 + p["b"])))


def fractional_return(fit: CurveFit, k: float, M: int) -> Estimate:
    """R(k) = (L(1) − L(k)) / (L(1) − L(M)). With b = 0 this is (M/(M−1))(1 − 1/k) whatever the
    data, so k80/k90 from it say little about the experts."""
    _require_floor_tail(fit)

    def R(p):
        num = 1 / (1 + p["b"]) - 1 / (k + p["b"])
        den = 1 / (1 + p["b"]) - 1 / (M + p["b"])
        return num / den

    return _estimate(fit, R)


def k_at_fraction(fit: CurveFit, fraction: float, M: int) -> Estimate:
    """The (continuous) k where R(k) reaches `fraction` (0.8 → k80, 0.9 → k90)."""
    _require_floor_tail(fit)
    if not 0 < fraction < 1:
        raise FitError(f"fraction must lie in (0, 1), got {fraction!r}")

    def k_f(p):
        b = p["b"]
        inv = 1 / (1 + b) - fraction * (1 / (1 + b) - 1 / (M + b))
        return 1 / inv - b

    return _estimate(fit, k_f, "R(k) is fixed by b alone: with b = 0, k_f = M/(M − f(M−1)) for any data (k90 = 5 at M = 9)")


def stop_rule(fit: CurveFit, tolerance: float, k_max: int = 1000) -> Estimate:
    """Smallest k after which one more expert gains less than `tolerance` (ΔL(k) < tolerance)."""
    _require_floor_tail(fit)
    if not tolerance > 0:
        raise FitError(f"tolerance must be > 0, got {tolerance!r}")

    def first_k(p):
        ks = np.arange(1, k_max + 1)
        below = np.nonzero(p["A"] / ((ks + p["b"]) * (ks + 1 + p["b"])) < tolerance)[0]
        return float(ks[below[0]]) if len(below) else math.inf

    return _estimate(fit, first_k)


def minimum_size(fit: JointFit, target: float) -> Estimate:
    """N_min = (B/(L_target − L*))^(1/β) in billions of parameters: the size whose floor meets the
    target (intervals from `mergelab.intervals.expert_bootstrap_joint` draws)."""

    def n_min(p):
        gap = target - p["L_star"]
        return (p["B"] / gap) ** (1 / p["beta"]) if gap > 0 and p["beta"] > 0 else math.inf

    reachable = target > fit.params["L_star"]
    note = "" if reachable else f"target {target:g} is at or below L* = {fit.params['L_star']:.4g}: no size reaches it"
    return _estimate(fit, n_min, note)
