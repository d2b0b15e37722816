"""average: θ0 + (1/k)·Σ v_i, i.e. the mean of the experts."""

from mergelab.engine.methods.base import MergeMethod


def merge(base, deltas, ctx, hp):
    return base + deltas.mean(dim=0)


METHOD = MergeMethod("average", merge, __doc__.split(": ", 1)[1], linear_scale=lambda k, hp: 1.0 / k)
