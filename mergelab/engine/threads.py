"""How many intra-op threads torch gets for merging and evaluating: the one home of that policy.

torch's default is one thread per core. For the small models mergelab sweeps on a CPU (the demo's
7K–822K parameters) the threads cost more than they bring, and on a busy machine they spin-wait on
each other: a 1,042-merge demo sweep took 1,112 s with the default two threads on a loaded 2-core
machine and 50 s on one (bench/threads.py measures 3–8× on a smaller sweep, bench/README.md). So: one
thread below SMALL_MODEL parameters, else one per PARAMS_PER_THREAD parameters up to the cores this
process may actually use (its CPU affinity and cgroup quota). MERGELAB_THREADS overrides the choice;
an OMP_NUM_THREADS the user set is respected. The demo build keeps its own single thread
(mergelab.demo.build.BUILD_THREADS): its checkpoints must be bitwise the same on any machine.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping

from mergelab.errors import MergelabError

THREADS_ENV = "MERGELAB_THREADS"
OMP_ENV = "OMP_NUM_THREADS"
SMALL_MODEL = 2_000_000        # parameters: below, one thread (matmuls too small to split profitably)
PARAMS_PER_THREAD = 2_000_000  # above SMALL_MODEL, one more thread per this many parameters


@dataclass(frozen=True)
class ThreadChoice:
    """The number of torch intra-op threads and why (one phrase, for logs and job messages)."""

    threads: int
    reason: str

    def __str__(self) -> str:
        return f"{self.threads} torch thread{'s' if self.threads != 1 else ''} ({self.reason})"


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity (os.sched_getaffinity), further capped by a
    cgroup v2 CPU quota (/sys/fs/cgroup/cpu.max) where one is set; at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def _positive(name: str, raw: str) -> int:
    if not raw.strip().isdigit() or int(raw) < 1:
        raise MergelabError(f"{name}={raw!r}: expected a positive whole number of threads (or unset it to let "
                            f"mergelab choose from the model size)")
    return int(raw)


def choose_threads(n_params: int, cores: int | None = None, environ: Mapping[str, str] | None = None) -> ThreadChoice:
    """The torch intra-op thread count for merging and evaluating a model of `n_params` parameters on
    `cores` cores (default: `available_cores()`).

    MERGELAB_THREADS in `environ` (default os.environ) wins; else a positive OMP_NUM_THREADS the user
    set; else 1 below SMALL_MODEL parameters, and ceil(n_params / PARAMS_PER_THREAD) capped at `cores`
    above. Raises MergelabError for a MERGELAB_THREADS that is not a positive whole number."""
    environ = os.environ if environ is None else environ
    if environ.get(THREADS_ENV, "").strip():
        threads = _positive(THREADS_ENV, environ[THREADS_ENV])
        return ThreadChoice(threads, f"{THREADS_ENV}={threads}")
    omp = environ.get(OMP_ENV, "").strip()
    if omp.isdigit() and int(omp) >= 1:
        return ThreadChoice(int(omp), f"{OMP_ENV}={int(omp)}")
    cores = available_cores() if cores is None else max(1, int(cores))
    if n_params < SMALL_MODEL:
        return ThreadChoice(1, f"{n_params:,} parameters: one thread for a model this small")
    threads = min(cores, math.ceil(n_params / PARAMS_PER_THREAD))
    return ThreadChoice(threads, f"{n_params:,} parameters, {cores} core{'s' if cores != 1 else ''} available")


def apply_threads(n_params: int, cores: int | None = None) -> ThreadChoice:
    """Set torch's intra-op threads for this process to `choose_threads(n_params, cores)`; returns the
    choice. Raises MergelabError as choose_threads does."""
    import torch

    choice = choose_threads(n_params, cores)
    torch.set_num_threads(choice.threads)
    return choice


@contextmanager
def torch_threads(n_params: int, cores: int | None = None) -> Iterator[ThreadChoice]:
    """`apply_threads` for the duration of the block, then torch's previous thread count again (a sweep
    run inside a longer-lived process, e.g. a test or a notebook, leaves its threads as they were)."""
    import torch

    before = torch.get_num_threads()
    choice = apply_threads(n_params, cores)
    try:
        yield choice
    finally:
        torch.set_num_threads(before)
