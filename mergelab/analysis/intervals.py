"""Expert-level uncertainty of merging curves: the random-effects model of merged losses and the
bootstrap that resamples experts.

Why experts and not subsets: every subset of one pool is built from the same M expert draws, and at
k = M there is a single subset. Resampling subsets treats them as independent and gives intervals
3–10× too narrow (bench/coverage.py: 14–47% coverage of L(M) for a nominal 95%, 0% for the per-k
mean at k = M). The unit of randomness is the expert: a new pool of experts trained the same way
gives a new curve.

The model (the second-order expansion of paper §3: with task vectors v_i = μ + δ_i, the merged loss
is L(θ0) + c·gᵀv̄ + ½c²·v̄ᵀHv̄ with v̄ the mean over the subset), for a subset S of k experts:

    L(S) = m_k + (1/k)·Σ_{i∈S} a_i + (1/k²)·Σ_{i∈S} c_i + e_S,    Σ a_i = Σ c_i = 0,  Var e_S = σ²/k

a_i is expert i's first-order effect (c·gᵀδ_i + c²·μᵀHδ_i), c_i its own curvature term
(½c²·δ_iᵀHδ_i about its mean, which moves the tail A), e_S what is left: pairwise interactions
(c²·δ_iᵀHδ_j) and evaluation noise. m_k is a free mean per k; the law L∞ + A/(k+b) is fitted to
the per-k means as everywhere else in mergelab.

The target of every interval is the *population* law: what the curve of a fresh pool of experts
trained the same way would be. The bootstrap draws a new pool (M effect pairs (a_i, c_i) resampled
from the estimated ones, variance-corrected by M/(M−1), and scaled by √((M−1)/χ²_{M−1}) so the
pool mean is t-distributed: σ is estimated from M experts only), new residuals e_S ~ N(0, σ̂²/k),
evaluates them on the same subsets as the data (exhaustive, random per k or orderings alike), and
refits. Intervals are percentiles of the refitted parameters (and of any function of them), and, for
the per-k means, basic intervals m̂_k − quantiles of (m*_k − f̂(k)). Coverage is checked by
simulation in bench/coverage.py and tests/test_intervals.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mergelab.analysis.fit import CurveFit, FitError, JointFit, fit_curve, fit_joint, fit_params
from mergelab.analysis.means import per_k_means
from mergelab.names import key_experts

MIN_DOF = 5  # residual degrees of freedom the noise variance σ² must rest on
MAX_FAILED_DRAWS = 0.05  # share of bootstrap refits that may fail before an interval is refused
FEW_SUBSETS_PER_K = 8  # below this many merges per k on average, intervals are marked approximate



@dataclass(frozen=True)
class SubsetDesign:
    """Which experts each merged subset holds: `experts` (M names), `Z` (n, M) 0/1 membership,
    `k` (n,) experts per subset."""

    experts: tuple[str, ...]
    Z: np.ndarray
    k: np.ndarray

    @classmethod
    def from_subsets(cls, subsets: Sequence) -> "SubsetDesign":
        """`subsets`: one entry per merge, either an experts_key ('a+b+c') or an iterable of names."""
        members = [key_experts(s) if isinstance(s, str) else tuple(s) for s in subsets]
        if any(not m or "" in m for m in members):
            raise FitError("every merged subset needs at least one expert (k ≥ 1); drop base-model rows first")
        experts = tuple(sorted({e for m in members for e in m}))
        column = {e: j for j, e in enumerate(experts)}
        Z = np.zeros((len(members), len(experts)))
        for i, m in enumerate(members):
            Z[i, [column[e] for e in m]] = 1.0
        return cls(experts, Z, Z.sum(axis=1))

    @property
    def M(self) -> int:
        return len(self.experts)

    def ks(self) -> np.ndarray:
        return np.unique(self.k)

    def per_k_means(self, Y: np.ndarray) -> np.ndarray:
        """Mean over subsets at each k in ks(): Y (..., n) -> (..., K)."""
        return per_k_means(self.k, Y)[1]


@dataclass(frozen=True)
class ExpertEffects:
    """Fitted random-effects model: centred effects a, c (M,), residual variance sigma2 (σ² of
    Var e_S = σ²/k, nats²), its degrees of freedom, and whether the curvature terms c were
    identified (they need subsets at several k)."""

    a: np.ndarray
    c: np.ndarray
    sigma2: float
    dof: int
    curvature: bool


def fit_effects(design: SubsetDesign, loss) -> ExpertEffects:
    """Least squares (weights k, as Var e_S = σ²/k) of the model in the module docstring.

    The curvature terms c are kept only when they leave at least max(MIN_DOF, M) residual degrees of
    freedom: with fewer, σ² would rest on a handful of residuals and the noise would be resampled as
    expert effects. Raises FitError when the experts' effects cannot be told apart from the curve:
    fewer than 2 experts, a single subset at every k (e.g. one ordering), or fewer than MIN_DOF
    residual degrees of freedom even without the curvature terms (e.g. two orderings)."""
    y = np.asarray(loss, dtype=float)
    if y.shape != design.k.shape:
        raise FitError(f"need one loss per merged subset ({len(design.k)}), got {y.shape[0]}")
    if not np.all(np.isfinite(y)):
        raise FitError(f"{int((~np.isfinite(y)).sum())} of {len(y)} merged subsets have a NaN/Inf loss")
    if design.M < 2:
        raise FitError("an interval needs at least 2 experts: with one there is nothing to resample")
    k = design.k
    onehot = (k[:, None] == design.ks()[None, :]).astype(float)
    sw = np.sqrt(k)[:, None]
    base = np.linalg.matrix_rank(onehot)
    first = np.hstack([onehot, design.Z / k[:, None]])
    rank_first = np.linalg.matrix_rank(first * sw)
    if rank_first == base:
        raise FitError("a single subset at every k: the experts' effects cannot be told apart from the curve, "
                       "so no interval can be given (sweep several subsets per k, or more orderings)")
    full = np.hstack([first, design.Z / k[:, None] ** 2])
    rank_full = np.linalg.matrix_rank(full * sw)
    curvature = rank_full > rank_first and len(y) - rank_full >= max(MIN_DOF, design.M)
    X, rank = (full, rank_full) if curvature else (first, rank_first)
    if len(y) - rank < MIN_DOF:
        raise FitError(f"{len(y)} merged subsets leave {len(y) - rank} residual degrees of freedom after the "
                       f"experts' effects (at least {MIN_DOF} needed): the experts cannot be told apart from the "
                       "merge-level noise, so no interval can be given (sweep more subsets per k, or more orderings)")
    coef, *_ = np.linalg.lstsq(X * sw, y * sw[:, 0], rcond=None)
    resid = y - X @ coef
    dof = len(y) - rank
    sigma2 = float(np.sum(k * resid ** 2) / dof)
    K, M = onehot.shape[1], design.M
    # fitted values are unique; the split between m_k and the effects' means is not: centre the effects
    centre = np.eye(M) - 1.0 / M
    cov = sigma2 * np.linalg.pinv((X * sw).T @ (X * sw))  # of the estimates; exact for contrasts such as a_i − ā
    blocks = [slice(K, K + M)] + ([slice(K + M, K + 2 * M)] if curvature else [])
    effects = [_deflate(centre @ coef[b], centre @ cov[b, b] @ centre) for b in blocks]
    return ExpertEffects(effects[0], effects[1] if curvature else np.zeros(M), sigma2, dof, bool(curvature))


def _deflate(effects: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Centred effect estimates scaled so that their spread is the experts' own, not the estimation
    noise's (a method-of-moments correction: mean square of the estimates − mean noise variance).
    Without it a design with few subsets per expert would resample noise as if it were experts."""
    M = len(effects)
    spread = float(effects @ effects) / (M - 1)
    if spread <= 0:
        return effects
    own = max(0.0, spread - float(np.trace(noise)) / (M - 1))
    return effects * np.sqrt(own / spread)


@dataclass(frozen=True)
class Pools:
    """n_draws new pools of M experts: picks (n_draws, M), the data's expert at each position, and
    scale (n_draws, 1), √(M/(M−1))·√((M−1)/χ²_{M−1}): an unbiased spread whose pool mean is
    t-distributed, since the experts' spread is itself estimated from M experts."""

    picks: np.ndarray
    scale: np.ndarray

    @classmethod
    def draw(cls, M: int, n_draws: int, rng: np.random.Generator) -> "Pools":
        picks = rng.integers(0, M, size=(n_draws, M))
        scale = np.sqrt(M / (M - 1)) * np.sqrt((M - 1) / rng.chisquare(M - 1, size=(n_draws, 1)))
        return cls(picks, scale)


def simulate_pools(design: SubsetDesign, effects: ExpertEffects, mean: np.ndarray, pools: Pools,
                   rng: np.random.Generator) -> np.ndarray:
    """Losses of every subset of the design in each new pool: (n_draws, n).

    mean: (n,) the population mean loss of each subset (the fitted law at its k)."""
    k = design.k
    a, c = effects.a[pools.picks] * pools.scale, effects.c[pools.picks] * pools.scale
    # σ̂² rests on `dof` residuals: each draw scales it by dof/χ²_dof, as the pool's spread is scaled
    spread = np.sqrt(effects.dof / rng.chisquare(effects.dof, size=(len(pools.picks), 1)))
    noise = rng.standard_normal((len(pools.picks), len(k))) * np.sqrt(effects.sigma2 / k) * spread
    return mean[None, :] + (a @ design.Z.T) / k + (c @ design.Z.T) / k ** 2 + noise


def mean_draws(subsets: Sequence, loss, population, *, n_boot: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-k mean losses of the same subsets in `n_boot` new pools of experts: (ks (K,), draws (n_boot, K)).

    population: callable k (n,) -> the population mean loss at each k (a fitted law's predict).
    Raises FitError when the experts' effects cannot be estimated from these subsets."""
    design = SubsetDesign.from_subsets(subsets)
    y = np.asarray(loss, dtype=float)
    effects = fit_effects(design, y)
    rng = np.random.default_rng(seed)
    pools = Pools.draw(design.M, n_boot, rng)
    return design.ks(), design.per_k_means(simulate_pools(design, effects, population(design.k), pools, rng))


def expert_bootstrap(subsets: Sequence, loss, *, n_boot: int = 1000, seed: int = 0, weights="k",
                     form: str = "floor_tail") -> CurveFit:
    """Fit the law to the per-k means of merged subsets and attach expert-level intervals.

    subsets: one entry per merge (experts_key 'a+b' or names); loss: (n,) its loss (CE in nats per
    token, or any metric). Returns the CurveFit of the per-k means with `samples` (n_boot, n_params)
    drawn by the expert bootstrap (module docstring), so `param_ci`, `band` and every planner give
    expert-level intervals, and `mean_draws` for the per-k means (`mean_ci`). When the experts'
    effects cannot be estimated (one subset per k, one expert) the fit comes back without draws and
    a note saying why. Raises FitError when the curve itself cannot be fitted (too few k, NaN, …)."""
    if n_boot < 1:
        raise FitError(f"n_boot must be >= 1, got {n_boot}")
    design = SubsetDesign.from_subsets(subsets)
    ks = design.ks()
    fit = fit_curve(ks, design.per_k_means(np.asarray(loss, dtype=float)), weights=weights, form=form)
    try:
        ks, draws = mean_draws(subsets, loss, fit.predict, n_boot=n_boot, seed=seed)
    except FitError as exc:
        fit.notes.append(f"no interval: {exc}")
        return fit
    fit.samples = fit_params(ks, draws, weights=weights, form=form)
    fit.mean_draws = draws - fit.predict(ks)[None, :]
    fit.interval = f"expert bootstrap ({n_boot} draws over M = {design.M} experts)"
    _withhold_standard_errors(fit)
    if len(design.k) < FEW_SUBSETS_PER_K * len(ks):
        fit.notes.append(f"approximate intervals: {len(design.k)} merges over {len(ks)} values of k; designs this "
                         "small covered 77–98% in simulation (bench/coverage.py), against 91–98.5% with at least "
                         f"{FEW_SUBSETS_PER_K} merges per k")
    return fit


def _withhold_standard_errors(fit: CurveFit, level: float = 0.95) -> None:
    """Blank the Jacobian standard errors of a bootstrapped fit whose interval reaches a parameter's bound:
    the draws then pile up on the bound, the data do not pin that parameter down, and the local
    curvature behind the SEs understates the uncertainty by orders of magnitude (the SEs are already
    blank when the estimate itself sits on a bound). Says so in the notes: report the interval."""
    from mergelab.analysis.fit import BOUND_TOL

    spec = fit.spec
    if spec is None or not all(np.isfinite(list(fit.se.values()))):
        return
    ci = fit.param_ci(level)
    reached = [name for name, (lo, hi) in zip(spec.nonlinear, spec.bounds)
               if ci[name][0] - lo <= BOUND_TOL * max(1.0, abs(hi)) or hi - ci[name][1] <= BOUND_TOL * max(1.0, abs(hi))]
    if reached:
        fit.se = {name: float("nan") for name in fit.se}
        fit.notes.append(f"no standard errors: the {level:.0%} interval of {', '.join(reached)} reaches its bound, so "
                         "the data do not pin it down; report the expert-bootstrap interval")


def expert_bootstrap_joint(N, subsets: Sequence, loss, *, n_boot: int = 100, seed: int = 0,
                           weights="k") -> JointFit:
    """The joint law L(N,k) = L* + B·N^(−β) + A0·N^(−γ)/(k+b) fitted to the per-(N, k) means of
    merged subsets, with expert-bootstrap draws in `samples` (n_boot, 6) for intervals and the
    minimum-size planner.

    N: (n,) size of each merge in billions of parameters; subsets: (n,) experts_key or names;
    loss: (n,) nats per token. When every size has the same experts (a family's experts are named
    by domain), each draw resamples one pool of names for all sizes, so an expert's effects move
    together across sizes; otherwise each size draws its own pool (noted). Without estimable
    effects the fit comes back without draws and a note saying why."""
    N, y, subsets = np.asarray(N, dtype=float), np.asarray(loss, dtype=float), list(subsets)
    parts = []
    for size in np.unique(N):
        rows = np.flatnonzero(N == size)
        parts.append((size, rows, SubsetDesign.from_subsets([subsets[i] for i in rows])))
    cell_N = np.concatenate([np.full(len(d.ks()), size) for size, _, d in parts])
    cell_k = np.concatenate([d.ks() for _, _, d in parts])
    fit = fit_joint(cell_N, cell_k, np.concatenate([d.per_k_means(y[rows]) for _, rows, d in parts]), weights=weights)
    try:
        effects = [fit_effects(d, y[rows]) for _, rows, d in parts]
    except FitError as exc:
        fit.notes.append(f"no interval: {exc}")
        return fit
    rng = np.random.default_rng(seed)
    shared = len({d.experts for _, _, d in parts}) == 1
    if not shared:
        fit.notes.append("sizes have different experts: each size's pool is resampled on its own")
    pools = Pools.draw(parts[0][2].M, n_boot, rng) if shared else None
    draws = np.hstack([d.per_k_means(simulate_pools(d, e, fit.predict(size, d.k), pools or Pools.draw(d.M, n_boot, rng), rng))
                       for (size, _, d), e in zip(parts, effects)])
    samples = np.full((n_boot, len(fit.params)), np.nan)
    for i, row in enumerate(draws):
        try:
            samples[i] = list(fit_joint(cell_N, cell_k, row, weights=weights).params.values())
        except FitError:
            pass  # counted below
    failed = int(np.isnan(samples).any(axis=1).sum())
    if failed > MAX_FAILED_DRAWS * n_boot:
        fit.notes.append(f"no interval: {failed} of {n_boot} bootstrap refits of the joint law failed")
        return fit
    if failed:
        fit.notes.append(f"{failed} of {n_boot} bootstrap refits failed and were left out of the intervals")
    fit.samples = samples[~np.isnan(samples).any(axis=1)]
    fit.interval = f"expert bootstrap ({len(fit.samples)} draws over M = {parts[0][2].M} experts)"
    return fit
