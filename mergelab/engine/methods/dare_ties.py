"""dare_ties: DARE masks, then TIES's sign election and disjoint mean: m_i ~ Bernoulli(1 − p) per entry
(seeded by seed, expert, tensor: the same masks as `dare`), ṽ_i = m_i⊙v_i/(1−p), θ0 + λ·disjoint_mean(ṽ)."""

from mergelab.engine.methods import dare
from mergelab.engine.methods.base import MergeMethod, Param
from mergelab.engine.methods.primitives import disjoint_mean


def combine(base, prepared, ctx, hp):
    return base + hp["lambda"] * disjoint_mean(prepared)


def merge(base, deltas, ctx, hp):
    return combine(base, dare.prepare(deltas, ctx, hp), ctx, hp)


METHOD = MergeMethod(
    "dare_ties", merge, __doc__.split(": ", 1)[1],
    {**dare.PARAMS, "lambda": Param(1.0, "scale λ of the merged task vector", float, low=0.0, low_open=True)},
    keep=dare.keep,
    keep_scale=dare.keep_scale,
    combine=combine,
    paper="Yu et al., Language Models are Super Mario (arXiv 2311.03099) §4: DARE as a pre-step of TIES-Merging "
          "(Yadav et al., arXiv 2306.01708); p = 0.2 as mergelab's dare, λ = 1",
    mergekit="merge_method: dare_ties with base_model θ0, weight 1, density 1 − p, parameters: {normalize: true, "
             "lambda: λ} (same distribution, different masks: mergekit's RNG). PEFT: "
             "peft.utils.merge_utils.dare_ties(weights=1, density=1 − p, majority_sign_method='total') is the "
             "same formula given the same masks (λ = 1)",
)
