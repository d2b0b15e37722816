"""task_arithmetic: θ0 + (c/k)·Σ v_i (or c·Σ v_i with normalize=false, as the paper's own code did)."""

from mergelab.engine.methods.base import MergeMethod, Param


def scale(k: int, hp: dict) -> float:
    return hp["c"] / k if hp["normalize"] else hp["c"]


def merge(base, deltas, ctx, hp):
    return base + scale(deltas.shape[0], hp) * deltas.sum(dim=0)


METHOD = MergeMethod(
    "task_arithmetic", merge, __doc__.split(": ", 1)[1],
    {
        "c": Param(0.8, "scaling coefficient c (paper default 0.8)", float, low=0.0, low_open=True),
        "normalize": Param(True, "divide the sum of task vectors by k", bool),
    },
    linear_scale=scale,
    paper="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv 2212.04089); c = 0.8 as in "
          "arXiv 2509.24244 §2, normalised by k (its code summed without 1/k: normalize=false)",
    mergekit="merge_method: task_arithmetic with base_model θ0, weight c/k per expert (c with normalize=false). "
             "PEFT: peft.utils.merge_utils.task_arithmetic with weights c/k (same formula; per-expert weights "
             "multiply them)",
)
