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


def noisy_family(root: Path, config, names, domains, family: str, dtype=None, examples: int = 8) -> Path:
    """A random base built from `config` (seed 0) and one expert per name (base + 0.01 Gaussian noise), saved with
    `save_pretrained` in `dtype` (default fp32), with one eval set of `examples` demo examples per expert's domain
    and a one-size manifest (size "big", token budget 16). Returns the manifest's path."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from mergelab.demo.domains import generate
    from mergelab.demo.tokenizer import save_tokenizer
    from mergelab.io.family import write_manifest

    dtype = dtype or torch.float32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(dtype).save_pretrained(str(root / "base"))
    save_tokenizer(root / "base")
    experts, evals = {}, {}
    (root / "eval").mkdir()
    for name, domain in zip(names, domains):
        model.to(torch.float32)
        with torch.no_grad():
            for key, p in model.named_parameters():
                p.copy_(state[key] + 0.01 * torch.randn_like(p))
        model.to(dtype).save_pretrained(str(root / name))
        experts[name], evals[name] = name, f"eval/{name}.jsonl"
        (root / evals[name]).write_text("".join(json.dumps(ex) + "\n" for ex in generate(domain, examples, 1)))
    n_params = sum(p.numel() for p in model.parameters())
    write_manifest(root / "family.toml", family, list(names), evals,
                   [{"name": "big", "n_params": n_params, "base": "base", "experts": experts}], token_budget=16)
    return root / "family.toml"
