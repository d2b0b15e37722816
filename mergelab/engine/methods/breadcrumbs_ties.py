"""breadcrumbs_ties: the breadcrumbs masks (largest gamma·n and smallest |v| dropped, density·n kept),
then TIES's sign election and disjoint mean: θ0 + λ·disjoint_mean(m⊙v)."""

from mergelab.engine.methods import breadcrumbs
from mergelab.engine.methods.base import MergeMethod
from mergelab.engine.methods.primitives import disjoint_mean


def combine(base, prepared, ctx, hp):
    return base + hp["lambda"] * disjoint_mean(prepared)


def merge(base, deltas, ctx, hp):
    return combine(base, deltas * breadcrumbs.keep(deltas, ctx, hp), ctx, hp)


METHOD = MergeMethod(
    "breadcrumbs_ties", merge, __doc__.split(": ", 1)[1], dict(breadcrumbs.PARAMS),
    keep=breadcrumbs.keep,
    combine=combine,
    paper=breadcrumbs.PAPER + "; the sign election and disjoint mean of TIES-Merging (arXiv 2306.01708)",
    mergekit="merge_method: breadcrumbs_ties with base_model θ0, weight 1, density, gamma, parameters: "
             "{normalize: true, lambda: λ} (mergekit int(·) counts and sort, mergelab ceil(density·n) ≥ 1 and "
             "kthvalue thresholds). PEFT has no equivalent",
)
