"""ties: per tensor, trim each task vector to its top-density |v|, elect a sign per entry
(sign of the trimmed sum, 0 → +), average the entries that agree with it (disjoint mean), θ0 + λ·τ."""

from mergelab.engine.methods.base import MergeMethod, Param
from mergelab.engine.methods.primitives import disjoint_mean, top_magnitude

__all__ = ["METHOD", "top_magnitude", "trim"]


def trim(deltas, density: float):
    """The task vectors with all but their top-density |v| entries zeroed (`top_magnitude`)."""
    return deltas * top_magnitude(deltas, density)


def keep(deltas, ctx, hp):
    return top_magnitude(deltas, hp["density"])


def prepare(deltas, ctx, hp):
    return trim(deltas, hp["density"])


def combine(base, trimmed, ctx, hp):
    """Elect a sign per entry and take the disjoint mean of the trimmed task vectors that agree
    (`primitives.disjoint_mean`: zeros never agree)."""
    return base + hp["lambda"] * disjoint_mean(trimmed)


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
             "(mergekit keeps int(density·n) entries per tensor, mergelab ceil(density·n) ≥ 1: identical at density 1). "
             "PEFT: peft.utils.merge_utils.ties(weights=1, majority_sign_method='total') is the same formula "
             "(λ = 1; identical where density·n is an integer and no |v| ties at the threshold: PEFT's topk "
             "keeps exactly int(density·n)); with per-expert weights PEFT elects signs on the unweighted "
             "vectors, mergelab on the weighted ones (weights scale the task vectors before the method)",
)
