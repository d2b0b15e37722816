"""Merge subsets of experts into one resident model, in memory, reusing the loaded experts.

The base θ0 and every expert θ_i are kept as their checkpoints store them (bf16, fp16 or fp32), once per
size: in the merge device's memory, in host memory, or left in their safetensors files and read chunk by
chunk during each merge (the pool's *placement*, chosen by `mergelab.engine.memory.plan_memory`). Task
vectors v_i = θ_i − θ0 are formed in fp32 per chunk inside each update, exactly as they were when they
were stored whole. Methods whose per-expert work only drops entries (`keep`: TIES, DARE) get their masks
stored as bits. A merge writes each merged tensor straight into the resident model's parameters, which
may be split over several devices (a device map): no merged model is ever written to disk or held twice.
"""

from __future__ import annotations

import bisect
import math
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from mergelab.io.adapters import AdapterCheckpoint
from mergelab.io.checkpoints import Checkpoint, SafetensorsFile, check_compatible
from mergelab.errors import CheckpointError
from mergelab.io.family import SizeSpec
from mergelab.engine.flat import ALIGN, FlatLayout
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
STREAM_CHUNK = 1 << 20  # entries per step of a linear update: its temporaries (fp32 chunk, mask) stay at ~10 MiB
KEPT_DTYPES = ("float32", "float16", "bfloat16")  # stored as is: their fp32 value is exact


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


def stored_dtype_name(ckpt: Checkpoint) -> str:
    """The dtype a checkpoint's weights are kept in: the one they are stored in when that is bf16, fp16 or
    fp32 for every tensor, else fp32 (mixed dtypes, fp64, a LoRA adapter's fp32 sums: cast once, as
    reading into fp32 always did)."""
    found = {ckpt.stored_dtype(name) for name in ckpt.names}
    return found.pop() if len(found) == 1 and next(iter(found)) in KEPT_DTYPES else "float32"


def _lazy_source(ckpt: Checkpoint, name: str) -> tuple[SafetensorsFile, str] | None:
    """(parsed file, stored key) from which tensor `name` of `ckpt` can be read in place, chunk by chunk;
    None where the tensor is formed on read (a LoRA adapter's base + B·A, an MoE tensor packed from its
    per-expert sources): the disk placement keeps those few tensors in memory instead."""
    if isinstance(ckpt, AdapterCheckpoint):
        if name in ckpt.modules:
            return None
        ckpt = ckpt.base  # a tensor the adapter does not reach is the base's, as stored
    if ckpt.layout is not None and name in ckpt.layout.packed:
        return None
    key = ckpt._key(name)  # renamed (converted layouts, Gemma 3's text model) or as stored
    return ckpt._open_file(ckpt.stored[key]), key


def stored_itemsizes(size: SizeSpec) -> tuple[int, list[int]]:
    """Bytes per parameter of the base and of each expert as the pool keeps them (`stored_dtype_name`),
    from the safetensors headers alone: what `plan_memory` counts."""
    bytes_of = {"float32": 4, "float16": 2, "bfloat16": 2}
    sizes = []
    for path in (size.base, *size.experts.values()):
        ckpt = Checkpoint(path)
        sizes.append(bytes_of[stored_dtype_name(ckpt)])
        ckpt.close()
    return sizes[0], sizes[1:]


def shard_ranges(layout: FlatLayout, devices: Sequence[str]) -> list[tuple[str, int, int]]:
    """(device, start, stop) flat ranges of `layout`, one per device, in layout order and of about equal
    size, cut only between modules (a decoder layer, the embedding, a norm stay whole on one device, as
    accelerate's device maps do), so each module's parameters live on one device. One device: one range.
    Raises CheckpointError when a module's tensors are not contiguous in the checkpoint (it cannot be
    kept on one device then)."""
    blocks: list[tuple[str, int]] = []  # module, flat end of its last tensor so far
    for name in layout.shapes:
        module, end = _module_of(name), layout.offsets[name] + math.prod(layout.shapes[name])
        if blocks and blocks[-1][0] == module:
            blocks[-1] = (module, end)
        elif any(b[0] == module for b in blocks):
            raise CheckpointError(f"cannot shard the model: the tensors of module {module!r} are not stored together "
                                  f"(tensor {name!r}); re-save the checkpoint or use one device")
        else:
            blocks.append((module, end))
    ranges, lo = [], 0
    for module, end in blocks:  # cut after the module that crosses the next device's share
        if len(ranges) < len(devices) - 1 and end >= layout.numel * (len(ranges) + 1) / len(devices):
            end = -(-end // ALIGN) * ALIGN  # tensors start on ALIGN boundaries: so do shards
            ranges.append((devices[len(ranges)], lo, end))
            lo = end
    ranges.append((devices[len(ranges)], lo, layout.numel))
    while len(ranges) < len(devices):  # fewer modules than devices: the rest hold nothing
        ranges.append((devices[len(ranges)], layout.numel, layout.numel))
    return ranges


def _module_of(name: str) -> str:
    """The module a tensor belongs to, at the granularity a device map places: a decoder layer
    ('model.layers.3'), else the tensor's own module ('model.embed_tokens', 'lm_head')."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return ".".join(parts[:-1]) or name


class MemoryExperts:
    """Experts kept in memory as stored: one flat buffer per storage dtype ([m_d, numel]), expert i in
    row slots[i] of the buffer of its dtype; every tensor read (and checked) from its checkpoint."""

    placement = "memory"

    def __init__(self, layout: FlatLayout, dtypes: Sequence[str], device: str):
        import torch

        self.device, self.slots, self.buffers = device, [], {}
        for dtype in dict.fromkeys(dtypes):
            count = sum(d == dtype for d in dtypes)
            self.buffers[dtype] = layout.zeros(count, dtype=getattr(torch, dtype), device=device)
        seen: dict[str, int] = {}
        for dtype in dtypes:
            self.slots.append((dtype, seen.get(dtype, 0)))
            seen[dtype] = seen.get(dtype, 0) + 1
        self.views = [layout.views(self.flat(i)) for i in range(len(dtypes))]

    def flat(self, i: int):
        dtype, row = self.slots[i]
        return self.buffers[dtype][row]

    def fill(self, i: int, ckpt: Checkpoint, names: Sequence[str]) -> dict[str, int]:
        """Read every tensor of expert i (finite, shape checked); return each tensor's stored row count."""
        return {name: read_aligned(ckpt, name, self.views[i][name]) for name in names}

    def read(self, i: int, name: str, lo: int, hi: int):
        return self.flat(i)[lo:hi]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def close(self) -> None:
        pass


class DiskExperts:
    """Experts left in their safetensors files and read chunk by chunk when a merge needs them (plain
    positioned reads, through the page cache: the process holds one chunk, never the files). Every
    expert is read through once when the pool loads, with the checks an eager read makes (NaN/Inf,
    naming the file and tensor); each chunk is checked again as it is read."""

    placement = "disk"

    def __init__(self, layout: FlatLayout):
        self.layout = layout
        self.order = list(layout.offsets)  # tensors in flat order, and where each starts (for ranges across them)
        self.starts = [layout.offsets[n] for n in self.order]
        self.entries: list[dict[str, tuple]] = []  # expert -> tensor -> (file, fd, byte offset, dtype, numel)
        self.fds: dict[Path, int] = {}
        self.held: list[dict] = []  # expert -> tensor -> flat tensor kept in memory (formed on read, not stored)
        self.device = "cpu"

    def add(self, ckpt: Checkpoint, names: Sequence[str]) -> dict[str, int]:
        """Index expert `ckpt` (already checked compatible); return each tensor's stored row count. A
        tensor that is formed on read (`_lazy_source` None: LoRA adapter modules, packed MoE tensors) is
        read once and held in memory (its dtype as read, flat), so such experts still merge from disk."""
        import torch

        tensors, rows, held = {}, {}, {}
        for name in names:
            source = _lazy_source(ckpt, name)
            if source is None:
                tensor = ckpt.tensor(name)  # checked finite
                held[name] = tensor.reshape(-1)
                rows[name] = tensor.shape[0] if tensor.dim() else 1
                continue
            file, key = source
            dtype_name, shape, begin, end = file.entries[key]
            dtype = getattr(torch, dtype_name)
            numel = math.prod(shape)
            if end - begin != numel * torch.empty((), dtype=dtype).element_size():
                raise CheckpointError(f"{file.path}: not a readable safetensors file (tensor {key!r} has {end - begin} "
                                      f"bytes for shape {list(shape)} in {dtype_name})")
            if file.path not in self.fds:
                try:
                    self.fds[file.path] = os.open(file.path, os.O_RDONLY)
                except OSError as exc:
                    raise CheckpointError(f"{file.path}: cannot open ({exc.strerror or exc})") from exc
            tensors[name] = (file.path, self.fds[file.path], file.start + begin, dtype, numel)
            rows[name] = shape[0] if shape else 1
        self.entries.append(tensors)
        self.held.append(held)
        return rows

    def read(self, i: int, name: str | None, lo: int, hi: int, check: bool = True):
        """Entries [lo, hi) of the flat layout of expert i: inside tensor `name`, in its stored dtype; or
        (`name` None) across tensors, in fp32. Entries past the expert's own tensor (a shorter vocabulary)
        and the gaps between tensors read as 0."""
        import torch

        if name is None:
            out = torch.zeros(hi - lo, dtype=torch.float32)
            first = max(0, bisect.bisect_right(self.starts, lo) - 1)
            for tensor in self.order[first:]:
                start = self.layout.offsets[tensor]
                if start >= hi:
                    break
                a, b = max(lo, start), min(hi, start + math.prod(self.layout.shapes[tensor]))
                if a < b:
                    out[a - lo:b - lo] = self.read(i, tensor, a, b, check)
            return out
        start = lo - self.layout.offsets[name]
        if name in self.held[i]:
            tensor = self.held[i][name]
            out = torch.zeros(hi - lo, dtype=tensor.dtype)
            n = max(0, min(hi - lo, tensor.numel() - start))
            out[:n] = tensor[start:start + n]
            return out
        path, fd, offset, dtype, numel = self.entries[i][name]
        n = max(0, min(hi - lo, numel - start))
        out = torch.zeros(hi - lo, dtype=dtype)
        if n:
            view = out[:n].view(torch.uint8).numpy()
            try:
                got = os.preadv(fd, [view], offset + start * out.element_size())
            except OSError as exc:
                raise CheckpointError(f"{path}: cannot read tensor {name!r} ({exc.strerror or exc})") from exc
            if got != view.nbytes:
                raise CheckpointError(f"{path}: not a readable safetensors file (tensor {name!r} is cut short)")
            if check and out.is_floating_point() and not torch.isfinite(out[:n]).all():
                bad = int((~torch.isfinite(out[:n])).sum())
                raise CheckpointError(f"{path}: tensor {name!r} has {bad} NaN/Inf values (read from disk during a merge; "
                                      f"did the file change since the sweep started?)")
        return out

    def verify(self, i: int) -> None:
        """Read expert i through once, checking every tensor is finite (the checks of an eager read)."""
        import torch

        for name, lo, hi in self.layout.chunks(STREAM_CHUNK):
            if name not in self.entries[i]:
                continue  # not stored (or held in memory: checked when read)
            chunk = self.read(i, name, lo, hi, check=False)
            if chunk.is_floating_point() and not torch.isfinite(chunk).all():
                path, _, _, _, _ = self.entries[i][name]
                bad = sum(int((~torch.isfinite(self.read(i, name, a, b, check=False))).sum())
                          for n, a, b in self.layout.chunks(STREAM_CHUNK) if n == name)
                raise CheckpointError(f"{path}: tensor {name!r} has {bad} NaN/Inf values")

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors held in memory (formed on read); 0 when every tensor is read from its file."""
        return sum(t.numel() * t.element_size() for held in self.held for t in held.values())

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    def __del__(self):
        self.close()


_SHIFTS = {}


def _shifts(device):
    import torch

    key = str(device)
    if key not in _SHIFTS:
        _SHIFTS[key] = torch.arange(8, dtype=torch.uint8, device=device)
    return _SHIFTS[key]


def pack_bits(mask):
    """A flat bool tensor as uint8 bits (little-endian within each byte), zero-padded to whole bytes."""
    import torch

    flat = mask.reshape(-1)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).to(torch.uint8) << _shifts(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed, skip: int, count: int):
    """`count` bools from uint8 bits, starting `skip` bits into `packed`."""
    return ((packed.unsqueeze(-1) >> _shifts(packed.device)) & 1).view(-1)[skip:skip + count].bool()


_TABLES = {}


def unpack_float(packed, skip: int, count: int):
    """`unpack_bits` as 0.0/1.0 fp32, in one lookup per byte (a 256 × 8 table): what a chunk's task
    vectors are multiplied by."""
    import torch

    key = str(packed.device)
    if key not in _TABLES:
        _TABLES[key] = ((torch.arange(256, device=packed.device).unsqueeze(-1) >> torch.arange(8, device=packed.device))
                        & 1).to(torch.float32)
    return torch.nn.functional.embedding(packed.long(), _TABLES[key]).view(-1)[skip:skip + count]


@dataclass
class ExpertPool:
    """Base weights and experts of one size, as stored (`MemoryExperts` or `DiskExperts`), with the task
    vectors v_i = θ_i − θ0 formed in fp32 chunk by chunk (`vectors`). base_flat [numel] holds θ0 in its
    checkpoint dtype (exact in fp32); base[name] are views into it. The base and the experts live on
    `store` (the merge device, or host memory, from where merges stream them), or stay in their files
    (`store="disk"`: base_flat and base are then None; `base_chunk` reads either). A method's per-expert `prepare` is kept
    as bit masks when the method gives it as a `keep` mask, else as dense fp32 prepared vectors.

    Vocabulary tensors of experts whose rows differ from the base's are aligned on the base's shape
    (family `vocab_policy`): only their first `merge_rows[name]` rows are merged; rows an expert lacks
    or that are not merged get a task vector of 0, so the merge keeps the base's values there.

    `shards` is the device map of the resident model: (device, start, stop) flat ranges; merges form
    each chunk's task vectors where the pool lives and move them to the device of the chunk's shard."""

    size: SizeSpec
    names: list[str]
    expert_names: tuple[str, ...]
    layout: FlatLayout
    base_checkpoint: Checkpoint
    merge_rows: dict = field(default_factory=dict)  # vocabulary tensor -> rows merged (base_rows/common_rows)

    prepared_for: tuple | None = None  # (method, hparams) whose `prepare` the vectors carry

    @classmethod
    def load(cls, size: SizeSpec, device: str = "cpu", progress=None, store: str | None = None,
             experts: Sequence[str] | None = None, shards: Sequence[str] | None = None) -> "ExpertPool":
        """The pool of `size` (every expert, or only `experts`: what `export-model` merges, so the others
        are never read; under the "common_rows" vocabulary policy their headers still set the merged rows,
        so the merge equals the sweep's). `store`: where base and experts live (default `device`; "cpu"
        for host memory; "disk" to leave the experts in their files). `shards`: devices the resident model
        is split over (default [device]). Raises CheckpointError for an unreadable or incompatible one
        (a NaN/Inf tensor is named with its file, whatever the store)."""
        base_ckpt = Checkpoint(size.base)
        policy = size.vocab_policy
        chosen = tuple(size.experts) if experts is None else tuple(experts)
        unknown = [e for e in chosen if e not in size.experts]
        if unknown:
            raise CheckpointError(f"size {size.name}: no expert {unknown[0]!r} (experts: {', '.join(size.experts)})")
        rows = {} if policy == "refuse" else {n: base_ckpt.shapes[n][0] for n in base_ckpt.vocab_tensors}
        dtypes = {}
        for name, path in size.experts.items():
            if name not in chosen and policy != "common_rows":
                continue
            expert = Checkpoint(path)
            if name in chosen:
                check_compatible(base_ckpt, expert, policy)
                dtypes[name] = stored_dtype_name(expert)
            if policy == "common_rows":
                rows = {n: min(r, expert.shapes.get(n, (r,))[0]) for n, r in rows.items()}
            expert.close()
        pool = cls(size, base_ckpt.names, chosen, FlatLayout.of(base_ckpt.shapes), base_ckpt, rows)
        store = store or device
        pool.shards = shard_ranges(pool.layout, list(shards) if shards else [device])
        pool._allocate(store, [dtypes[e] for e in chosen])
        pool._read_experts(progress)
        return pool

    def _allocate(self, store: str, dtypes: list[str]) -> None:
        import torch

        self.store = store
        home = "cpu" if store == "disk" else store
        self.experts = DiskExperts(self.layout) if store == "disk" else MemoryExperts(self.layout, dtypes, home)
        if store == "disk":  # the base too is read chunk by chunk, after the experts (index M)
            self.base_flat = self.base = None
        else:
            base_dtype = getattr(torch, stored_dtype_name(self.base_checkpoint))
            self.base_flat = self.layout.zeros(dtype=base_dtype, device=home)
            self.base = self.layout.views(self.base_flat)
            for name in self.names:
                self.base_checkpoint.read_into(name, self.base[name])
        self.base_checkpoint.close()
        self.home = home
        self.masks = None  # uint8 [M, numel / 8]: keep bits of the method prepared for
        self.mask_scale = 1.0
        self.dense = None  # fp32 [M, numel]: prepared vectors of a method without a keep mask
        self._shard_of = {}
        for g, (_, lo, hi) in enumerate(self.shards):
            for name, start in self.layout.offsets.items():
                if lo <= start < hi:
                    self._shard_of[name] = g

    def rows(self, name: str, n_rows: int) -> int:
        """How many leading rows of an expert's tensor (of `n_rows` rows) enter the merge (all, outside
        vocabulary tensors)."""
        return min(n_rows, self.merge_rows.get(name, n_rows))

    def _read_experts(self, progress=None) -> None:
        """Read (memory) or index and check (disk) each expert in turn, one checkpoint open at a time, and
        note the flat ranges whose task vector is 0 (vocabulary rows an expert lacks or that are not merged)."""
        self.zero_ranges: list[list[tuple[int, int]]] = []
        for i, expert in enumerate(self.expert_names):
            ckpt = Checkpoint(self.size.experts[expert])
            if isinstance(self.experts, DiskExperts):
                stored_rows = self.experts.add(ckpt, self.names)
                self.experts.verify(i)
            else:
                stored_rows = self.experts.fill(i, ckpt, self.names)
            ckpt.close()
            zeros = []
            for name in self.names:
                shape = self.layout.shapes[name]
                r = self.rows(name, stored_rows[name])
                if shape and r < shape[0]:
                    start = self.layout.offsets[name]
                    zeros.append((start + r * math.prod(shape[1:]), start + math.prod(shape)))
            self.zero_ranges.append(zeros)
            if progress is not None:
                progress.update(1)
        if isinstance(self.experts, DiskExperts):
            self.experts.add(self.base_checkpoint, self.names)
            self.experts.verify(len(self.expert_names))
            self.base_checkpoint.close()
        self.prepared_for = None

    def base_chunk(self, name: str | None, lo: int, hi: int):
        """θ0 over flat entries [lo, hi) (inside tensor `name`, or across tensors when None), in its stored
        dtype (fp32 when read across tensors from disk), on the pool's home."""
        if self.base_flat is not None:
            return self.base_flat[lo:hi]
        return self.experts.read(len(self.expert_names), name, lo, hi)

    def base_tensor(self, name: str):
        """θ0's tensor `name`, in its stored dtype (a view when in memory, read from its file on disk)."""
        start, shape = self.layout.offsets[name], self.layout.shapes[name]
        return self.base_chunk(name, start, start + math.prod(shape)).view(shape)

    def raw(self, i: int, name: str | None, lo: int, hi: int, out) -> None:
        """out (fp32, on the pool's home) = v_i over flat entries [lo, hi) (of tensor `name`, or across
        tensors when None): θ_i − θ0 in fp32, 0 on the rows that are not merged."""
        import torch

        out.copy_(self.experts.read(i, name, lo, hi))  # cast (and moved) in place: no fp32 temporary of the chunk
        out.sub_(self.base_chunk(name, lo, hi).to(out.device))
        for a, b in self.zero_ranges[i]:
            a, b = max(a, lo), min(b, hi)
            if a < b:
                out[a - lo:b - lo].zero_()

    def vectors(self, index: Sequence[int], name: str | None, lo: int, hi: int, prepared: bool = True,
                device: str | None = None):
        """The task vectors of experts `index` over flat entries [lo, hi) (inside tensor `name`, or across
        tensors when None: linear updates need no tensor boundaries), fp32 [len(index), hi − lo] on
        `device` (default the pool's home): raw, or (`prepared`) as the method `ready_for` last prepared
        them: masked by their keep bits and scaled, or from the dense prepared copy. Formed on `device`
        from the stored chunks moved there (bf16 experts and base, packed bits: ~4 + 1/8 bytes per
        entry moved, not an fp32 vector's 4 per expert formed on the host)."""
        import torch

        out = torch.empty((len(index), hi - lo), dtype=torch.float32, device=device or self.home)
        for j, i in enumerate(index):
            if prepared and self.dense is not None:
                out[j].copy_(self.dense[i, lo:hi])
                continue
            self.raw(i, name, lo, hi, out[j])
            if prepared and self.masks is not None:
                out[j].mul_(unpack_float(self.masks[i, lo // 8:-(-hi // 8)].to(out.device), lo % 8, hi - lo))
                if self.mask_scale != 1.0:
                    out[j].mul_(self.mask_scale)
        return out

    def tensor_vectors(self, index: Sequence[int], name: str, prepared: bool = True):
        """`vectors` of one whole tensor, shaped [len(index), *shape]."""
        start = self.layout.offsets[name]
        shape = self.layout.shapes[name]
        return self.vectors(index, name, start, start + math.prod(shape), prepared).view(len(index), *shape)

    def shard_of(self, name: str) -> int:
        """Index in `shards` of the device that holds tensor `name` of the resident model."""
        return self._shard_of[name]

    def ready_for(self, method: MergeMethod, hp: dict) -> None:
        """Bring the task vectors into the form `method` merges from: raw, or with its per-expert
        `prepare` applied (once for all subsets): kept as one bit per entry and expert when the method
        gives its prepare as a `keep` mask (TIES, DARE), else as a dense fp32 copy of the M prepared
        task vectors (`memory.plan_memory` counts it). Per-expert weights and tensor filters act after
        the prepare, so they do not change what is prepared."""
        import torch

        own = {k: v for k, v in hp.items() if k not in options.OPTIONS}  # weights/filters act after prepare
        key = (method.name, tuple(sorted(own.items()))) if method.prepare else None
        if key == self.prepared_for:
            return
        self.masks = self.dense = None
        self.prepared_for = None
        if method.prepare:
            m = len(self.expert_names)
            if method.keep is not None:
                self.masks = torch.zeros((m, self.layout.numel // 8), dtype=torch.uint8, device=self.home)
                self.mask_scale = float(method.keep_scale(hp)) if method.keep_scale else 1.0
            else:
                self.dense = self.layout.zeros(m, dtype=torch.float32, device=self.home)
            # one expert's tensor at a time: temporaries stay at a few copies of one tensor
            try:
                for name in self.names:
                    start = self.layout.offsets[name]
                    for i, expert in enumerate(self.expert_names):
                        vector = self.tensor_vectors([i], name, prepared=False)
                        ctx = MergeContext(name, (expert,))
                        if self.masks is not None:
                            bits = pack_bits(method.keep(vector, ctx, hp).to(self.home))
                            self.masks[i, start // 8:start // 8 + bits.numel()] = bits
                        else:
                            self.dense[i, start:start + vector[0].numel()] = method.prepare(vector, ctx, hp).reshape(-1)
            except BaseException:
                self.masks = self.dense = None  # a prepare that fails midway leaves the raw vectors
                raise
            self.prepared_for = key

    def indices(self, subset: Sequence[str]) -> list[int]:
        return [self.expert_names.index(e) for e in subset]

    @property
    def nbytes(self) -> int:
        """Bytes the pool holds in memory: base, experts (0 on disk), masks or dense prepared vectors."""
        held = self.experts.nbytes + (0 if self.base_flat is None else self.base_flat.numel() * self.base_flat.element_size())
        for extra in (self.masks, self.dense):
            if extra is not None:
                held += extra.numel() * extra.element_size()
        return held

    def close(self) -> None:
        """Close the files a disk store reads from."""
        self.experts.close()


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


def _to_device(value, device):
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


class ResidentModel:
    """One model whose parameters are overwritten in place by each merge. Its parameters are views
    into flat buffers laid out like the pool's base: one buffer (`flat`) on one device, or one per
    device of a device map (`shards`: (device, start, stop) ranges of the layout, whole modules each;
    `parts` lists (layout of the range, buffer)). With several devices, each module moves its inputs
    to its own device (as accelerate's hooks do), so the forward pass runs across them.

    It has no writer of its own: a `MergeSession` is the one thing that writes its weights (merges,
    the base, single experts), so the session always knows what they hold."""

    def __init__(self, base: Checkpoint, device: str, shards: Sequence[tuple[str, int, int]] | None = None):
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
        self.shards = list(shards) if shards else [(device, 0, self.layout.numel)]
        self.parts, placed, owner = [], {}, {}
        for shard_device, lo, hi in self.shards:
            names = [n for n, start in self.layout.offsets.items() if lo <= start < hi]
            part = FlatLayout.of({n: self.layout.shapes[n] for n in names})  # offsets = global − lo
            flat = part.zeros(dtype=weight_dtype(device), device=shard_device)
            self.parts.append((part, flat))
            for name, view in part.views(flat).items():
                placed[id(self.params[name])] = torch.nn.Parameter(view, requires_grad=False)
                owner[_module_of(name)] = shard_device
        self.flat = self.parts[0][1] if len(self.parts) == 1 else None
        for module in model.modules():  # by identity, so a tied head gets the embedding's view too
            for key, param in module._parameters.items():
                if param is not None:
                    module._parameters[key] = placed[id(param)]
        self.params = dict(model.named_parameters())
        if len(self.shards) > 1:  # also over several "cpu" entries, where moving is a no-op: the same code runs
            self._move_inputs(owner)

    def _move_inputs(self, owner: dict[str, str]) -> None:
        """Each module of the device map moves its inputs to its device before running."""
        modules = dict(self.model.named_modules())
        for name, module in modules.items():  # a tied head: no tensor of its own, its weight is the embedding's
            own = next(module.parameters(recurse=False), None)
            covered = any(name == o or name.startswith(o + ".") for o in owner)
            if own is not None and not covered:
                owner[name] = str(own.device)
        for name, device in owner.items():
            module = modules.get(name)
            if module is None:
                continue
            module.register_forward_pre_hook(
                lambda mod, args, kwargs, device=device: (_to_device(args, device), _to_device(kwargs, device)),
                with_kwargs=True)

    def slice(self, lo: int, hi: int, shard: int):
        """The resident weights over flat entries [lo, hi) of the layout, which shard `shard` holds."""
        start = self.shards[shard][1]
        return self.parts[shard][1][lo - start:hi - start]


class MergeSession:
    """Merges a sequence of subsets into the resident model, reusing work between consecutive merges.

    Per-expert work (TIES trimming, DARE masks) is done once per method (`ExpertPool.ready_for`).
    Linear methods (θ0 + s·Σ prepared v_i) update the fp32 merged weights by the experts that enter
    or leave: in `merge_rank` order consecutive subsets of one size differ by one swap, which costs two adds
    over the whole model, each forming its task vector from the stored expert chunk by chunk. On CPU
    those fp32 weights are the resident model itself; on GPU the resident model is bf16: an fp32 copy
    (per shard of a device map) is kept and rounded into it. The weights are rebuilt from θ0 when the
    scale or the method changes, when rebuilding is cheaper, and every `refresh` updates, so rounding
    cannot drift. Other methods combine entrywise, in chunks of COMBINE_CHUNK entries.

    The session is the resident model's only writer: the reference rows (`load_base`, `load_expert`)
    and the formula-by-formula merge (`merge_formula`) go through it too, so it knows whether the
    weights still hold its last linear merge."""

    def __init__(self, pool: ExpertPool, resident: ResidentModel, refresh: int = 64):
        if resident.layout != pool.layout:
            raise CheckpointError(f"{pool.size.base}: the resident model was not built from this size's base")
        if [(lo, hi) for _, lo, hi in resident.shards] != [(lo, hi) for _, lo, hi in pool.shards]:
            raise CheckpointError(f"{pool.size.base}: the resident model is split over other devices than the pool's "
                                  f"device map ({len(resident.shards)} vs {len(pool.shards)} shards)")
        self.pool, self.resident, self.refresh = pool, resident, refresh
        self.merged = None  # per shard: fp32 weights of the last linear merge
        self.members: frozenset[int] = frozenset()
        self.state = None  # (prepared form, scale) the merged weights were built with
        self.updates = 0
        self.holds_merge = False  # the resident weights are the last linear merge (nothing wrote over them)

    def _chunks(self, size: int):
        """(name, start, stop, shard) of every chunk of the layout, at most `size` entries, one tensor each."""
        for name, lo, hi in self.pool.layout.chunks(size):
            yield name, lo, hi, self.pool.shard_of(name)

    def _spans(self, size: int):
        """(None, start, stop, shard): the layout in pieces of at most `size` entries across tensors (and the
        zero gaps between them) within each shard: one op per piece, however many tensors a model has.
        From disk, pieces stay inside one tensor (`_chunks`): reads go tensor by tensor anyway, and a
        piece's temporaries stay as small as the tensor."""
        if self.pool.store == "disk":
            yield from self._chunks(size)
            return
        for g, (_, lo, hi) in enumerate(self.pool.shards):
            for start in range(lo, hi, size):
                yield None, start, min(start + size, hi), g

    def load_base(self) -> None:
        """The base model θ0 into the resident model (the k = 0 reference row)."""
        self.holds_merge = False
        for name, lo, hi, g in self._spans(STREAM_CHUNK):
            self.resident.slice(lo, hi, g).copy_(self.pool.base_chunk(name, lo, hi))

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
                    param[r:].copy_(pool.base_tensor(name)[r:])
        ckpt.close()

    def merge_formula(self, method: MergeMethod, hp: dict, subset: Sequence[str]) -> None:
        """Merge `subset` straight from the method's formula (`method.merge`), tensor by tensor, from the
        raw task vectors: no state kept between merges, no incremental update. The reference the
        incremental path is tested against, and what `export-model` writes."""
        import torch

        pool = self.pool
        self.holds_merge = False
        index = pool.indices(subset)
        weights = options.expert_weights(hp, subset)
        with torch.no_grad():
            for name in pool.names:
                param = self.resident.params[name]
                if not options.is_merged(hp, name):  # filtered out: the base's values
                    param.copy_(pool.base_tensor(name))
                    continue
                deltas = pool.tensor_vectors(index, name, prepared=False).to(param.device)
                if weights:  # w_i·v_i (methods.options)
                    deltas = options.per_expert_scale(deltas, weights)
                base = pool.base_tensor(name).to(param.device, torch.float32)
                param.copy_(method.merge(base, deltas, MergeContext(name, tuple(subset)), hp))

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
                self.resident.params[name].copy_(self.pool.base_tensor(name))

    def discard(self) -> None:
        """Never build on the weights now resident (e.g. they are not finite, and inf − inf is NaN):
        the next linear merge rebuilds them from θ0 instead of updating them by swaps."""
        self.state = None

    def _combine(self, method, hp, subset, index) -> None:
        import torch

        pool = self.pool
        self.holds_merge = False
        weights = options.expert_weights(hp, subset)
        whole = method.whole_tensor  # angles, SVDs: the whole tensor at once, in its shape
        spans = ((n, pool.layout.offsets[n], pool.layout.offsets[n] + math.prod(pool.layout.shapes[n]), pool.shard_of(n))
                 for n in pool.names)
        for name, lo, hi, g in spans if whole else self._chunks(COMBINE_CHUNK):
            if not options.is_merged(hp, name):
                continue  # filtered out: `merge` writes the base's values
            target = self.resident.slice(lo, hi, g)
            picked = pool.vectors(index, name, lo, hi, device=target.device)
            if weights:  # w_i·v_i, after the keep bits or the dense prepared vectors
                picked = options.per_expert_scale(picked, weights)
            base, ctx = pool.base_chunk(name, lo, hi).to(target.device, torch.float32), MergeContext(name, tuple(subset))
            if whole:
                shape = pool.layout.shapes[name]
                target.copy_(method.combine(base.view(shape), picked.view(len(index), *shape), ctx, hp).reshape(-1))
            else:
                target.copy_(method.combine(base, picked, ctx, hp))

    def _linear(self, index: list[int], scale: float, weights: dict | None = None, key: tuple = ()) -> None:
        """merged = θ0 + Σ scale·w_i·v_i over `index`, by the experts that enter or leave when the state
        (prepared form, scale, options `key`) is unchanged; `weights` maps expert name -> w_i (default 1)."""
        import torch

        pool, parts = self.pool, self.resident.parts
        if self.merged is None:
            self.merged = [flat if flat.dtype == torch.float32 else torch.zeros(flat.shape, dtype=torch.float32,
                                                                               device=flat.device)
                           for _, flat in parts]
        weights = weights or {}
        alpha = {i: scale * weights.get(pool.expert_names[i], 1.0) for i in range(len(pool.expert_names))}
        target, state = frozenset(index), (pool.prepared_for, scale, key)
        enter, leave = sorted(target - self.members), sorted(self.members - target)
        in_place = self.merged[0] is parts[0][1]
        intact = not in_place or self.holds_merge  # nothing wrote over the last linear merge
        incremental = intact and state == self.state and self.updates < self.refresh and len(enter) + len(leave) < len(target)
        self.state = None  # until this merge completes: one that fails midway is rebuilt next time
        if incremental:
            for i in enter:
                self._add(i, alpha[i])
            for i in leave:
                self._add(i, -alpha[i])
            self.updates += 1
        else:
            for name, lo, hi, g in self._spans(STREAM_CHUNK):
                start = pool.shards[g][1]
                self.merged[g][lo - start:hi - start].copy_(pool.base_chunk(name, lo, hi))
            for i in sorted(target):
                self._add(i, alpha[i])
            self.updates = 0
        self.members, self.state = target, state
        if not in_place:
            for merged, (_, flat) in zip(self.merged, parts):
                flat.copy_(merged)  # rounded once into the bf16 resident
        self.holds_merge = True

    def _add(self, i: int, alpha: float) -> None:
        """merged += alpha · v_i, chunk by chunk: each chunk's task vector formed from the stored expert
        (in memory, host memory or its file) and moved to the device of the shard it updates."""
        pool = self.pool
        for name, lo, hi, g in self._spans(STREAM_CHUNK):
            start = pool.shards[g][1]
            merged = self.merged[g][lo - start:hi - start]
            merged.add_(pool.vectors([i], name, lo, hi, device=merged.device)[0], alpha=alpha)


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
