"""Adaptive sweeps against random sampling and the exhaustive grid, and the coverage of their intervals.

1. Replay on the shipped `standard` demo results (data/demo/results.parquet, every subset of 9 experts per
   size and setting): for every (method setting, size) macro curve and each target, the merges the adaptive
   policy (mergelab.analysis.adaptive) uses, whether its estimate lies in the exhaustive fit's 95% CI, and
   the merges two random designs need to reach the same precision with the same interval and stopping
   rule: N random subsets per k (the `--subsets N` plan, plus the single experts and the full pool, N
   grown until the target is met) and uniformly random subsets (every subset equally likely, grown 10% at
   a time; median over 3 seeds each). A target the exhaustive grid itself does not reach (its interval is
   wider) is out of reach for this pool: the interval is for the population of experts, and more merges of
   the same 9 experts cannot narrow it further.
2. Coverage: over simulated families (mergelab.analysis.simulate: a known law, M = 9 experts with shared
   effects, curvature, pair interference and merge noise), how often the adaptive 95% CI contains the true
   population value, for targets set relative to each family's drop L(1) − L(M).

    python bench/adaptive.py                      # both (about 10 min on 2 busy cores)
    python bench/adaptive.py --replay-only
    python bench/adaptive.py --coverage-only --families 200
"""

import argparse
import math
import os
import time

import numpy as np
import pandas as pd

from mergelab.analysis.adaptive import (FINAL_DRAWS, REPORT_LEVEL, curves_of, interval, parse_target, replay_curve,
                                        run_policy)
from mergelab.analysis.simulate import SCENARIOS, Pool, random_law, simulate_losses
from mergelab.demo.up import shipped_results_path
from mergelab.names import key_experts
from mergelab.sweep.plan import plan_subsets

TARGETS = ("L_inf:0.01", "k90:0.5")
SEEDS = (0, 1, 2)


def reach(target, experts, table, designs):
    """Merges of the first design in `designs` (lists of subsets, growing) whose interval meets the target."""
    M = len(experts)
    for subsets in designs:
        losses = [table[frozenset(s)] for s in subsets]
        iv = interval(target, subsets, losses, M, n_boot=FINAL_DRAWS, seed=len(subsets), level=REPORT_LEVEL)
        if np.isfinite(iv.half_width) and iv.half_width <= target.threshold(iv.estimate):
            return len(subsets)
    return math.inf


def per_k_designs(experts, seed):
    M = len(experts)
    for n in range(2, math.comb(M, M // 2) + 1):
        plan = plan_subsets(experts, range(1, M + 1), n, seed=seed)
        yield list(dict.fromkeys([(e,) for e in experts] + plan + [tuple(experts)]))
        if len(plan) >= 2 ** M - 1:
            return


def uniform_designs(experts, seed):
    M = len(experts)
    every = [s for k in range(1, M + 1) for s in __import__("itertools").combinations(experts, k)]
    order = np.random.default_rng(seed).permutation(len(every))
    n = 20
    while True:
        yield [every[i] for i in order[:n]]
        if n >= len(every):
            return
        n = min(len(every), int(n * 1.1) + 1)


def replay_table(targets=TARGETS):
    results = pd.read_parquet(shipped_results_path())
    curves = curves_of(results)
    rows = []
    for text in targets:
        target = parse_target(text)
        for info, losses in curves:
            start = time.perf_counter()
            experts = info["experts"]
            result, full = replay_curve(target, experts, losses)
            table = {frozenset(key_experts(k)): v for k, v in losses.items()}
            exhaustive_met = full.half_width <= target.threshold(full.estimate)
            per_k = uniform = math.inf  # out of reach for this pool: no random design reaches it either
            if exhaustive_met:
                per_k = np.median([reach(target, experts, table, per_k_designs(list(experts), s)) for s in SEEDS])
                uniform = np.median([reach(target, experts, table, uniform_designs(list(experts), s)) for s in SEEDS])
            rows.append({"target": text, "size": info["size"], "setting": info["setting"],
                         "adaptive": result.merges, "stopped": result.reason,
                         "estimate": result.estimate, "ci": (result.lo, result.hi),
                         "exhaustive": len(losses), "exhaustive estimate": full.estimate,
                         "exhaustive ci": (full.lo, full.hi), "exhaustive meets target": exhaustive_met,
                         "within exhaustive CI": full.lo <= result.estimate <= full.hi,
                         "random per k": per_k, "uniform random": uniform,
                         "seconds": time.perf_counter() - start})
            print(f"<!-- {text} {info['size']} {info['setting']}: adaptive {result.merges} ({result.reason}), "
                  f"per-k {per_k}, uniform {uniform}, {rows[-1]['seconds']:.1f} s -->", flush=True)
    return pd.DataFrame(rows)


def print_replay(frame):
    print("\n| target | size | setting | adaptive merges (stopped) | estimate [95% CI] | exhaustive estimate [95% CI] "
          "| in exhaustive CI | random per k | uniform random |\n|---|---|---|---|---|---|---|---|---|")
    f = lambda v: f"{v:.4g}"  # noqa: E731
    for r in frame.to_dict("records"):
        full = r["exhaustive ci"]
        print(f"| {r['target']} | {r['size']} | {r['setting']} | {r['adaptive']} ({r['stopped']}) | {f(r['estimate'])} "
              f"[{f(r['ci'][0])}, {f(r['ci'][1])}] | {f(r['exhaustive estimate'])} [{f(full[0])}, {f(full[1])}]"
              f"{'' if r['exhaustive meets target'] else ' (wider than the target)'} | "
              f"{'yes' if r['within exhaustive CI'] else '**no**'} | {r['random per k']:g} | {r['uniform random']:g} |")
    print()
    for text, g in frame.groupby("target", sort=False):
        reached = g[g["exhaustive meets target"]]
        met = reached[reached["stopped"] == "target met"]
        share = (met["adaptive"] / met["exhaustive"]).to_numpy()
        ratio_k = (met["random per k"] / met["adaptive"]).to_numpy()
        ratio_u = (met["uniform random"] / met["adaptive"]).to_numpy()
        print(f"- {text}: the exhaustive grid meets the target on {len(reached)}/{len(g)} curves; adaptive meets it on "
              f"{len(met)} of those, with {np.median(share):.1%} of the exhaustive merges (median; max {share.max():.1%}), "
              f"its estimate inside the exhaustive 95% CI on {int(g['within exhaustive CI'].sum())}/{len(g)} curves; "
              f"random per k needs {np.median(ratio_k):.1f}× the adaptive merges (median; min {ratio_k.min():.1f}×), "
              f"uniform random {np.median(ratio_u):.1f}× (min {ratio_u.min():.1f}×). Out of reach on "
              f"{int((~g['exhaustive meets target']).sum())} curves (the exhaustive interval is wider than the target); "
              f"there adaptive stopped after {', '.join(str(x) for x in g.loc[~g['exhaustive meets target'], 'adaptive'])} merges.")


def coverage(n_families, scenario_name="mix", seed=0, M=9):
    """Coverage of the adaptive CI over simulated families; targets relative to each family's drop."""
    scenario = SCENARIOS[scenario_name]
    rng = np.random.default_rng(seed)
    experts = tuple(f"e{i}" for i in range(M))
    out = []
    for f in range(n_families):
        law = random_law(rng)
        pool = Pool.draw(law, scenario, M, rng)
        noise_rng = np.random.default_rng(rng.integers(2 ** 31))
        cache = {}

        def evaluate(batch):
            for s in batch:
                if frozenset(s) not in cache:
                    idx = tuple(int(e[1:]) for e in s)
                    cache[frozenset(s)] = float(simulate_losses(law, scenario, [idx], M, noise_rng, pool)[0])
            return [cache[frozenset(s)] for s in batch]

        drop = law.drop(M)
        for quantity, precision, truth in (("L_inf", 0.3 * drop, law.L_inf), ("k90", 0.5, law.k_fraction(0.9, M))):
            target = parse_target(f"{quantity}:{precision!r}")
            r = run_policy(target, experts, evaluate, seed=int(rng.integers(2 ** 31)), predict=False)
            out.append({"family": f, "quantity": quantity, "merges": r.merges, "reason": r.reason,
                        "covered": bool(r.lo <= truth <= r.hi) if np.isfinite(r.lo) else None,
                        "width": r.half_width, "truth": truth, "estimate": r.estimate})
        if (f + 1) % 20 == 0:
            done = pd.DataFrame(out)
            print(f"<!-- {f + 1} families: coverage so far {done.groupby('quantity')['covered'].mean().round(3).to_dict()} -->",
                  flush=True)
    return pd.DataFrame(out)


def print_coverage(frame, n, scenario):
    print(f"\n| quantity (target) | families | interval given | coverage (all) | coverage (target met) | "
          f"target met | merges (median, max) |\n|---|---|---|---|---|---|---|")
    for q, g in frame.groupby("quantity", sort=False):
        given = g[g["covered"].notna()]
        met = given[given["reason"] == "target met"]
        label = {"L_inf": "L∞ (0.3 × drop)", "k90": "k90 (0.5)"}[q]
        print(f"| {label} | {len(g)} | {len(given)} | {given['covered'].mean():.1%} | "
              f"{met['covered'].mean() if len(met) else float('nan'):.1%} | {len(met)} | "
              f"{int(g['merges'].median())}, {int(g['merges'].max())} |")
    print(f"\n(scenario {scenario!r}, M = 9, {REPORT_LEVEL:.0%} intervals; load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", type=int, default=200)
    parser.add_argument("--scenario", default="mix", choices=list(SCENARIOS))
    parser.add_argument("--replay-only", action="store_true")
    parser.add_argument("--coverage-only", action="store_true")
    parser.add_argument("--targets", default=",".join(TARGETS), help="replay targets, comma-separated")
    args = parser.parse_args()
    print(f"load average at start: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if not args.coverage_only:
        start = time.perf_counter()
        frame = replay_table(args.targets.split(","))
        print_replay(frame)
        print(f"\n(replay: {time.perf_counter() - start:.0f} s)")
    if not args.replay_only:
        start = time.perf_counter()
        print_coverage(coverage(args.families, args.scenario), args.families, args.scenario)
        print(f"\n(coverage: {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
