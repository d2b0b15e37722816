"""Memory placements (issue 16): a family whose all-in-memory fp32 plan exceeds MERGELAB_MEMORY_LIMIT_GB
by 4× swept under that limit (the plan streams the experts from disk), and host bytes per parameter of
each placement at M = 9, measured as (peak RSS − the runtime's) / parameters.

Checkpoints are bf16 (as released models are); models are a few million parameters so the run fits a
small machine: the Python/torch runtime (~0.3–0.5 GB) is measured on its own, by the same sweep of a
tiny model (a few thousand parameters), and subtracted. Every sweep runs in a fresh process on one torch
thread. Load average (1 min) is printed beside each timing.

    python bench/placement_memory.py            # ~5 min on 2 busy cores
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build(root: Path, m: int, hidden: int, layers: int) -> Path:
    """A random Qwen2 base and m experts (base + 0.01 noise), all stored in bf16, with m eval sets."""
    import torch
    from transformers import Qwen2Config

    from common import noisy_family
    from mergelab.demo.domains import DOMAINS

    config = Qwen2Config(vocab_size=264, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    domains = (DOMAINS * 2)[:m] if m > len(DOMAINS) else DOMAINS[:m]
    names = [f"{d}{i}" for i, d in enumerate(domains)]
    return noisy_family(root, config, names, domains, "placements", torch.bfloat16, examples=8)


CHILD = """
import json, resource, sys, tempfile, time
from pathlib import Path
manifest, methods, k_max = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
from mergelab.io.family import load_family
from mergelab.store import ResultStore
from mergelab.sweep.plan import SweepSpec
from mergelab.sweep.runner import run_sweep
family = load_family(manifest)
start = time.perf_counter()
report = run_sweep(SweepSpec(family, ["big"], {m: {} for m in methods}, list(range(1, k_max + 1)), reference_rows=False),
                   ResultStore(Path(tempfile.mkdtemp()) / "r.duckdb"), device="cpu", progress=False)
print(json.dumps({"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "merged": report.merged,
                  "seconds": time.perf_counter() - start, "plan": report.memory_plans["big"],
                  "n_params": family.sizes[0].n_params}))
"""


def sweep(manifest: Path, methods: str, k_max: int, placement: str | None = None, limit_gib: float | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MERGELAB_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("MERGELAB_PLACEMENT", None)
    env.pop("MERGELAB_MEMORY_LIMIT_GB", None)
    if placement:
        env["MERGELAB_PLACEMENT"] = placement
    if limit_gib:
        env["MERGELAB_MEMORY_LIMIT_GB"] = repr(limit_gib)
    out = subprocess.run([sys.executable, "-c", CHILD, str(manifest), methods, str(k_max)], env=env,
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["load"] = os.getloadavg()[0]
    return result


def main() -> None:
    from mergelab.engine.memory import HEADROOM, format_bytes, placement_bytes

    tmp = Path(tempfile.mkdtemp(prefix="placements-"))
    print(f"load average at start: {os.getloadavg()[0]:.1f}")
    runtime4 = sweep(build(tmp / "tiny4", 4, 16, 1), "average,task_arithmetic", 4)
    runtime9 = sweep(build(tmp / "tiny9", 9, 16, 1), "average,ties,dare", 2)
    print(f"runtime alone (the same sweep of a {runtime4['n_params']:,}-parameter model): peak RSS "
          f"{format_bytes(runtime4['rss'])} (M = 4), {format_bytes(runtime9['rss'])} (M = 9)")

    # 1. M = 4, all subsets, under a limit the in-memory fp32 plan exceeds 4×: the plan picks disk
    big = build(tmp / "big", 4, 320, 8)
    small = build(tmp / "small", 4, 160, 8)
    from mergelab.io.checkpoints import Checkpoint

    n = Checkpoint(big.parent / "base").n_params
    fp32_plan = int(HEADROOM * n * (4 + 2) * 4)  # before issue 16: base, M task vectors, resident, all fp32
    need = placement_bytes(n, 4, "cpu", "disk", expert_itemsize=2, base_itemsize=2, masks=False)[0]
    limit = fp32_plan / 4 / 2**30  # the fp32 plan exceeds it 4×; the disk plan (`need`) is below it
    assert need <= limit * 2**30
    print(f"\nmodel: {n:,} parameters, M = 4 bf16 experts; in-memory fp32 plan {format_bytes(fp32_plan)}; "
          f"MERGELAB_MEMORY_LIMIT_GB = {limit:.4f} ({format_bytes(int(limit * 2**30))}, {fp32_plan / (limit * 2**30):.2f}× "
          f"below the fp32 plan; the disk plan needs {format_bytes(need)})")
    limited = sweep(big, "average,task_arithmetic", 4, limit_gib=limit)
    print(f"under the limit: {limited['plan']}")
    print(f"  {limited['merged']} merges in {limited['seconds']:.1f} s, {limited['seconds'] / limited['merged'] * 1000:.0f} ms "
          f"per merge+eval (load {limited['load']:.1f}); peak RSS {format_bytes(limited['rss'])}, of which the runtime "
          f"{format_bytes(runtime4['rss'])}: the sweep's own {format_bytes(limited['rss'] - runtime4['rss'])} against "
          f"the limit {format_bytes(int(limit * 2**30))}")
    resident = sweep(big, "average,task_arithmetic", 4, placement="device")
    smaller = sweep(small, "average,task_arithmetic", 4, placement="device")
    scale = n / smaller["n_params"]
    per_merge = {name: r["seconds"] / r["merged"] for name, r in
                 (("disk", limited), ("device", resident), ("small", smaller))}
    print(f"  same model all in memory: {per_merge['device'] * 1000:.0f} ms per merge+eval (load {resident['load']:.1f}), "
          f"peak RSS {format_bytes(resident['rss'])}")
    print(f"  in memory, a {smaller['n_params']:,}-parameter model: {per_merge['small'] * 1000:.0f} ms, × {scale:.2f} "
          f"(size) = {per_merge['small'] * scale * 1000:.0f} ms (load {smaller['load']:.1f}); disk / that: "
          f"{per_merge['disk'] / (per_merge['small'] * scale):.2f}×; disk / the same model in memory: "
          f"{per_merge['disk'] / per_merge['device']:.2f}×")

    # 2. host bytes per parameter at M = 9, per placement, linear and ties/dare
    nine = build(tmp / "nine", 9, 256, 8)
    print("\nhost bytes per parameter at M = 9 ((peak RSS − runtime) / parameters; planned = placement_bytes "
          "without headroom):")
    print("| placement | methods | measured B/param | planned B/param | before issue 16 |")
    print("|---|---|---|---|---|")
    for placement in ("device", "disk"):
        for methods, masks in (("average", False), ("ties,dare", True)):
            r = sweep(nine, methods, 2, placement=placement)
            planned = placement_bytes(r["n_params"], 9, "cpu", placement, expert_itemsize=2, base_itemsize=2,
                                      masks=masks)[0] / HEADROOM / r["n_params"]
            print(f"| {placement} | {methods} | {(r['rss'] - runtime9['rss']) / r['n_params']:.1f} | {planned:.1f} | "
                  f"{4 * (9 + 2)} (fp32 base, 9 task vectors, resident) |")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - started:.0f} s")
