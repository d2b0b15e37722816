"""breadcrumbs: per expert and tensor, drop the largest gamma·n |v| (outliers) and all but the next
density·n (the smallest), then average: θ0 + (λ/k)·Σ m_i⊙v_i (no rescale). Linear: incremental."""

from mergelab.engine.methods.base import MergeMethod, Param
from mergelab.engine.methods.primitives import magnitude_band

PARAMS = {
    "density": Param(0.9, "fraction of entries kept per tensor (after the outliers)", float, 0.0, 1.0, low_open=True),
    "gamma": Param(0.01, "fraction of largest-|v| entries dropped as outliers", float, 0.0, 1.0, high_open=True),
    "lambda": Param(1.0, "scale λ of the merged task vector", float, low=0.0, low_open=True),
}
PAPER = ("Davari & Belilovsky, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks, ECCV 2024 "
         "(arXiv 2312.06795): mask the largest and the smallest magnitudes per layer; density 0.9 and gamma "
         "0.01 as mergekit's example")


def keep(deltas, ctx, hp):
    return magnitude_band(deltas, hp["density"], hp["gamma"])


def merge(base, deltas, ctx, hp):
    return base + (hp["lambda"] / deltas.shape[0]) * (deltas * keep(deltas, ctx, hp)).sum(dim=0)


METHOD = MergeMethod(
    "breadcrumbs", merge, __doc__.split(": ", 1)[1], dict(PARAMS),
    keep=keep,
    linear_scale=lambda k, hp: hp["lambda"] / k,
    paper=PAPER,
    mergekit="merge_method: breadcrumbs with base_model θ0, weight λ/k, density, gamma, parameters: "
             "{normalize: false, rescale: false} (mergekit keeps int(density·n) and drops int(gamma·n) by a "
             "sort, mergelab keeps ceil(density·n) ≥ 1 by kthvalue thresholds: ties at the thresholds differ; "
             "where int(gamma·n) = 0, e.g. a norm of < 100 entries at gamma 0.01, mergekit's slice "
             "indices[n_bot:-0] is empty and it keeps nothing of the tensor, mergelab drops no outlier). "
             "PEFT has no equivalent",
)
