"""Merge bandwidth: bytes of merged weights written per second by the merge step alone (no
evaluation), against a plain copy of the same tensors into the resident model, in one run.

    python bench/merge_bandwidth.py [--device cpu|cuda]
"""

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import best_of, demo_family  # noqa: E402


def main():
    import torch

    from mergelab.engine.session import ExpertPool, MergeSession, ResidentModel, merge_rank, pick_device
    from mergelab.io.family import load_family
    from mergelab.engine.methods import get_method

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = pick_device(args.device)
    size = load_family(demo_family()).sizes[-1]
    pool = ExpertPool.load(size, device)
    fresh = ExpertPool.load(size, device)  # raw task vectors for the direct-formula baseline
    resident = ResidentModel(pool.base_checkpoint, device)
    session = MergeSession(pool, resident)
    formula = MergeSession(fresh, resident)  # the direct-formula baseline writes through its own session
    nbytes = sum(p.numel() * p.element_size() for p in resident.params.values())
    experts = pool.expert_names
    subsets = sorted((s for k in range(1, len(experts) + 1) for s in itertools.combinations(experts, k)),
                     key=lambda s: merge_rank(s, experts))

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def copy():
        session.load_base()  # one copy of the whole model, as fast as a copy gets
        sync()

    t_copy = best_of(copy, 20)
    print(f"{size.name}: {size.n_params:,} params, {nbytes / 1e6:.2f} MB resident, device {device}")
    print(f"plain copy into the resident model: {nbytes / t_copy / 1e9:.2f} GB/s")
    print(f"all {len(subsets)} subsets in merge order (by k, then one swap per step), mean k "
          f"{sum(map(len, subsets)) / len(subsets):.1f}")
    for name in ("average", "task_arithmetic", "ties", "dare"):
        method = get_method(name)
        hp = method.resolve({})
        session.merge(method, hp, subsets[0])  # prepares TIES/DARE task vectors once, outside the timing

        def direct():
            for subset in subsets:
                formula.merge_formula(method, hp, subset)
            sync()

        def engine():
            for subset in subsets:
                session.merge(method, hp, subset)
            sync()

        t_direct = best_of(direct, 2) / len(subsets)
        t_engine = best_of(engine, 3) / len(subsets)
        print(f"{name:16s} engine {nbytes / t_engine / 1e9:6.2f} GB/s = {t_copy / t_engine:.2f} of copy "
              f"({t_engine * 1e3:.2f} ms/merge); direct formula {t_direct * 1e3:.2f} ms/merge; speed-up {t_direct / t_engine:.1f}x")


if __name__ == "__main__":
    main()
