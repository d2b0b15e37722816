"""Memory planning before a sweep: where one size's weights will live, against what the machine has.

The engine keeps the base and the M experts in their checkpoint dtype (bf16 usually: 2 bytes per
parameter each), TIES/DARE keep masks as bits (M/8 bytes per parameter), and the resident model: fp32
on CPU, where it also holds the merged weights; bf16 on CUDA, fed from an fp32 copy of the merged
weights (6 bytes per parameter). A *placement* says where each of these lives:

- ``device``: everything on the merge device;
- ``host``: base, experts and masks in host memory, streamed to the GPU chunk by chunk (GPU: 6 B/param);
- ``disk``: the base and experts stay in their safetensors files and are read chunk by chunk (through
  the page cache) during each merge; only the keep bits and the resident model (with its fp32
  accumulator on GPU) are in memory;
- sharded over G devices (``sharded:G``, experts in host memory, or ``sharded:G:disk``): the resident
  model and its accumulator split over G GPUs by whole modules (a device map), 6/G B/param each.

`plan_memory` takes the first placement that fits (in that order; fewest GPUs first), from free device
memory, MemAvailable or `MERGELAB_MEMORY_LIMIT_GB`, and the model's size; `MERGELAB_PLACEMENT` forces one
(for tests and benchmarks). A size that no placement holds is refused before anything is loaded, with the
numbers of each placement tried. The sweep passes SizeSpec.n_params: the base checkpoint's parameters
counted from its safetensors headers, never the manifest's number alone (mergelab.io.family)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from mergelab.errors import MergelabError

LIMIT_ENV = "MERGELAB_MEMORY_LIMIT_GB"
PLACEMENT_ENV = "MERGELAB_PLACEMENT"
HEADROOM = 1.15  # per-tensor temporaries and allocator slack measured in bench/sweep_memory.py
PLACEMENTS = ("device", "host", "disk")  # where the experts live; sharding (G devices) is on top of host or disk
PLACEMENT_HELP = "device, host, disk, sharded:G or sharded:G:disk"


@dataclass(frozen=True)
class MemoryPlan:
    """Where one size's weights live (`placement`, over `shards` devices) and what that needs: per merge
    device (`needed_bytes`, against `available_bytes`) and in host memory besides (`host_bytes`, 0 when the
    device is the host, against `host_available`). `tried` holds the placements that did not fit, as text;
    `notes` what the numbers assume (dense prepared vectors)."""

    size: str
    device: str
    needed_bytes: int
    available_bytes: int | None
    host_bytes: int = 0
    host_available: int | None = None
    placement: str = "device"
    shards: int = 1
    forced: bool = False
    tried: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def store(self) -> str:
        """Where the base and experts live (`ExpertPool.load`'s `store`): the merge device, "cpu" (host
        memory) or "disk"."""
        return {"host": "cpu", "disk": "disk"}.get(self.placement, self.device)

    @property
    def devices(self) -> list[str]:
        """The devices the resident model is split over: one, or cuda:0..G−1 (on CPU, G "cpu" entries)."""
        if self.shards == 1:
            return [self.device]
        if self.device.startswith("cuda"):
            return [f"cuda:{g}" for g in range(self.shards)]
        return [self.device] * self.shards

    @property
    def fits(self) -> bool:
        return _fits(self.needed_bytes, self.available_bytes) and _fits(self.host_bytes, self.host_available)

    @property
    def label(self) -> str:
        """The placement as `MERGELAB_PLACEMENT` names it: device, host, disk, sharded:G, sharded:G:disk."""
        if self.shards > 1:
            return f"sharded:{self.shards}" + (":disk" if self.placement == "disk" else "")
        return self.placement

    def describe(self) -> str:
        where = f"size {self.size} on {self.device}" if self.shards == 1 else \
            f"size {self.size} sharded over {self.shards} devices ({', '.join(dict.fromkeys(self.devices))})"
        text = f"{where}: needs ~{_gib(self.needed_bytes)}{' per device' if self.shards > 1 else ''}, " \
               f"available {_gib(self.available_bytes)}"
        if self.placement == "host":
            text += (f", with the experts streamed from host memory (~{_gib(self.host_bytes)}, available "
                     f"{_gib(self.host_available)})")
        elif self.placement == "disk":
            text += ", with the base and experts streamed from their safetensors files"
            if self.host_bytes:
                text += f" (host memory ~{_gib(self.host_bytes)} for the keep bits, available {_gib(self.host_available)})"
        if self.placement != "device" or self.shards > 1 or self.forced:
            text += f" [placement {self.label}{', forced by ' + PLACEMENT_ENV if self.forced else ''}]"
        if self.notes:
            text += " (" + "; ".join(self.notes) + ")"
        return text


def _fits(needed: int, available: int | None) -> bool:
    return available is None or needed <= available


def _gib(n: int | None) -> str:
    """Bytes in the unit that shows them (B, KiB, MiB, GiB, TiB), three significant digits; 'unknown' for None."""
    return "unknown" if n is None else format_bytes(n)


def format_bytes(n: int) -> str:
    """`n` bytes as '512 B', '7.21 KiB', '1.50 MiB', '14.9 GiB', '1024 GiB', '1.20 TiB': the largest binary unit in
    which the number is at least 1, so a tiny model's needs never read 0.00 GiB."""
    value, unit = float(n), "B"
    for next_unit in ("KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024:
            break
        value, unit = value / 1024, next_unit
    if unit == "B":
        return f"{int(value)} B"
    return f"{value:.0f} {unit}" if abs(value) >= 100 else f"{value:.1f} {unit}" if abs(value) >= 10 else f"{value:.2f} {unit}"


def placement_bytes(n_params: int, n_experts: int, device: str, placement: str = "device", shards: int = 1,
                    expert_itemsize: float = 4, base_itemsize: int = 4, masks: bool = True,
                    dense: bool = False) -> tuple[int, int]:
    """(bytes per merge device, bytes of host memory besides) of one size under `placement` (device, host,
    disk) over `shards` devices. n_params: parameters of the model; expert_itemsize: mean bytes per
    parameter of an expert as stored (2 for bf16); masks: M/8 bytes per parameter of keep bits (TIES,
    DARE); dense: M fp32 prepared vectors (a method with a prepare but no keep mask). On CPU the device
    is the host: everything counts in the first number. With HEADROOM."""
    if placement not in PLACEMENTS:
        raise MergelabError(f"placement {placement!r}: expected one of {', '.join(PLACEMENTS)}")
    pool = 0 if placement == "disk" else base_itemsize + n_experts * expert_itemsize  # disk: base and experts in their files
    pool += (n_experts / 8 if masks else 0) + (4 * n_experts if dense else 0)
    cuda = device.startswith("cuda")
    resident = 2 + 4 if cuda else 4  # CUDA: bf16 model + fp32 merged copy; CPU: the fp32 model is the merge
    if not cuda:
        return int(HEADROOM * n_params * (pool + resident)), 0
    if placement == "device" and shards == 1:
        return int(HEADROOM * n_params * (pool + resident)), 0
    return int(HEADROOM * n_params * resident / shards), int(HEADROOM * n_params * pool)


def needed_bytes(n_params: int, n_experts: int, device: str, streamed: bool = False, **kinds) -> int:
    """Bytes on the merge device: `placement_bytes`' first number for everything on the device, or
    (`streamed`) with the experts in host memory. `kinds`: placement_bytes' itemsize/masks/dense options."""
    return placement_bytes(n_params, n_experts, device, "host" if streamed else "device", **kinds)[0]


def export_bytes(n_params: int, largest: int, k: int) -> int:
    """Bytes `export-model` holds at its peak on the CPU: the base, k fp32 experts and the merged model
    (`needed_bytes`), and the merge's temporaries, made one tensor at a time: the k chosen task vectors of the
    largest tensor (`largest` entries, often the embedding), their combination and the merged tensor."""
    return needed_bytes(n_params, k, "cpu", masks=False) + int(HEADROOM * largest * 4 * (k + 2))


def available_bytes(device: str) -> int | None:
    """MERGELAB_MEMORY_LIMIT_GB if set, else free device memory (CUDA) or MemAvailable (Linux)."""
    if os.environ.get(LIMIT_ENV):
        try:
            return int(float(os.environ[LIMIT_ENV]) * 2**30)
        except ValueError as exc:
            raise MergelabError(f"{LIMIT_ENV}={os.environ[LIMIT_ENV]!r}: expected a number of GiB") from exc
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def parse_placement(text: str, where: str = PLACEMENT_ENV) -> tuple[str, int]:
    """'device' | 'host' | 'disk' | 'sharded:G' | 'sharded:G:disk' as (placement, shards). Raises
    MergelabError naming `where` for anything else."""
    parts = text.strip().lower().split(":")
    if len(parts) == 1 and parts[0] in PLACEMENTS:
        return parts[0], 1
    if parts[0] == "sharded" and len(parts) in (2, 3) and parts[1].isdigit() and int(parts[1]) >= 1 \
            and (len(parts) == 2 or parts[2] in ("host", "disk")):
        return (parts[2] if len(parts) == 3 else "host"), int(parts[1])
    raise MergelabError(f"{where}={text!r}: expected {PLACEMENT_HELP}")


def plan_memory(n_params: int, n_experts: int, size: str, device: str, host_share: float = 1.0, *,
                expert_itemsize: float = 4, base_itemsize: int = 4, masks: bool = True, dense: bool = False,
                gpus: int | None = None, available: int | None = -1, host_available: int | None = -1,
                placement: str | None = None) -> MemoryPlan:
    """The first placement that fits: on CUDA everything on the device, then experts in host memory, then
    streamed from disk, then the resident model sharded over 2..`gpus` GPUs (experts in host memory, then
    on disk); on CPU everything in memory, then the experts streamed from disk. Else the most frugal plan,
    which does not fit, for `require_fit` to refuse (its `tried` lists the others). Memory from
    `available_bytes` unless given (`available` per device, `host_available`); the host's share is
    `host_share` of it (the GPUs of one node share its memory). `placement` (else MERGELAB_PLACEMENT)
    forces one (`parse_placement`). Itemsizes, masks, dense: as `placement_bytes`."""
    cuda = device.startswith("cuda")
    free = available_bytes(device) if available == -1 else available
    host = (available_bytes("cpu") if host_available == -1 else host_available) if cuda else None
    host = None if host is None else int(host * host_share)
    if gpus is None:
        gpus = _device_count() if cuda else 1
    kinds = dict(expert_itemsize=expert_itemsize, base_itemsize=base_itemsize, masks=masks, dense=dense)
    notes = ("dense fp32 prepared task vectors for a method without a keep mask",) if dense else ()

    def plan(where: str, shards: int, forced: bool = False) -> MemoryPlan:
        dev, host_need = placement_bytes(n_params, n_experts, device, where, shards, **kinds)
        return MemoryPlan(size, device, dev, free, host_need, host if host_need else None, where, shards, forced,
                          notes=notes)

    forced = os.environ.get(PLACEMENT_ENV) if placement is None else placement  # "": choose, whatever the env
    if forced:
        where, shards = parse_placement(forced, "--placement" if placement else PLACEMENT_ENV)
        return plan(where, shards, forced=True)
    order = [("device", 1)] + ([("host", 1)] if cuda else []) + [("disk", 1)]
    order += [(where, g) for where in ("host", "disk") for g in range(2, gpus + 1)] if cuda else []
    tried = []
    for where, shards in order:
        candidate = plan(where, shards)
        if candidate.fits:
            return candidate
        tried.append(candidate.describe())
    frugal = plan("disk", max(gpus, 1) if cuda else 1)
    return replace(frugal, tried=tuple(tried))


def _device_count() -> int:
    import torch

    return max(1, torch.cuda.device_count())


def require_fit(plan: MemoryPlan) -> None:
    """Raise MergelabError, with the numbers of every placement tried, when `plan` does not fit."""
    if not plan.fits:
        others = f"; also tried: {' | '.join(plan.tried)}" if plan.tried else ""
        raise MergelabError(f"not starting: {plan.describe()}{others}. Use a larger machine, fewer experts per size, "
                            f"or raise {LIMIT_ENV} if the estimate is too cautious")


# The paper's models (Qwen2.5, bf16 checkpoints): parameters counted from their safetensors headers.
QWEN25_PARAMS = {"0.5B": 494_032_768, "1.5B": 1_543_714_304, "3B": 3_085_938_688, "7B": 7_615_616_512,
                 "14B": 14_770_033_664, "32B": 32_763_876_352, "72B": 72_706_203_648}
# Machines of docs/scale-out.md: (GPUs, bytes per GPU, host bytes)
MACHINES = {"(a) 1×80 GB GPU, 128 GiB host": (1, 80 * 10**9, 128 * 2**30),
            "(b) 8×80 GB GPUs, 1 TiB host": (8, 80 * 10**9, 2**40)}


def placement_table(n_experts: int = 9, sizes: dict[str, int] | None = None,
                    machines: dict[str, tuple[int, int, int]] | None = None) -> list[dict]:
    """What `plan_memory` chooses for each model size on each machine with bf16 checkpoints, keep masks
    and no dense prepared vectors: rows of size, params, machine, placement (label, '—' when nothing
    fits), fits, GPU bytes per device and host bytes. The table in docs/scale-out.md."""
    rows = []
    for machine, (gpus, gpu_bytes, host_bytes) in (machines or MACHINES).items():
        for name, n in (sizes or QWEN25_PARAMS).items():
            plan = plan_memory(n, n_experts, name, "cuda:0", expert_itemsize=2, base_itemsize=2, masks=True,
                               gpus=gpus, available=gpu_bytes, host_available=host_bytes, placement="")
            rows.append({"size": name, "params": n, "machine": machine, "placement": plan.label if plan.fits else "—",
                         "fits": plan.fits, "gpu_bytes": plan.needed_bytes, "host_bytes": plan.host_bytes})
    return rows


def placement_markdown(n_experts: int = 9) -> str:
    """`placement_table` as the markdown table docs/scale-out.md shows."""
    lines = ["| size | machine | placement | GPU memory per device | host memory |", "|---|---|---|---|---|"]
    for row in placement_table(n_experts):
        lines.append(f"| {row['size']} | {row['machine']} | {row['placement']} | {format_bytes(row['gpu_bytes'])} | "
                     f"{format_bytes(row['host_bytes'])} |")
    return "\n".join(lines)
