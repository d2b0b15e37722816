"""model_stock: per tensor, cos θ = the mean pairwise cosine between the k task vectors (clamped at 0),
t = k·cos θ/(1 + (k−1)·cos θ), θ0 + t·(1/k)·Σ v_i: the average pulled back toward the base the more the
task vectors disagree (k = 1: the expert). Needs the whole tensor; not linear, so not incremental."""

from mergelab.engine.methods.base import MergeMethod


def ratio(deltas):
    """t of the stacked task vectors [k, *shape] (a 0-d tensor); a zero vector has cosine 0 with any other."""
    import torch

    k = deltas.shape[0]
    if k == 1:
        return deltas.new_tensor(1.0)
    flat = deltas.reshape(k, -1)
    norms = flat.norm(dim=1, keepdim=True)
    unit = flat / torch.where(norms > 0, norms, torch.ones_like(norms))
    gram = unit @ unit.T
    cos = ((gram.sum() - gram.diagonal().sum()) / (k * (k - 1))).clamp(0.0, 1.0)
    return k * cos / (1 + (k - 1) * cos)


def combine(base, deltas, ctx, hp):
    return base + ratio(deltas) * deltas.mean(dim=0)


METHOD = MergeMethod(
    "model_stock", combine, __doc__.split(": ", 1)[1],
    combine=combine,
    whole_tensor=True,
    paper="Jang, Yun & Han, Model Stock: All we need is just a few fine-tuned models, ECCV 2024 "
          "(arXiv 2403.19522) eq. 5, with the mean pairwise angle for k > 2 and one ratio per tensor; no "
          "hyperparameters",
    mergekit="merge_method: model_stock with base_model θ0, parameters: {filter_wise: false} (mergekit "
             "uses the raw mean cosine; mergelab clamps it at 0, so t ∈ [0, 1] where mergekit's t can be "
             "negative or unbounded for anti-correlated task vectors). PEFT has no equivalent",
)
