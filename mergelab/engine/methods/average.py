"""average: θ0 + (1/k)·Σ v_i, i.e. the mean of the experts."""

from mergelab.engine.methods.base import MergeMethod


def merge(base, deltas, ctx, hp):
    return base + deltas.mean(dim=0)


METHOD = MergeMethod(
    "average", merge, __doc__.split(": ", 1)[1], linear_scale=lambda k, hp: 1.0 / k,
    paper="uniform model soup: Wortsman et al., Model soups, ICML 2022 (arXiv 2203.05482); the merging-laws "
          "paper's 'average' (arXiv 2509.24244 §2)",
    mergekit="merge_method: linear, weight 1 per expert, parameters: {normalize: true} (identical to ≤ 1.2e-7). "
             "PEFT: peft.utils.merge_utils.task_arithmetic with weights 1/k on the task vectors (same formula)",
)
