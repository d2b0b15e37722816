"""Coverage of mergelab's 95% intervals by simulation: does the interval contain the true L∞, A, b,
L(M), k90, the per-k mean at k = M and the 3-point forecast of L(M) (from k = 1, 2, 4 only) as
often as it claims?

Families are simulated from a known law with expert random effects (mergelab.analysis.simulate: independent
subset noise, shared per-expert effects, and a mix with pairwise interference), on the plans a sweep
runs (every subset, N random subsets per k, diverse orderings), M = 9 experts. Each family is
intervalled three ways, in the same run:
- mergelab: the expert bootstrap (mergelab.analysis.intervals.expert_bootstrap);
- subset bootstrap: resample the merged subsets within each k and refit — what mergelab did before
  and what a user would write first (the baseline);
- expert jackknife: delete one expert (and every subset holding it), refit, t interval with M − 1 dof.
A second table checks the synergy intervals (mergelab.analysis.synergy.synergy_intervals) the same way.
The width column is the median interval width over 3.92 × the SD of (estimate − truth) across
families (for quantities in nats, both in units of each family's drop L(1) − L(M)): 1 is as wide
as a correct normal interval.

    python bench/coverage.py                 # 200 families per scenario and plan (about 10 min on 2 cores)
    python bench/coverage.py --families 50   # quicker
    python bench/coverage.py --synergy-only  # only the synergy table (families / 4 per row)
    python bench/coverage.py --joint-only    # only the joint law: floor at the largest size, β, N_min
"""

import argparse
import sys
import time

import numpy as np
from scipy.stats import t as student_t

from mergelab.analysis.fit import FitError, fit_params
from mergelab.analysis.simulate import (JOINT_QUANTITIES, QUANTITIES, SCENARIOS, all_subsets, coverage_records, families,
                                       joint_coverage, quantities, synergy_coverage)
from mergelab.sweep.plan import plan_subsets

M = 9
EXPERTS = [f"e{i}" for i in range(M)]
PLANS = {"all subsets": "all", "10 random per k": 10, "15 orderings": "orderings:15", "3 random per k": 3,
         "5 orderings": "orderings:5"}


def plan(spec) -> list[tuple[int, ...]]:
    if spec == "all":
        return all_subsets(M)
    return [tuple(int(e[1:]) for e in subset) for subset in plan_subsets(EXPERTS, range(1, M + 1), spec, seed=0)]


def per_k_means(subsets, loss, keep):
    k = np.array([len(s) for s in subsets])
    ks = np.unique(k[keep])
    return ks.astype(float), np.array([loss[keep & (k == x)].mean() for x in ks])


def subset_bootstrap(subsets, loss, rng, n_boot):
    """The baseline: resample subsets within each k, refit; percentile intervals."""
    k = np.array([len(s) for s in subsets])
    ks = np.unique(k)
    groups = [loss[k == x] for x in ks]
    draws = np.column_stack([g[rng.integers(0, len(g), (n_boot, len(g)))].mean(axis=1) for g in groups])
    params = fit_params(ks.astype(float), draws)
    q = np.array([[*quantities(dict(zip(("L_inf", "A", "b"), p)), M), d[-1], np.nan] for p, d in zip(params, draws)])
    return np.nanpercentile(q, [2.5, 97.5], axis=0)


def expert_jackknife(subsets, loss, estimate):
    """Delete-one-expert jackknife with a t interval (M − 1 dof)."""
    reps = []
    for j in range(M):
        keep = np.array([j not in s for s in subsets])
        ks, means = per_k_means(subsets, loss, keep)
        try:
            p = fit_params(ks, means[None])[0]
        except FitError:
            continue
        reps.append([*quantities(dict(zip(("L_inf", "A", "b"), p)), M), means[-1], np.nan])
    reps = np.array(reps)
    n = len(reps)
    se = np.sqrt((n - 1) / n * ((reps - reps.mean(axis=0)) ** 2).sum(axis=0))
    half = student_t.ppf(0.975, n - 1) * se
    return estimate - half, estimate + half


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", type=int, default=200)
    parser.add_argument("--draws", type=int, default=400)
    parser.add_argument("--synergy-only", action="store_true", help="only the synergy table")
    parser.add_argument("--joint-only", action="store_true", help="only the joint-law table")
    args = parser.parse_args()
    if args.synergy_only:
        return synergy_table(args)
    if args.joint_only:
        return joint_table(args)
    print(f"# Coverage of nominal 95% intervals: {args.families} simulated families per row, M = {M}, "
          f"{args.draws} bootstrap draws\n")
    print("| scenario | plan | interval | " + " | ".join(QUANTITIES) + " | width (median over ideal) |")
    print("|---" * (4 + len(QUANTITIES)) + "|")
    for scenario in SCENARIOS.values():
        for plan_name, spec in PLANS.items():
            start = time.perf_counter()
            subsets = plan(spec)
            records = coverage_records(scenario, subsets, M, args.families, n_boot=args.draws, seed=0)
            truth, est = records["truth"], records["estimate"]
            base = {"subset bootstrap": [], "expert jackknife": []}
            for f, (_, loss, seed) in enumerate(families(scenario, subsets, M, args.families, seed=0)):  # the same families
                base["subset bootstrap"].append(subset_bootstrap(subsets, loss, np.random.default_rng(seed), args.draws))
                base["expert jackknife"].append(expert_jackknife(subsets, loss, est[f]))
            rows = {"mergelab (expert bootstrap)": (records["lo"], records["hi"])}
            rows |= {name: (np.array([b[0] for b in v]), np.array([b[1] for b in v])) for name, v in base.items()}
            # families differ in scale (noise is set relative to each one's drop L(1) − L(M)): compare in those units
            drop = np.array([law.drop(M) for law, _, _ in families(scenario, subsets, M, args.families, seed=0)])
            unit = np.where(np.isin(QUANTITIES, ("b", "k90")), 1.0, drop[:, None])  # b and k90 have no unit
            sd = np.nanstd((est - truth) / unit, axis=0)
            for name, (lo, hi) in rows.items():
                given = np.isfinite(lo)  # families where this interval was given (a design may allow none)
                hits = ((lo <= truth) & (truth <= hi)).sum(axis=0)
                cover = np.where(given.any(axis=0), hits / np.maximum(given.sum(axis=0), 1), np.nan)
                if given.sum() < given.size and name.startswith("mergelab"):
                    print(f"<!-- {scenario.name} / {plan_name}: intervals given in {given.sum(axis=0).tolist()} of "
                          f"{len(lo)} families -->", file=sys.stderr)
                width = np.nanmedian((hi - lo) / unit, axis=0) / (2 * 1.96 * sd)
                print(f"| {scenario.name} | {plan_name} | {name} | " + " | ".join("—" if np.isnan(c) else f"{c:.1%}" for c in cover)
                      + " | " + ", ".join("—" if np.isnan(w) else f"{w:.1f}" for w in width) + " |", flush=True)
            print(f"<!-- {scenario.name} / {plan_name}: {time.perf_counter() - start:.0f} s -->", file=sys.stderr)
    synergy_table(args)
    joint_table(args)


def synergy_table(args):
    print(f"\n# Coverage of the synergy intervals S[d, e] (every donor, {args.families // 4} families per row)\n")
    print("| scenario | plan | coverage | median width (drops) |\n|---|---|---|---|")
    for scenario in SCENARIOS.values():
        for plan_name, spec in PLANS.items():
            cover, width = synergy_coverage(scenario, plan(spec), M, args.families // 4, n_boot=args.draws // 2, seed=0)
            print(f"| {scenario.name} | {plan_name} | {cover:.1%} | {width:.2f} |", flush=True)


def joint_table(args):
    n = args.families // 4
    print(f"\n# Coverage of the joint law's intervals ({n} families, sizes 0.5–14 B, {args.draws // 4} draws, "
          "each a refit of the joint law)\n")
    print("| scenario | " + " | ".join(JOINT_QUANTITIES) + " | intervals given |")
    print("|---" * (len(JOINT_QUANTITIES) + 2) + "|")
    for scenario in SCENARIOS.values():
        r = joint_coverage(scenario, n, n_boot=args.draws // 4, seed=0)
        given = np.isfinite(r["lo"]).all(axis=1)
        cover = ((r["lo"] <= r["truth"]) & (r["truth"] <= r["hi"]))[given].mean(axis=0)
        print(f"| {scenario.name} | " + " | ".join(f"{c:.1%}" for c in cover) + f" | {given.sum()} of {n} |", flush=True)


if __name__ == "__main__":
    main()
