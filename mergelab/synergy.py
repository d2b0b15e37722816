"""Cross-domain synergy: S[d, e] = mean drop of the CE on receiver domain e when donor expert d is
added to a merge, over every pair of merges (S, S ∪ {d}) present in the results — all of them
with exhaustive subsets, consecutive prefixes with orderings."""

from __future__ import annotations

import numpy as np
import pandas as pd

DEFAULT_BLOCKS = {
    "math": ("algebra", "analysis", "geometry", "discrete", "number_theory"),
    "science": ("chemistry", "physics", "biology"),
    "code": ("code",),
}


def synergy_matrix(results: pd.DataFrame, min_k: int = 1) -> pd.DataFrame:
    """Donors (experts) × receivers (domains) from rows of one (family, size, method, hparams):
    columns experts_key, domain, loss. Merges of fewer than `min_k` experts are not used as S."""
    table = results.pivot_table(index="experts_key", columns="domain", values="loss", aggfunc="first")
    sets = {key: frozenset(key.split("+")) if key else frozenset() for key in table.index}
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
    """The n most positive and n most negative off-diagonal pairs."""
    pairs = off_diagonal(matrix).stack().rename("synergy").reset_index()
    pairs = pairs.sort_values("synergy", ascending=False)
    return pd.concat([pairs.head(n), pairs.tail(n)]).drop_duplicates().reset_index(drop=True)
