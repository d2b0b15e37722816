"""Merge subsets of experts into one resident model, in memory, reusing the loaded task vectors.

The base weights and every expert's task vector v_i = θ_i − θ0 are read once per size (fp32, on the
merge device). A merge writes each merged tensor straight into the resident model's parameters: no
merged model is ever written to disk or held twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from mergelab.checkpoints import Checkpoint, check_compatible
from mergelab.errors import CheckpointError
from mergelab.family import SizeSpec
from mergelab.methods import MergeContext, MergeMethod


def pick_device(requested: str | None = None) -> str:
    import torch

    if requested and requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise CheckpointError(f"device {requested!r} requested but CUDA is not available")
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def weight_dtype(device: str):
    """bf16 weights on GPU (merges still accumulate in fp32), fp32 on CPU."""
    import torch

    return torch.bfloat16 if device.startswith("cuda") else torch.float32


@dataclass
class ExpertPool:
    """Base weights and stacked task vectors of one size: deltas[name] has shape [M, *shape]."""

    size: SizeSpec
    names: list[str]
    expert_names: tuple[str, ...]
    base: dict
    deltas: dict
    base_checkpoint: Checkpoint

    @classmethod
    def load(cls, size: SizeSpec, device: str = "cpu", progress=None) -> "ExpertPool":
        import torch

        base_ckpt = Checkpoint(size.base)
        experts = {e: Checkpoint(p) for e, p in size.experts.items()}
        for ckpt in experts.values():
            check_compatible(base_ckpt, ckpt)
        names = base_ckpt.names
        base, deltas = {}, {}
        for name in names:
            theta0 = base_ckpt.tensor(name, torch.float32, device)
            base[name] = theta0
            deltas[name] = torch.stack([ckpt.tensor(name, torch.float32, device) - theta0 for ckpt in experts.values()])
            if progress is not None:
                progress.update(1)
        return cls(size, names, tuple(experts), base, deltas, base_ckpt)

    def indices(self, subset: Sequence[str]) -> list[int]:
        return [self.expert_names.index(e) for e in subset]


class ResidentModel:
    """One model whose parameters are overwritten in place by each merge."""

    def __init__(self, base: Checkpoint, device: str):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(base.path, trust_remote_code=False)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=weight_dtype(device), trust_remote_code=False)
        self.model = model.eval()
        self.params = dict(model.named_parameters())
        missing = [n for n in base.names if n not in self.params]
        unfilled = [n for n in self.params if n not in base.shapes]
        if missing or unfilled:
            first = (missing or unfilled)[0]
            raise CheckpointError(f"{base.path}: tensor {first!r} does not match the architecture in config.json")

    def write(self, name: str, tensor) -> None:
        import torch

        with torch.no_grad():
            self.params[name].copy_(tensor)

    def load_base(self, pool: ExpertPool) -> None:
        for name in pool.names:
            self.write(name, pool.base[name])

    def load_expert(self, pool: ExpertPool, expert: str) -> None:
        i = pool.expert_names.index(expert)
        for name in pool.names:
            self.write(name, pool.base[name] + pool.deltas[name][i])


def merge_into(resident: ResidentModel, pool: ExpertPool, method: MergeMethod, hp: dict, subset: Sequence[str]) -> None:
    """Merge `subset` of the pool's experts with `method` into the resident model, tensor by tensor."""
    import torch

    index = torch.tensor(pool.indices(subset), device=next(iter(pool.base.values())).device)
    with torch.no_grad():
        for name in pool.names:
            deltas = pool.deltas[name].index_select(0, index)
            merged = method.merge(pool.base[name], deltas, MergeContext(name, tuple(subset)), hp)
            resident.write(name, merged)
