"""Peak memory of a sweep against the (M + 3) × model-size budget, on a model large enough that
tensors, not the Python/torch runtime, dominate: a random 25M-parameter Qwen2 base with M = 4 experts
(base + noise), swept with average, ties and dare over all subsets. The runtime's own footprint is
measured in the same way and reported beside: a process that does what any sweep does besides holding
the engine's tensors (loads one model, evaluates it on the family's eval sets, caches the rows).

    python bench/sweep_memory.py
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

M = 4


def build(root: Path) -> Path:
    from transformers import Qwen2Config

    from common import noisy_family
    from mergelab.demo.domains import DOMAINS

    config = Qwen2Config(vocab_size=264, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    domains = DOMAINS[:M]  # experts are named by the domain they were tuned on
    return noisy_family(root, config, domains, domains, "memory", examples=10)


CHILD = """
import resource, sys, tempfile
from pathlib import Path
mode, manifest = sys.argv[1], sys.argv[2]
from mergelab.io.family import load_family
family = load_family(manifest)
if mode == "runtime":  # what any sweep process needs besides the engine's tensors
    from transformers import AutoTokenizer
    from mergelab.io.checkpoints import Checkpoint
    from mergelab.engine.session import ResidentModel
    from mergelab.engine.evaluate import METRIC_VERSION, evaluate, prepare_eval
    from mergelab.store import ResultStore
    size = family.sizes[0]
    resident = ResidentModel(Checkpoint(size.base), "cpu")
    data = prepare_eval(family.eval_sets, AutoTokenizer.from_pretrained(str(size.base)), family.token_budget)
    losses = evaluate(resident.model, data)
    ResultStore(Path(tempfile.mkdtemp()) / "r.duckdb").upsert([
        {"family": family.name, "size": size.name, "n_params": size.n_params, "method": "base", "hparams": "{}",
         "experts_key": "", "domain": d, "loss": loss, "n_tokens": data.n_tokens[d], "eval_hash": data.hashes[d],
         "metric_version": METRIC_VERSION, "device": "cpu"} for d, loss in losses.items()])
else:
    from mergelab.store import ResultStore
    from mergelab.sweep.plan import SweepSpec
    from mergelab.sweep.runner import run_sweep
    spec = SweepSpec(family, ["big"], {"average": {}, "ties": {}, "dare": {}}, [1, 2, 3, 4])
    run_sweep(spec, ResultStore(Path(tempfile.mkdtemp()) / "r.duckdb"), progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def peak(mode: str, manifest: Path) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(manifest)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    root = Path(tempfile.mkdtemp())
    manifest = build(root)
    from mergelab.io.family import load_family

    n_params = load_family(manifest).sizes[0].n_params
    model_mib = n_params * 4 / 2**20
    runtime, sweep = peak("runtime", manifest), peak("sweep", manifest)
    print(f"model: {n_params:,} params = {model_mib:.0f} MiB in fp32; M = {M} experts")
    print(f"peak RSS: sweep {sweep:.0f} MiB; runtime with one model loaded and evaluated {runtime:.0f} MiB")
    print(f"sweep minus runtime: {(sweep - runtime) / model_mib:.1f} model sizes beyond the one the runtime holds "
          f"(the engine holds M + 2 = {M + 2} in all: base, M task vectors, resident model; "
          f"budget M + 3 = {M + 3}, i.e. {M + 2} beyond it)")
    print(f"sweep peak / (runtime without its model + (M + 3) x model) = "
          f"{sweep / (runtime - model_mib + (M + 3) * model_mib):.2f} (target <= 1)")

if __name__ == "__main__":
    main()
