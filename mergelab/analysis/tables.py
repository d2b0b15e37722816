"""From cached result rows to fitted tables: curves per (size, method, hyperparameters, domain or
macro), fitted in batches, with provenance. The dashboard and the CLI call these.

A curve is (family, size, method, hyperparameters, domain): two settings of one method (TIES at
density 0.2 and 0.5) are two curves everywhere. `setting` names a method with its hyperparameters
for legends, pickers and tables: the method alone when the family has one setting of it, else the
method and the hyperparameters that differ ("ties density=0.5")."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from mergelab import __version__, metrics
from mergelab.analysis.fit import FitError, FitFailure, JointFit, fit_curves, fit_joint
from mergelab.analysis.intervals import expert_bootstrap
from mergelab.analysis.means import mean_by_k, per_k_means
from mergelab.bars import asked_bar as progress_bar
from mergelab.names import MACRO, REFERENCE_METHODS, billions, key_experts

CURVE_KEYS = ["family", "size", "n_params", "method", "hparams"]


def setting_labels(frame: pd.DataFrame, labels_from: pd.DataFrame | None = None) -> pd.Series:
    """The setting of each row (columns family, method, hparams): the method alone when its family
    has one setting of it, else the method and the hyperparameters that differ between its settings,
    e.g. 'ties lambda=0.5'. The settings are those in `labels_from` (default: `frame`): pass the
    family's cached rows so that a domain or table holding fewer settings keeps the same labels."""
    labels = {}
    source = frame if labels_from is None else pd.concat([labels_from[["family", "method", "hparams"]],
                                                          frame[["family", "method", "hparams"]]])
    for (family, method), group in source.groupby(["family", "method"], sort=False):
        settings = {h: json.loads(h) for h in group["hparams"].unique()}
        names = sorted({name for p in settings.values() for name in p})
        differ = [n for n in names if len({json.dumps(p.get(n)) for p in settings.values()}) > 1]
        for hparams, p in settings.items():
            # an option a setting does not have (per-expert weights, filters) is left out, not shown as null
            labels[family, method, hparams] = " ".join([method, *(f"{n}={json.dumps(p[n])}" for n in differ if n in p)])
    return pd.Series([labels[key] for key in zip(frame["family"], frame["method"], frame["hparams"])],
                     index=frame.index, dtype=object, name="setting")


def with_settings(frame: pd.DataFrame, labels_from: pd.DataFrame | None = None) -> pd.DataFrame:
    """`frame` with a `setting` column (see setting_labels) after `method`."""
    out = frame.drop(columns="setting", errors="ignore")
    labels = setting_labels(out, labels_from) if len(out) else pd.Series(dtype=object)
    out.insert(out.columns.get_loc("method") + 1, "setting", labels)
    return out


def merge_losses(results: pd.DataFrame, domain: str = MACRO) -> pd.DataFrame:
    """One row per merge (k ≥ 1, merge methods only) with the loss on `domain`, or the macro mean
    over domains for merges evaluated on every domain of their family; with its `setting`."""
    rows = results[~results["method"].isin(REFERENCE_METHODS) & (results["k"] >= 1)]
    keys = CURVE_KEYS + ["experts_key", "k"]
    if domain != MACRO:
        return with_settings(rows[rows["domain"] == domain][keys + ["loss"]].reset_index(drop=True), rows)
    # per size: its current rows may cover other domains than another size's (an eval set changed there)
    n_domains = rows.groupby(["family", "size"])["domain"].nunique().rename("family_domains")
    # rows are unique per (merge, domain) among current rows, so a row count is a domain count
    macro = rows.groupby(keys, as_index=False, sort=False).agg(loss=("loss", "mean"), n_domains=("loss", "size"))
    macro = macro.join(n_domains, on=["family", "size"])
    complete = macro[macro["n_domains"] == macro["family_domains"]]
    return with_settings(complete[keys + ["loss"]].reset_index(drop=True), rows)


def per_k_summary(store, family: str, sizes) -> pd.DataFrame:
    """Mean cross-domain CE per k (rows) for each size and method setting (columns), over the current
    cached merges of `family` (a ResultStore's) at `sizes` (those evaluated on every current domain)."""
    macro = merge_losses(metrics.select(store.results(family=family, size=list(sizes)), metrics.DEFAULT))
    if macro.empty:
        return macro
    return mean_by_k(macro, ["size", "setting"]).pivot(index="k", columns=["size", "setting"], values="loss").round(4)


def pool_size(rows: pd.DataFrame) -> int:
    """M: the number of distinct experts in the rows' merges and single-expert reference rows (pass
    the rows of one family and size). The pool, not the largest k swept, bounds what can be merged."""
    return len({e for key in rows["experts_key"].unique() if key for e in key_experts(key)})


def domains_of(results: pd.DataFrame) -> list[str]:
    return sorted(results["domain"].unique())


def curve_means(results: pd.DataFrame, domains=None) -> pd.DataFrame:
    """One row per curve (CURVE_KEYS + domain), one column per k with the mean loss over subsets,
    plus n_subsets. `domains` may include MACRO (the default: macro and every domain)."""
    domains = list(domains or [MACRO, *domains_of(results)])
    frames = []
    if MACRO in domains:
        frames.append(merge_losses(results, MACRO).assign(domain=MACRO))
    plain = [d for d in domains if d != MACRO]
    if plain:
        rows = results[~results["method"].isin(REFERENCE_METHODS) & (results["k"] >= 1) & results["domain"].isin(plain)]
        frames.append(rows[CURVE_KEYS + ["domain", "experts_key", "k", "loss"]])
    keys = CURVE_KEYS + ["domain"]
    means = mean_by_k(pd.concat(frames, ignore_index=True), keys).set_index(keys + ["k"])
    wide = means["loss"].unstack("k").sort_index()
    wide["n_subsets"] = means["n_subsets"].groupby(level=keys).sum()  # one row per merge and k
    return wide


def fit_table(results: pd.DataFrame, *, domains=None, weights="k", n_boot: int = 0, seed: int = 0,
              wide: pd.DataFrame | None = None) -> pd.DataFrame:
    """The floor-tail law per curve. Curves that share a k grid are fitted in one batch; with
    n_boot > 0 each curve gets expert-bootstrap intervals (mergelab.analysis.intervals) as CI columns.
    `wide` (from curve_means) may be passed in to skip recomputing the per-k means."""
    wide = curve_means(results, domains) if wide is None else wide
    ks = np.array([c for c in wide.columns if c != "n_subsets"], dtype=float)
    values = wide[list(ks)].to_numpy(dtype=float)
    measured = ~np.isnan(values)
    keys, names = list(wide.index), list(wide.index.names)
    subsets_of = subset_lookup(results)
    by_grid: dict[tuple, list[int]] = {}
    for i, row in enumerate(measured):
        by_grid.setdefault(tuple(row), []).append(i)
    rows = []
    # bootstrapped curves are fitted one by one, for seconds each: a bar on the CLI's terminal (never the dashboard)
    with progress_bar(total=len(keys) if n_boot else 0, desc=f"bootstrap fits ({n_boot:,} draws)", unit="curve",
                      leave=False) as bar:
        for grid, members in by_grid.items():
            grid_k = ks[np.array(grid)]
            curves = values[np.ix_(members, np.array(grid))]
            infos = [dict(zip(names, keys[i])) for i in members]
            fits = _fit_group(subsets_of, infos, grid_k, curves, weights, n_boot, seed, bar)
            for i, info, fit in zip(members, infos, fits):
                info.update(n_subsets=int(wide["n_subsets"].iat[i]), k_min=int(grid_k.min()), k_max=int(grid_k.max()))
                info.update(fit.to_dict())
                rows.append(info)
    return with_settings(pd.DataFrame(rows).sort_values(["family", "domain", "method", "hparams", "n_params"],
                                                        ignore_index=True), results)


def _fit_group(subsets_of, infos: list[dict], k: np.ndarray, curves: np.ndarray, weights, n_boot: int, seed: int,
               bar=None) -> list:
    """Fits of curves sharing one k grid: batched, or bootstrapped one by one (`bar` advanced per curve).
    A curve that cannot be fitted yields a FitFailure with the reason."""
    if not n_boot:
        try:
            return fit_curves(k, curves, weights=weights)
        except FitError:
            pass  # one bad curve: fit one by one below to say which
    out = []
    for info, means in zip(infos, curves):
        try:
            if n_boot:
                subsets = subsets_of(info)
                out.append(expert_bootstrap(subsets["experts_key"], subsets["loss"], n_boot=n_boot, seed=seed,
                                            weights=weights))
            else:
                out.append(fit_curves(k, means[None], weights=weights)[0])
        except FitError as exc:
            out.append(FitFailure(str(exc)))
        if n_boot and bar is not None:
            bar.update(1)
    return out


def subset_lookup(results: pd.DataFrame):
    """curve key (dict with CURVE_KEYS and domain) -> its merges, one row per subset; merge_losses runs
    once per domain, not once per curve."""
    by_domain: dict[str, dict] = {}

    def subsets_of(key: dict) -> pd.DataFrame:
        domain = key["domain"]
        if domain not in by_domain:
            by_domain[domain] = dict(iter(merge_losses(results, domain).groupby(CURVE_KEYS)))
        return by_domain[domain][tuple(key[c] for c in CURVE_KEYS)]

    return subsets_of


def joint_table(results: pd.DataFrame, *, domains=None, weights="k") -> pd.DataFrame:
    """The joint law L(N,k) = L* + B·N^(−β) + A0·N^(−γ)/(k+b) (arXiv 2509.24244 §3, Tables 3–5) over sizes
    per (method, hyperparameters, domain); N in billions of parameters, CE in nats/token.

    Parameters the data do not identify are NaN; `identified` and `reason` say which and why (the rules
    are in `mergelab.analysis.fit.JointFit`). `r2` is weighted ∝ k, as the paper reports it; `r2_unweighted` beside it."""
    rows = []
    for domain in domains or [MACRO, *domains_of(results)]:
        merges = merge_losses(results, domain)
        for (family, method, hparams), group in merges.groupby(["family", "method", "hparams"]):
            row = {"family": family, "method": method, "hparams": hparams, "domain": domain,
                   "sizes": sorted(group["size"].unique()), "n_subsets": len(group)}
            try:
                row.update(fit_joint_merges(group, weights=weights).to_dict())
            except FitError as exc:
                row.update(identified=False, reason=str(exc), notes=[str(exc)])
            rows.append(row)
    return with_settings(pd.DataFrame(rows), results)


def fit_joint_merges(merges: pd.DataFrame, *, weights="k") -> JointFit:
    """The joint law fitted to the per-(N, k) mean losses of merges (rows of `merge_losses` for one
    setting, all its sizes): N = n_params in billions, loss in nats per token. Raises FitError."""
    means = mean_by_k(merges, ["n_params"])
    return fit_joint(billions(means["n_params"]), means["k"], means["loss"], weights=weights)


def joint_warning(table: pd.DataFrame) -> str:
    """A sentence for a `joint_table` with fits that are not identified ("" when every fit is)."""
    if "identified" not in table or table.empty:
        return ""
    bad = int((~table["identified"].fillna(False).astype(bool)).sum())
    return (f"{bad} of {len(table)} joint fits are not identified: the parameters the data do not pin down are "
            "blank, and the reason column says why." if bad else "")


def provenance(results: pd.DataFrame, **options) -> dict:
    """What a table was computed from and how: enough to reproduce it."""
    merges = results[~results["method"].isin(REFERENCE_METHODS)]
    return {
        "mergelab_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "families": sorted(results["family"].unique()),
        "methods": {m: sorted(g["hparams"].unique()) for m, g in merges.groupby("method")},
        "sizes": {s: int(n) for s, n in results.groupby("size")["n_params"].first().items()},
        "k_range": [int(merges["k"].min()), int(merges["k"].max())] if len(merges) else [],
        "n_merges": int(merges[["family", "size", "method", "hparams", "experts_key"]].drop_duplicates().shape[0]),
        "eval_hashes": sorted(results["eval_hash"].unique()),
        "metric_version": sorted(int(v) for v in results["metric_version"].unique()),
        # what the numbers are (mergelab.metrics): name → direction and unit; CE for rows that name none
        "metrics": {m.name: {"direction": m.direction, "unit": m.unit}
                    for m in (metrics.of_rows(metrics.select(results, n)) for n in metrics.names(results))},
        "options": options,
    }


def synergy_table(results: pd.DataFrame, *, n_boot: int = 0, seed: int = 0) -> pd.DataFrame:
    """Long-form synergy (donor, receiver, synergy, n_pairs; with n_boot > 0 also the 95% interval
    lo, hi from mergelab.analysis.synergy.synergy_intervals) per (family, size, method, hparams)."""
    from mergelab.analysis.synergy import synergy_intervals, synergy_matrix

    frames = []
    merges = results[~results["method"].isin(REFERENCE_METHODS)]
    for key, group in merges.groupby(CURVE_KEYS):
        matrix = synergy_matrix(group)
        long = matrix.stack(future_stack=True).rename("synergy").reset_index()
        long["n_pairs"] = long["donor"].map(matrix.attrs["n_pairs"])
        if n_boot:
            lo, hi = synergy_intervals(group, n_boot=n_boot, seed=seed)
            long["lo"] = lo.stack(future_stack=True).to_numpy()
            long["hi"] = hi.stack(future_stack=True).to_numpy()
        frames.append(long.assign(**dict(zip(CURVE_KEYS, key))))
    if not frames:
        raise FitError("no merges to compute synergy from")
    columns = ["donor", "receiver", "synergy", "n_pairs"] + (["lo", "hi"] if n_boot else [])
    return with_settings(pd.concat(frames, ignore_index=True)[CURVE_KEYS + columns], results)


PLAN_DEFAULTS = {"epsilon": 0.01, "tolerance": 0.001}


def plan_table(results: pd.DataFrame, *, weights="k", n_boot: int = 0, seed: int = 0,
               epsilon: float = PLAN_DEFAULTS["epsilon"], tolerance: float = PLAN_DEFAULTS["tolerance"]) -> pd.DataFrame:
    """Per macro curve: k80, k90, k_ε and the stop rule, each with its interval when bootstrapped,
    M (the pool) and whether the answer extrapolates beyond it. Curves that do not fall get no
    floor-based answers, only the note saying why."""
    from mergelab.analysis import planning

    rows = []
    wide = curve_means(results, [MACRO])
    subsets_of = subset_lookup(results)
    for key in wide.index:
        info = dict(zip(wide.index.names, key))
        subsets = subsets_of(info)
        M = pool_size(results[(results["family"] == info["family"]) & (results["size"] == info["size"])])
        try:
            fit = (expert_bootstrap(subsets["experts_key"], subsets["loss"], n_boot=n_boot, seed=seed, weights=weights)
                   if n_boot
                   else fit_curves(*_means(subsets), weights=weights)[0])
        except FitError as exc:
            rows.append({**info, "quantity": "fit", "note": str(exc)})
            continue
        quantities = {"k80": planning.k_at_fraction(fit, 0.8, M), "k90": planning.k_at_fraction(fit, 0.9, M),
                      f"k_eps({epsilon:g})": planning.k_epsilon(fit, epsilon, M),
                      f"stop(tol={tolerance:g})": planning.stop_rule(fit, tolerance, M)}
        for name, est in quantities.items():
            rows.append({**info, "quantity": name, "M": M, **est.as_dict()})
    return with_settings(pd.DataFrame(rows), results)


def _means(subsets: pd.DataFrame):
    ks, means = per_k_means(subsets["k"], subsets["loss"])
    return ks, means[None]
