"""torch threads under CPU contention: a `mergelab sweep` of the micro demo family on the threads the
policy chooses (mergelab.engine.threads: one for these models) against torch's default (one per
core), while `--burners` CPU-bound processes compete for the cores. Prints the load average and
the ratio.

    PYTHONPATH=. python bench/threads.py [--burners 2] [--k 1-3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import demo_family  # noqa: E402


def burners(n: int) -> list[subprocess.Popen]:
    """`n` processes spinning on a core each: the other work of a shared machine."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def sweep(manifest: Path, k: str, env: dict) -> tuple[float, str]:
    """Wall seconds of one `mergelab sweep` into a fresh cache, and its summary line."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "mergelab", "sweep", "--family", str(manifest), "--methods",
                              "average", "--k", k, "--db", str(Path(tmp) / "r.duckdb"), "--device", "cpu"],
                             capture_output=True, text=True, env=env, check=True).stdout
        return time.perf_counter() - start, next(line for line in out.splitlines() if "merges evaluated" in line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burners", type=int, default=2, help="competing CPU-bound processes")
    parser.add_argument("--k", default="1-3", help="subset sizes swept (1-9 is the whole default plan)")
    args = parser.parse_args()
    manifest = demo_family("micro", sizes=("xs", "s"))
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MERGELAB_THREADS")}
    cores = len(os.sched_getaffinity(0))
    runs = {"policy (mergelab's choice)": base,
            f"torch default ({cores} threads, one per core)": dict(base, MERGELAB_THREADS=str(cores))}
    spinning = burners(args.burners)
    try:
        time.sleep(5)  # let the load average feel the burners
        print(f"{args.burners} CPU-bound processes competing on {cores} cores; load average {os.getloadavg()[0]:.2f}")
        seconds = {}
        for name, env in runs.items():
            seconds[name], line = sweep(manifest, args.k, env)
            print(f"{name}: {seconds[name]:.1f} s wall, load {os.getloadavg()[0]:.2f}: {line}")
    finally:
        for proc in spinning:
            proc.kill()
    policy, default = seconds.values()
    print(f"ratio default / policy: {default / policy:.1f}x")


if __name__ == "__main__":
    main()
