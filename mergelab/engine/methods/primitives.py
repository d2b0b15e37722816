"""Shared building blocks of the merge methods: sparsify, elect signs, fuse.

Per-expert steps (a method's `keep` / `prepare`) take `deltas` of shape [k, *shape] (fp32 task vectors,
one row per expert) and work on each expert on its own; they return a bool keep mask of deltas' shape
(the form the engine may store as bits), or, where the step is not a pure mask, the transformed
vectors. Fusing steps (a method's `combine`) take the prepared vectors of a subset and return one
merged task vector of shape `shape`.

Masks:
  top_magnitude      the ceil(density·n) largest |v| per expert and tensor (TIES trimming)
  magnitude_band     the largest gamma·n dropped, then the next ceil(density·n) kept (Model Breadcrumbs)
  seeded_uniform     uniforms on [0, 1) drawn on the CPU from a generator seeded by (seed, expert, tensor)
  seeded_keep        u ≥ p: a Bernoulli keep mask with drop rate p (DARE)
  ranked_keep_prob   keep probabilities rising linearly with |v|'s rank in its row (DELLA's MAGPRUNE)
Fusing:
  elect_signs        sign of the sum per entry, 0 → + (TIES)
  agreement          where an entry's sign equals the elected one (never for 0)
  disjoint_mean      the mean of the entries that agree with the elected sign (TIES), ÷ max(1, count)
"""

from __future__ import annotations

import hashlib
import math


def keep_count(density: float, n: int) -> int:
    """Entries kept of n at `density`: ceil(density·n), at least one and at most n."""
    return min(n, max(1, math.ceil(density * n)))


def kth_largest(magnitude, rank: int):
    """The rank-th largest value (1-based) of each row of `magnitude` [k, n], as [k, 1]; kthvalue, not a sort."""
    n = magnitude.shape[1]
    return magnitude.kthvalue(n - rank + 1, dim=1, keepdim=True).values


def top_magnitude(deltas, density: float):
    """Mask of the ceil(density·n) largest-|v| entries of each expert's tensor (at least one; ties at the
    threshold are all kept). The threshold comes from kthvalue, not a full sort."""
    k = deltas.shape[0]
    flat = deltas.reshape(k, -1)
    n = flat.shape[1]
    keep = keep_count(density, n)
    if keep == n:
        return flat.new_ones(deltas.shape, dtype=bool)
    magnitude = flat.abs()
    return (magnitude >= kth_largest(magnitude, keep)).reshape(deltas.shape)


def magnitude_band(deltas, density: float, gamma: float):
    """Mask of Model Breadcrumbs: per expert and tensor, drop the floor(gamma·n) largest |v| (outliers),
    keep the next ceil(density·n) (at least one), drop the rest (the smallest). When the two do not fit
    (floor(gamma·n) + kept > n), fewer outliers are dropped, as in mergekit. Ties at the upper threshold
    are all dropped, ties at the lower one all kept."""
    k = deltas.shape[0]
    flat = deltas.reshape(k, -1)
    n = flat.shape[1]
    keep = keep_count(density, n)
    top = min(int(gamma * n), n - keep)
    magnitude = flat.abs()
    mask = magnitude >= kth_largest(magnitude, top + keep) if top + keep < n else flat.new_ones(flat.shape, dtype=bool)
    if top:
        mask &= magnitude < kth_largest(magnitude, top)
    return mask.reshape(deltas.shape)


def mask_seed(seed: int, expert: str, tensor: str) -> int:
    """The generator seed of one expert's tensor: the first 8 bytes of sha256('seed|expert|tensor'), 63 bits."""
    digest = hashlib.sha256(f"{seed}|{expert}|{tensor}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_uniform(shape, seed: int, expert: str, tensor: str):
    """Uniforms on [0, 1) of `shape`, drawn on the CPU from a generator seeded by (seed, expert, tensor):
    the same for an expert whatever the subset, its order, the device or the thread count."""
    import torch

    generator = torch.Generator().manual_seed(mask_seed(seed, expert, tensor))
    return torch.rand(shape, generator=generator)


def seeded_keep(deltas, ctx, p: float, seed: int):
    """Each expert's seeded keep mask u ≥ p ([k, *shape] bool, on deltas' device): drop rate p."""
    import torch

    masks = torch.stack([seeded_uniform(deltas.shape[1:], seed, e, ctx.tensor) >= p for e in ctx.experts])
    return masks.to(deltas.device)


def ranked_keep_prob(deltas, density: float, epsilon: float):
    """DELLA's MAGPRUNE keep probabilities ([k, *shape], fp32): within each row (the last dimension; a
    1-D tensor is one row) entries are ranked by |v| (1 = smallest; ties broken by position, stable) and
    kept with probability (density − ε) + 2ε·(rank − 1)/(n − 1): from density − ε for the smallest to
    density + ε for the largest, density on average (density itself in a row of one entry)."""
    import torch

    rows = deltas.reshape(deltas.shape[0], -1, deltas.shape[-1] if deltas.dim() > 1 else 1)
    n = rows.shape[-1]
    if n == 1:
        return torch.full_like(deltas, density)
    order = rows.abs().argsort(dim=-1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(n, device=deltas.device).expand_as(order))  # 0-based rank
    prob = (density - epsilon) + (2 * epsilon / (n - 1)) * rank.to(deltas.dtype)
    return prob.reshape(deltas.shape)


def elect_signs(vectors):
    """The elected sign per entry ([*shape], ±1.0): sign of the sum over experts, 0 → +."""
    elected = vectors.sum(dim=0).sign_()
    elected[elected == 0] = 1
    return elected


def agreement(vectors, elected):
    """1.0 where an entry's sign equals the elected one, else 0.0 (so zeros never agree); [k, *shape]."""
    return vectors.sign().eq_(elected).to(vectors.dtype)


def disjoint_mean(vectors):
    """TIES's elect + disjoint mean: per entry, the mean of the entries whose sign agrees with the elected
    sign, 0 where none does. One [k, n] temporary: the agreement is built in place of the signs."""
    elected = elect_signs(vectors)
    agree = vectors.sign().eq_(elected)  # 1.0 where the entry agrees, else 0.0
    count = agree.sum(dim=0).clamp_(min=1)
    return agree.mul_(vectors).sum(dim=0) / count


def per_expert_scale(vectors, scales):
    """vectors [k, *shape] times one factor per expert (a list of k floats)."""
    import torch

    factor = torch.tensor(scales, dtype=vectors.dtype, device=vectors.device)
    return vectors * factor.view(-1, *([1] * (vectors.dim() - 1)))
