"""dare: drop each task-vector entry with probability p (Bernoulli mask per expert and tensor), rescale
survivors by 1/(1−p), then average: θ0 + (1/k)·Σ m_i⊙v_i/(1−p). Masks are drawn on the CPU from a
generator seeded by (seed, expert, tensor), so results do not depend on subset order, device or threads."""

import hashlib

from mergelab.engine.methods.base import MergeMethod, Param


def mask_seed(seed: int, expert: str, tensor: str) -> int:
    digest = hashlib.sha256(f"{seed}|{expert}|{tensor}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def keep_mask(shape, p: float, seed: int, expert: str, tensor: str):
    import torch

    generator = torch.Generator().manual_seed(mask_seed(seed, expert, tensor))
    return torch.rand(shape, generator=generator) >= p


def keep(deltas, ctx, hp):
    """Each expert's seeded keep mask ([k, *shape] bool, on deltas' device)."""
    import torch

    masks = torch.stack([keep_mask(deltas.shape[1:], hp["p"], hp["seed"], e, ctx.tensor) for e in ctx.experts])
    return masks.to(deltas.device)


def keep_scale(hp) -> float:
    return 1.0 / (1.0 - hp["p"]) if hp["rescale"] else 1.0


def prepare(deltas, ctx, hp):
    """Each expert's task vector with its seeded drop mask applied and survivors rescaled."""
    return deltas * keep(deltas, ctx, hp).to(deltas.dtype) * keep_scale(hp)


def merge(base, deltas, ctx, hp):
    return base + prepare(deltas, ctx, hp).mean(dim=0)


METHOD = MergeMethod(
    "dare", merge, __doc__.split(": ", 1)[1],
    {
        "p": Param(0.2, "drop rate p", float, 0.0, 1.0, high_open=True),
        "rescale": Param(True, "rescale survivors by 1/(1−p)", bool),
        "seed": Param(0, "seed of the drop masks", int, low=0),
    },
    prepare=prepare,
    keep=keep,
    keep_scale=keep_scale,
    linear_scale=lambda k, hp: 1.0 / k,
    paper="Yu et al., Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free "
          "Lunch, ICML 2024 (arXiv 2311.03099): drop with rate p, rescale by 1/(1−p), then average",
    mergekit="merge_method: dare_linear with base_model θ0, weight 1/k, density 1 − p, normalize: false "
             "(same distribution, different masks: mergekit draws them from its own RNG)",
)
