"""Expert-level intervals: the random-effects model recovers known effects, intervals are finite at
k = M, and a small seeded simulation shows they cover (bench/coverage.py runs the full one)."""

import itertools

import numpy as np
import pytest

from mergelab.analysis import planning
from mergelab.analysis.intervals import SubsetDesign, expert_bootstrap, expert_bootstrap_joint, fit_effects
from mergelab.analysis.simulate import QUANTITIES, SCENARIOS, Law, all_subsets, coverage_records, simulate_losses

M = 9
PLAN = all_subsets(M)
KEYS = ["+".join(f"e{i}" for i in s) for s in PLAN]


def test_effects_model_recovers_known_expert_effects():
    rng = np.random.default_rng(0)
    a, c = rng.normal(0, 0.05, M), rng.normal(0, 0.1, M)
    a, c = a - a.mean(), c - c.mean()
    design = SubsetDesign.from_subsets(KEYS)
    k = design.k
    loss = 1.0 + 0.5 / (k + 1.0) + (design.Z @ a) / k + (design.Z @ c) / k ** 2
    effects = fit_effects(design, loss)
    assert effects.curvature and effects.sigma2 < 1e-20
    assert np.allclose(effects.a, a, atol=1e-10) and np.allclose(effects.c, c, atol=1e-10)
    assert design.experts == tuple(f"e{i}" for i in range(M))


def test_interval_at_k_equals_M_is_not_zero_width():
    law = Law(1.0, 0.5, 1.0)
    loss = simulate_losses(law, SCENARIOS["shared expert effects"], PLAN, M, np.random.default_rng(1))
    fit = expert_bootstrap(KEYS, loss, n_boot=300, seed=0)
    ks, means, lo, hi = fit.mean_ci()
    assert list(ks) == list(range(1, M + 1))
    assert (lo < means).all() and (means < hi).all()
    assert hi[-1] - lo[-1] > 0.01 * law.drop(M)  # one subset at k = M, yet its population mean is uncertain
    assert fit.samples.shape == (300, 3) and "M = 9 experts" in fit.interval
    ci = fit.param_ci()
    for name in ("L_inf", "A", "b"):
        assert ci[name][0] <= fit.params[name] <= ci[name][1]


def test_one_subset_per_k_gives_a_fit_without_interval_and_says_why():
    order = [f"e{i}" for i in range(M)]
    keys = ["+".join(order[:k]) for k in range(1, M + 1)]
    loss = 1.0 + 0.5 / (np.arange(1, M + 1) + 1.0)
    fit = expert_bootstrap(keys, loss, n_boot=50)
    assert fit.samples is None and any("single subset at every k" in n for n in fit.notes)
    est = planning.k_for_target(fit, 1.1)
    assert np.isfinite(est.value) and np.isnan(est.lo)


def plan_of(spec) -> list[tuple[int, ...]]:
    from mergelab.sweep.plan import plan_subsets

    experts = [f"e{i}" for i in range(M)]
    return [tuple(experts.index(e) for e in subset) for subset in plan_subsets(experts, range(1, M + 1), spec, seed=0)]


@pytest.mark.parametrize("scenario, spec, max_width", [
    *[(name, "all", 2.5) for name in SCENARIOS],
    # few subsets per expert: without deflating the effects by their estimation noise, the L(M) interval
    # is about 1.9× as wide as a correct one here (bench/coverage.py)
    ("independent subset noise", 10, 1.6),
    ("independent subset noise", "orderings:15", 1.6),
])
def test_small_seeded_simulation_covers(scenario, spec, max_width):
    """40 families per case: every quantity covered in at least 85% (95% nominal; the full benchmark
    with 400 families per plan is bench/coverage.py), with widths near a correct interval's."""
    plan = PLAN if spec == "all" else plan_of(spec)
    records = coverage_records(SCENARIOS[scenario], plan, M, 40, n_boot=200, seed=7)
    truth, lo, hi = records["truth"], records["lo"], records["hi"]
    cover = ((lo <= truth) & (truth <= hi)).mean(axis=0)
    assert (cover >= 0.85).all(), dict(zip(QUANTITIES, cover))
    drop = np.array([Law(*t[:3]).drop(M) for t in truth])
    err = (records["estimate"] - truth)[:, [0, 3, 5]] / drop[:, None]  # L∞, L(M), mean at k=M (nats)
    width = np.median((hi - lo)[:, [0, 3, 5]] / drop[:, None], axis=0) / (3.92 * err.std(axis=0))
    assert (width < max_width).all(), width


def test_too_few_subsets_give_no_interval_and_say_why():
    """Two orderings leave fewer residual degrees of freedom than the noise variance needs: no interval
    (it would resample noise as expert effects), a note with the count."""
    plan = plan_of("orderings:2")
    loss = simulate_losses(Law(1.0, 0.5, 1.0), SCENARIOS["mix"], plan, M, np.random.default_rng(0))
    fit = expert_bootstrap(["+".join(f"e{i}" for i in s) for s in plan], loss, n_boot=50)
    assert fit.samples is None and any("residual degrees of freedom" in n for n in fit.notes), fit.notes


def test_joint_interval_resamples_one_pool_across_sizes():
    rng = np.random.default_rng(4)
    sizes = (0.5, 1.5, 7.0, 32.0)
    a = rng.normal(0, 0.004, M)  # an expert's effect is shared by its checkpoints at every size
    N, keys, loss = [], [], []
    for size in sizes:
        for s, key in zip(PLAN, KEYS):
            k = len(s)
            N.append(size)
            keys.append(key)
            loss.append(0.2 + 0.1 * size ** -0.4 + 0.05 / (k + 0.3) + a[list(s)].mean() + rng.normal(0, 0.002) / k ** 0.5)
    fit = expert_bootstrap_joint(N, keys, loss, n_boot=40, seed=0)
    assert fit.samples.shape == (40, 6) and np.isfinite(fit.samples).all()
    est = planning.minimum_size(fit, 0.26)
    truth = (0.1 / 0.06) ** (1 / 0.4)
    assert est.lo <= est.value <= est.hi and est.lo < truth < est.hi


def test_synergy_intervals_cover_in_a_small_simulation():
    from mergelab.analysis.simulate import synergy_coverage

    cover, width = synergy_coverage(SCENARIOS["mix"], PLAN, M, 12, n_boot=150, seed=3)
    assert cover >= 0.85 and 0 < width < 0.5, (cover, width)  # bench: 0.11 drops wide, 91% covered


def test_failed_joint_refits_are_counted_not_called_unreachable(monkeypatch):
    """A bootstrap refit of the joint law that fails is left out and said; above 5% the interval is refused."""
    import mergelab.analysis.intervals as intervals

    rng = np.random.default_rng(4)
    N, keys, loss = [], [], []
    for size in (0.5, 1.5, 7.0, 32.0):
        for s, key in zip(PLAN, KEYS):
            N.append(size)
            keys.append(key)
            loss.append(0.2 + 0.1 * size ** -0.4 + 0.05 / (len(s) + 0.3) + rng.normal(0, 0.002))
    real, calls = intervals.fit_joint, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) in (3, 5):  # the point fit is call 1; two of 40 refits fail
            raise intervals.FitError("did not converge")
        return real(*args, **kwargs)

    monkeypatch.setattr(intervals, "fit_joint", flaky)
    fit = expert_bootstrap_joint(N, keys, loss, n_boot=40, seed=0)
    assert fit.samples.shape == (38, 6) and any("2 of 40 bootstrap refits failed" in n for n in fit.notes)
    assert np.isfinite(planning.minimum_size(fit, 0.26).hi)
    def only_the_point_fit(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise intervals.FitError("did not converge")
        return real(*args, **kwargs)

    calls.clear()
    monkeypatch.setattr(intervals, "fit_joint", only_the_point_fit)
    refused = expert_bootstrap_joint(N, keys, loss, n_boot=20, seed=0)
    assert refused.samples is None and any("no interval" in n for n in refused.notes)


def test_small_designs_are_marked_approximate():
    """Five orderings (about 40 merges over 9 values of k) covered L(M) in 77% of simulated families
    with pairwise interference: their intervals say so; ten random subsets per k do not need to."""
    for spec, marked in (("orderings:5", True), (10, False)):
        plan = plan_of(spec)
        loss = simulate_losses(Law(1.0, 0.5, 1.0), SCENARIOS["mix"], plan, M, np.random.default_rng(2))
        fit = expert_bootstrap(["+".join(f"e{i}" for i in s) for s in plan], loss, n_boot=50)
        assert fit.samples is not None
        assert any("approximate intervals" in n for n in fit.notes) == marked, (spec, fit.notes)


def test_standard_errors_are_withheld_when_an_interval_reaches_a_bound():
    """b = 0.05 with noisy experts: the estimate is inside (0, 100) but its 95% interval reaches 0. The
    Jacobian SE of b (~0.01) would claim it is pinned down; only the interval is given, and a note says so."""
    import itertools

    rng = np.random.default_rng(0)
    names = [f"e{i}" for i in range(6)]
    effect = dict(zip(names, rng.normal(0, 0.2, 6)))
    keys, loss = [], []
    for k in range(1, 7):
        for subset in itertools.combinations(names, k):
            keys.append("+".join(subset))
            loss.append(2 + 0.5 / (k + 0.05) + np.mean([effect[e] for e in subset]) / k + rng.normal(0, 0.003))
    fit = expert_bootstrap(keys, loss, n_boot=200)
    assert not fit.at_bound["b"] and 0 < fit.b < 0.1
    assert fit.param_ci()["b"][0] == 0.0
    assert all(np.isnan(v) for v in fit.se.values())
    assert any("interval of b reaches its bound" in n and "report the expert-bootstrap interval" in n for n in fit.notes)
    assert all(np.isnan(fit.to_dict()[f"se_{p}"]) for p in ("L_inf", "A", "b"))
    from mergelab.ui.curves import fit_summary

    row = fit_summary({("s", "average"): fit}).iloc[0]
    assert row["b 95% CI (expert bootstrap)"].endswith("(bound)") and not any(c.startswith("se_") or "standard error" in c for c in row.index)
