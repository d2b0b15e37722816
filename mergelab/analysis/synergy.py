"""Cross-domain synergy: S[d, e] = mean drop of the CE on receiver domain e when donor expert d is
added to a merge, over every pair of merges (S, S ∪ {d}) present in the results — all of them
with exhaustive subsets, consecutive prefixes with orderings."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mergelab.names import key_experts

DEFAULT_BLOCKS = {
    "math": ("algebra", "analysis", "geometry", "discrete", "number_theory"),
    "science": ("chemistry", "physics", "biology"),
    "code": ("code",),
}


def synergy_matrix(results: pd.DataFrame, min_k: int = 1) -> pd.DataFrame:
    """Donors (experts) × receivers (domains) from rows of one (family, size, method, hparams):
    columns experts_key, domain, loss (nats per token). S[d, e] = mean over every pair of cached merges
    (S, S ∪ {d}) of L_e(S) − L_e(S ∪ {d}): positive when d joining lowers the CE on e (nats; after the
    paper's synergy analysis, arXiv 2509.24244 §5). Merges of fewer than `min_k` experts are not used as
    S. `attrs["n_pairs"]` counts the pairs per donor; a donor without pairs gets a row of NaN."""
    table = results.pivot_table(index="experts_key", columns="domain", values="loss", aggfunc="first")
    sets = {key: frozenset(key_experts(key)) for key in table.index}
    index_of = {s: key for key, s in sets.items()}
    donors = sorted({e for s in sets.values() for e in s})
    drops = {d: [] for d in donors}
    for key, members in sets.items():
        if len(members) < min_k:
            continue
        for d in donors:
            if d not in members and (members | {d}) in index_of:
                drops[d].append(table.loc[key].to_numpy() - table.loc[index_of[members | {d}]].to_numpy())
    matrix = pd.DataFrame({d: np.nanmean(v, axis=0) if v else np.full(len(table.columns), np.nan)
                           for d, v in drops.items()}, index=table.columns).T
    matrix.index.name, matrix.columns.name = "donor", "receiver"
    matrix.attrs["n_pairs"] = {d: len(v) for d, v in drops.items()}
    return matrix


def synergy_intervals(results: pd.DataFrame, *, n_boot: int = 200, seed: int = 0, level: float = 0.95,
                      min_k: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(lo, hi): donor × receiver matrices of 95% intervals for `synergy_matrix(results, min_k)`.

    Per receiver domain, the expert random-effects model of mergelab.analysis.intervals is fitted to the
    merges' losses; each draw keeps the donor d with its own estimated effects and replaces its
    co-experts by a new pool resampled from the others, evaluates the same subsets, and recomputes
    S[d, e] over the same (S, S ∪ {d}) pairs. The interval is for d's synergy against the population
    of co-experts (basic bootstrap: Ŝ − quantiles of S* − S_world). Entries that get no interval are
    NaN, and `lo.attrs["notes"]` says why (fewer than 3 experts, a receiver with NaN losses, effects
    that cannot be estimated), each reason once with the receivers it holds for ("for every receiver, …"
    when it holds for all)."""
    from mergelab.analysis.intervals import SubsetDesign

    matrix = synergy_matrix(results, min_k)
    lo, hi = (pd.DataFrame(np.nan, index=matrix.index, columns=matrix.columns) for _ in range(2))
    table = results[results["experts_key"] != ""].pivot_table(index="experts_key", columns="domain", values="loss",
                                                               aggfunc="first")
    design = SubsetDesign.from_subsets(list(table.index))
    row_of = {frozenset(key_experts(key)): i for i, key in enumerate(table.index)}
    members = list(row_of)
    rng = np.random.default_rng(seed)
    tails = [50 * (1 - level), 50 * (1 + level)]
    M = design.M
    lo.attrs["notes"] = notes = []
    if M < 3:
        notes.append(f"{M} experts: resampling co-experts needs at least 3")
        return lo, hi
    why: dict[str, list[str]] = {}  # reason -> receivers: the same reason holds for every domain of a design
    _receiver_intervals(matrix, table, design, row_of, members, min_k, n_boot, rng, tails, lo, hi, why)
    for reason, receivers in why.items():
        where = "every receiver" if len(receivers) == len(table.columns) > 1 else ", ".join(receivers)
        notes.append(f"for {where}, {reason}")
    return lo, hi


def _receiver_intervals(matrix, table, design, row_of, members, min_k, n_boot, rng, tails, lo, hi, why):
    """synergy_intervals' loop over receivers: fills lo, hi; `why` collects reason -> receivers."""
    from mergelab.analysis.fit import FitError
    from mergelab.analysis.intervals import fit_effects

    M, k = design.M, design.k
    for receiver in table.columns:
        y = table[receiver].to_numpy(dtype=float)
        if not np.isfinite(y).all():
            why.setdefault(f"{int((~np.isfinite(y)).sum())} merges lack a loss on it", []).append(receiver)
            continue
        try:
            effects = fit_effects(design, y)
        except FitError as exc:
            why.setdefault(str(exc), []).append(receiver)
            continue
        m_k = dict(zip(design.ks(), design.per_k_means(y)))
        mean = np.array([m_k[x] for x in k])
        for j, donor in enumerate(design.experts):
            if donor not in matrix.index:
                continue
            pairs = [(row_of[s], row_of[s | {donor}]) for s in members
                     if donor not in s and len(s) >= min_k and (s | {donor}) in row_of]
            if not pairs:
                continue
            without, with_d = np.array(pairs).T
            others = np.delete(np.arange(M), j)
            a_o, c_o = effects.a[others] - effects.a[others].mean(), effects.c[others] - effects.c[others].mean()
            picks = rng.integers(0, M - 1, size=(n_boot, M))
            scale = np.sqrt((M - 1) / (M - 2)) * np.sqrt((M - 2) / rng.chisquare(M - 2, size=(n_boot, 1)))
            a, c = a_o[picks] * scale, c_o[picks] * scale
            a[:, j], c[:, j] = effects.a[j], effects.c[j]  # the donor stays itself
            spread = np.sqrt(effects.dof / rng.chisquare(effects.dof, size=(n_boot, 1)))  # σ̂² rests on dof residuals
            noise = rng.standard_normal((n_boot, len(k))) * np.sqrt(effects.sigma2 / k) * spread
            y_star = mean + (a @ design.Z.T) / k + (c @ design.Z.T) / k ** 2 + noise
            s_star = (y_star[:, without] - y_star[:, with_d]).mean(axis=1)
            k1 = k[with_d]
            world = np.mean(mean[without] - mean[with_d] - effects.a[j] / k1 - effects.c[j] / k1 ** 2)
            q_lo, q_hi = np.percentile(s_star - world, tails)
            lo.loc[donor, receiver] = matrix.loc[donor, receiver] - q_hi
            hi.loc[donor, receiver] = matrix.loc[donor, receiver] - q_lo


def unmeasured_donors(matrix: pd.DataFrame) -> list[str]:
    """The donors of `synergy_matrix` without a value: no two cached merges differ by that expert alone
    (S and S ∪ {d}), so its row is blank."""
    pairs = matrix.attrs.get("n_pairs", {})
    return [d for d in matrix.index if not pairs.get(d, 1) or not np.isfinite(matrix.loc[d].to_numpy(dtype=float)).any()]


def off_diagonal(matrix: pd.DataFrame) -> pd.DataFrame:
    """The matrix with self-pairs (donor d → receiver d) blanked: they measure the own expert."""
    out = matrix.copy()
    for d in out.index:
        if d in out.columns:
            out.loc[d, d] = np.nan
    return out


def donor_strength(matrix: pd.DataFrame) -> pd.Series:
    """How much each donor helps the other domains on average."""
    return off_diagonal(matrix).mean(axis=1).rename("donor_strength")


def receiver_susceptibility(matrix: pd.DataFrame) -> pd.Series:
    """How much each domain gains on average from the other donors."""
    return off_diagonal(matrix).mean(axis=0).rename("receiver_susceptibility")


def block_means(matrix: pd.DataFrame, blocks: dict[str, tuple[str, ...]] | None = None) -> pd.DataFrame:
    """Mean synergy from donors of one block to receivers of another (self-pairs excluded)."""
    blocks = blocks or DEFAULT_BLOCKS
    clean = off_diagonal(matrix)
    out = pd.DataFrame(index=list(blocks), columns=list(blocks), dtype=float)
    for a, donors in blocks.items():
        for b, receivers in blocks.items():
            sub = clean.reindex(index=[d for d in donors if d in clean.index],
                                columns=[r for r in receivers if r in clean.columns])
            values = sub.to_numpy().ravel()
            out.loc[a, b] = np.nanmean(values) if np.isfinite(values).any() else np.nan
    out.index.name, out.columns.name = "donor_block", "receiver_block"
    return out


def top_pairs(matrix: pd.DataFrame, n: int = 10) -> pd.DataFrame:
    """The strongest off-diagonal pairs of both signs: the n most helpful (synergy > 0) and the n most
    harmful (synergy < 0), columns donor, receiver, synergy, sorted from most helpful to most harmful.
    Pairs without a value (the blanked diagonal, donors without pairs) are left out: pandas ≥ 3 keeps
    NaN through `stack()`, and sorted last they would fill the harmful tail."""
    pairs = off_diagonal(matrix).stack(future_stack=True).rename("synergy").reset_index()
    pairs = pairs[np.isfinite(pairs["synergy"].to_numpy(dtype=float))]
    helpful = pairs[pairs["synergy"] > 0].nlargest(n, "synergy")
    harmful = pairs[pairs["synergy"] < 0].nsmallest(n, "synergy")
    return (pd.concat([helpful, harmful]).sort_values("synergy", ascending=False, kind="stable")
            .reset_index(drop=True))
