"""Merge cost per method: seconds of the merge step alone (no evaluation) per merge, on the demo
`standard` family's size m (with --synthetic: a random model of exactly that architecture and parameter
count, its 9 experts = base + noise, since training the demo family takes ~an hour on 2 cores; merge
cost depends on shapes, not on trained values), a sample of subsets in merge order, through the sweep engine
(`MergeSession.merge`: prepared once, incremental swaps for linear methods, chunked or whole-tensor
combine for the rest), and whether the method is incremental. The one-off per-expert `prepare`
is timed apart. Prints the machine's load average, since the container's 2 cores are shared.

    python bench/methods_cost.py [--synthetic] [--device cpu|cuda] [--subsets N] [--methods a,b]
"""

import argparse
import itertools
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import demo_family  # noqa: E402

DOMAINS = ("algebra", "analysis", "geometry", "discrete", "number_theory", "code", "chemistry", "physics", "biology")


def synthetic_size(root: Path):
    """A SizeSpec like the standard demo's m: its Qwen2 config (mergelab.demo.build), random weights,
    9 experts = base + 0.02·N(0, 1) per weight; saved once under `root`."""
    import torch
    from transformers import AutoModelForCausalLM

    from mergelab.demo.build import PRESETS
    from mergelab.io.family import SizeSpec

    config = next(s for s in PRESETS["standard"].sizes if s.name == "m").qwen2_config()
    experts = {d: root / "experts" / d for d in DOMAINS}
    if not (root / "experts" / DOMAINS[-1] / "model.safetensors").is_file():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(root / "base")
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for domain, path in experts.items():
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(state[name] + 0.02 * torch.randn_like(p))
            model.save_pretrained(path)
    return SizeSpec("m", None, root / "base", experts, "refuse", root / "family.toml")


def main():
    import torch

    from mergelab.engine.methods import METHODS, get_method, incremental
    from mergelab.engine.session import ExpertPool, MergeSession, ResidentModel, merge_rank, pick_device
    from mergelab.io.family import load_family

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--subsets", type=int, default=60, help="subsets merged per method (a random sample of "
                                                                  "all, in merge order)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--synthetic", action="store_true", help="a random model of size m's shapes instead of the "
                                                                   "trained demo family")
    args = parser.parse_args()
    device = pick_device(args.device)
    bench_dir = Path(os.environ.get("MERGELAB_BENCH_DIR", "/tmp/mergelab-bench"))
    size = (synthetic_size(bench_dir / "synthetic-standard-m") if args.synthetic
            else load_family(demo_family("standard", ("m",))).size("m"))
    pool = ExpertPool.load(size, device)
    resident = ResidentModel(pool.base_checkpoint, device)
    session = MergeSession(pool, resident)
    experts = pool.expert_names
    every = [s for k in range(1, len(experts) + 1) for s in itertools.combinations(experts, k)]
    subsets = sorted(random.Random(0).sample(every, min(args.subsets, len(every))),
                     key=lambda s: merge_rank(s, experts))
    print(f"size m: {size.n_params:,} parameters, {len(experts)} experts, device {device}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{len(subsets)} of {len(every)} subsets in merge order, mean k {sum(map(len, subsets)) / len(subsets):.1f}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    print(f"| method | incremental | prepare once (s) | merge step per merge (ms) |")
    print("|---|---|---|---|")
    for name in args.methods.split(","):
        method = get_method(name)
        hp = method.resolve({})
        start = time.perf_counter()
        pool.ready_for(method, hp)  # the one-off per-expert transform (re-reads raw vectors if needed)
        sync()
        prepare = time.perf_counter() - start
        session.merge(method, hp, subsets[0])  # warm
        start = time.perf_counter()
        for subset in subsets:
            session.merge(method, hp, subset)
        sync()
        per_merge = (time.perf_counter() - start) / len(subsets)
        print(f"| {name} | {'yes' if incremental(method) else 'no'} | {prepare:.2f} | {per_merge * 1e3:.1f} |")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
