"""Merge subsets of experts into one resident model, in memory, reusing the loaded task vectors.

The base weights and every expert's task vector v_i = θ_i − θ0 are read once per size (fp32, on the
merge device). A merge writes each merged tensor straight into the resident model's parameters: no
merged model is ever written to disk or held twice.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Sequence

from mergelab.io.checkpoints import Checkpoint, check_compatible
from mergelab.errors import CheckpointError
from mergelab.io.family import SizeSpec
from mergelab.engine.flat import FlatLayout
from mergelab.engine.methods import MergeContext, MergeMethod
from mergelab.engine.methods import options


def pick_device(requested: str | None = None) -> str:
    import torch

    if requested and requested != "auto":
        try:
            torch.device(requested)
        except RuntimeError as exc:
            raise CheckpointError(f"device {requested!r} is not a torch device (auto, cpu, cuda, cuda:N, mps)") from exc
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise CheckpointError(f"device {requested!r} requested but CUDA is not available")
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def weight_dtype(device: str):
    """bf16 weights on GPU (merges still accumulate in fp32), fp32 on CPU."""
    import torch

    return torch.bfloat16 if device.startswith("cuda") else torch.float32


COMBINE_CHUNK = 1 << 20  # entries per combine step: its temporaries stay within ~2·k·4 MiB
STREAM_CHUNK = 1 << 24  # entries per step of a linear update: 64 MiB of a task vector moved at a time


def read_aligned(ckpt: Checkpoint, name: str, out) -> int:
    """Read tensor `name` of `ckpt` into `out` (cast to its dtype), straight into place when the shapes
    match, else through a temporary and aligned on the leading rows both have (a vocabulary of another
    size); return the stored tensor's row count."""
    if ckpt.shapes[name] == tuple(out.shape):
        ckpt.read_into(name, out)
        return out.shape[0] if out.dim() else 1
    tensor = ckpt.tensor(name, out.dtype, out.device)
    r = min(tensor.shape[0], out.shape[0])
    out[:r].copy_(tensor[:r])
    return tensor.shape[0]


@dataclass
class ExpertPool:
    """Base weights and stacked task vectors of one size, each role in one flat buffer
    (`mergelab.engine.flat`): base_flat [numel], deltas_flat [M, numel]; base[name] and deltas[name]
    ([M, *shape]) are views into them. The base lives on the merge device; the task vectors too, or
    in host memory (`store="cpu"`) when they do not fit on the GPU, from where merges stream them.

    Vocabulary tensors of experts whose rows differ from the base's are aligned on the base's shape
    (family `vocab_policy`): only their first `merge_rows[name]` rows are merged; rows an expert lacks
    or that are not merged get a task vector of 0, so the merge keeps the base's values there."""

    size: SizeSpec
    names: list[str]
    expert_names: tuple[str, ...]
    layout: FlatLayout
    base_checkpoint: Checkpoint
    merge_rows: dict = field(default_factory=dict)  # vocabulary tensor -> rows merged (base_rows/common_rows)

    prepared_for: tuple | None = None  # (method, hparams) whose `prepare` has been applied to deltas

    @classmethod
    def load(cls, size: SizeSpec, device: str = "cpu", progress=None, store: str | None = None,
             experts: Sequence[str] | None = None) -> "ExpertPool":
        """The pool of `size` (every expert, or only `experts`: what `export-model` merges, so the others
        are never read; under the "common_rows" vocabulary policy their headers still set the merged rows,
        so the merge equals the sweep's). Raises CheckpointError for an unreadable or incompatible one."""
        base_ckpt = Checkpoint(size.base)
        policy = size.vocab_policy
        chosen = tuple(size.experts) if experts is None else tuple(experts)
        unknown = [e for e in chosen if e not in size.experts]
        if unknown:
            raise CheckpointError(f"size {size.name}: no expert {unknown[0]!r} (experts: {', '.join(size.experts)})")
        rows = {} if policy == "refuse" else {n: base_ckpt.shapes[n][0] for n in base_ckpt.vocab_tensors}
        for name, path in size.experts.items():
            if name not in chosen and policy != "common_rows":
                continue
            expert = Checkpoint(path)
            if name in chosen:
                check_compatible(base_ckpt, expert, policy)
            if policy == "common_rows":
                rows = {n: min(r, expert.shapes.get(n, (r,))[0]) for n, r in rows.items()}
            expert.close()
        pool = cls(size, base_ckpt.names, chosen, FlatLayout.of(base_ckpt.shapes), base_ckpt, rows)
        pool._allocate(device, store or device)
        pool._read_deltas(progress)
        return pool

    def _allocate(self, device: str, store: str) -> None:
        import torch

        self.base_flat = self.layout.zeros(dtype=torch.float32, device=device)
        self.deltas_flat = self.layout.zeros(len(self.expert_names), dtype=torch.float32, device=store)
        self.base, self.deltas = self.layout.views(self.base_flat), self.layout.views(self.deltas_flat)
        for name in self.names:
            self.base_checkpoint.read_into(name, self.base[name])
        self.base_checkpoint.close()

    def rows(self, name: str, n_rows: int) -> int:
        """How many leading rows of an expert's tensor (of `n_rows` rows) enter the merge (all, outside
        vocabulary tensors)."""
        return min(n_rows, self.merge_rows.get(name, n_rows))

    def _read_deltas(self, progress=None) -> None:
        """Fill deltas[name][i] = θ_i − θ0 expert by expert, closing each file before the next, so
        at most one checkpoint is open at a time; tensors of the base's shape are read straight into
        place, the rest (vocabulary rows that differ) through a temporary."""
        for i, expert in enumerate(self.expert_names):
            ckpt = Checkpoint(self.size.experts[expert])
            for name in self.names:
                out, base = self.deltas[name][i], self.base[name]
                r = self.rows(name, read_aligned(ckpt, name, out))
                out.sub_(base.to(out.device))
                if out.dim() and r < out.shape[0]:
                    out[r:].zero_()  # vocabulary rows the expert lacks or that are not merged
            ckpt.close()
            if progress is not None:
                progress.update(1)
        self.prepared_for = None

    def ready_for(self, method: MergeMethod, hp: dict) -> None:
        """Bring the task vectors into the form `method` merges from: raw, or with its per-expert
        `prepare` applied (in place, once for all subsets). Going back to raw re-reads the experts,
        so memory stays at one set of M task vectors."""
        own = {k: v for k, v in hp.items() if k not in options.OPTIONS}  # weights/filters act after prepare
        key = (method.name, tuple(sorted(own.items()))) if method.prepare else None
        if key == self.prepared_for:
            return
        if self.prepared_for is not None:
            self._read_deltas()
        if method.prepare:
            self.prepared_for = ("incomplete",)  # if prepare fails midway, the next method re-reads the experts
            # one expert's tensor at a time: temporaries stay at a few copies of one tensor
            for name in self.names:
                for i, expert in enumerate(self.expert_names):
                    vector = self.deltas[name][i:i + 1]
                    vector.copy_(method.prepare(vector, MergeContext(name, (expert,)), hp))
            self.prepared_for = key

    def indices(self, subset: Sequence[str]) -> list[int]:
        return [self.expert_names.index(e) for e in subset]


_META_LOCK = threading.Lock()


@contextmanager
def parameters_on_meta():
    """Create module parameters on the meta device (no memory, initialisers do nothing) and buffers
    (rotary tables) for real, where the surrounding torch.device puts them."""
    import torch

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    with _META_LOCK:  # the patch is process-wide: one model built at a time
        register = torch.nn.Module.register_parameter
        torch.nn.Module.register_parameter = register_on_meta
        try:
            yield
        finally:
            torch.nn.Module.register_parameter = register


class ResidentModel:
    """One model whose parameters are overwritten in place by each merge. Its parameters are views
    into one flat buffer (`flat`) laid out like the pool's base, so a linear merge is one op.

    It has no writer of its own: a `MergeSession` is the one thing that writes its weights (merges,
    the base, single experts), so the session always knows what they hold."""

    def __init__(self, base: Checkpoint, device: str):
        import torch
        from transformers import AutoModelForCausalLM

        config = base.model_config()  # config.json's, or a multimodal wrapper's text model (Gemma 3)
        with torch.device(device), parameters_on_meta():  # parameters get the flat buffer's views below
            model = AutoModelForCausalLM.from_config(config, dtype=weight_dtype(device), trust_remote_code=False)
        model.tie_weights()
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
        self.layout = FlatLayout.of(base.shapes)
        self.flat = self.layout.zeros(dtype=weight_dtype(device), device=device)
        placed = {id(self.params[name]): torch.nn.Parameter(view, requires_grad=False)
                  for name, view in self.layout.views(self.flat).items()}
        for module in model.modules():  # by identity, so a tied head gets the embedding's view too
            for key, param in module._parameters.items():
                if param is not None:
                    module._parameters[key] = placed[id(param)]
        self.params = dict(model.named_parameters())


class MergeSession:
    """Merges a sequence of subsets into the resident model, reusing work between consecutive merges.

    Per-expert work (TIES trimming, DARE masks) is done once per method (`ExpertPool.ready_for`).
    Linear methods (θ0 + s·Σ prepared v_i) update the fp32 merged weights by the experts that enter
    or leave: in `merge_rank` order consecutive subsets of one size differ by one swap, which costs two adds
    over the whole model. On CPU those fp32 weights are the resident model itself, so a sweep holds
    the base, M task vectors and the resident model: M + 2 model sizes. On GPU the resident model is
    bf16: an fp32 copy is kept and rounded into it. The weights are rebuilt from θ0 when the scale or
    the method changes, when rebuilding is cheaper, and every `refresh` updates, so rounding cannot
    drift. Other methods combine entrywise, in chunks of COMBINE_CHUNK entries.

    The session is the resident model's only writer: the reference rows (`load_base`, `load_expert`)
    and the formula-by-formula merge (`merge_formula`) go through it too, so it knows whether the
    weights still hold its last linear merge."""

    def __init__(self, pool: ExpertPool, resident: ResidentModel, refresh: int = 64):
        if resident.layout != pool.layout:
            raise CheckpointError(f"{pool.size.base}: the resident model was not built from this size's base")
        self.pool, self.resident, self.refresh = pool, resident, refresh
        self.merged = None  # fp32 weights of the last linear merge
        self.members: frozenset[int] = frozenset()
        self.state = None  # (prepared form, scale) the merged weights were built with
        self.updates = 0
        self.holds_merge = False  # the resident weights are the last linear merge (nothing wrote over them)

    def load_base(self) -> None:
        """The base model θ0 into the resident model (the k = 0 reference row)."""
        self.holds_merge = False
        self.resident.flat.copy_(self.pool.base_flat)

    def load_expert(self, expert: str) -> None:
        """The expert itself, read from its checkpoint (the pool's task vectors may be prepared), into
        the resident model: the k = 1 reference row. Vocabulary rows are aligned as in the pool."""
        import torch

        pool = self.pool
        ckpt = Checkpoint(pool.size.experts[expert])
        self.holds_merge = False
        with torch.no_grad():
            for name in pool.names:
                param = self.resident.params[name].data
                r = pool.rows(name, read_aligned(ckpt, name, param))  # cast once into a bf16 resident
                if param.dim() and r < param.shape[0]:  # aligned as in the pool: the expert alone is its own merge
                    param[r:].copy_(pool.base[name][r:])
        ckpt.close()

    def merge_formula(self, method: MergeMethod, hp: dict, subset: Sequence[str]) -> None:
        """Merge `subset` straight from the method's formula (`method.merge`), tensor by tensor, reading
        the pool's task vectors as they are: no state kept between merges, no incremental update. The
        reference the incremental path is tested against, and what `export-model` writes."""
        import torch

        pool = self.pool
        self.holds_merge = False
        index = torch.tensor(pool.indices(subset), device=pool.deltas_flat.device)
        weights = options.expert_weights(hp, subset)
        with torch.no_grad():
            for name in pool.names:
                if not options.is_merged(hp, name):  # filtered out: the base's values
                    self.resident.params[name].copy_(pool.base[name])
                    continue
                deltas = pool.deltas[name].index_select(0, index).to(pool.base_flat.device)
                if weights:  # w_i·v_i (methods.options)
                    deltas = options.per_expert_scale(deltas, weights)
                merged = method.merge(pool.base[name], deltas, MergeContext(name, tuple(subset)), hp)
                self.resident.params[name].copy_(merged)

    def merge(self, method: MergeMethod, hp: dict, subset: Sequence[str]) -> None:
        import torch

        self.pool.ready_for(method, hp)
        index = self.pool.indices(subset)
        with torch.no_grad():
            if method.linear_scale is None:
                self._combine(method, hp, subset, index)
            else:
                self._linear(index, method.linear_scale(len(index), hp), options.weight_map(hp), options.options_key(hp))
            for name in options.kept_from_base(hp, self.pool.names):  # tensor filters: the base's values
                self.resident.params[name].copy_(self.pool.base[name])

    def discard(self) -> None:
        """Never build on the weights now resident (e.g. they are not finite, and inf − inf is NaN):
        the next linear merge rebuilds them from θ0 instead of updating them by swaps."""
        self.state = None

    def _combine(self, method, hp, subset, index) -> None:
        import torch

        pool, flat = self.pool, self.resident.flat
        self.holds_merge = False
        rows = torch.tensor(index, device=pool.deltas_flat.device)
        weights = options.expert_weights(hp, subset)
        whole = method.whole_tensor  # angles, SVDs: the whole tensor at once, in its shape
        spans = ((n, pool.layout.offsets[n], pool.layout.offsets[n] + pool.base[n].numel()) for n in pool.names)
        for name, lo, hi in spans if whole else pool.layout.chunks(COMBINE_CHUNK):
            if not options.is_merged(hp, name):
                continue  # filtered out: `merge` writes the base's values
            picked = pool.deltas_flat[:, lo:hi].index_select(0, rows).to(flat.device)
            if weights:
                picked = options.per_expert_scale(picked, weights)
            base, ctx = pool.base_flat[lo:hi], MergeContext(name, tuple(subset))
            if whole:
                shape = pool.layout.shapes[name]
                flat[lo:hi] = method.combine(base.view(shape), picked.view(len(index), *shape), ctx, hp).reshape(-1)
            else:
                flat[lo:hi] = method.combine(base, picked, ctx, hp)

    def _linear(self, index: list[int], scale: float, weights: dict | None = None, key: tuple = ()) -> None:
        """merged = θ0 + Σ scale·w_i·v_i over `index`, by the experts that enter or leave when the state
        (prepared form, scale, options `key`) is unchanged; `weights` maps expert name -> w_i (default 1)."""
        import torch

        pool, flat = self.pool, self.resident.flat
        if self.merged is None:
            self.merged = flat if flat.dtype == torch.float32 else torch.empty_like(pool.base_flat)
        weights = weights or {}
        alpha = {i: scale * weights.get(pool.expert_names[i], 1.0) for i in range(len(pool.expert_names))}
        target, state = frozenset(index), (pool.prepared_for, scale, key)
        enter, leave = sorted(target - self.members), sorted(self.members - target)
        intact = self.merged is not flat or self.holds_merge  # nothing wrote over the last linear merge
        incremental = intact and state == self.state and self.updates < self.refresh and len(enter) + len(leave) < len(target)
        self.state = None  # until this merge completes: one that fails midway is rebuilt next time
        if incremental:
            for i in enter:
                self._add(i, alpha[i])
            for i in leave:
                self._add(i, -alpha[i])
            self.updates += 1
        else:
            self.merged.copy_(pool.base_flat)
            for i in sorted(target):
                self._add(i, alpha[i])
            self.updates = 0
        self.members, self.state = target, state
        if self.merged is not flat:
            flat.copy_(self.merged)  # rounded once into the bf16 resident
        self.holds_merge = True

    def _add(self, i: int, alpha: float) -> None:
        """merged += alpha · v_i, in chunks, so task vectors kept in host memory stream to the device."""
        vector, merged = self.pool.deltas_flat[i], self.merged
        for lo in range(0, merged.numel(), STREAM_CHUNK):
            merged[lo:lo + STREAM_CHUNK].add_(vector[lo:lo + STREAM_CHUNK].to(merged.device), alpha=alpha)


def merge_rank(subset: Sequence[str], experts: Sequence[str]) -> tuple[int, int]:
    """Sort key of the merge order: by size k, then by Gray-code rank. Within one k this is a revolving
    door: consecutive subsets of a full enumeration differ by one swap (one expert out, one in)."""
    return len(subset), gray_rank(sum(1 << experts.index(e) for e in subset))


def gray_rank(mask: int) -> int:
    """Position of a subset bitmask in the binary-reflected Gray code: sorting subsets by it makes
    consecutive subsets of a full enumeration differ by exactly one expert."""
    rank = mask
    shift = 1
    while mask >> shift:
        rank ^= mask >> shift
        shift += 1
    return rank
