"""Is a demo family in the regime the merging law assumes? Per size: the base's macro CE, each
expert's gain on its own domain and forgetting on the other eight (both against the base), the
relative task-vector norm ||θ_i − θ0|| / ||θ0||, and the macro CE of merges at a few k against the base.

    OMP_NUM_THREADS=1 python bench/demo_regime.py --family DIR/family.toml [--db PATH]
        [--k 1,2,4,9] [--subsets 6] [--methods average,ties]
    OMP_NUM_THREADS=1 python bench/demo_regime.py --parquet data/demo/results.parquet   # no checkpoints:
        gains, forgetting and merges from shipped rows (task-vector norms need --family)

With --family it runs a real (small) sweep through mergelab.sweep into --db (default: a temporary
cache), so cached merges are reused when --db is given twice. Negative gain = better than the base.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mergelab.analysis.tables import merge_losses
from mergelab.store import ResultStore
from mergelab.sweep.plan import parse_ks


def task_vector_norms(family) -> pd.DataFrame:
    """||θ_i − θ0|| / ||θ0|| over all tensors, per (size, expert)."""
    from safetensors.numpy import load_file

    rows = []
    for size in family.sizes:
        base = load_file(str(size.base / "model.safetensors"))
        base_sq = sum(float(np.square(t.astype(np.float64)).sum()) for t in base.values())
        for name, path in size.experts.items():
            expert = load_file(str(path / "model.safetensors"))
            diff_sq = sum(float(np.square(expert[k].astype(np.float64) - base[k]).sum()) for k in base)
            rows.append({"size": size.name, "expert": name, "rel_norm": math.sqrt(diff_sq / base_sq)})
    return pd.DataFrame(rows)


def expert_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per size: each expert's change on its own domain and its mean change on the other domains."""
    out = {}
    for size, group in rows.groupby("size", sort=False):
        base = group[group["method"] == "base"].set_index("domain")["loss"]
        for name, e in group[group["method"] == "expert"].groupby("experts_key"):
            loss = e.set_index("domain")["loss"]
            out[(size, "own")] = out.get((size, "own"), {}) | {name: loss[name] - base[name]}
            out[(size, "other")] = out.get((size, "other"), {}) | {name: (loss.drop(name) - base.drop(name)).mean()}
    return pd.DataFrame(out).T


def regime_table(rows: pd.DataFrame, ks, norms: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (size, method): base macro CE, expert gain/forgetting, merged macro CE per k."""
    out = []
    for size, group in rows.groupby("size", sort=False):
        base = group[group["method"] == "base"].set_index("domain")["loss"]
        experts = group[group["method"] == "expert"]
        own, other = [], []
        for name, e in experts.groupby("experts_key"):
            loss = e.set_index("domain")["loss"]
            own.append(loss[name] - base[name])
            other.append((loss.drop(name) - base.drop(name)).mean())
        info = {"size": size, "n_params": int(group["n_params"].iloc[0]), "base_macro": base.mean(),
                "own_gain_mean": np.mean(own), "own_gain_worst": np.max(own),
                "n_experts_improving_own": int(np.sum(np.array(own) < 0)),
                "forget_mean": np.mean(other), "forget_max": np.max(other),
                "forget_rel": np.mean(other) / base.mean(),
                "expert_macro": experts.groupby("experts_key")["loss"].mean().mean()}
        if norms is not None and not norms.empty:
            info["tv_rel_norm"] = norms.loc[norms["size"] == size, "rel_norm"].mean()
        merges = merge_losses(group)
        for (method, hparams), m in merges.groupby(["method", "hparams"], sort=False):
            means = m.groupby("k")["loss"].mean()
            row = dict(info, method=method if hparams in ("{}",) else f"{method} {hparams}")
            for k in ks:
                if k in means.index:
                    row[f"k{k}"] = means[k]
                    row[f"k{k}-base"] = means[k] - info["base_macro"]
            out.append(row)
    return pd.DataFrame(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--family", type=Path, help="a built family (family.toml or its directory)")
    source.add_argument("--parquet", type=Path, help="exported result rows (no checkpoints needed)")
    parser.add_argument("--db", type=Path, help="results cache for --family (default: a temporary one)")
    parser.add_argument("--k", default="1,2,4,9")
    parser.add_argument("--subsets", default="6", help="'all' or N random subsets per k")
    parser.add_argument("--methods", default="average,ties")
    parser.add_argument("--sizes", default=None)
    parser.add_argument("--detail", action="store_true", help="also print each expert's own gain and forgetting")
    args = parser.parse_args(argv)
    ks = parse_ks(args.k, 9)
    pd.set_option("display.width", 250, "display.max_columns", 40)

    norms = None
    if args.parquet:
        rows = pd.read_parquet(args.parquet)
    else:
        from mergelab.io.family import load_family
        from mergelab.sweep.plan import SweepSpec, parse_subsets
        from mergelab.sweep.runner import run_sweep

        family = load_family(args.family)
        sizes = args.sizes.split(",") if args.sizes else list(family.size_names)
        db = args.db or Path(tempfile.mkdtemp(prefix="demo-regime-")) / "r.duckdb"
        store = ResultStore(db)
        spec = SweepSpec(family, sizes, {m: {} for m in args.methods.split(",")}, ks, parse_subsets(args.subsets))
        started = time.perf_counter()
        report = run_sweep(spec, store, progress=False)
        print(f"sweep: {report.merged} merges ({report.skipped} cached) in {time.perf_counter() - started:.1f} s, db {db}")
        rows = store.results(family=family.name, size=sizes)
        norms = task_vector_norms(family)
        norms = norms[norms["size"].isin(sizes)]
    if args.sizes:
        rows = rows[rows["size"].isin(args.sizes.split(","))]
    order = rows.groupby("size")["n_params"].first().sort_values().index
    rows = rows.set_index("size").loc[order].reset_index()
    table = regime_table(rows, ks, norms)
    print(table.round(4).to_string(index=False))
    if args.detail:
        print(expert_table(rows).round(4).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
