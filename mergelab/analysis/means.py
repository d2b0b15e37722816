"""Per-k means: the one place where merged losses are averaged over the subsets of each k.

Every fit in mergelab is to these means (the law describes the mean loss of a k-expert merge),
every figure draws them, and every table reports them: arrays through `per_k_means`, cached rows
through `mean_by_k`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from mergelab.names import experts_key

if TYPE_CHECKING:
    import pandas as pd

    from mergelab.store import ResultStore


def per_k_means(k, loss) -> tuple[np.ndarray, np.ndarray]:
    """(ks, means): the distinct k (K,), sorted, and the mean of `loss` over the entries at each k.

    k: (n,) experts per merge; loss: (n,) or (..., n) (e.g. bootstrap draws, one row each), CE in
    nats per token or any unit; means come back as (K,) or (..., K)."""
    k, loss = np.asarray(k, dtype=float).ravel(), np.asarray(loss, dtype=float)
    ks = np.unique(k)
    if loss.ndim == 1:
        return ks, np.array([loss[k == x].mean() for x in ks])
    onehot = (k[:, None] == ks[None, :]).astype(float)
    return ks, (loss @ onehot) / onehot.sum(axis=0)


def mean_by_k(frame: "pd.DataFrame", by: Sequence[str] = ()) -> "pd.DataFrame":
    """Mean loss per k of rows with one merge each (columns `by`, k, loss): columns *by, k, loss (the
    mean) and n_subsets (how many merges it averages), sorted by `by` and k."""
    return frame.groupby([*by, "k"], as_index=False, sort=True)["loss"].agg(loss="mean", n_subsets="size")


def ordering_estimate(losses: dict[str, float], orderings: list[list[str]], ks) -> "pd.DataFrame":
    """E[L | k] estimated from the prefixes of diverse orderings: per k the mean over orderings of
    the loss of each ordering's k-prefix, with its standard error std/√n (orderings are the units).

    `losses` maps experts_key (sorted '+'-joined) to a loss, e.g. the macro CE of each merge."""
    import pandas as pd

    rows = []
    for k in ks:
        values = np.array([losses[experts_key(order[:k])] for order in orderings])
        se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
        rows.append({"k": k, "mean": values.mean(), "se": se, "n_orderings": len(values)})
    return pd.DataFrame(rows)


__all__ = ["mean_by_k", "ordering_estimate", "per_k_means"]
