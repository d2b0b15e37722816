"""Adaptive sweeps: pin one quantity of a merging curve to a stated precision with as few merges as
possible, and know when to stop.

A target names a quantity of the floor–tail law L(k) = L∞ + A/(k+b) and the 95% CI half-width wanted:
`L_inf:0.005` (metric units), `A:10%` (of the estimate), `k90:0.5` (experts), `predict@9:0.003` (the
fitted loss at k = 9). The policy (`run_policy`) is a pure function of the merges measured so far and an
`evaluate(subsets) -> losses` callback, so the same code runs live (the callback merges and evaluates,
through the results cache) and in replay (the callback looks losses up in an exhaustive sweep):

1. start design: every single expert (k = 1), M balanced pairs (k = 2), a few subsets at k ≈ √(2M) and
   the one subset at k = M;
2. fit the law to the per-k means and interval it with the expert bootstrap
   (mergelab.analysis.intervals: the experts, not the subsets, are the unit of randomness);
3. stop when the half-width meets the target, the budget is spent, or every subset is merged;
4. otherwise choose the next batch one merge at a time: for each k, the subset that keeps expert (and
   pair) counts most balanced; among ks, the one whose merge cuts the predicted variance of the target
   most per second. The prediction is the delta method on the random-effects model of the intervals
   module: per-k means m_k with covariance s_a²·u_k·u_k' + s_c²·v_k·v_k' + δ σ²/(k·n_k) (u_k the experts'
   shares in the k-subsets' mean, v_k = u_k/k), mapped to the target through the fit's gradient with
   respect to the means, and calibrated by the ratio of the current bootstrap half-width to its own
   prediction. The same prediction gives the merges still needed.

Honest intervals under adaptivity: stopping when the interval first looks narrow enough selects
intervals that came out narrow by chance, and a design on a few ks (the start design has k = 1, 2, ≈√(2M),
M) can look precise while the law misfits the ks between (TIES on the demo: ±0.008 from 22 merges where
all 511 give ±0.046). So the target counts as met only once every k from 1 to M holds a merge: when it
looks met earlier, a confirmatory batch (one balanced subset at each k not yet seen) is merged and the
interval recomputed. The interval read by the stopping rule is the one reported (FINAL_DRAWS draws at
REPORT_LEVEL, seeded by the design so that a rerun on the same cache agrees); bench/adaptive.py measures
its coverage over simulated families (bench/README.md).
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from mergelab.errors import MergelabError
from mergelab.names import experts_key

POLICY_DRAWS = 200      # bootstrap draws of `interval` by default
FINAL_DRAWS = 1000      # draws of the interval of each refit, the one the stopping rule reads and the one reported
REPORT_LEVEL = 0.95     # its level (bench/adaptive.py checks its coverage under the stopping rule)
STOP_LEVEL = 0.95
MAX_CANDIDATES = 2000   # subsets scored per k when C(M, k) is larger (sampled, seeded)
PAIR_WEIGHT = 0.25      # weight of pair-count balance next to expert-count balance when choosing subsets
CALIBRATION = (0.5, 4.0)
GIVE_UP = 3             # refits in a row predicting the target out of reach before the policy stops …
GIVE_UP_SHARE = 0.1     # … once it has merged at least this share of all subsets (early predictions are rough)  # bounds of bootstrap half-width / delta-method half-width

PER_CURVE = ("L_inf", "A", "b", "predict", "k_fraction")
JOINT = ("L_star", "min_size")


class TargetError(MergelabError):
    """A target that is not `QUANTITY:PRECISION` with a known quantity and a positive precision."""


@dataclass(frozen=True)
class Target:
    """A quantity of the floor–tail law and the 95% CI half-width wanted for it.

    quantity: 'L_inf', 'A', 'b', 'predict' (the law at k = `at`), 'k_fraction' (the k where the
    fractional return reaches `at`, 0.9 for k90), or a joint-law quantity ('L_star', 'min_size');
    precision: the half-width, in the quantity's unit, or a fraction of |estimate| when `relative`."""

    quantity: str
    precision: float
    relative: bool = False
    at: float | None = None
    text: str = ""

    @property
    def joint(self) -> bool:
        return self.quantity in JOINT

    def value(self, params: dict, M: int) -> float:
        """The quantity at floor–tail parameters `params` (L_inf, A, b) for a pool of M experts."""
        L_inf, A, b = params["L_inf"], params["A"], params["b"]
        if self.quantity in ("L_inf", "A", "b"):
            return float(params[self.quantity])
        if self.quantity == "predict":
            return float(L_inf + A / (self.at + b))
        if self.quantity == "k_fraction":
            inv = 1 / (1 + b) - self.at * (1 / (1 + b) - 1 / (M + b))
            return float(1 / inv - b) if inv > 0 else math.inf
        raise TargetError(f"target {self.text!r}: joint-law quantities are not available per curve")

    def threshold(self, estimate: float) -> float:
        """The half-width that meets the target at this estimate."""
        return self.precision * abs(estimate) if self.relative else self.precision

    def describe(self) -> str:
        unit = f"{self.precision:.0%} of the estimate" if self.relative else f"{self.precision:g}"
        return f"95% CI half-width of {self.label} ≤ {unit}"

    @property
    def label(self) -> str:
        if self.quantity == "predict":
            return f"L({self.at:g})"
        if self.quantity == "k_fraction":
            return f"k{self.at * 100:g}"
        return {"L_inf": "L∞", "L_star": "L*"}.get(self.quantity, self.quantity)


_K_FRACTION = re.compile(r"k(\d{1,2})")


def parse_target(text: str) -> Target:
    """`QUANTITY:PRECISION` → Target. Quantities: L_inf, A, b, k90 (any kNN, 1 ≤ NN ≤ 99), predict@K
    (K ≥ 1), and the joint-law L_star, min_size@LOSS; precision a positive number in the quantity's unit,
    or a percentage of the estimate ('10%'). Raises TargetError naming the part that is wrong."""
    raw = str(text)
    name, sep, prec = raw.strip().partition(":")
    name, prec = name.strip(), prec.strip()
    example = "e.g. L_inf:0.005, k90:0.5, A:10% or predict@9:0.003"
    if not sep or not name or not prec:
        raise TargetError(f"--adaptive {raw!r}: expected QUANTITY:PRECISION, {example}")
    relative = prec.endswith("%")
    try:
        precision = float(prec[:-1] if relative else prec)
    except ValueError:
        raise TargetError(f"--adaptive {raw!r}: precision {prec!r} is not a number; {example}") from None
    if not math.isfinite(precision) or precision <= 0:
        raise TargetError(f"--adaptive {raw!r}: precision must be a positive finite number, got {prec!r}")
    if relative:
        precision /= 100
    base, _, at_text = name.partition("@")
    at = None
    if at_text or "@" in name:
        try:
            at = float(at_text)
        except ValueError:
            raise TargetError(f"--adaptive {raw!r}: {at_text!r} after '@' is not a number") from None
        if not math.isfinite(at):
            raise TargetError(f"--adaptive {raw!r}: {at_text!r} after '@' is not a finite number")
    if base in ("L_inf", "A", "b", "L_star") and at is None:
        return Target(base, precision, relative, None, raw)
    if base == "predict":
        if at is None or at < 1:
            raise TargetError(f"--adaptive {raw!r}: predict needs the k to predict at, predict@K with K ≥ 1")
        return Target("predict", precision, relative, at, raw)
    if base == "min_size":
        if at is None:
            raise TargetError(f"--adaptive {raw!r}: min_size needs the target loss, min_size@LOSS")
        return Target("min_size", precision, relative, at, raw)
    match = _K_FRACTION.fullmatch(base)
    if match and at is None and 1 <= int(match.group(1)) <= 99:
        return Target("k_fraction", precision, relative, int(match.group(1)) / 100, raw)
    raise TargetError(f"--adaptive {raw!r}: unknown quantity {name!r}; expected L_inf, A, b, kNN (k90), predict@K, "
                      f"L_star or min_size@LOSS")


def require_per_curve(target: Target) -> None:
    """Refuse a joint-law target (L_star, min_size@…): the policy pins per-curve quantities only."""
    if target.joint:
        raise TargetError(f"--adaptive {target.text!r}: joint-law targets (L_star, min_size@…) are not supported "
                          "by the adaptive policy yet; give a per-curve target (L_inf, A, b, k90, predict@K)")


# -- designs ----------------------------------------------------------------------------------


Subset = tuple[str, ...]


def start_design(experts: Sequence[str]) -> list[Subset]:
    """The first merges: every single expert, M pairs (i, i+1) so each expert appears twice, a few
    subsets at k ≈ √(2M) chosen balanced, and the full pool (k = M). Raises TargetError below 3 experts
    (the law needs 3 distinct k)."""
    experts = tuple(experts)
    M = len(experts)
    if M < 3:
        raise TargetError(f"an adaptive sweep needs at least 3 experts (the law needs 3 distinct k), got {M}")
    design: list[Subset] = [(e,) for e in experts]
    if M == 3:
        return design + [s for k in (2, 3) for s in itertools.combinations(experts, k)]
    pairs = [tuple(sorted((experts[i], experts[(i + 1) % M]), key=experts.index)) for i in range(M)]
    design += list(dict.fromkeys(pairs))
    mid = int(round(math.sqrt(2 * M)))
    if 2 < mid < M:
        for _ in range(max(3, M // 3)):
            pick = balanced_subset(experts, mid, design, seed=0)
            if pick is None:
                break
            design.append(pick)
    design.append(experts)
    return design


class DesignCounts:
    """How often each expert (counts (M+1, M)) and pair (pairs (M+1, M, M)) appears among the merged
    subsets of each k, the number of subsets per k (n (M+1,)) and which are merged (bitmasks per k):
    what subset choice and the predicted interval need, updated in place as merges are planned."""

    def __init__(self, experts: Sequence[str], design: Sequence[Subset] = ()):
        self.experts = tuple(experts)
        self.M = M = len(self.experts)
        self.index = {e: i for i, e in enumerate(self.experts)}
        self.counts, self.n = np.zeros((M + 1, M)), np.zeros(M + 1)
        self.pairs = np.zeros((M + 1, M, M))
        self.taken: list[set[int]] = [set() for _ in range(M + 1)]
        for s in design:
            self.add(s)

    def add(self, subset: Subset) -> None:
        idx = [self.index[e] for e in subset]
        k = len(idx)
        mask = sum(1 << i for i in idx)
        if mask in self.taken[k]:
            return
        self.taken[k].add(mask)
        self.counts[k, idx] += 1
        self.n[k] += 1
        self.pairs[k][np.ix_(idx, idx)] += 1

    def copy(self) -> "DesignCounts":
        out = DesignCounts.__new__(DesignCounts)
        out.experts, out.M, out.index = self.experts, self.M, self.index
        out.counts, out.n, out.pairs = self.counts.copy(), self.n.copy(), self.pairs.copy()
        out.taken = [set(t) for t in self.taken]
        return out

    @property
    def size(self) -> int:
        return int(self.n.sum())

    def pick(self, k: int, seed: int = 0) -> Subset | None:
        """The k-subset not yet merged that keeps expert counts (and, with weight PAIR_WEIGHT, pair
        counts) at this k most even; None when every k-subset is merged."""
        M = self.M
        if len(self.taken[k]) >= math.comb(M, k):
            return None
        if math.comb(M, k) <= MAX_CANDIDATES:
            C, masks = _combinations(M, k)
        else:
            rng = np.random.default_rng([seed, k, int(self.n[k])])
            C = np.zeros((2 * MAX_CANDIDATES, M))
            np.put_along_axis(C, np.argsort(rng.random((len(C), M)), axis=1)[:, :k], 1.0, axis=1)
            C = np.unique(C, axis=0)
            masks = C @ (2.0 ** np.arange(M))
        if self.taken[k]:
            free = ~np.isin(masks.astype(np.int64), np.fromiter(self.taken[k], dtype=np.int64))
            if not free.any():
                return None
            C = C[free]
        # the sum of squared counts after adding a candidate, up to a constant: 2·(counts of its members)
        score = C @ self.counts[k] + PAIR_WEIGHT * np.einsum("ci,ij,cj->c", C, self.pairs[k], C) / max(k - 1, 1)
        rng = np.random.default_rng([seed, k, int(self.n[k]), 1])
        best = np.flatnonzero(score <= score.min() + 1e-9)
        pick = C[int(best[rng.integers(len(best))])]
        return tuple(self.experts[i] for i in np.flatnonzero(pick))


def balanced_subset(experts: Sequence[str], k: int, design: Sequence[Subset], seed: int = 0) -> Subset | None:
    """The k-subset not yet in `design` that keeps how often each expert (and, with weight PAIR_WEIGHT,
    each pair) appears at this k most even; None when every k-subset is merged. Deterministic for a
    given design and seed (a resumed sweep makes the same choice)."""
    return DesignCounts(experts, design).pick(k, seed)


@functools.lru_cache(maxsize=64)
def _combinations(M: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every k-subset of range(M) as 0/1 rows (C(M,k), M) and as bitmasks (C(M,k),), in lexicographic order."""
    C = np.zeros((math.comb(M, k), M))
    for j, c in enumerate(itertools.combinations(range(M), k)):
        C[j, list(c)] = 1.0
    return C, C @ (2.0 ** np.arange(M))


# -- intervals and predictions ----------------------------------------------------------------


@dataclass
class Interval:
    """The target's estimate and percentile interval on one design (NaN bounds without an interval),
    with the fit and why there is no interval, if there is none."""

    estimate: float
    lo: float = math.nan
    hi: float = math.nan
    fit: object = None
    note: str = ""

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2 if np.isfinite(self.lo) and np.isfinite(self.hi) else math.inf


def interval(target: Target, subsets: Sequence[Subset], losses, M: int, *, n_boot: int = POLICY_DRAWS,
             seed: int = 0, level: float = STOP_LEVEL) -> Interval:
    """Fit the law to the per-k means of `subsets` (losses in the metric's unit) and interval the target
    with the expert bootstrap (mergelab.analysis.intervals.expert_bootstrap). An Interval without
    bounds (and a note) when the experts' effects cannot be estimated yet or the curve cannot be fitted."""
    from mergelab.analysis.fit import FitError
    from mergelab.analysis.intervals import expert_bootstrap

    keys = [experts_key(s) for s in subsets]
    try:
        fit = expert_bootstrap(keys, np.asarray(losses, dtype=float), n_boot=n_boot, seed=seed)
    except FitError as exc:
        return Interval(math.nan, note=str(exc))
    estimate = target.value(fit.params, M)
    if fit.samples is None:
        return Interval(estimate, fit=fit, note="; ".join(fit.notes))
    names = list(fit.params)
    draws = np.array([target.value(dict(zip(names, s)), M) for s in fit.samples if np.all(np.isfinite(s))])
    draws = draws[~np.isnan(draws)]
    if not len(draws):
        return Interval(estimate, fit=fit, note="no usable bootstrap draws")
    lo, hi = np.percentile(draws, [50 * (1 - level), 50 * (1 + level)], method="inverted_cdf")
    return Interval(estimate, float(lo), float(hi), fit)


class Predictor:
    """Predicted half-width of the target for hypothetical designs (the delta method on the
    random-effects model, module docstring), calibrated on the current bootstrap half-width."""

    def __init__(self, target: Target, experts: Sequence[str], subsets: Sequence[Subset], losses, current: Interval):
        from mergelab.analysis.intervals import SubsetDesign, fit_effects

        self.target, self.experts, self.M = target, tuple(experts), len(experts)
        self.index = {e: i for i, e in enumerate(self.experts)}
        self.fit = current.fit
        y = np.asarray(losses, dtype=float)
        design = SubsetDesign.from_subsets([experts_key(s) for s in subsets])
        try:
            effects = fit_effects(design, y)
            order = [design.experts.index(e) for e in self.experts if e in design.experts]
            a, c = effects.a[order], effects.c[order]
            self.s_a2 = float(a @ a) / max(len(a) - 1, 1)
            self.s_c2 = float(c @ c) / max(len(c) - 1, 1)
            self.sigma2 = effects.sigma2
        except Exception:  # effects not estimable yet: subset noise only, from the spread within each k
            k = design.k
            spread = [np.var(y[k == x], ddof=1) * x for x in design.ks() if (k == x).sum() > 1]
            self.s_a2 = self.s_c2 = 0.0
            self.sigma2 = float(np.mean(spread)) if spread else float(np.var(y)) or 1e-12
        self._grad: dict[tuple, np.ndarray] = {}
        self.now = self.half_width(list(subsets), calibrated=False)
        ratio = current.half_width / self.now if np.isfinite(current.half_width) and self.now > 0 else 1.0
        self.calibration = float(np.clip(ratio, *CALIBRATION))

    def floor(self) -> float:
        """Predicted half-width (uncalibrated) with every subset merged: what the pool of M experts
        allows at best, since the interval is for the population of experts."""
        full = DesignCounts(self.experts)
        for k in range(1, self.M + 1):
            full.n[k] = math.comb(self.M, k)
            full.counts[k] = math.comb(self.M - 1, k - 1)
        return self.half_width(full, calibrated=False)

    def gradient(self, ks: tuple) -> np.ndarray:
        """∂target/∂m_k at the fitted law's means, (K,), by central differences through the fit."""
        if ks not in self._grad:
            from mergelab.analysis.fit import fit_params

            k = np.array(ks, dtype=float)
            m0 = self.fit.predict(k)
            eps = max(1e-6, 1e-3 * float(np.ptp(m0)) if np.ptp(m0) > 0 else 1e-6)
            rows = [m0] + [m0 + s * eps * np.eye(len(k))[j] for j in range(len(k)) for s in (1, -1)]
            names = list(self.fit.params)
            try:
                P = fit_params(k, np.array(rows))
                q = np.array([self.target.value(dict(zip(names, p)), self.M) for p in P])
                g = (q[1::2] - q[2::2]) / (2 * eps)
            except Exception:
                g = np.zeros(len(k))
            self._grad[ks] = np.where(np.isfinite(g), g, 0.0)
        return self._grad[ks]

    def half_width(self, design: "Sequence[Subset] | DesignCounts", calibrated: bool = True) -> float:
        """Predicted 95% half-width of the target on `design` (subsets, or their DesignCounts)."""
        counts = design if isinstance(design, DesignCounts) else DesignCounts(self.experts, design)
        ks = np.flatnonzero(counts.n[1:]) + 1
        if len(ks) < 3:
            return math.inf
        kf, n = ks.astype(float), counts.n[ks]
        U = counts.counts[ks] / (kf * n)[:, None]
        V = U / kf[:, None]
        cov = self.s_a2 * U @ U.T + self.s_c2 * V @ V.T + np.diag(self.sigma2 / (kf * n))
        g = self.gradient(tuple(int(k) for k in ks))
        hw = 1.96 * math.sqrt(max(float(g @ cov @ g), 0.0))
        if not calibrated or not self.now > 0:
            return hw
        # the bootstrap's excess over the delta method (nonlinearity of small designs) fades as the
        # predicted width shrinks below today's
        return hw * (1 + (self.calibration - 1) * min(1.0, hw / self.now))

    def plan(self, design: "Sequence[Subset] | DesignCounts", n_merges: int, cost: float = 1.0,
             seed: int = 0) -> list[Subset]:
        """The next `n_merges` merges: one at a time, for each k the most balanced new subset, the k whose
        merge lowers the predicted variance most (per `cost`, seconds per merge of this curve). A
        DesignCounts passed in is updated with the plan."""
        counts = design if isinstance(design, DesignCounts) else DesignCounts(self.experts, design)
        chosen = []
        for _ in range(n_merges):
            now = self.half_width(counts, calibrated=False) ** 2
            best, best_gain = None, -math.inf
            for k in range(1, self.M + 1):
                pick = counts.pick(k, seed)
                if pick is None:
                    continue
                trial = counts.copy()
                trial.add(pick)
                gain = (now - self.half_width(trial, calibrated=False) ** 2) / cost
                if gain > best_gain + 1e-18:
                    best, best_gain = pick, gain
            if best is None:
                break
            counts.add(best)
            chosen.append(best)
        return chosen

    def merges_to_target(self, subsets: Sequence[Subset], threshold: float, step: int, seed: int = 0,
                         limit: int | None = None) -> float:
        """Predicted merges still needed for the half-width to reach `threshold` (calibrated; else where the
        uncalibrated delta method reaches it; inf when neither does within every subset or `limit` merges)."""
        counts = DesignCounts(self.experts, subsets)
        start = counts.size
        if self.half_width(counts) <= threshold:
            return 0.0
        total = 2 ** self.M - 1
        limit = total if limit is None else min(limit, total)
        rough = math.inf  # where the uncalibrated prediction meets the target: the answer if the calibrated never does
        while counts.size < limit:
            # batches grow with the design (a coarser answer far from the target, at a bounded cost)
            if not self.plan(counts, min(max(step, counts.size // 3), limit - counts.size), seed=seed):
                break
            if self.half_width(counts) <= threshold:
                return float(counts.size - start)
            if rough == math.inf and self.half_width(counts, calibrated=False) <= threshold:
                rough = float(counts.size - start)
        return rough


# -- the loop ---------------------------------------------------------------------------------


@dataclass
class Step:
    """One refit of the loop: merges so far, the interval then, the predicted merges still needed."""

    merges: int
    estimate: float
    lo: float
    hi: float
    predicted_remaining: float
    note: str = ""

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2 if np.isfinite(self.lo) else math.inf


@dataclass
class AdaptiveResult:
    """What the policy ended with: the design (subsets, losses), the reported interval (a fresh bootstrap
    at REPORT_LEVEL), why it stopped ('target met', 'budget spent', 'every subset merged', 'out of reach',
    'no interval'),
    and each step's interval (`history`)."""

    target: Target
    experts: tuple[str, ...]
    subsets: list[Subset]
    losses: list[float]
    estimate: float
    lo: float
    hi: float
    reason: str
    history: list[Step] = field(default_factory=list)

    @property
    def merges(self) -> int:
        return len(self.subsets)

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2 if np.isfinite(self.lo) else math.inf

    @property
    def met(self) -> bool:
        return self.reason == "target met"


Evaluate = Callable[[list[Subset]], Sequence[float]]


def batch_size(M: int, merged: int) -> int:
    """Merges per batch: about a quarter of those made so far, at least M/2 and 2 (refits stay cheap
    next to merges, and a batch is large enough to be worth a round trip through the job queue)."""
    return max(2, M // 2, merged // 4)


def run_policy(target: "Target | str", experts: Sequence[str], evaluate: Evaluate, *, budget: int | None = None,
               known: dict | None = None, seed: int = 0, cost: float = 1.0,
               on_step: Callable[[Step], None] | None = None, give_up: int = GIVE_UP,
               predict: bool = True) -> AdaptiveResult:
    """Run the adaptive design to `target` for one curve of a pool of `experts`.

    evaluate(subsets) -> losses (one per subset, metric units; NaN for a merge that could not be made):
    merges and evaluates (live) or looks up (replay). `known`: {subset (tuple of names) or experts_key:
    loss} already measured (cached merges): used first and counted in the budget, so a rerun continues
    where a killed one stopped. budget: the most merges of this curve (None: no limit). seed: subset
    choice ties and bootstrap seeds. cost: seconds per merge (for `Predictor.plan`). on_step(Step) after
    every refit. Raises TargetError for a joint-law target or fewer than 3 experts."""
    from mergelab.names import key_experts

    target = parse_target(target) if isinstance(target, str) else target
    require_per_curve(target)
    experts = tuple(experts)
    M = len(experts)
    index = {e: i for i, e in enumerate(experts)}
    data: dict[frozenset, tuple[Subset, float]] = {}
    for key, loss in (known or {}).items():
        s = key_experts(key) if isinstance(key, str) else tuple(key)
        if s and all(e in index for e in s) and loss is not None and np.isfinite(loss):
            s = tuple(sorted(s, key=index.get))
            data[frozenset(s)] = (s, float(loss))
    failed: set[frozenset] = set()
    limit = budget if budget is not None else 2 ** M - 1

    def measure(batch: list[Subset]) -> None:
        batch = [s for s in batch if frozenset(s) not in data and frozenset(s) not in failed]
        room = limit - len(data)
        batch = batch[:max(room, 0)]
        if not batch:
            return
        for s, loss in zip(batch, evaluate(batch)):
            if loss is not None and np.isfinite(loss):
                data[frozenset(s)] = (tuple(s), float(loss))
            else:
                failed.add(frozenset(s))

    measure(start_design(experts))
    history: list[Step] = []
    reason, step_no, hopeless = "", 0, 0
    while True:
        # in a canonical order (by k, then experts), so the interval depends on the merges alone, not on the
        # order they were measured or read back from the cache in
        ordered = sorted(data.values(), key=lambda item: (len(item[0]), [index[e] for e in item[0]]))
        subsets = [s for s, _ in ordered]
        losses = [v for _, v in ordered]
        # the interval reported if the policy stops here; seeded by the design, so a rerun on it agrees
        current = interval(target, subsets, losses, M, n_boot=FINAL_DRAWS, seed=seed + len(subsets), level=REPORT_LEVEL)
        threshold = target.threshold(current.estimate) if np.isfinite(current.estimate) else math.nan
        exhausted = len(data) + len(failed) >= 2 ** M - 1
        remaining, batch, beyond = math.nan, [], False
        if current.fit is not None and not (np.isfinite(current.half_width) and current.half_width <= threshold):
            predictor = Predictor(target, experts, subsets, losses, current)
            step = batch_size(M, len(data))
            batch = predictor.plan(subsets, step, cost, seed)
            if predict:
                remaining = predictor.merges_to_target(subsets, threshold, step, seed, limit=limit)
            beyond = predictor.floor() > threshold
        elif current.fit is not None:
            remaining = 0.0
        record = Step(len(data), current.estimate, current.lo, current.hi, remaining, current.note)
        history.append(record)
        if on_step:
            on_step(record)
        hopeless = hopeless + 1 if beyond else 0
        met = np.isfinite(current.half_width) and current.half_width <= threshold
        unseen = [k for k in range(1, M + 1) if not any(len(s) == k for s in subsets)]
        if met and unseen and len(data) < limit:
            # a confirmatory batch before stopping: a merge at each k not yet seen (up to a batch), so that an
            # interval that looks narrow on a few ks must hold once the law meets the whole range of k
            picks = np.unique(np.linspace(0, len(unseen) - 1, min(len(unseen), batch_size(M, len(data)))).round())
            batch = [p for p in (balanced_subset(experts, unseen[int(i)], subsets, seed) for i in picks) if p]
        elif met:
            reason = "target met"
        elif give_up and hopeless >= give_up and len(data) >= GIVE_UP_SHARE * (2 ** M - 1):
            reason = "out of reach"
        elif len(data) >= limit:
            reason = "budget spent"
        elif exhausted:
            reason = "every subset merged"
        elif current.fit is None and not batch:
            batch = _fill(experts, subsets, batch_size(M, len(data)), seed)
        if reason:
            break
        before = len(data)
        if not batch:  # nothing the predictor wants: widen the design where it is thinnest
            batch = _fill(experts, subsets, batch_size(M, len(data)), seed)
        measure(batch)
        if len(data) == before and not batch:
            reason = "every subset merged"
            break
        if len(data) == before and all(frozenset(s) in failed for s in batch):
            if len(data) + len(failed) >= 2 ** M - 1:
                reason = "every subset merged"
                break
        step_no += 1
    if not np.isfinite(current.half_width):
        reason = reason if reason in ("budget spent", "out of reach") else "no interval"
    return AdaptiveResult(target, experts, subsets, losses, current.estimate, current.lo, current.hi, reason, history)


def _fill(experts: Sequence[str], design: Sequence[Subset], n: int, seed: int) -> list[Subset]:
    """n balanced subsets at the ks with the smallest share of their subsets merged (used while the
    interval cannot be computed yet, so there is no prediction to follow)."""
    design, out = list(design), []
    M = len(experts)
    for _ in range(n):
        share = {k: sum(len(s) == k for s in design) / math.comb(M, k) for k in range(1, M + 1)}
        for k in sorted(share, key=lambda k: (share[k], -math.comb(M, k))):
            pick = balanced_subset(experts, k, design, seed)
            if pick is not None:
                design.append(pick)
                out.append(pick)
                break
        else:
            break
    return out


# -- replay against an exhaustive sweep -----------------------------------------------------------

REPLAY_FIELDS = ("method", "size", "target", "merges_used", "exhaustive_merges", "estimate", "ci",
                 "exhaustive_estimate")


def curves_of(results, domain: str | None = None) -> list[tuple[dict, dict]]:
    """The merge curves among cached rows (ResultStore.results): [(info, {experts_key: loss}), …], one per
    (family, size, method setting), with info {family, size, n_params, method, hparams, setting, experts};
    the loss is the macro mean over domains (merges evaluated on every domain) or `domain`'s."""
    from mergelab.analysis.tables import merge_losses
    from mergelab.names import MACRO, key_experts

    frame = merge_losses(results, domain or MACRO)
    out = []
    for (family, size, n_params, method, hparams, setting), group in frame.groupby(
            ["family", "size", "n_params", "method", "hparams", "setting"], sort=True):
        experts = tuple(sorted({e for key in group["experts_key"] for e in key_experts(key)}))
        info = {"family": family, "size": size, "n_params": int(n_params), "method": method, "hparams": hparams,
                "setting": setting, "experts": experts}
        out.append((info, dict(zip(group["experts_key"], map(float, group["loss"])))))
    return sorted(out, key=lambda c: (c[0]["family"], c[0]["n_params"], c[0]["setting"]))


def replay_curve(target: "Target | str", experts: Sequence[str], losses: dict, *, budget: int | None = None,
                 seed: int = 0) -> tuple[AdaptiveResult, Interval]:
    """Run the policy on one curve whose merges are all in `losses` ({experts_key: loss}): a merge is a
    lookup. Returns the policy's result and the interval of the exhaustive design (every merge in
    `losses`, FINAL_DRAWS draws at REPORT_LEVEL). A subset the cache lacks counts as a failed merge."""
    from mergelab.names import key_experts

    target = parse_target(target) if isinstance(target, str) else target
    table = {frozenset(key_experts(key)): loss for key, loss in losses.items()}

    def lookup(batch):
        return [table.get(frozenset(s), math.nan) for s in batch]

    result = run_policy(target, experts, lookup, budget=budget, seed=seed)
    subsets = [key_experts(key) for key in losses]
    full = interval(target, subsets, list(losses.values()), len(experts), n_boot=FINAL_DRAWS, seed=seed + 10_007,
                    level=REPORT_LEVEL)
    return result, full


def replay_record(info: dict, target: Target, result: AdaptiveResult, full: Interval, n_exhaustive: int) -> dict:
    """One replay line: the REPLAY_FIELDS (method is the setting, e.g. 'ties lambda=0.5')."""
    def num(x):
        return float(x) if x is not None and np.isfinite(x) else None

    return {"method": info["setting"], "size": info["size"], "target": target.text or f"{target.quantity}",
            "merges_used": result.merges, "exhaustive_merges": n_exhaustive, "estimate": num(result.estimate),
            "ci": [num(result.lo), num(result.hi)], "exhaustive_estimate": num(full.estimate)}
