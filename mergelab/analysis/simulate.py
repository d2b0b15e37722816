"""Synthetic merge results with a known law, for checking that intervals cover what they claim.

A simulated family draws M experts from a population and evaluates every subset of a plan:

    L(S) = L∞ + A/(k+b) + (1/k)·Σ_{i∈S} a_i + (1/k²)·Σ_{i∈S} c_i + (2/k²)·Σ_{i<j∈S} w_ij + e_S

with a_i ~ N(0, expert_sd²) (an expert's shared effect), c_i ~ N(0, curvature_sd²) (its effect on
the tail), w_ij ~ N(0, pair_sd²) (pairwise interference) and e_S ~ N(0, subset_sd²/k) (independent
noise per merge): the terms of the second-order expansion in paper §3 (see mergelab.analysis.intervals).
Averaged over the population of experts every term but the law has mean 0, so the law is the truth
an interval for L∞, A, b, L(M) or k90 must cover. Used by bench/coverage.py and the tests.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from mergelab.names import experts_key


@dataclass(frozen=True)
class Scenario:
    """Noise structure, each SD in units of the curve's drop L(1) − L(M) (nats)."""

    name: str
    expert_sd: float = 0.0
    curvature_sd: float = 0.0
    pair_sd: float = 0.0
    subset_sd: float = 0.0


SCENARIOS = {
    s.name: s for s in (
        Scenario("independent subset noise", subset_sd=0.15),
        Scenario("shared expert effects", expert_sd=0.3, curvature_sd=0.6),
        Scenario("mix", expert_sd=0.2, curvature_sd=0.4, pair_sd=0.1, subset_sd=0.1),
    )
}


@dataclass(frozen=True)
class Law:
    """L∞ + A/(k+b): L_inf and A in nats, b ≥ 0 dimensionless."""

    L_inf: float
    A: float
    b: float

    def __call__(self, k) -> np.ndarray:
        return self.L_inf + self.A / (np.asarray(k, dtype=float) + self.b)

    def drop(self, M: int) -> float:
        return float(self(1) - self(M))

    def k_fraction(self, fraction: float, M: int) -> float:
        """The k where R(k) = (L(1) − L(k))/(L(1) − L(M)) reaches `fraction` (k90 at 0.9)."""
        inv = 1 / (1 + self.b) - fraction * (1 / (1 + self.b) - 1 / (M + self.b))
        return 1 / inv - self.b


def random_law(rng: np.random.Generator) -> Law:
    """A law in the range seen on real and demo curves: L∞ ∈ [0.5, 2], A ∈ [0.1, 1], b ∈ [0.2, 3]."""
    return Law(float(rng.uniform(0.5, 2.0)), float(rng.uniform(0.1, 1.0)), float(rng.uniform(0.2, 3.0)))


@dataclass(frozen=True)
class Pool:
    """The M experts of one simulated family: effects a (M,), c (M,) and pairwise terms w (M, M),
    upper triangle, all in nats."""

    a: np.ndarray
    c: np.ndarray
    w: np.ndarray

    @classmethod
    def draw(cls, law: Law, scenario: Scenario, M: int, rng: np.random.Generator) -> "Pool":
        unit = law.drop(M)
        return cls(rng.normal(0, scenario.expert_sd * unit, M), rng.normal(0, scenario.curvature_sd * unit, M),
                   np.triu(rng.normal(0, scenario.pair_sd * unit, (M, M)), 1))

    def synergy(self, law: Law, donor: int, k_with: np.ndarray) -> float:
        """The population synergy of `donor`: the mean over pairs (S, S ∪ {donor}), S of k_with − 1
        co-experts drawn from the population, of L(S) − L(S ∪ {donor}) (co-experts' effects average 0)."""
        k = np.asarray(k_with, dtype=float)
        return float(np.mean(law(k - 1) - law(k) - self.a[donor] / k - self.c[donor] / k ** 2))


def simulate_losses(law: Law, scenario: Scenario, subsets: list[tuple[int, ...]], M: int,
                    rng: np.random.Generator, pool: Pool | None = None) -> np.ndarray:
    """One family: the loss of each subset (tuples of expert indices in 0..M−1), (n,)."""
    pool = pool or Pool.draw(law, scenario, M, rng)
    out = np.empty(len(subsets))
    for i, s in enumerate(subsets):
        k, idx = len(s), list(s)
        pairs = pool.w[np.ix_(idx, idx)].sum()
        out[i] = law(k) + pool.a[idx].sum() / k + pool.c[idx].sum() / k ** 2 + 2 * pairs / k ** 2
    k = np.array([len(s) for s in subsets], dtype=float)
    return out + rng.normal(0, scenario.subset_sd * law.drop(M), len(subsets)) / np.sqrt(k)


def all_subsets(M: int) -> list[tuple[int, ...]]:
    return [s for k in range(1, M + 1) for s in itertools.combinations(range(M), k)]


QUANTITIES = ("L_inf", "A", "b", "L(M)", "k90", "mean at k=M", "3-point L(M)")


def quantities(params: dict, M: int) -> np.ndarray:
    """L∞, A, b, L(M) and k90 of a floor-tail parameter dict (the per-k mean and the 3-point forecast
    are added separately)."""
    law = Law(params["L_inf"], params["A"], params["b"])
    return np.array([law.L_inf, law.A, law.b, float(law(M)), law.k_fraction(0.9, M)])


def families(scenario: Scenario, plan: list[tuple[int, ...]], M: int, n: int, seed: int = 0):
    """Yield n simulated families on one plan: (law, loss (len(plan),), a seed for their bootstrap)."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        law = random_law(rng)
        yield law, simulate_losses(law, scenario, plan, M, rng), int(rng.integers(2**31))


def coverage_records(scenario: Scenario, plan: list[tuple[int, ...]], M: int, n_families: int, *, n_boot: int = 400,
                     seed: int = 0, level: float = 0.95) -> dict[str, np.ndarray]:
    """Simulate `n_families` families on one plan and interval each with the expert bootstrap.

    Returns arrays (n_families, len(QUANTITIES)): 'truth', 'estimate', 'lo', 'hi' (NaN rows where the
    fit failed). Coverage is mean(lo ≤ truth ≤ hi)."""
    from mergelab.analysis.fit import FitError
    from mergelab.analysis.heldout import forecast_errors
    from mergelab.analysis.intervals import expert_bootstrap

    keys = [experts_key(f"e{i}" for i in s) for s in plan]
    out = {name: np.full((n_families, len(QUANTITIES)), np.nan) for name in ("truth", "estimate", "lo", "hi")}
    tail = 50 * (1 - level), 50 * (1 + level)
    for f, (law, loss, boot_seed) in enumerate(families(scenario, plan, M, n_families, seed)):
        out["truth"][f] = [*quantities(vars(law), M), law(M), law(M)]
        try:
            fit = expert_bootstrap(keys, loss, n_boot=n_boot, seed=boot_seed)
        except FitError:
            continue
        if fit.samples is None:  # no interval for this design: the fit's note says why
            continue
        names = list(fit.params)
        draws = np.array([quantities(dict(zip(names, s)), M) for s in fit.samples])
        lo, hi = np.nanpercentile(draws, tail, axis=0)
        _, means, mlo, mhi = fit.mean_ci(level)
        k = np.array([len(s) for s in plan], dtype=float)
        forecast = forecast_errors(k, loss, keys, n_boot=n_boot, seed=boot_seed, level=level).table.iloc[-1]
        out["estimate"][f] = [*quantities(fit.params, M), means[-1], forecast["predicted"]]
        out["lo"][f], out["hi"][f] = [*lo, mlo[-1], forecast["lo"]], [*hi, mhi[-1], forecast["hi"]]
    return out


def synergy_coverage(scenario: Scenario, plan: list[tuple[int, ...]], M: int, n_families: int, *, n_boot: int = 200,
                     seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """(coverage, median width in units of the drop) of the synergy intervals
    (mergelab.analysis.synergy.synergy_intervals) of every donor, over `n_families` simulated families with one
    receiver domain."""
    import pandas as pd

    from mergelab.analysis.synergy import synergy_intervals

    rng = np.random.default_rng(seed)
    keys = [experts_key(f"e{i}" for i in s) for s in plan]
    index = {frozenset(s): i for i, s in enumerate(plan)}
    hits, widths = [], []
    for _ in range(n_families):
        law = random_law(rng)
        pool = Pool.draw(law, scenario, M, rng)
        loss = simulate_losses(law, scenario, plan, M, rng, pool)
        rows = pd.DataFrame({"experts_key": keys, "domain": "x", "loss": loss})
        lo, hi = synergy_intervals(rows, n_boot=n_boot, seed=int(rng.integers(2**31)), level=level)
        for d in range(M):
            with_d = [len(s) + 1 for s in plan if d not in s and frozenset(s) | {d} in index]
            if not with_d or np.isnan(lo.loc[f"e{d}", "x"]):
                continue
            truth = pool.synergy(law, d, np.array(with_d))
            hits.append(lo.loc[f"e{d}", "x"] <= truth <= hi.loc[f"e{d}", "x"])
            widths.append((hi.loc[f"e{d}", "x"] - lo.loc[f"e{d}", "x"]) / law.drop(M))
    return float(np.mean(hits)), float(np.median(widths))


JOINT_QUANTITIES = ("floor at the largest N", "beta", "N_min")


def joint_coverage(scenario: Scenario, n_families: int, *, sizes=(0.5, 1.5, 3.0, 7.0, 14.0), M: int = 9,
                   n_boot: int = 60, seed: int = 0, level: float = 0.95) -> dict[str, np.ndarray]:
    """Coverage of the joint law's intervals (mergelab.analysis.intervals.expert_bootstrap_joint).

    Each family draws a joint law L(N,k) = L* + B·N^−β + A0·N^−γ/(k+b) (N in billions) and one pool
    of experts whose effects, in units of each size's drop, are shared by all sizes; every subset
    is merged at every size. Returns 'truth', 'lo', 'hi' (n_families, 3) for the floor at the
    largest size, β and the minimum size N_min whose floor meets a target halfway (in N, geometric)
    between the two largest sizes. NaN rows: no interval (the fit said why)."""
    from mergelab.analysis import planning
    from mergelab.analysis.intervals import expert_bootstrap_joint

    rng = np.random.default_rng(seed)
    plan = all_subsets(M)
    keys = [experts_key(f"e{i}" for i in s) for s in plan]
    out = {name: np.full((n_families, len(JOINT_QUANTITIES)), np.nan) for name in ("truth", "lo", "hi")}
    tail = 50 * (1 - level), 50 * (1 + level)
    for f in range(n_families):
        L_star, B, beta = rng.uniform(0.2, 0.5), rng.uniform(0.1, 0.3), rng.uniform(0.3, 0.6)
        A0, gamma, b = rng.uniform(0.05, 0.2), rng.uniform(0.0, 0.3), rng.uniform(0.2, 2.0)
        unit = Pool.draw(Law(0.0, M / (M - 1), 0.0), scenario, M, rng)  # effects per unit of drop (its drop is 1)
        N, subsets, loss = [], [], []
        for size in sizes:
            law = Law(L_star + B * size ** -beta, A0 * size ** -gamma, b)
            d = law.drop(M)
            pool = Pool(unit.a * d, unit.c * d, unit.w * d)
            loss += list(simulate_losses(law, scenario, plan, M, rng, pool))
            N += [size] * len(plan)
            subsets += keys
        n_target = float(np.sqrt(sizes[-1] * sizes[-2]))
        target = L_star + B * n_target ** -beta
        out["truth"][f] = [L_star + B * sizes[-1] ** -beta, beta, n_target]
        fit = expert_bootstrap_joint(N, subsets, loss, n_boot=n_boot, seed=int(rng.integers(2**31)))
        if fit.samples is None or not fit.identified:
            continue
        names = list(fit.params)
        draws = np.array([[p["L_star"] + p["B"] * sizes[-1] ** -p["beta"], p["beta"],
                           planning.minimum_size(replace_params(fit, p), target).value]
                          for p in (dict(zip(names, s)) for s in fit.samples)])
        out["lo"][f], out["hi"][f] = np.nanpercentile(draws, tail, axis=0)
    return out


def replace_params(fit, params: dict):
    """A copy of a JointFit with other parameters and no draws (to evaluate a planner on one draw)."""
    import dataclasses

    return dataclasses.replace(fit, params=params, samples=None)
