"""dare: drop each task-vector entry with probability p (Bernoulli mask per expert and tensor), rescale
survivors by 1/(1−p), then average: θ0 + (1/k)·Σ m_i⊙v_i/(1−p). Masks are drawn on the CPU from a
generator seeded by (seed, expert, tensor), so results do not depend on subset order, device or threads."""

from mergelab.engine.methods.base import MergeMethod, Param
from mergelab.engine.methods.primitives import mask_seed, seeded_keep, seeded_uniform

__all__ = ["METHOD", "keep_mask", "mask_seed"]


def keep_mask(shape, p: float, seed: int, expert: str, tensor: str):
    """One expert's keep mask of `shape` (u ≥ p, `primitives.seeded_uniform`)."""
    return seeded_uniform(shape, seed, expert, tensor) >= p


def keep(deltas, ctx, hp):
    """Each expert's seeded keep mask ([k, *shape] bool, on deltas' device)."""
    return seeded_keep(deltas, ctx, hp["p"], hp["seed"])


def keep_scale(hp) -> float:
    return 1.0 / (1.0 - hp["p"]) if hp["rescale"] else 1.0


def prepare(deltas, ctx, hp):
    """Each expert's task vector with its seeded drop mask applied and survivors rescaled."""
    return deltas * keep(deltas, ctx, hp).to(deltas.dtype) * keep_scale(hp)


def merge(base, deltas, ctx, hp):
    return base + prepare(deltas, ctx, hp).mean(dim=0)


PARAMS = {
    "p": Param(0.2, "drop rate p", float, 0.0, 1.0, high_open=True),
    "rescale": Param(True, "rescale survivors by 1/(1−p)", bool),
    "seed": Param(0, "seed of the drop masks", int, low=0),
}

METHOD = MergeMethod(
    "dare", merge, __doc__.split(": ", 1)[1], dict(PARAMS),
    prepare=prepare,
    keep=keep,
    keep_scale=keep_scale,
    linear_scale=lambda k, hp: 1.0 / k,
    paper="Yu et al., Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free "
          "Lunch, ICML 2024 (arXiv 2311.03099): drop with rate p, rescale by 1/(1−p), then average",
    mergekit="merge_method: dare_linear with base_model θ0, weight 1/k, density 1 − p, normalize: false "
             "(same distribution, different masks: mergekit draws them from its own RNG). PEFT: "
             "peft.utils.merge_utils.dare_linear(weights=1/k, density=1 − p) is the same formula given the "
             "same masks (it draws them with torch.bernoulli from the global RNG)",
)
