"""Fit speed on the shipped demo results: refit every curve (all domains + macro × methods × sizes)
and bootstrap one curve 1000 times (expert bootstrap), each against a plain scipy.curve_fit baseline
measured in the same run (one curve_fit call per curve / per resampled curve, as a straightforward
script would).

    python bench/fit_speed.py            # prints seconds and ratios
"""

import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
from scipy.optimize import curve_fit

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import best_of  # noqa: E402

from mergelab.analysis.tables import curve_means, fit_table, merge_losses
from mergelab.demo.up import shipped_results_path
from mergelab.analysis.intervals import expert_bootstrap
from mergelab.store import ResultStore


def law(k, L_inf, A, b):
    return L_inf + A / (k + b)


def scipy_fit(k, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return curve_fit(law, k, y, p0=(y.min(), y.max() - y.min(), 1.0), sigma=1 / np.sqrt(k),
                             bounds=([-np.inf, -np.inf, 0], [np.inf, np.inf, 100]))[0]
        except RuntimeError:
            return np.full(3, np.nan)


def main():
    with tempfile.TemporaryDirectory() as tmp:
        store = ResultStore(Path(tmp) / "bench.duckdb")
        store.import_parquet(shipped_results_path())
        results = store.results()
    wide = curve_means(results)
    ks = np.array([c for c in wide.columns if c != "n_subsets"], dtype=float)
    curves = wide[ks].to_numpy()
    print(f"{len(curves)} curves ({results['family'].iloc[0]}: domains + macro × methods × sizes)")

    full = best_of(lambda: fit_table(results))
    ours = best_of(lambda: fit_table(results, wide=wide))
    base = best_of(lambda: [scipy_fit(ks, y) for y in curves], repeat=2)
    print(f"refit every curve from its per-k means: mergelab {ours * 1e3:.1f} ms (target < 200 ms), "
          f"scipy curve_fit loop {base * 1e3:.1f} ms, ratio {base / ours:.1f}x")
    print(f"the same from raw cached rows (per-k means recomputed): mergelab {full * 1e3:.1f} ms")

    subsets = merge_losses(results)
    one = subsets[(subsets["size"] == subsets["size"].iloc[0]) & (subsets["method"] == "average")]
    ours_boot = best_of(lambda: expert_bootstrap(one["experts_key"], one["loss"], n_boot=1000), repeat=3)
    rng = np.random.default_rng(0)
    groups = [one["loss"].to_numpy()[one["k"].to_numpy() == k] for k in ks]

    def scipy_boot():
        for _ in range(1000):
            scipy_fit(ks, np.array([g[rng.integers(0, len(g), len(g))].mean() for g in groups]))

    base_boot = best_of(scipy_boot, repeat=1)
    print(f"1000-draw expert bootstrap of one curve: mergelab {ours_boot:.3f} s (target < 2 s), "
          f"scipy loop {base_boot:.3f} s, ratio {base_boot / ours_boot:.1f}x")


if __name__ == "__main__":
    main()
