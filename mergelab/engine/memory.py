"""Memory planning before a sweep: what merging one size will hold, against what the machine has.

The engine keeps, per size, the base and M task vectors in fp32 on the merge device and the resident
model: fp32 on CPU, where it also holds the merged weights (M + 2 fp32 copies in all); bf16 on CUDA,
fed from one more fp32 copy of the merged weights. When that does not fit on a GPU but the rest does,
the task vectors stay in host memory and stream to the GPU chunk by chunk as merges need them. A size
that cannot fit either way is refused before anything is loaded, with the numbers. The sweep passes
SizeSpec.n_params: the base checkpoint's parameters counted from its safetensors headers, never the
manifest's number alone (mergelab.io.family)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from mergelab.errors import MergelabError

LIMIT_ENV = "MERGELAB_MEMORY_LIMIT_GB"
HEADROOM = 1.15  # per-tensor temporaries and allocator slack measured in bench/sweep_memory.py


@dataclass(frozen=True)
class MemoryPlan:
    size: str
    device: str
    needed_bytes: int
    available_bytes: int | None
    host_bytes: int = 0  # task vectors kept in host memory (streamed plan), else 0
    host_available: int | None = None

    @property
    def store(self) -> str:
        """Where the task vectors live: the merge device, or host memory when streamed."""
        return "cpu" if self.host_bytes else self.device

    @property
    def fits(self) -> bool:
        return _fits(self.needed_bytes, self.available_bytes) and _fits(self.host_bytes, self.host_available)

    def describe(self) -> str:
        text = f"size {self.size} on {self.device}: needs ~{_gib(self.needed_bytes)}, available {_gib(self.available_bytes)}"
        if self.host_bytes:
            text += (f", with the task vectors streamed from host memory (~{_gib(self.host_bytes)}, available "
                     f"{_gib(self.host_available)})")
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


def needed_bytes(n_params: int, n_experts: int, device: str, streamed: bool = False) -> int:
    """Bytes on the merge device: base and (unless streamed) M task vectors in fp32, and the resident model."""
    resident = 4 + 2 if device.startswith("cuda") else 4  # CUDA: fp32 merged copy + bf16 model
    vectors = 0 if streamed else n_experts
    return int(HEADROOM * n_params * ((vectors + 1) * 4 + resident))


def export_bytes(n_params: int, largest: int, k: int) -> int:
    """Bytes `export-model` holds at its peak on the CPU: the base, k fp32 task vectors and the merged model
    (`needed_bytes`), and the merge's temporaries, made one tensor at a time: the k chosen task vectors of the
    largest tensor (`largest` entries, often the embedding), their combination and the merged tensor."""
    return needed_bytes(n_params, k, "cpu") + int(HEADROOM * largest * 4 * (k + 2))


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


def plan_memory(n_params: int, n_experts: int, size: str, device: str, host_share: float = 1.0) -> MemoryPlan:
    """Everything on the merge device if it fits; on a GPU that cannot hold the task vectors, them in
    host memory (streamed) if that fits in `host_share` of it (the GPUs of one node share its memory);
    else the plan that does not fit, for `require_fit` to refuse."""
    plan = MemoryPlan(size, device, needed_bytes(n_params, n_experts, device), available_bytes(device))
    if plan.fits or not device.startswith("cuda"):
        return plan
    host = available_bytes("cpu")
    streamed = MemoryPlan(size, device, needed_bytes(n_params, n_experts, device, streamed=True), plan.available_bytes,
                          int(HEADROOM * n_params * n_experts * 4), None if host is None else int(host * host_share))
    return streamed if streamed.fits else plan


def require_fit(plan: MemoryPlan) -> None:
    if not plan.fits:
        raise MergelabError(f"not starting: {plan.describe()}. Use a larger machine, fewer experts per size, "
                            f"or raise {LIMIT_ENV} if the estimate is too cautious")
