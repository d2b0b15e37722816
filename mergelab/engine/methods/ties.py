"""ties: per tensor, trim each task vector to its top-density |v|, elect a sign per entry
(sign of the trimmed sum, 0 → +), average the entries that agree with it (disjoint mean), θ0 + λ·τ."""

import math

from mergelab.engine.methods.base import MergeMethod, Param


def top_magnitude(deltas, density: float):
    """Mask of the ceil(density·n) largest-|v| entries of each expert's tensor (at least one; ties at the
    threshold are all kept). The threshold comes from kthvalue, not a full sort."""
    k = deltas.shape[0]
    flat = deltas.reshape(k, -1)
    n = flat.shape[1]
    keep = min(n, max(1, math.ceil(density * n)))
    if keep == n:
        return flat.new_ones(deltas.shape, dtype=bool)
    magnitude = flat.abs()
    threshold = magnitude.kthvalue(n - keep + 1, dim=1, keepdim=True).values
    return (magnitude >= threshold).reshape(deltas.shape)


def trim(deltas, density: float):
    """The task vectors with all but their top-density |v| entries zeroed (`top_magnitude`)."""
    return deltas * top_magnitude(deltas, density)


def keep(deltas, ctx, hp):
    return top_magnitude(deltas, hp["density"])


def prepare(deltas, ctx, hp):
    return trim(deltas, hp["density"])


def combine(base, trimmed, ctx, hp):
    """Elect a sign per entry and take the disjoint mean of the trimmed task vectors that agree.
    An entry agrees when its sign equals the elected one (never 0), so zeros never count. One [k, n]
    temporary: the agreement mask is built in place of the signs."""
    elected = trimmed.sum(dim=0).sign_()
    elected[elected == 0] = 1
    agree = trimmed.sign().eq_(elected)  # 1.0 where the entry agrees, else 0.0
    count = agree.sum(dim=0).clamp_(min=1)
    return base + hp["lambda"] * (agree.mul_(trimmed).sum(dim=0) / count)


def merge(base, deltas, ctx, hp):
    return combine(base, prepare(deltas, ctx, hp), ctx, hp)


METHOD = MergeMethod(
    "ties", merge, __doc__.split(": ", 1)[1],
    {
        "density": Param(0.2, "fraction of largest-|v| entries kept per tensor", float, 0.0, 1.0, low_open=True),
        "lambda": Param(1.0, "scale λ of the merged task vector (paper: 0.5 or 1.0)", float, low=0.0, low_open=True),
    },
    prepare=prepare,
    keep=keep,
    combine=combine,
    paper="Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023 "
          "(arXiv 2306.01708): trim, elect sign, disjoint mean; density 0.2 and λ ∈ {0.5, 1.0} as in arXiv 2509.24244",
    mergekit="merge_method: ties with base_model θ0, weight 1, density, parameters: {normalize: true, lambda: λ} "
             "(mergekit keeps int(density·n) entries per tensor, mergelab ceil(density·n) ≥ 1: identical at density 1)",
)
