"""End to end against the peers' pipeline, on the same family and subsets:

(a) peers: one `mergekit-yaml` process per subset writing a merged model to disk, then a plain
    transformers evaluation that loads it and runs model(input_ids, labels=…) per example;
    timed on a sample of subsets and extrapolated per merge;
(b) mergelab: `mergelab sweep` (one process, in-memory merges, batched evaluation) over every subset.

It also checks that mergelab's average and TIES merges equal mergekit's where the definitions
coincide: `linear` with equal weights and normalize: true is the average; `ties` with weight 1,
normalize: true and density 1.0 (no trimming, so no rounding of the kept count) is our TIES with
density 1.0. With density < 1 mergekit keeps int(density·n) entries per tensor and we keep
ceil(density·n) (at least one): the fraction of entries that differ is reported.

mergekit is a benchmark-only dependency; install it beside torch in its own venv:
    python3 -m venv .venv-mergekit && .venv-mergekit/bin/pip install torch==2.13.0 mergekit==0.1.5
    python bench/sweep_vs_mergekit.py [--mergekit .venv-mergekit/bin/mergekit-yaml] [--sample 4]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import demo_family  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def mergekit_config(method: str, size, subset, density: float) -> str:
    from mergelab.engine.materialise import mergekit_yaml

    return mergekit_yaml(size, method, {"density": density} if method == "ties" else {}, subset)


def run_mergekit(binary: str, config: str, out: Path) -> float:
    cfg = out.with_suffix(".yml")
    cfg.write_text(config)
    start = time.perf_counter()
    subprocess.run([binary, str(cfg), str(out), "--no-write-model-card", "--allow-crimes"], check=True,
                   env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True)
    return time.perf_counter() - start


def naive_eval(model_dir: Path, family, tokenizer) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from mergelab.engine.evaluate import load_eval_set, tokenize_example

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        for path in family.eval_sets.values():
            count = 0
            for ex in load_eval_set(path):
                ids, n_prompt = tokenize_example(tokenizer, ex["prompt"], ex["response"])
                labels = list(ids)
                labels[:n_prompt] = [-100] * n_prompt
                model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
                count += len(ids) - n_prompt
                if count >= family.token_budget:
                    break
    return time.perf_counter() - start


def ours_weights(size, method: str, subset, density: float):
    from mergelab.engine.session import ExpertPool, MergeSession, ResidentModel
    from mergelab.engine.methods import get_method

    pool = ExpertPool.load(size)
    resident = ResidentModel(pool.base_checkpoint, "cpu")
    m = get_method(method)
    MergeSession(pool, resident).merge(m, m.resolve({"density": density} if method == "ties" else {}), subset)
    return {n: p.detach().clone() for n, p in resident.params.items()}


def compare(size, method, subset, density, out: Path) -> tuple[float, float]:
    """(max |Δw| over all tensors, fraction of entries that differ by more than 1e-6)."""
    from safetensors.torch import load_file

    theirs = {}
    for f in sorted(out.glob("*.safetensors")):
        theirs.update(load_file(f))
    ours = ours_weights(size, method, subset, density)
    worst, differ, total = 0.0, 0, 0
    for name, t in ours.items():
        d = (t - theirs[name].float()).abs()
        worst, differ, total = max(worst, d.max().item()), differ + int((d > 1e-6).sum()), total + d.numel()
    return worst, differ / total


def main():
    from transformers import AutoTokenizer

    from mergelab.io.family import load_family
    from mergelab.sweep.plan import plan_subsets

    parser = argparse.ArgumentParser()
    parser.add_argument("--mergekit", default=str(ROOT / ".venv-mergekit" / "bin" / "mergekit-yaml"))
    parser.add_argument("--sample", type=int, default=4, help="subsets per method for the peers' pipeline")
    args = parser.parse_args()
    manifest = demo_family()
    family = load_family(manifest)
    size = family.sizes[-1]
    tokenizer = AutoTokenizer.from_pretrained(str(size.base))
    experts = size.expert_names
    sample = plan_subsets(experts, [2, 3, 5, 7, 9], subsets=1, seed=0)[: args.sample]
    tmp = Path(tempfile.mkdtemp())
    print(f"family {family.name}, size {size.name} ({size.n_params:,} params), {len(experts)} experts")

    peer = {}
    for method in ("average", "ties"):
        times = []
        for i, subset in enumerate(sample):
            out = tmp / f"{method}-{i}"
            t_merge = run_mergekit(args.mergekit, mergekit_config(method, size, subset, 0.2), out)
            t_eval = naive_eval(out, family, tokenizer)
            times.append(t_merge + t_eval)
        peer[method] = sum(times) / len(times)
        print(f"peers ({method}): {peer[method]:.2f} s per merge+eval (mergekit-yaml process + load + plain eval, "
              f"mean of {len(times)})")

    db = tmp / "ours.duckdb"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mergelab", "sweep", "--family", str(manifest), "--methods", "average,ties",
                    "--db", str(db), "--no-reference", "--device", "cpu"], check=True, capture_output=True)
    total = time.perf_counter() - start
    n = 2 * (2 ** len(experts) - 1)
    ours = total / n
    print(f"mergelab sweep: {n} merges (all subsets, average + ties) in {total:.1f} s, process start included: "
          f"{ours * 1e3:.0f} ms per merge+eval")
    print(f"ratio: {sum(peer.values()) / len(peer) / ours:.0f}x faster end to end (target >= 20x)")

    for method, density in (("average", 1.0), ("ties", 1.0), ("ties", 0.2)):
        subset = sample[-1]
        out = tmp / f"check-{method}-{density}"
        run_mergekit(args.mergekit, mergekit_config(method, size, subset, density), out)
        worst, frac = compare(size, method, subset, density, out)
        print(f"agreement with mergekit, {method} density {density} on {'+'.join(subset)}: max |Δw| = {worst:.2e}, "
              f"entries differing > 1e-6: {frac:.4%}")
    print(json.dumps({"peer_s_per_merge": peer, "mergelab_s_per_merge": ours}))


if __name__ == "__main__":
    main()
