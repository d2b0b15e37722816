"""Merge subsets of experts into one resident model, in memory, reusing the loaded task vectors.

The base weights and every expert's task vector v_i = θ_i − θ0 are read once per size (fp32, on the
merge device). A merge writes each merged tensor straight into the resident model's parameters: no
merged model is ever written to disk or held twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from mergelab.checkpoints import Checkpoint, check_compatible
from mergelab.errors import CheckpointError
from mergelab.family import SizeSpec
from mergelab.methods import MergeContext, MergeMethod


def pick_device(requested: str | None = None) -> str:
    import torch

    if requested and requested != "auto":
        try:
            torch.device(requested)
        except RuntimeError:
            raise CheckpointError(f"device {requested!r} is not a torch device (auto, cpu, cuda, cuda:N, mps)") from None
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
    """Base weights and stacked task vectors of one size: deltas[name] has shape [M, *shape].

    Vocabulary tensors of experts whose rows differ from the base's are aligned on the base's shape
    (family `vocab_policy`): only their first `merge_rows[name]` rows are merged; rows an expert lacks
    or that are not merged get a task vector of 0, so the merge keeps the base's values there."""

    size: SizeSpec
    names: list[str]
    expert_names: tuple[str, ...]
    base: dict
    deltas: dict
    base_checkpoint: Checkpoint
    merge_rows: dict = field(default_factory=dict)  # vocabulary tensor -> rows merged (base_rows/common_rows)

    prepared_for: tuple | None = None  # (method, hparams) whose `prepare` has been applied to deltas

    @classmethod
    def load(cls, size: SizeSpec, device: str = "cpu", progress=None) -> "ExpertPool":
        base_ckpt = Checkpoint(size.base)
        policy = size.vocab_policy
        rows = {} if policy == "refuse" else {n: base_ckpt.shapes[n][0] for n in base_ckpt.vocab_tensors}
        for path in size.experts.values():
            expert = Checkpoint(path)
            check_compatible(base_ckpt, expert, policy)
            if policy == "common_rows":
                rows = {n: min(r, expert.shapes[n][0]) for n, r in rows.items()}
            expert.close()
        pool = cls(size, base_ckpt.names, tuple(size.experts), {}, {}, base_ckpt, rows)
        pool._read_deltas(device, progress)
        return pool

    def rows(self, name: str, tensor) -> int:
        """How many leading rows of an expert's `tensor` enter the merge (all, outside vocabulary tensors)."""
        return min(tensor.shape[0], self.merge_rows.get(name, tensor.shape[0]))

    def _read_deltas(self, device: str, progress=None) -> None:
        """Fill deltas[name][i] = θ_i − θ0 expert by expert, closing each file before the next, so
        at most one checkpoint is mapped at a time; existing tensors are overwritten in place."""
        import torch

        if not self.base:
            for name in self.names:
                self.base[name] = self.base_checkpoint.tensor(name, torch.float32, device)
            self.base_checkpoint.close()
        for name in self.names:
            if name not in self.deltas:
                self.deltas[name] = torch.empty((len(self.expert_names), *self.base[name].shape),
                                                dtype=torch.float32, device=device)
        for i, expert in enumerate(self.expert_names):
            ckpt = Checkpoint(self.size.experts[expert])
            for name in self.names:
                tensor, out = ckpt.tensor(name, torch.float32, device), self.deltas[name][i]
                r = self.rows(name, tensor)
                torch.sub(tensor[:r], self.base[name][:r], out=out[:r])
                out[r:].zero_()  # vocabulary rows the expert lacks or that are not merged
            ckpt.close()
            if progress is not None:
                progress.update(1)
        self.prepared_for = None

    def ready_for(self, method: MergeMethod, hp: dict) -> None:
        """Bring the task vectors into the form `method` merges from: raw, or with its per-expert
        `prepare` applied (in place, once for all subsets). Going back to raw re-reads the experts,
        so memory stays at one set of M task vectors."""
        key = (method.name, tuple(sorted(hp.items()))) if method.prepare else None
        if key == self.prepared_for:
            return
        if self.prepared_for is not None:
            self._read_deltas(str(next(iter(self.base.values())).device))
        if method.prepare:
            for name in self.names:  # in place, one tensor at a time: no second set of task vectors
                self.deltas[name].copy_(method.prepare(self.deltas[name], MergeContext(name, self.expert_names), hp))
            self.prepared_for = key

    def indices(self, subset: Sequence[str]) -> list[int]:
        return [self.expert_names.index(e) for e in subset]


class ResidentModel:
    """One model whose parameters are overwritten in place by each merge."""

    def __init__(self, base: Checkpoint, device: str):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from transformers.initialization import no_init_weights

        config = AutoConfig.from_pretrained(base.path, trust_remote_code=False)
        with torch.device(device), no_init_weights():  # every weight is overwritten before use
            model = AutoModelForCausalLM.from_config(config, dtype=weight_dtype(device), trust_remote_code=False)
        model.tie_weights()  # tying is part of weight initialisation, which was skipped
        self.model = model.eval()
        self.params = dict(model.named_parameters())
        unknown = [n for n in base.names if n not in self.params]
        unfilled = [n for n in self.params if n not in base.shapes]
        arch = type(model).__name__
        if unknown:
            raise CheckpointError(f"{base.files[unknown[0]]}: tensor {unknown[0]!r} is not a parameter of {arch} "
                                  f"built from config.json ({len(unknown)} such tensors; its parameters are named "
                                  f"like {next(iter(self.params))!r})")
        if unfilled:
            raise CheckpointError(f"{base.path}: {arch} built from config.json has parameter {unfilled[0]!r}, "
                                  f"which no safetensors file holds ({len(unfilled)} missing)")
        wrong = [n for n in base.names if tuple(self.params[n].shape) != base.shapes[n]]
        if wrong:
            raise CheckpointError(f"{base.files[wrong[0]]}: tensor {wrong[0]!r} has shape {list(base.shapes[wrong[0]])}, "
                                  f"{arch} built from config.json expects {list(self.params[wrong[0]].shape)}")

    def write(self, name: str, tensor) -> None:
        import torch

        with torch.no_grad():
            self.params[name].copy_(tensor)

    def load_base(self, pool: ExpertPool) -> None:
        for name in pool.names:
            self.write(name, pool.base[name])

    def load_expert(self, pool: ExpertPool, expert: str) -> None:
        """The expert itself, read from its checkpoint (the pool's task vectors may be prepared)."""
        import torch

        ckpt = Checkpoint(pool.size.experts[expert])
        device = next(iter(pool.base.values())).device
        with torch.no_grad():
            for name in pool.names:
                tensor, param = ckpt.tensor(name, torch.float32, device), self.params[name]
                r = pool.rows(name, tensor)  # aligned as in the pool: the expert alone is its own merge
                param[:r].copy_(tensor[:r])
                param[r:].copy_(pool.base[name][r:])
        ckpt.close()


def merge_into(resident: ResidentModel, pool: ExpertPool, method: MergeMethod, hp: dict, subset: Sequence[str]) -> None:
    """Merge `subset` of the pool's experts with `method` into the resident model, tensor by tensor,
    straight from the formula (no state kept between merges)."""
    import torch

    index = torch.tensor(pool.indices(subset), device=next(iter(pool.base.values())).device)
    with torch.no_grad():
        for name in pool.names:
            deltas = pool.deltas[name].index_select(0, index)
            merged = method.merge(pool.base[name], deltas, MergeContext(name, tuple(subset)), hp)
            resident.write(name, merged)


class MergeSession:
    """Merges a sequence of subsets into the resident model, reusing work between consecutive merges.

    Per-expert work (TIES trimming, DARE masks) is done once per method (`ExpertPool.ready_for`).
    Linear methods keep a running sum Σ v_i of the current subset and update it by the experts that
    enter or leave, so consecutive subsets that differ by one expert (Gray-code order) cost one add;
    the sum is rebuilt from scratch every `refresh` updates so rounding cannot drift."""

    def __init__(self, pool: ExpertPool, resident: ResidentModel, refresh: int = 64):
        self.pool, self.resident, self.refresh = pool, resident, refresh
        self.sums: dict | None = None
        self.members: frozenset[int] = frozenset()
        self.sum_key = None
        self.updates = 0

    def merge(self, method: MergeMethod, hp: dict, subset: Sequence[str]) -> None:
        import torch

        self.pool.ready_for(method, hp)
        index = self.pool.indices(subset)
        with torch.no_grad():
            if method.linear_scale is None:
                self._combine(method, hp, subset, index)
            else:
                self._update_sums(index, self.pool.prepared_for)
                scale = method.linear_scale(len(index), hp)
                for name in self.pool.names:
                    param = self.resident.params[name]
                    if param.dtype == self.sums[name].dtype:
                        torch.add(self.pool.base[name], self.sums[name], alpha=scale, out=param.data)
                    else:
                        param.copy_(self.pool.base[name] + scale * self.sums[name])

    def _combine(self, method, hp, subset, index) -> None:
        import torch

        rows = torch.tensor(index, device=next(iter(self.pool.base.values())).device)
        for name in self.pool.names:
            picked = self.pool.deltas[name].index_select(0, rows)
            self.resident.write(name, method.combine(self.pool.base[name], picked, MergeContext(name, tuple(subset)), hp))

    def _update_sums(self, index: list[int], key) -> None:
        target = frozenset(index)
        enter, leave = sorted(target - self.members), sorted(self.members - target)
        fresh = (self.sums is None or key != self.sum_key or self.updates >= self.refresh
                 or len(enter) + len(leave) >= len(target))
        deltas = self.pool.deltas
        if fresh:
            import torch

            rows = sorted(target)
            if self.sums is None:
                self.sums = {n: deltas[n][rows].sum(dim=0) for n in self.pool.names}
            else:  # rebuild in place: never two sets of sums alive at once
                for n in self.pool.names:
                    torch.sum(deltas[n][rows], dim=0, out=self.sums[n])
            self.updates = 0
        else:
            for name in self.pool.names:
                for i in enter:
                    self.sums[name] += deltas[name][i]
                for i in leave:
                    self.sums[name] -= deltas[name][i]
            self.updates += 1
        self.members, self.sum_key = target, key


def gray_rank(mask: int) -> int:
    """Position of a subset bitmask in the binary-reflected Gray code: sorting subsets by it makes
    consecutive subsets of a full enumeration differ by exactly one expert."""
    rank = mask
    shift = 1
    while mask >> shift:
        rank ^= mask >> shift
        shift += 1
    return rank
