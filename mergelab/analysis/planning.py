"""Planning with a fitted law: how many experts for a target loss, when to stop adding experts,
which size is needed. Every answer is an Estimate: the value at the fitted parameters plus a
percentile interval over the fit's expert-bootstrap draws (mergelab.analysis.intervals; NaN bounds when the
fit has none).

Two guards keep answers inside what the data support:
- a floor-based answer needs a falling curve. A curve that rises with k, or falls and then rises
  (TIES at low density often does), is not described by L∞ + A/(k+b): its "floor" and "tail" mean
  nothing, so the planners say why instead of answering (`k_for_target` reports where the
  measured means reach the target, if they do);
- answers in k are compared with the pool: with M experts, k > M cannot be merged, so such an
  answer is marked `extrapolated` with a note. M is the family's number of experts, not the largest
  k swept.
Formulas: DESIGN §3 (k_req, k_ε, ΔL, R(k), N_min) after paper §4.

Fits are made on oriented values (mergelab.metrics: a higher-is-better metric negated), so every formula
here reads "lower is better"; `metric` (default CE) turns targets and the numbers in notes back into the
metric's own values: for accuracy a target is reached from below and the floor is a ceiling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from mergelab.analysis.fit import CurveFit, FitError, JointFit
from mergelab.names import PARAMS_PER_BILLION, params_label

RISE_TOLERANCE = 0.1  # a rise after the minimum larger than this share of the drop makes a curve non-monotone


@dataclass(frozen=True)
class Estimate:
    """An answer (k, a fraction or a size) with its 95% interval and a note saying what limits it."""

    value: float
    lo: float = float("nan")
    hi: float = float("nan")
    note: str = ""
    extrapolated: bool = False  # beyond the M experts available (k answers) or outside the data

    def whole(self) -> "Estimate":
        """The answer as a count of experts: value and interval rounded up to whole k (a k of 4.2 needs 5
        experts; 1e-9 of slack so a fitted 5.0000000001 stays 5). NaN and infinity pass through."""
        up = lambda v: float(math.ceil(v - 1e-9)) if math.isfinite(v) else v  # noqa: E731
        return replace(self, value=up(self.value), lo=up(self.lo), hi=up(self.hi))

    def as_dict(self) -> dict:
        return {"value": self.value, "lo": self.lo, "hi": self.hi, "extrapolated": self.extrapolated,
                "note": self.note}


def _estimate(fit: "CurveFit | JointFit", fn: Callable[[dict], float], note: str = "", level: float = 0.95) -> Estimate:
    value = float(fn(fit.params))
    if fit.samples is None or not len(fit.samples):
        return Estimate(value, note=note)
    names = list(fit.params)
    usable = fit.samples[~np.isnan(fit.samples).any(axis=1)]  # a failed refit is no draw (not "unreachable")
    draws = np.array([fn(dict(zip(names, s))) for s in usable], dtype=float)
    draws = draws[~np.isnan(draws)]
    if not len(draws):
        return Estimate(value, note=note)
    # sample quantiles without interpolation: draws may be infinite (target unreachable in that draw)
    lo, hi = np.percentile(draws, [50 * (1 - level), 50 * (1 + level)], method="inverted_cdf")
    return Estimate(value, float(lo), float(hi), note)


def _k_swept(fit: CurveFit) -> float | None:
    return float(np.max(fit.observed[0])) if fit.observed is not None else None


def _in_data(est: Estimate, fit: CurveFit, M: int | None) -> Estimate:
    """Mark a k answer outside what was measured: beyond the M experts available, beyond the largest
    k swept (the law then extrapolates the measured curve), or below one expert."""
    if not np.isfinite(est.value):
        return est
    k_max = _k_swept(fit)
    if M is not None and est.value > M:
        where = f"beyond the M = {M} experts available"
    elif k_max is not None and est.value > k_max:
        where = f"beyond the largest k swept ({k_max:g})"
    elif est.value < 1:
        where = "below one expert"
    else:
        if M is not None and est.hi > M:
            return Estimate(est.value, est.lo, est.hi, "; ".join(filter(None, [
                est.note, f"its interval reaches beyond the M = {M} experts available"])), est.extrapolated)
        return est
    note = "; ".join(filter(None, [est.note, f"k = {est.value:.3g} is {where}: an extrapolation of the law"]))
    return Estimate(est.value, est.lo, est.hi, note, extrapolated=True)


def not_falling(fit: CurveFit, metric=None) -> str:
    """Why `fit`'s curve cannot carry a floor-based answer ('' when it falls with k; for a higher-is-better
    `metric`, when the metric rises with k: the notes then speak of it and its own values).

    Judged on the fitted tail (A ≤ 0 rises) and on the measured per-k means (`fit.observed`): a
    loss at the largest k above the loss at k = 1 rises; a rise after the minimum of more than
    RISE_TOLERANCE of the drop to it is non-monotone."""
    if fit.form != "floor_tail":
        raise FitError(f"planning needs a floor_tail fit L∞ + A/(k+b), got {fit.form!r}")
    m = _metric(metric)
    noun = (m.label or m.name) if m.higher_better else "loss"  # CE's notes read as they always have
    what, worse, better, bound = (f"measured {noun}", *(("falls", "rises", "ceiling") if m.higher_better
                                                                     else ("rises", "falls", "floor")))
    if fit.observed is not None:
        ks, means = (np.asarray(x, dtype=float) for x in fit.observed)
        low = int(np.argmin(means))
        rise, drop = means[-1] - means[low], means[0] - means[low]
        shown = means * m.sign
        if low == 0 and means[-1] > means[0]:
            return (f"the {what} {worse} from {shown[0]:.4g} at k = {ks[0]:g} to {shown[-1]:.4g} at "
                    f"k = {ks[-1]:g}: the {bound}–tail law does not describe this curve")
        if rise > RISE_TOLERANCE * drop:
            return (f"the {what} {better} to {shown[low]:.4g} at k = {ks[low]:g}, then {worse} by {rise:.3g} to "
                    f"k = {ks[-1]:g}: the {bound}–tail law does not describe a non-monotone curve")
    if fit.A <= 0:
        return (f"the fitted {noun} {worse} with k (A = {fit.A:.3g} ≤ 0): there is no {bound} to plan "
                f"against")
    return ""


def _metric(metric):
    from mergelab import metrics

    return metric if isinstance(metric, metrics.Metric) else metrics.get(metric)


def _refuse(fit: CurveFit) -> Estimate | None:
    reason = not_falling(fit)
    return Estimate(float("nan"), note=f"no floor-based answer: {reason}") if reason else None


def k_for_target(fit: CurveFit, target: float, M: int | None = None, metric=None) -> Estimate:
    """k_req = A/(L_target − L∞) − b; infinite when the target is at or below the floor.

    `target` is in the metric's own values (`metric`, default CE): for a higher-is-better one (accuracy)
    it is the first k whose value reaches the target from below, and the bound is a ceiling.
    For a curve that does not improve with k, the value is the first measured k whose mean reaches the
    target (NaN if none), with no interval and a note saying why the law was not used."""
    m = _metric(metric)
    goal = target * m.sign  # the oriented target: lower is better
    reason = not_falling(fit, m)
    if reason:
        ks, means = fit.observed if fit.observed is not None else ([], [])
        reached = [k for k, v in zip(ks, means) if v <= goal]
        seen = f"the measured means first reach {target:g} at k = {reached[0]:g}" if reached else \
            f"no measured k reaches {target:g}"
        return Estimate(float(reached[0]) if reached else float("nan"), note=f"{seen} (not from the law: {reason})")

    def k_req(p):
        gap = goal - p["L_inf"]
        return p["A"] / gap - p["b"] if gap > 0 and p["A"] > 0 else math.inf  # a draw that rises never gets there

    if m.higher_better:
        note = "" if goal > fit.L_inf else (f"target {target:g} is at or above the ceiling C = {-fit.L_inf:.4g}: "
                                            f"unreachable")
    else:
        note = "" if goal > fit.L_inf else f"target {target:g} is at or below the floor L∞ = {fit.L_inf:.4g}: unreachable"
    return _in_data(_estimate(fit, k_req, note), fit, M)


def k_epsilon(fit: CurveFit, eps: float, M: int | None = None) -> Estimate:
    """k_ε = A/ε − b (DESIGN §3): the k where the fitted loss is within ε (nats per token) of the floor L∞.
    M: the pool size, beyond which the answer is marked extrapolated. Raises FitError unless ε > 0."""
    if not eps > 0:
        raise FitError(f"epsilon must be > 0, got {eps!r}")
    return _refuse(fit) or _in_data(_estimate(fit, lambda p: p["A"] / eps - p["b"] if p["A"] > 0 else math.inf),
                                    fit, M)


def marginal_gain(fit: CurveFit, k: float) -> Estimate:
    """ΔL(k) = L(k) − L(k+1) = A/((k+b)(k+1+b)): what the (k+1)-th expert buys (nats)."""
    return _refuse(fit) or _estimate(fit, lambda p: p["A"] / ((k + p["b"]) * (k + 1 + p["b"])))


def fractional_return(fit: CurveFit, k: float, M: int) -> Estimate:
    """R(k) = (L(1) − L(k)) / (L(1) − L(M)). With b = 0 this is (M/(M−1))(1 − 1/k) whatever the
    data, so k80/k90 from it say little about the experts."""
    def R(p):
        num = 1 / (1 + p["b"]) - 1 / (k + p["b"])
        den = 1 / (1 + p["b"]) - 1 / (M + p["b"])
        return num / den

    return _refuse(fit) or _estimate(fit, R)


def k_at_fraction(fit: CurveFit, fraction: float, M: int) -> Estimate:
    """The (continuous) k where R(k) reaches `fraction` (0.8 → k80, 0.9 → k90), within [1, M]."""
    if not 0 < fraction < 1:
        raise FitError(f"fraction must lie in (0, 1), got {fraction!r}")

    def k_f(p):
        b = p["b"]
        inv = 1 / (1 + b) - fraction * (1 / (1 + b) - 1 / (M + b))
        return 1 / inv - b

    by_form = M / (M - fraction * (M - 1))
    note = (f"R(k) is fixed by b alone: with b = 0, k_f = M/(M − f(M−1)) for any data "
            f"(k{fraction * 100:.0f} = {by_form:.2f} at M = {M})")
    k_max = _k_swept(fit)
    if k_max is not None and k_max < M:
        note += f"; L(M) itself is extrapolated beyond the largest k swept ({k_max:g})"
    return _refuse(fit) or _estimate(fit, k_f, note)


def stop_rule(fit: CurveFit, tolerance: float, M: int | None = None, k_max: int = 1000) -> Estimate:
    """Smallest k after which one more expert gains less than `tolerance` nats (ΔL(k) < tolerance)."""
    if not tolerance > 0:
        raise FitError(f"tolerance must be > 0, got {tolerance!r}")

    def first_k(p):
        ks = np.arange(1, k_max + 1)
        below = np.nonzero(p["A"] / ((ks + p["b"]) * (ks + 1 + p["b"])) < tolerance)[0]
        return float(ks[below[0]]) if len(below) else math.inf

    return _refuse(fit) or _in_data(_estimate(fit, first_k), fit, M)


def default_targets(fit: CurveFit, M: int) -> dict[str, float]:
    """Planner inputs whose answers fall inside the data: the loss, ε and tolerance that the fitted
    law reaches halfway to the largest k measured (at most M) (shown as defaults in the dashboard)."""
    mid = (1 + min(M, _k_swept(fit) or M)) / 2
    if fit.A <= 0:  # a rising curve has no floor: plain, positive inputs (the planners say why they refuse)
        return {"target": float(fit.predict([mid])[0]), "epsilon": 0.01, "tolerance": 0.001}
    return {"target": float(fit.predict([mid])[0]), "epsilon": fit.A / (mid + fit.b),
            "tolerance": fit.A / ((mid + fit.b) * (mid + 1 + fit.b))}


def minimum_size(fit: JointFit, target: float, sizes=None) -> Estimate:
    """N_min = (B/(L_target − L*))^(1/β) in billions of parameters: the size whose floor meets the
    target (intervals from `mergelab.analysis.intervals.expert_bootstrap_joint` draws). With `sizes` (the
    swept sizes, billions), an answer outside their range is marked as an extrapolation. A fit whose
    L*, B or β is not identified (JointFit.not_identified) gets no answer, only the reason."""

    missing = [name for name in ("L_star", "B", "beta") if name in getattr(fit, "not_identified", {})]
    if missing:
        return Estimate(float("nan"), note="No minimum size: N_min = (B/(L_target − L*))^(1/β) extrapolates the floor "
                                           "law in N, which these sizes do not identify: " + "; ".join(fit.reasons(missing)))

    def n_min(p):
        gap = target - p["L_star"]
        return (p["B"] / gap) ** (1 / p["beta"]) if gap > 0 and p["beta"] > 0 else math.inf

    reachable = target > fit.params["L_star"]
    note = "" if reachable else f"target {target:g} is at or below L* = {fit.params['L_star']:.4g}: no size reaches it"
    est = _estimate(fit, n_min, note)
    if sizes is None or not np.isfinite(est.value) or min(sizes) <= est.value <= max(sizes):
        return est
    span = (f"outside the swept sizes {params_label(min(sizes) * PARAMS_PER_BILLION)}–"
            f"{params_label(max(sizes) * PARAMS_PER_BILLION)} parameters: an extrapolation of the joint law")
    return Estimate(est.value, est.lo, est.hi, "; ".join(filter(None, [est.note, span])), extrapolated=True)
