"""dare: drop each task-vector entry with probability p (Bernoulli mask per expert and tensor), rescale
survivors by 1/(1−p), then average: θ0 + (1/k)·Σ m_i⊙v_i/(1−p). Masks are drawn on the CPU from a
generator seeded by (seed, expert, tensor), so results do not depend on subset order, device or threads."""

import hashlib

from mergelab.methods.base import MergeMethod, Param


def mask_seed(seed: int, expert: str, tensor: str) -> int:
    digest = hashlib.sha256(f"{seed}|{expert}|{tensor}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def keep_mask(shape, p: float, seed: int, expert: str, tensor: str):
    import torch

    generator = torch.Generator().manual_seed(mask_seed(seed, expert, tensor))
    return torch.rand(shape, generator=generator) >= p


def merge(base, deltas, ctx, hp):
    p = hp["p"]
    scale = 1.0 / (1.0 - p) if hp["rescale"] else 1.0
    total = base.new_zeros(base.shape)
    for delta, expert in zip(deltas, ctx.experts):
        mask = keep_mask(delta.shape, p, hp["seed"], expert, ctx.tensor).to(delta.device)
        total += delta * mask
    return base + (scale / deltas.shape[0]) * total


METHOD = MergeMethod(
    "dare", merge, __doc__.split(": ", 1)[1],
    {
        "p": Param(0.2, "drop rate p", float, 0.0, 1.0, high_open=True),
        "rescale": Param(True, "rescale survivors by 1/(1−p)", bool),
        "seed": Param(0, "seed of the drop masks", int, low=0),
    },
)
