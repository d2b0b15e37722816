"""Fitting the merging law per curve, L(k) = L∞ + A/(k + b), jointly over sizes,
L(N, k) = L* + B·N^(−β) + A0·N^(−γ)/(k + b), and alternative forms.

Every form here is linear in some parameters once the others are fixed (for the floor-tail law,
L∞ and A are linear given b). Fits therefore profile: a weighted linear least-squares solve inside,
a vectorised grid plus a bounded refinement over the few nonlinear parameters outside. That is
robust (no starting point to get wrong) and fast enough to refit every curve on each interaction.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from mergelab.analysis.means import per_k_means
from mergelab.errors import MergelabError

B_MAX = 100.0       # upper bound of the offset b (k + b); larger means "no curvature in the data"
EXP_MAX = 3.0       # upper bound of β, γ and of the power-law / exponential rates
BOUND_TOL = 1e-6


class FitError(MergelabError):
    """Input that cannot support the requested fit (too few points, constant loss, NaN, …)."""


@dataclass(frozen=True)
class Form:
    """A model linear in `linear` parameters given the `nonlinear` ones.

    basis(x, *theta) returns the design matrix (n, len(linear)); theta lies within `bounds`.
    """

    name: str
    formula: str
    linear: tuple[str, ...]
    nonlinear: tuple[str, ...]
    bounds: tuple[tuple[float, float], ...]
    basis: Callable[..., np.ndarray]
    grid: tuple[np.ndarray, ...]
    nonneg: tuple[str, ...] = ()   # linear parameters constrained to be >= 0

    @property
    def n_params(self) -> int:
        return len(self.linear) + len(self.nonlinear)


def design_columns(*columns) -> np.ndarray:
    """Design-matrix columns broadcast to one shape and stacked last: (..., n, p) (for Form.basis)."""
    return np.stack(np.broadcast_arrays(*columns), -1).astype(float)


def param_grid(lo: float, hi: float, n: int, log: bool = True) -> np.ndarray:
    """n grid points on [lo, hi] for a nonlinear parameter (log-spaced, with lo itself when it is 0)."""
    if log:
        return np.concatenate([[lo], np.geomspace(max(lo, 1e-3), hi, n - 1)]) if lo == 0 else np.geomspace(lo, hi, n)
    return np.linspace(lo, hi, n)


FORMS: dict[str, Form] = {
    f.name: f for f in (
        Form("floor_tail", "L∞ + A/(k+b)", ("L_inf", "A"), ("b",), ((0.0, B_MAX),),
             lambda k, b: design_columns(1.0, 1.0 / (k + b)), (param_grid(0.0, B_MAX, 48),)),
        Form("power", "L∞ + A·k^(−α)", ("L_inf", "A"), ("alpha",), ((1e-3, EXP_MAX),),
             lambda k, a: design_columns(1.0, k ** -a), (param_grid(1e-3, EXP_MAX, 40),)),
        Form("exponential", "L∞ + A·exp(−λk)", ("L_inf", "A"), ("lam",), ((1e-3, EXP_MAX),),
             lambda k, lam: design_columns(1.0, np.exp(-lam * k)), (param_grid(1e-3, EXP_MAX, 40),)),
        Form("log", "a − c·ln k", ("a", "c"), (), (),
             lambda k: design_columns(1.0, -np.log(k)), ()),
        Form("floor_tail_interference", "L∞ + A/(k+b) + D·k/(k+q)", ("L_inf", "A", "D"), ("b", "q"),
             ((0.0, B_MAX), (0.1, 50.0)),
             lambda k, b, q: design_columns(1.0, 1.0 / (k + b), k / (k + q)),
             (param_grid(0.0, B_MAX, 20), param_grid(0.1, 50.0, 12)), nonneg=("D",)),
    )
}


class FitResult:
    """What every fit returns, per curve (`CurveFit`) or jointly over sizes (`JointFit`):

    params (name -> value, in the loss's units: CE in nats per token for the laws here), se (Jacobian
    standard errors; NaN at a bound or where not identified), r2 (weighted like the fit, ∝ k by default)
    and r2_unweighted, aic, aicc, bic, sse, n, at_bound (name -> on a bound), notes, samples (bootstrap
    draws of the params, or None), param_ci(level) (percentile intervals over the draws; FitError
    without), predict(*x) and to_dict(). A curve that cannot be fitted is a `FitFailure` (in tables and
    dictionaries of fits) or a raised `FitError`, never a string."""

    ok = True  # a fit, not a FitFailure

    def __getattr__(self, name: str) -> float:
        """Each parameter as an attribute: fit.L_inf, fit.A, fit.b; joint.L_star, joint.beta, …"""
        params = self.__dict__.get("params") or {}
        if name in params:
            return params[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or parameter {name!r}")

    def param_ci(self, level: float = 0.95) -> dict[str, tuple[float, float]]:
        """Percentile intervals over the expert-bootstrap draws (mergelab.analysis.intervals).

        Raises FitError without draws: the Jacobian standard errors `se` treat the per-k means as
        independent, which subsets sharing experts are not, so no interval is built from them."""
        names = list(self.params)
        lo, hi = np.nanpercentile(self._draws(), [50 * (1 - level), 50 * (1 + level)], axis=0)
        return {n: (float(lo[i]), float(hi[i])) for i, n in enumerate(names)}

    def _draws(self) -> np.ndarray:
        if self.samples is None or not len(self.samples):
            raise FitError("no expert-bootstrap draws on this fit: use mergelab.analysis.intervals.expert_bootstrap() "
                           "for intervals")
        return self.samples


@dataclass(frozen=True)
class FitFailure:
    """A curve that could not be fitted, and why: what a table or a dictionary of fits holds in its place."""

    reason: str
    ok = False

    def to_dict(self) -> dict:
        return {"notes": [self.reason]}

    def __str__(self) -> str:
        return self.reason


@dataclass
class CurveFit(FitResult):
    """A fitted curve L(k) (a `Form`: floor_tail L∞ + A/(k+b) by default): parameters, standard errors,
    goodness of fit and bound flags (the `FitResult` protocol)."""

    form: str
    params: dict[str, float]
    se: dict[str, float]
    r2: float            # weighted by the fit's weights (∝ k by default, as the paper reports it)
    aic: float
    bic: float
    sse: float
    n: int
    weights: str
    at_bound: dict[str, bool]
    notes: list[str] = field(default_factory=list)
    r2_unweighted: float = float("nan")  # every point counted once, for comparison with the weighted r2
    aicc: float = float("nan")           # AIC with the small-sample correction: rank forms by this on ~9 points
    spec: Form | None = field(default=None, repr=False)
    # Attached by mergelab.analysis.intervals.expert_bootstrap (intervals that resample experts):
    samples: np.ndarray | None = None      # draws of the params, (n_boot, n_params), order of `params`
    mean_draws: np.ndarray | None = None   # per-k mean of each draw minus the fitted law, (n_boot, K)
    interval: str = ""                     # how the draws were made, for tables and captions
    observed: tuple | None = None          # (k (K,), observed per-k means (K,)), set by every fit

    def predict(self, k) -> np.ndarray:
        return predict_form(self.spec or self.form, self.params, np.asarray(k, dtype=float))

    def mean_ci(self, level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(k, observed per-k mean, lo, hi): basic bootstrap intervals of the population mean loss
        at each k, m̂_k − quantiles of (m*_k − f̂(k)); finite at k = M, where one subset was merged."""
        self._draws()
        ks, means = self.observed
        q_lo, q_hi = np.nanpercentile(self.mean_draws, [50 * (1 - level), 50 * (1 + level)], axis=0)
        return ks, means, means - q_hi, means - q_lo

    def band(self, k, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise percentile band of the fitted curve over the expert-bootstrap draws."""
        self._draws()
        k = np.asarray(k, dtype=float)
        curves = np.array([predict_form(self.spec or self.form, dict(zip(self.params, s)), k) for s in self.samples])
        lo, hi = np.nanpercentile(curves, [50 * (1 - level), 50 * (1 + level)], axis=0)
        return lo, hi

    def to_dict(self) -> dict:
        out = {"form": self.form, "formula": (self.spec or FORMS[self.form]).formula, **self.params,
               **{f"se_{k}": v for k, v in self.se.items()}, "r2": self.r2, "r2_unweighted": self.r2_unweighted,
               "aic": self.aic, "aicc": self.aicc, "bic": self.bic,
               "n": self.n, "weights": self.weights, "at_bound": [k for k, v in self.at_bound.items() if v],
               "notes": list(self.notes)}
        if self.samples is not None:
            out.update({f"ci_{k}": list(v) for k, v in self.param_ci().items()})
            out["n_bootstrap"], out["interval"] = len(self.samples), self.interval
        return out


def predict_form(form: "str | Form", params: dict[str, float], k: np.ndarray) -> np.ndarray:
    spec = _form(form)
    X = spec.basis(np.asarray(k, dtype=float), *(params[n] for n in spec.nonlinear))
    return X @ np.array([params[n] for n in spec.linear])


# -- input checks -----------------------------------------------------------------------------


def _weights(k: np.ndarray, weights) -> tuple[np.ndarray, str]:
    if isinstance(weights, str):
        if weights == "k":
            return k.astype(float), "k"
        if weights == "uniform":
            return np.ones_like(k, dtype=float), "uniform"
        raise FitError(f"weights={weights!r}: expected 'k', 'uniform' or an array")
    w = np.asarray(weights, dtype=float)
    if w.shape != k.shape or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise FitError(f"weights must be {len(k)} positive finite numbers")
    return w, "custom"


def _clean(k, loss, min_distinct: int = 3) -> tuple[np.ndarray, np.ndarray]:
    k, loss = np.asarray(k, dtype=float).ravel(), np.asarray(loss, dtype=float).ravel()
    if k.shape != loss.shape:
        raise FitError(f"k and loss differ in length ({len(k)} vs {len(loss)})")
    bad = ~(np.isfinite(k) & np.isfinite(loss))
    if bad.any():
        raise FitError(f"{int(bad.sum())} of {len(k)} rows have NaN/Inf k or loss; drop them first")
    if np.any(k < 1):
        raise FitError(f"k must be >= 1 (merged experts), got min k = {k.min():g}")
    distinct = np.unique(k)
    if len(distinct) < min_distinct:
        raise FitError(f"need at least {min_distinct} distinct k to fit, got {len(distinct)} "
                       f"(k = {', '.join(f'{x:g}' for x in distinct)})")
    if np.ptp(loss) <= 1e-12 * max(1.0, abs(loss.mean())):
        raise FitError(f"loss is constant ({loss[0]:.6g}) across k: there is no tail to fit")
    return k, loss


# -- the profile fit --------------------------------------------------------------------------


def _solve_linear(X: np.ndarray, y: np.ndarray, w: np.ndarray, nonneg: Sequence[int] = ()):
    """Weighted least squares, batched over leading axes of X: (..., n, p). Returns beta, sse.
    Columns in `nonneg` that come out negative are dropped (set to 0) and the rest refitted."""
    sw = np.sqrt(w)
    Xw, yw = X * sw[:, None], y * sw
    beta = _lstsq(Xw, yw)
    for j in nonneg:
        neg = beta[..., j] < 0
        if np.any(neg):
            keep = [c for c in range(X.shape[-1]) if c != j]
            sub = _lstsq(Xw[..., keep], yw)
            beta = np.where(neg[..., None], np.insert(sub, j, 0.0, axis=-1), beta)
    resid = yw - np.einsum("...np,...p->...n", Xw, beta)
    return beta, np.einsum("...n,...n->...", resid, resid)


def _lstsq(Xw: np.ndarray, yw: np.ndarray) -> np.ndarray:
    """Least squares via normal equations with a tiny ridge (batched); fine for 2–3 columns."""
    XtX = np.einsum("...np,...nq->...pq", Xw, Xw)
    Xty = np.einsum("...np,...n->...p", Xw, yw)
    scale = np.maximum(np.einsum("...pp->...p", XtX).max(axis=-1), 1e-300)[..., None, None]
    ridge = 1e-12 * scale * np.eye(XtX.shape[-1])
    return np.linalg.solve(XtX + ridge, Xty[..., None])[..., 0]


def _form(name: "str | Form") -> Form:
    if isinstance(name, Form):
        return name
    if name not in FORMS:
        raise FitError(f"unknown form {name!r} (forms: {', '.join(FORMS)})")
    return FORMS[name]


def fit_curve(k, loss, *, weights="k", form: "str | Form" = "floor_tail") -> CurveFit:
    """Weighted least squares of one curve, L(k) = L∞ + A/(k+b) by default (arXiv 2509.24244 §3, fitted
    with weights ∝ k as there), or another `form` (FORMS: power, exponential, log, floor_tail_interference).

    k: (n,) experts merged (≥ 1; repeated k are fine, e.g. every subset); loss: (n,) CE in nats per token
    (or any unit: parameters come back in it); weights: "k", "uniform" or (n,) positive numbers.
    The linear parameters are solved exactly given the nonlinear ones, which come from a grid and a bounded
    refinement (b ∈ [0, 100]); parameters on a bound are flagged in `at_bound`. Returns a CurveFit (the
    FitResult protocol). Raises FitError for NaN/Inf, k < 1, fewer than 3 distinct k (more for larger
    forms), a constant loss, bad weights or an unknown form."""
    return fit_curves(k, np.asarray(loss, dtype=float)[None, :], weights=weights, form=form)[0]


def fit_curves(k, losses, *, weights="k", form: "str | Form" = "floor_tail") -> list[CurveFit]:
    """`fit_curve` of many curves sharing one k vector, in one vectorised pass: k (K,), losses (m, K)
    (nats per token); returns m CurveFits. Raises FitError if any row cannot be fitted (fit rows one by one
    to tell which)."""
    spec = _form(form)
    losses = np.atleast_2d(np.asarray(losses, dtype=float))
    min_k = max(3, spec.n_params - 1)
    k = np.asarray(k, dtype=float).ravel()
    for row in losses:
        _clean(k, row, min_k)
    w, wname = _weights(k, weights)
    theta, beta, sse = _fit_batch(spec, k, losses, w)
    fits = []
    for row, th, be, ss in zip(losses, theta, beta, sse):
        params = dict(zip(spec.linear, map(float, be))) | dict(zip(spec.nonlinear, map(float, th)))
        fit = _finish(spec, params, k, row, w, float(ss), wname)
        fit.observed = per_k_means(k, row)
        if not np.all(np.diff(fit.observed[1]) <= 0):
            fit.notes.append("mean loss is not monotone in k")
        if "A" in params and params["A"] < 0:
            fit.notes.append("A < 0: the fitted loss rises with k")
        fits.append(fit)
    return fits


def fit_params(k, Y, *, weights="k", form: "str | Form" = "floor_tail") -> np.ndarray:
    """Parameters only (no errors, notes or standard errors) of every row of Y (m, K) sharing the k
    grid (K,): (m, n_params) in the order of CurveFit.params (linear, then nonlinear). For bootstrap
    draws, where building m CurveFit objects would dominate the time."""
    spec = _form(form)
    k = np.asarray(k, dtype=float).ravel()
    w, _ = _weights(k, weights)
    theta, beta, _ = _fit_batch(spec, k, np.atleast_2d(np.asarray(Y, dtype=float)), w)
    return np.column_stack([beta, theta])


def _fit_batch(spec: Form, k: np.ndarray, Y: np.ndarray, w: np.ndarray):
    """Parameters of `spec` fitted to every row of Y: (theta (m, nonlinear), beta (m, linear), sse (m,))."""
    nonneg = [spec.linear.index(n) for n in spec.nonneg]
    if len(spec.nonlinear) == 1 and not nonneg:
        theta = _profile_1d(spec, k, Y, w)[:, None]
    elif not spec.nonlinear:
        theta = np.empty((len(Y), 0))
    else:
        theta = np.array([_profile_nd(spec, k, y, w, nonneg) for y in Y])
    X = spec.basis(k[None, :], *(theta[:, i:i + 1] for i in range(theta.shape[1])))
    beta, sse = _solve_linear(X, Y, w, nonneg)
    return theta, beta, sse


_INV_PHI = (math.sqrt(5) - 1) / 2


def _profile_1d(spec: Form, k, Y, w, iterations: int = 40) -> np.ndarray:
    """Best nonlinear parameter per row: grid search, then golden-section search between the grid
    neighbours of the best point, all rows at once."""
    grid = spec.grid[0]

    def sse(theta):  # theta (m, T) -> (m, T)
        X = spec.basis(k, theta[..., None])
        with np.errstate(all="ignore"):
            _, s = _solve_linear(X, Y[:, None, :], w)
        return np.where(np.isfinite(s), s, np.inf)

    on_grid = sse(np.broadcast_to(grid, (len(Y), len(grid))))
    best = np.argmin(on_grid, axis=1)
    lo, hi = grid[np.maximum(best - 1, 0)], grid[np.minimum(best + 1, len(grid) - 1)]
    c, d = hi - _INV_PHI * (hi - lo), lo + _INV_PHI * (hi - lo)
    fc, fd = sse(c[:, None])[:, 0], sse(d[:, None])[:, 0]
    for _ in range(iterations):  # one new evaluation per step, the bracket shrinks by 0.618
        left = fc < fd
        hi, lo = np.where(left, d, hi), np.where(left, lo, c)
        x = np.where(left, hi - _INV_PHI * (hi - lo), lo + _INV_PHI * (hi - lo))
        fx = sse(x[:, None])[:, 0]
        c, fc, d, fd = (np.where(left, x, d), np.where(left, fx, fd),
                        np.where(left, c, x), np.where(left, fc, fx))
    refined = (lo + hi) / 2
    keep_grid = on_grid[np.arange(len(Y)), best] < sse(refined[:, None])[:, 0]
    return np.where(keep_grid, grid[best], refined)


def _profile_nd(spec: Form, k, loss, w, nonneg) -> tuple[float, ...]:
    """Several nonlinear parameters: vectorised grid search, then bounded L-BFGS-B refinement."""
    from scipy.optimize import minimize

    mesh = np.meshgrid(*spec.grid, indexing="ij")
    points = np.stack([m.ravel() for m in mesh], -1)
    X = spec.basis(k[None, :], *(points[:, i:i + 1] for i in range(points.shape[1])))
    with np.errstate(all="ignore"):
        _, sse = _solve_linear(X, loss, w, nonneg)
    best = points[int(np.argmin(np.where(np.isfinite(sse), sse, np.inf)))]

    def objective(theta):
        _, s = _solve_linear(spec.basis(k, *theta), loss, w, nonneg)
        return float(s) if np.isfinite(s) else np.inf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = minimize(objective, best, method="L-BFGS-B", bounds=spec.bounds)
    return tuple(map(float, res.x if res.fun <= objective(best) else best))


def _finish(spec: Form, params, k, loss, w, sse, wname) -> CurveFit:
    n, p = len(k), spec.n_params
    mean = np.average(loss, weights=w)
    sst = float(np.sum(w * (loss - mean) ** 2))
    r2 = 1.0 - sse / sst if sst > 0 else float("nan")
    at_bound = {name: (v - lo <= BOUND_TOL * max(1.0, abs(hi))) or (hi - v <= BOUND_TOL * max(1.0, abs(hi)))
                for name, (lo, hi), v in zip(spec.nonlinear, spec.bounds, (params[x] for x in spec.nonlinear))}
    at_bound |= {name: params[name] <= 0.0 for name in spec.nonneg}
    # Jacobian standard errors assume an interior optimum: at a bound they are not valid for any parameter
    se = ({x: float("nan") for x in (*spec.linear, *spec.nonlinear)} if any(at_bound.values())
          else _standard_errors(spec, params, k, w, sse, n - p))
    aic, aicc, bic = criteria(sse, n, p)
    resid = loss - spec.basis(k, *(params[x] for x in spec.nonlinear)) @ np.array([params[x] for x in spec.linear])
    sst_u = float(np.sum((loss - loss.mean()) ** 2))
    r2_u = 1.0 - float(resid @ resid) / sst_u if sst_u > 0 else float("nan")
    fit = CurveFit(spec.name, params, se, r2, aic, bic, sse, n, wname,
                   at_bound, spec=spec, r2_unweighted=r2_u, aicc=aicc)
    for name, hit in at_bound.items():
        if hit:
            fit.notes.append(f"{name} sits on its bound")
    if any(at_bound.values()):
        fit.notes.append("no standard errors at a bound: report the expert-bootstrap interval")
    return fit


def criteria(sse: float, n: int, p: int) -> tuple[float, float, float]:
    """(AIC, AICc, BIC) of a weighted Gaussian least-squares fit with p parameters on n points (a tiny floor
    on the SSE keeps exact fits finite). AICc (Hurvich & Tsai 1989) corrects AIC's penalty, far too light
    when n is close to p (9 points, 5 parameters); it is infinite when n ≤ p + 1."""
    loglik_term = n * math.log(max(sse, 1e-300) / n)
    aic = loglik_term + 2 * p
    aicc = aic + 2 * p * (p + 1) / (n - p - 1) if n - p - 1 > 0 else math.inf
    return aic, aicc, loglik_term + p * math.log(n)


def fit_at(params: dict[str, float], k, loss, *, weights="uniform", form: "str | Form" = "floor_tail") -> CurveFit:
    """The CurveFit of given parameters (no optimisation) on the points (k, loss): residual SSE, R²,
    criteria, standard errors and bound flags, as `fit_curve` reports them (e.g. a closed-form solution)."""
    spec = _form(form)
    k, loss = np.asarray(k, dtype=float).ravel(), np.asarray(loss, dtype=float).ravel()
    w, wname = _weights(k, weights)
    params = {n: float(params[n]) for n in (*spec.linear, *spec.nonlinear)}
    resid = loss - predict_form(spec, params, k)
    fit = _finish(spec, params, k, loss, w, float(np.sum(w * resid ** 2)), wname)
    fit.observed = per_k_means(k, loss)
    return fit


def _standard_errors(spec: Form, params, k, w, sse, dof) -> dict[str, float]:
    """Asymptotic SEs from the Jacobian (numeric for the nonlinear parameters). They treat the per-k
    means as independent points, which merges sharing experts are not: a diagnostic of the fit's
    conditioning, not an interval to report (mergelab.analysis.intervals gives those)."""
    names = list(spec.linear) + list(spec.nonlinear)
    x0 = np.array([params[n] for n in names])

    def model(x):
        return spec.basis(k, *x[len(spec.linear):]) @ x[:len(spec.linear)]

    J = np.empty((len(w), len(x0)))
    for i in range(len(x0)):
        h = 1e-6 * max(1.0, abs(x0[i]))
        up, down = x0.copy(), x0.copy()
        up[i] += h
        down[i] -= h
        J[:, i] = (model(up) - model(down)) / (2 * h)
    if dof <= 0:
        return {n: float("nan") for n in names}
    s2 = sse / dof
    try:
        cov = s2 * np.linalg.inv(J.T @ (J * w[:, None]))
        return {n: float(math.sqrt(v)) if v >= 0 else float("nan") for n, v in zip(names, np.diag(cov))}
    except np.linalg.LinAlgError:
        return {n: float("nan") for n in names}


# -- joint fit over sizes -----------------------------------------------------------------------
#
# L(N, k) = L* + B·N^(−β) + A0·N^(−γ)/(k + b): arXiv 2509.24244, §3 and Tables 3–5 (CE in nats/token,
# N in billions of parameters). The fit is unit-free: the loss is standardised and N divided by the
# geometric mean of the sizes before fitting, and the result mapped back, so the same points in nats,
# millinats or with an offset give the same β, γ, b and proportionally scaled L*, B, A0.

JOINT_PARAMS = ("L_star", "B", "beta", "A0", "gamma", "b")
JOINT_SYMBOLS = {"L_star": "L*", "B": "B", "beta": "β", "A0": "A0", "gamma": "γ", "b": "b"}
JOINT_BOUNDS = ((0.0, EXP_MAX), (0.0, EXP_MAX), (0.0, B_MAX))  # β, γ, b
FLOOR_SIZES = 4    # sizes the floor L* + B·N^(−β) needs: its 3 parameters and one more size to test the form
TAIL_SIZES = 3     # sizes the tail A0·N^(−γ) needs: its 2 parameters and one more
EXACT = 1e-6       # a residual RMS or a term's variation below this fraction of the loss's spread counts as 0
LR_95 = 3.841458820694124  # χ²(1) 95% quantile: threshold of the profile likelihood ratio


def _joint_basis(x, beta, gamma, b):
    N, k = x
    return design_columns(1.0, N ** -beta, N ** -gamma / (k + b))


# The joint law as a Form over x = (N, k): linear in (L*, B, A0) given (β, γ, b), like every per-curve
# form; `fit_joint` profiles it with the same linear solve (`_solve_linear`) on its grid, then refines
# (β, γ, b) by variable projection (`_JointLS`), since three nonlinear parameters need more than a grid.
JOINT = Form("joint", "L* + B·N^(−β) + A0·N^(−γ)/(k+b)", ("L_star", "B", "A0"), ("beta", "gamma", "b"),
             JOINT_BOUNDS, _joint_basis,
             (np.linspace(0.0, EXP_MAX, 16), np.linspace(0.0, EXP_MAX, 16), param_grid(0.0, B_MAX, 20)))


@dataclass
class JointFit(FitResult):
    """L(N,k) = L* + B·N^(−β) + A0·N^(−γ)/(k+b) (arXiv 2509.24244 §3, Tables 3–5); CE in nats/token
    (or whatever unit the loss came in: L*, B and A0 carry it), N in billions of parameters.

    `params` holds the fitted values, which `predict` uses; `not_identified` maps the parameters the
    data do not pin down to the reason, and `reported()` / `to_dict()` blank those (NaN). Rules, in
    order (a parameter flagged by several gets every reason):

    1. sizes: the floor (L*, B, β) needs ≥ 4 sizes (with 3, the three per-size floors determine it
       exactly and nothing tests the N^(−β) form; with 2, B and β are not separately identified);
       the tail (A0, γ) needs ≥ 3 sizes;
    2. a term that is 0: when B·N^(−β) varies by less than 1e-6 of the loss's spread over the sizes,
       β means nothing (B ≈ 0); when A0·N^(−γ)/(k+b) does, γ and b mean nothing (A0 ≈ 0);
    3. bounds: β, γ or b on its upper bound (3, 3, 100) is set by the bound, not the data; β = 0 makes
       B·N^(−β) a constant, so only L* + B is identified. γ = 0 or b = 0 (a tail that does not shrink
       with N, a pure 1/k) are values like any other: noted, not flagged;
    4. the joint L* above the largest size's own per-curve floor L∞ (by more than 1.96 standard
       errors): the floor law contradicts the per-size floors (L*, B, β flagged);
    5. a flat profile: fixing β (or γ, or b) anywhere on its range and refitting the rest never raises
       the SSE past the 95% likelihood-ratio threshold n·ln(SSE/SSE_min) = 3.84 (SSE_min floored at a
       residual RMS of 1e-6 of the loss's spread, the precision of exact input).
    """

    params: dict[str, float]
    r2: float            # weighted by the fit's weights (∝ k by default, as the paper reports it)
    sse: float
    n: int
    at_bound: dict[str, bool]
    notes: list[str] = field(default_factory=list)
    samples: np.ndarray | None = None  # bootstrap draws of params, shape (n_boot, 6)
    interval: str = ""                 # how the draws were made (mergelab.analysis.intervals.expert_bootstrap_joint)
    r2_unweighted: float = float("nan")  # every (N, k) point counted once
    n_sizes: int = 0
    not_identified: dict[str, list[str]] = field(default_factory=dict)  # parameter -> why the data do not pin it down
    se: dict[str, float] = field(default_factory=dict)  # Jacobian SEs: NaN at a bound or where not identified
    aic: float = float("nan")
    aicc: float = float("nan")
    bic: float = float("nan")
    weights: str = "k"
    form = "joint"
    spec = JOINT

    @property
    def identified(self) -> bool:
        """True when every parameter is pinned down by the data (see the class docstring's rules)."""
        return not self.not_identified

    def predict(self, N, k) -> np.ndarray:
        """L(N, k) at sizes N (billions of parameters) and k experts (broadcast)."""
        N, k = np.broadcast_arrays(np.asarray(N, dtype=float), np.asarray(k, dtype=float))
        return predict_form(JOINT, self.params, (N, k))

    def floor(self, N) -> np.ndarray:
        """L∞(N) = L* + B·N^(−β)."""
        return self.params["L_star"] + self.params["B"] * np.asarray(N, dtype=float) ** -self.params["beta"]

    def tail(self, N) -> np.ndarray:
        """A(N) = A0·N^(−γ)."""
        return self.params["A0"] * np.asarray(N, dtype=float) ** -self.params["gamma"]

    def reported(self) -> dict[str, float]:
        """The parameters to show: NaN for those that are not identified."""
        return {n: (math.nan if n in self.not_identified else v) for n, v in self.params.items()}

    def reasons(self, names=None) -> list[str]:
        """One line per distinct reason, naming its parameters: ["L*, B, β: 3 sizes for …", …]."""
        grouped: dict[str, list[str]] = {}
        for name, whys in self.not_identified.items():
            for why in whys if names is None or name in names else ():
                grouped.setdefault(why, []).append(JOINT_SYMBOLS.get(name, name))
        return [f"{', '.join(names_)}: {why}" for why, names_ in grouped.items()]

    def require(self, *names: str, purpose: str = "This") -> None:
        """Raise FitError, with the reasons, unless every parameter in `names` is identified."""
        missing = [n for n in names if n in self.not_identified]
        if missing:
            raise FitError(f"{purpose}: it needs {', '.join(JOINT_SYMBOLS.get(n, n) for n in names)}, which the joint "
                           f"fit does not identify. " + "; ".join(self.reasons(missing)))

    def describe(self) -> str:
        """One line for a caption: the identified parameters, and R² weighted ∝ k and unweighted."""
        shown = [f"{JOINT_SYMBOLS[n]} = {v:.4g}" for n, v in self.reported().items() if v == v]
        return " · ".join(shown + [f"R² = {self.r2:.4f} (weights ∝ k), {self.r2_unweighted:.4f} (unweighted)"])

    def to_dict(self) -> dict:
        return {"form": "joint", "formula": JOINT.formula, **self.reported(),
                **{f"se_{k}": v for k, v in self.se.items()}, "aic": self.aic, "aicc": self.aicc, "bic": self.bic,
                "r2": self.r2, "r2_unweighted": self.r2_unweighted, "n": self.n, "n_sizes": self.n_sizes,
                "identified": self.identified, "not_identified": list(self.not_identified),
                "reason": "; ".join(self.reasons()),
                "at_bound": [k for k, v in self.at_bound.items() if v], "notes": list(self.notes)}


def fit_joint(N, k, loss, *, weights="k") -> JointFit:
    """Weighted least squares of L(N,k) = L* + B·N^(−β) + A0·N^(−γ)/(k+b) over sizes (weights ∝ k by
    default, as the paper, arXiv 2509.24244 §3 and Tables 3–5). N: (n,) sizes in billions of parameters
    (`mergelab.names.billions`); k: (n,) experts merged; loss: (n,) CE in nats per token or any unit (the
    fit standardises it). Judges which parameters the data identify (see `JointFit`). Raises FitError for
    NaN/Inf, k < 1, fewer than 3 distinct k, fewer than 2 sizes, N ≤ 0 or a constant loss."""
    N, k, loss, w, sizes = _joint_input(N, k, loss, weights)
    problem = _JointLS(N, k, loss, w)
    theta, sse_z = problem.solve()
    params = problem.params(theta)
    resid = loss - problem.predict(theta)
    sse = float(np.sum(w * resid ** 2))
    sst = float(np.sum(w * (loss - np.average(loss, weights=w)) ** 2))
    sst_u = float(np.sum((loss - loss.mean()) ** 2))
    at_bound = {n: (v - lo <= BOUND_TOL) or (hi - v <= BOUND_TOL * hi)
                for n, (lo, hi), v in zip(("beta", "gamma", "b"), JOINT_BOUNDS, theta)}
    fit = JointFit(params, 1.0 - sse / sst, sse, len(k), at_bound, r2_unweighted=1.0 - float(resid @ resid) / sst_u,
                   n_sizes=len(sizes))
    fit.notes += [f"{n} sits on its bound" for n, hit in at_bound.items() if hit]
    fit.not_identified = _identification(problem, theta, sse_z, fit, N, k, loss, w, sizes)
    fit.aic, fit.aicc, fit.bic = criteria(sse, len(k), JOINT.n_params)
    fit.weights = _weights(k, weights)[1]
    nan = {n: float("nan") for n in JOINT_PARAMS}
    se = nan if any(at_bound.values()) else _standard_errors(JOINT, params, (N, k), w, sse, len(k) - JOINT.n_params)
    fit.se = {n: (math.nan if n in fit.not_identified else se[n]) for n in JOINT_PARAMS}
    return fit


def _identification(problem: "_JointLS", theta, sse_z, fit: JointFit, N, k, loss, w, sizes) -> dict[str, list[str]]:
    """The parameters the data do not pin down, with the reason (rules in `JointFit`'s docstring)."""
    out: dict[str, list[str]] = {}

    def flag(names, reason):
        for name in names:
            out.setdefault(name, []).append(reason)

    p, n_sizes, spread = fit.params, len(sizes), float(loss.std())
    if n_sizes < FLOOR_SIZES:
        flag(("L_star", "B", "beta"), f"{n_sizes} sizes: " + (
            "the 3 per-size floors fix L* + B·N^−β exactly, nothing tests it" if n_sizes == 3
            else "B and β are not separately identified") + f" (the floor needs ≥ {FLOOR_SIZES} sizes)")
    if n_sizes < TAIL_SIZES:
        flag(("A0", "gamma"), f"{n_sizes} sizes: the 2 per-size tails fix A0·N^−γ exactly, nothing tests it "
                              f"(the tail needs ≥ {TAIL_SIZES} sizes)")
    if np.ptp(p["B"] * sizes ** -p["beta"]) < EXACT * spread:
        flag(("beta",), "B·N^−β is flat over the sizes (B ≈ 0): β has no meaning")
    if np.ptp(p["A0"] * N ** -p["gamma"] / (k + p["b"])) < EXACT * spread:
        flag(("gamma", "b"), "the tail A0·N^−γ/(k+b) is 0 (A0 ≈ 0): γ and b have no meaning")
    for name, (lo, hi), value in zip(("beta", "gamma", "b"), JOINT_BOUNDS, theta):
        if hi - value <= BOUND_TOL * hi:
            flag((name,), "on its upper bound: the value is the bound's, not the data's")
    if theta[0] <= BOUND_TOL:
        flag(("L_star", "B"), "β = 0 makes B·N^−β a constant: only L* + B is identified")
    top = N == sizes[-1]
    try:
        own = fit_curve(k[top], loss[top], weights=w[top])
    except FitError:
        own = None
    if own is not None:
        se = own.se["L_inf"]
        if p["L_star"] > own.L_inf + (1.96 * se if np.isfinite(se) else 0.0) + EXACT * spread:
            flag(("L_star", "B", "beta"), f"L* = {p['L_star']:.4g} lies above the largest size's own floor "
                                          f"L∞ = {own.L_inf:.4g} (N = {sizes[-1]:.3g}B)")
    for j, name in enumerate(("beta", "gamma", "b")):
        if name not in out and problem.flat_profile(j, theta, sse_z):
            flag((name,), "flat profile: any value on its range fits as well (within the 95% likelihood-ratio threshold)")
    return {name: out[name] for name in JOINT_PARAMS if name in out}


def _joint_input(N, k, loss, weights):
    N = np.asarray(N, dtype=float).ravel()
    k, loss = _clean(k, loss)
    if N.shape != k.shape or not np.all(np.isfinite(N)) or np.any(N <= 0):
        raise FitError(f"N must be {len(k)} positive sizes")
    sizes = np.unique(N)
    if len(sizes) < 2:
        raise FitError(f"a joint fit needs at least 2 sizes, got 1 (N = {sizes[0]:g}); fit the curve alone")
    w, _ = _weights(k, weights)
    return N, k, loss, w, sizes


class _JointLS:
    """The joint law as a unit-free least-squares problem. The loss is standardised, z = (loss − μ)/σ,
    and N divided by the geometric mean of the sizes; the linear parameters (L*, B, A0) are profiled out
    by a weighted linear solve (SVD, so collinear columns do no harm) given θ = (β, γ, b), and θ comes
    from a grid, several starts at the grid's local minima, and a bounded trust-region Gauss–Newton
    refinement of the projected residual (variable projection, Kaufman's Jacobian) with relative
    tolerances. Nothing here depends on the loss's units or offset."""

    GRID = JOINT.grid
    STARTS = 5

    def __init__(self, N, k, loss, w):
        self.ref = float(np.exp(np.log(np.unique(N)).mean()))
        self.x, self.k, self.w, self.sw = N / self.ref, k, w, np.sqrt(w)
        self.lnx = np.log(self.x)
        self.mu, self.sd = float(loss.mean()), float(loss.std())
        z = (loss - self.mu) / self.sd
        self.zw = z * self.sw
        self.sst = float(np.sum(w * (z - np.average(z, weights=w)) ** 2))
        self._grid_sse: np.ndarray | None = None
        self._cache: tuple = (None, None)

    def _linear(self, theta):
        """(c, weighted residual, U) at θ: c the standardised linear parameters, U an orthonormal basis
        of the weighted design's column space."""
        key = np.asarray(theta, dtype=float).tobytes()
        if self._cache[0] == key:
            return self._cache[1]
        beta, gamma, b = theta
        Xw = self.sw[:, None] * self._design(beta, gamma, b)
        U, s, Vt = np.linalg.svd(Xw, full_matrices=False)
        keep = s > s[0] * 1e-13
        U, s, Vt = U[:, keep], s[keep], Vt[keep]
        c = Vt.T @ ((U.T @ self.zw) / s)
        out = (c, self.zw - Xw @ c, U)
        self._cache = (key, out)
        return out

    def _design(self, beta, gamma, b):
        return JOINT.basis((self.x, self.k), beta, gamma, b)

    def _jacobian(self, theta):
        c, _, U = self._linear(theta)
        beta, gamma, b = theta
        floor, tail = np.exp(-beta * self.lnx), np.exp(-gamma * self.lnx) / (self.k + b)
        D = self.sw[:, None] * np.column_stack([-self.lnx * floor * c[1], -self.lnx * tail * c[2], -tail / (self.k + b) * c[2]])
        return -(D - U @ (U.T @ D))

    def sse(self, theta) -> float:
        r = self._linear(theta)[1]
        return float(r @ r)

    def grid_sse(self) -> np.ndarray:
        """SSE (standardised) at every point of GRID, shape (16, 16, 20), in one batched solve."""
        if self._grid_sse is None:
            mesh = np.meshgrid(*self.GRID, indexing="ij")
            X = self._design(*(m.reshape(-1, 1) for m in mesh))
            with np.errstate(all="ignore"):
                _, sse = _solve_linear(X, self.zw / self.sw, self.w)
            self._grid_sse = np.where(np.isfinite(sse), sse, np.inf).reshape(mesh[0].shape)
        return self._grid_sse

    def refine(self, start, free=(0, 1, 2)) -> tuple[np.ndarray, float]:
        """Bounded trust-region refinement of the θ entries in `free`, the others held at `start`."""
        from scipy.optimize import least_squares

        lo, hi = (np.array([bd[i] for bd in JOINT_BOUNDS]) for i in (0, 1))
        theta0, free = np.clip(np.asarray(start, dtype=float), lo, hi), list(free)

        def full(v):
            theta = theta0.copy()
            theta[free] = v
            return theta

        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            res = least_squares(lambda v: self._linear(full(v))[1], theta0[free],
                                jac=lambda v: self._jacobian(full(v))[:, free], bounds=(lo[free], hi[free]),
                                method="trf", x_scale="jac", ftol=1e-15, xtol=1e-15, gtol=1e-15, max_nfev=300)
        theta = full(res.x)
        sse = self.sse(theta)
        if not np.isfinite(sse) or sse > self.sse(theta0):
            theta, sse = theta0, self.sse(theta0)
        return theta, sse

    def starts(self) -> list[np.ndarray]:
        """The lowest local minima of the grid (up to STARTS), best first."""
        from scipy.ndimage import minimum_filter

        S = self.grid_sse()
        minima = np.flatnonzero(S.ravel() <= minimum_filter(S, size=3, mode="nearest").ravel())
        best = minima[np.argsort(S.ravel()[minima], kind="stable")][:self.STARTS]
        return [np.array([g[i] for g, i in zip(self.GRID, np.unravel_index(j, S.shape))]) for j in best]

    def solve(self, start=None) -> tuple[np.ndarray, float]:
        """θ = (β, γ, b) with the lowest SSE from `start`, or from every grid start; and that SSE."""
        fits = [self.refine(s) for s in ([start] if start is not None else self.starts())]
        return min(fits, key=lambda f: f[1])

    def flat_profile(self, j: int, theta, sse_min: float) -> bool:
        """True when θ_j fixed anywhere on its grid, the rest refitted, never raises the SSE past the
        95% likelihood-ratio threshold. The grid's own minimum over the others bounds the profile
        from above, so only grid values above the threshold need a refit."""
        floor = max(sse_min, EXACT ** 2 * self.sst)
        threshold = floor * math.exp(LR_95 / len(self.zw))
        S = np.moveaxis(self.grid_sse(), j, 0).reshape(len(self.GRID[j]), -1)
        others = [i for i in range(3) if i != j]
        for i in np.argsort(-S.min(axis=1), kind="stable"):
            if S[i].min() < threshold:
                return True
            grid_best = np.array(np.unravel_index(int(np.argmin(S[i])), [len(self.GRID[o]) for o in others]))
            from_grid, from_fit = np.array(theta, dtype=float), np.array(theta, dtype=float)
            from_grid[others] = [self.GRID[o][g] for o, g in zip(others, grid_best)]
            from_grid[j] = from_fit[j] = self.GRID[j][i]
            if min(self.refine(s, others)[1] for s in (from_grid, from_fit)) >= threshold:
                return False
        return True

    def linear(self, theta) -> np.ndarray:
        """(L*, B_ref, A0_ref) in the loss's units, for N/ref."""
        c = self._linear(theta)[0]
        return np.array([self.mu + self.sd * c[0], self.sd * c[1], self.sd * c[2]])

    def params(self, theta) -> dict[str, float]:
        L, B_ref, A0_ref = self.linear(theta)
        beta, gamma, b = map(float, theta)
        return {"L_star": float(L), "B": float(B_ref * self.ref ** beta), "beta": beta,
                "A0": float(A0_ref * self.ref ** gamma), "gamma": gamma, "b": b}

    def predict(self, theta) -> np.ndarray:
        _, r, _ = self._linear(theta)
        return self.mu + self.sd * (self.zw - r) / self.sw


def _joint_solve(N, k, loss, w, start):
    """(β, γ, b), the linear (L*, B_ref, A0_ref) in the loss's units, the weighted SSE and the N
    reference scale (B = B_ref·ref^β, A0 = A0_ref·ref^γ). Without a start, a grid and several starts."""
    problem = _JointLS(N, k, loss, w)
    theta, sse_z = problem.solve(start)
    return theta, problem.linear(theta), sse_z * problem.sd ** 2, problem.ref
