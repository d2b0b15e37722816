"""What fingerprinting a checkpoint costs (mergelab.io.fingerprint), against the strongest simple thing a
user would write: sha256 over every file of the checkpoint directory.

Writes safetensors checkpoints shaped like real ones (bf16; ~290 tensors for 1 GB as Qwen2.5-0.5B, 339
in 4 shards for 15 GB as Qwen2.5-7B), then times both, cold (page cache dropped, when permitted) and
warm. Prints seconds, bytes read and the ratio.

    python bench/fingerprint_cost.py --gb 1 15 --dir /tmp/fpbench
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

SHARD_BYTES = 5 * 2**30
LAYOUTS = {1: (290, 1), 15: (339, 4)}  # GB -> (tensors, shards)


def write_checkpoint(path: Path, gb: float) -> None:
    import numpy as np

    tensors, shards = LAYOUTS.get(int(gb), (max(8, int(gb * 25)), max(1, int(gb // 5) + 1)))
    per_tensor = int(gb * 2**30 / tensors) // 2 * 2
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": 1000}))
    block = np.random.default_rng(0).integers(0, 255, 64 * 2**20, dtype=np.uint8).tobytes()
    weight_map, names = {}, [f"model.layers.{i}.weight" for i in range(tensors)]
    for s in range(shards):
        mine = names[s::shards]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {}, 0
        for name in mine:
            header[name] = {"dtype": "BF16", "shape": [per_tensor // 2], "data_offsets": [offset, offset + per_tensor]}
            offset += per_tensor
            weight_map[name] = file
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(path / file, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            left = offset
            while left:
                f.write(block[: min(left, len(block))])
                left -= min(left, len(block))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def sha256_dir(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        with open(file, "rb") as f:
            while chunk := f.read(16 * 2**20):
                digest.update(chunk)
    return digest.hexdigest()


def timed(fn, cold: bool) -> float:
    if cold:
        drop_caches()
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    from mergelab.io import fingerprint

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, nargs="+", default=[1.0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/fpbench"))
    args = parser.parse_args()
    cold = drop_caches()
    print(f"load average {os.getloadavg()[0]:.2f}; page cache {'dropped before each cold run' if cold else 'NOT droppable: cold = warm'}")
    for gb in args.gb:
        path = args.dir / f"{gb:g}gb"
        write_checkpoint(path, gb)
        size = sum(f.stat().st_size for f in path.iterdir())
        tensors = len(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"])
        for label, is_cold in (("cold", True), ("warm", False)):
            fingerprint._CACHE.clear()
            ours = timed(lambda: fingerprint.checkpoint_fingerprint(path), is_cold)
            full = timed(lambda: sha256_dir(path), is_cold)
            print(f"{size / 2**30:6.2f} GiB, {tensors} tensors, {label}: fingerprint {ours * 1e3:8.1f} ms "
                  f"(reads {3 * 4 * tensors / 1024:.1f} MiB of samples) · sha256 of every file {full:7.2f} s · "
                  f"ratio {full / ours:,.0f}×")
        shutil.rmtree(path)


if __name__ == "__main__":
    main()
