"""della: DELLA-Merging's MAGPRUNE, per expert and row: entry ranked r of n by |v| (1 = smallest) is kept
with probability q = density − ε + 2ε·(r−1)/(n−1) (seeded mask) and rescaled by 1/q; then TIES's sign
election and disjoint mean: θ0 + λ·disjoint_mean(m⊙v/q). `della_linear` averages instead: θ0 + (λ/k)·Σ m⊙v/q.

The per-entry rescale 1/q is not one factor per method, so della has no keep-mask form: its prepared
task vectors are stored dense (one fp32 copy per expert, as every method was before masks as bits)."""

from mergelab.engine.methods.base import MergeMethod, Param
from mergelab.errors import HyperparameterError
from mergelab.engine.methods.primitives import disjoint_mean, ranked_keep_prob, seeded_uniform

PARAMS = {
    "density": Param(0.5, "mean keep probability per row", float, 0.0, 1.0, low_open=True),
    "epsilon": Param(0.1, "half-width ε of the keep probabilities around density", float, 0.0, 0.5, high_open=True),
    "lambda": Param(1.0, "scale λ of the merged task vector", float, low=0.0, low_open=True),
    "rescale": Param(True, "rescale survivors by 1/q (their keep probability)", bool),
    "seed": Param(0, "seed of the drop masks", int, low=0),
}


def validator(name: str):
    """The cross-parameter check of `name` (della or della_linear): density ± ε must lie in (0, 1]."""
    def validate(hp):
        lo, hi = hp["density"] - hp["epsilon"], hp["density"] + hp["epsilon"]
        if lo <= 0 or hi > 1:
            raise HyperparameterError(f"{name}: keep probabilities density ± epsilon = [{lo:g}, {hi:g}] must lie in "
                                      f"(0, 1]; lower epsilon={hp['epsilon']!r} or move density={hp['density']!r}")
    return validate


def prepare(deltas, ctx, hp):
    """Each expert's task vector with its MAGPRUNE mask applied and survivors rescaled by 1/q."""
    import torch

    q = ranked_keep_prob(deltas, hp["density"], hp["epsilon"])
    u = torch.stack([seeded_uniform(deltas.shape[1:], hp["seed"], e, ctx.tensor) for e in ctx.experts])
    kept = u.to(deltas.device) < q
    return deltas * kept / q if hp["rescale"] else deltas * kept


def combine(base, prepared, ctx, hp):
    return base + hp["lambda"] * disjoint_mean(prepared)


def merge(base, deltas, ctx, hp):
    return combine(base, prepare(deltas, ctx, hp), ctx, hp)


def merge_linear(base, deltas, ctx, hp):
    return base + (hp["lambda"] / deltas.shape[0]) * prepare(deltas, ctx, hp).sum(dim=0)


PAPER = ("Deep, Bhardwaj & Ramesh, DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based "
         "Sampling, 2024 (arXiv 2406.11617): drop (MAGPRUNE), elect, fuse; mergelab's defaults density 0.5, "
         "ε 0.1, λ 1 (the paper tunes them per task)")
MERGEKIT = ("(same keep probabilities, ranked per row as mergekit's della_magprune; different masks: mergekit's RNG. "
            "mergelab rescales each survivor by 1/q, the paper's unbiased rescale; mergekit's current sparsify.py "
            "rescales the whole tensor to its original norm instead). PEFT has no equivalent")

METHOD = MergeMethod(
    "della", merge, __doc__.split(": ", 1)[1].split("`della_linear`")[0].strip(), dict(PARAMS),
    prepare=prepare,
    combine=combine,
    validate=validator("della"),
    paper=PAPER,
    mergekit="merge_method: della with base_model θ0, weight 1, density, epsilon, lambda, parameters: "
             "{normalize: true} " + MERGEKIT,
)

LINEAR = MergeMethod(
    "della_linear", merge_linear,
    "DELLA's MAGPRUNE masks (keep probability rising with |v|'s rank in its row, survivors × 1/q), then "
    "averaged: θ0 + (λ/k)·Σ m_i⊙v_i/q_i. Linear: incremental.",
    dict(PARAMS),
    prepare=prepare,
    linear_scale=lambda k, hp: hp["lambda"] / k,
    validate=validator("della_linear"),
    paper=PAPER,
    mergekit="merge_method: della_linear with base_model θ0, weight λ/k, density, epsilon, parameters: "
             "{normalize: false} " + MERGEKIT,
)
