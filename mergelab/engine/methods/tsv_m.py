"""tsv_m: Task Singular Vectors merge. For a 2-D tensor: each task vector's SVD truncated to its top
r = max(1, ⌊min(m, n)/k⌋) singular triplets; the k·r left and right singular vectors concatenated into
U [m, kr] and V [n, kr] and each replaced by its nearest orthonormal matrix (U = P S Qᵀ → P Qᵀ), then
θ0 + α·U⊥ diag(σ) V⊥ᵀ. Other tensors (norms, biases): θ0 + α·(1/k)·Σ v_i. Needs the whole tensor; not
linear, so not incremental."""

from mergelab.engine.methods.base import MergeMethod, Param


def orthonormal(x):
    """The orthonormal matrix nearest `x` (Procrustes: P Qᵀ from x = P S Qᵀ)."""
    import torch

    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def merged_vector(deltas):
    """The TSV-M task vector of stacked 2-D task vectors [k, m, n] (fp32)."""
    import torch

    k, m, n = deltas.shape
    r = max(1, min(m, n) // k)
    u, s, vh = torch.linalg.svd(deltas, full_matrices=False)  # batched: [k, m, q], [k, q], [k, q, n]
    u_cat = u[:, :, :r].permute(1, 0, 2).reshape(m, k * r)
    v_cat = vh[:, :r, :].permute(2, 0, 1).reshape(n, k * r)
    s_cat = s[:, :r].reshape(k * r)
    return (orthonormal(u_cat) * s_cat) @ orthonormal(v_cat).T


def combine(base, deltas, ctx, hp):
    if deltas.dim() != 3:
        return base + hp["alpha"] * deltas.mean(dim=0)
    return base + hp["alpha"] * merged_vector(deltas)


METHOD = MergeMethod(
    "tsv_m", combine, __doc__.split(": ", 1)[1],
    {"alpha": Param(1.0, "scale α of the merged task vector (paper: 1.0)", float, low=0.0, low_open=True)},
    combine=combine,
    whole_tensor=True,
    paper="Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025 "
          "(arXiv 2412.00081): TSV-Merge with each task's rank fraction 1/k and α = 1.0; every 2-D tensor "
          "(embeddings included) through the SVD, other tensors averaged as in its code",
    mergekit="no mergekit 0.1.5 equivalent (export-model --mergekit-yaml refuses it); PEFT has none either",
)
