"""Shared by the benchmarks: a demo family to measure on (built once into a cache dir) and timing."""

import os
import time
from pathlib import Path


def demo_family(preset: str = "standard", sizes=("m",)) -> Path:
    """The manifest of a demo family kept under MERGELAB_BENCH_DIR (default /tmp/mergelab-bench)."""
    from mergelab.demo.build import build_family

    root = Path(os.environ.get("MERGELAB_BENCH_DIR", "/tmp/mergelab-bench")) / f"{preset}-{'-'.join(sizes)}"
    if not (root / "family.toml").is_file():
        build_family(preset, root, sizes=list(sizes), force=True)
    return root / "family.toml"


def best_of(fn, repeat: int = 5) -> float:
    """Fastest of `repeat` runs, in seconds (the least disturbed by other work on the machine)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
