"""Memory planning before a sweep: what merging one size will hold, against what the machine has.

The engine keeps, per size, the base and M task vectors in fp32 on the merge device and the resident
model: fp32 on CPU, where it also holds the merged weights (M + 2 fp32 copies in all); bf16 on CUDA,
fed from one more fp32 copy of the merged weights. A size that cannot fit is refused before anything
is loaded, with the numbers."""

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

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.needed_bytes <= self.available_bytes

    def describe(self) -> str:
        have = "unknown" if self.available_bytes is None else f"{self.available_bytes / 2**30:.2f} GiB"
        return f"size {self.size} on {self.device}: needs ~{self.needed_bytes / 2**30:.2f} GiB, available {have}"


def needed_bytes(n_params: int, n_experts: int, device: str) -> int:
    resident = 4 + 2 if device.startswith("cuda") else 4  # CUDA: fp32 merged copy + bf16 model
    return int(HEADROOM * n_params * ((n_experts + 1) * 4 + resident))


def available_bytes(device: str) -> int | None:
    """MERGELAB_MEMORY_LIMIT_GB if set, else free device memory (CUDA) or MemAvailable (Linux)."""
    if os.environ.get(LIMIT_ENV):
        try:
            return int(float(os.environ[LIMIT_ENV]) * 2**30)
        except ValueError:
            raise MergelabError(f"{LIMIT_ENV}={os.environ[LIMIT_ENV]!r}: expected a number of GiB") from None
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


def plan_memory(n_params: int, n_experts: int, size: str, device: str) -> MemoryPlan:
    return MemoryPlan(size, device, needed_bytes(n_params, n_experts, device), available_bytes(device))


def require_fit(plan: MemoryPlan) -> None:
    if not plan.fits:
        raise MergelabError(f"not starting: {plan.describe()}. Use a larger machine, fewer experts per size, "
                            f"or raise {LIMIT_ENV} if the estimate is too cautious")
