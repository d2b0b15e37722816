"""Evaluation like for like: `mergelab sweep` over every subset of the micro demo family's smallest
size (method average) against the plain in-process loop a user would write, scored tokens per second,
start-up included, in one run.

Both run as fresh processes on one torch thread, over the same eval rows (the family's eval sets, its
token budget and max_length) and the same subsets (no reference rows). The plain loop: load the base
with transformers and the experts' safetensors, then for each subset `load_state_dict` of the averaged
weights and one padded `model(input_ids, attention_mask, labels=…)` batch per domain (labels −100
outside the responses); its loss is the domain's mean response-token CE. The two must agree within
1e-4 nats on every (subset, domain).

    python bench/eval_vs_plain.py [--repeat 3] [--device cpu|cuda] [--size xs|s]

`--device cuda` runs both on the GPU (bf16 weights and sdpa attention for both, as a user would; the
CE then agrees within 1e-2, bf16 rounding differing with the batch shapes).
"""

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent


def plain_setup(family_path: str, device: str, size_name: str):
    """What a user's script does before its loop: load the base with transformers, the experts'
    safetensors, and one padded batch per domain (labels −100 outside the responses)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergelab.engine.evaluate import load_eval_set, tokenize_row  # the same rows as the sweep
    from mergelab.io.family import load_family

    torch.set_num_threads(1)
    family = load_family(family_path)
    size = family.size(size_name)
    tokenizer = AutoTokenizer.from_pretrained(str(size.base))
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(size.base), dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    experts = {name: load_file(str(Path(path) / "model.safetensors"), device=device)
               for name, path in size.experts.items()}
    batches, n_scored = {}, 0
    for domain, path in family.eval_sets.items():
        rows, scored = [], 0
        for example in load_eval_set(path):
            ids, n_prompt = tokenize_row(tokenizer, example, Path(path))
            ids = ids[:family.max_length]
            if len(ids) - max(n_prompt, 1) <= 0:
                continue
            rows.append((ids, n_prompt))
            scored += len(ids) - max(n_prompt, 1)
            if scored >= family.token_budget:
                break
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id or 0, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, -100)
        for r, (ids, n_prompt) in enumerate(rows):
            input_ids[r, :len(ids)] = torch.tensor(ids)
            attention[r, :len(ids)] = 1
            labels[r, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
        batches[domain] = (input_ids.to(device), attention.to(device), labels.to(device))
        n_scored += scored
    return model, experts, batches, n_scored


def plain_subsets(model, experts, batches) -> dict:
    """The plain loop itself: for each subset, load_state_dict of the averaged weights, then one padded
    forward with labels per domain. Returns {"a,b": {domain: loss}}."""
    import torch

    names = list(experts)
    results = {}
    with torch.no_grad():
        for k in range(1, len(names) + 1):
            for subset in itertools.combinations(names, k):
                averaged = {key: sum(experts[e][key].float() for e in subset) / len(subset)
                            for key in experts[subset[0]]}
                model.load_state_dict(averaged, strict=False)  # tied lm_head: not in the files
                results[",".join(sorted(subset))] = {
                    domain: model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
                    for domain, (ids, mask, labels) in batches.items()}
    return results


def plain_loop(family_path: str, out: str, device: str, size_name: str) -> None:
    """The plain loop as its own program: writes the losses, the scored-token count and its CPU seconds
    before the loop (start-up) and in it."""
    model, experts, batches, n_scored = plain_setup(family_path, device, size_name)
    started = time.process_time()
    results = plain_subsets(model, experts, batches)
    looped = time.process_time() - started
    Path(out).write_text(json.dumps({"losses": results, "scored_per_eval": n_scored, "startup_cpu": started,
                                     "loop_cpu": looped}))


def steady_state(manifest, device: str, size_name: str) -> tuple[float, float, float, int]:
    """CPU seconds of the plain loop's subset loop, of the sweep's merge+evaluate loop over the same
    subsets (SizeEvaluator, no cache writes) and of that loop on padded batches (packing switched off:
    the evaluator before packing), all in this process after their set-up; and the count."""
    import torch

    from mergelab.engine.evaluate import _PACKING
    from mergelab.engine.methods import get_method
    from mergelab.io.family import load_family
    from mergelab.engine.methods.base import canonical_hparams
    from mergelab.sweep.evaluator import SizeEvaluator
    from mergelab.sweep.plan import WorkItem
    from mergelab.sweep.runner import _prepare_size_eval

    torch.set_num_threads(1)
    family = load_family(manifest)
    size = family.size(size_name)
    model, experts, batches, _ = plain_setup(str(manifest), device, size_name)
    hp = canonical_hparams(get_method("average").resolve({}))
    items = [WorkItem(size.name, "average", hp, s) for k in range(1, len(experts) + 1)
             for s in itertools.combinations(size.expert_names, k)]
    evaluator = SizeEvaluator(family.name, size, _prepare_size_eval(family, size), device)
    plain_subsets(model, experts, {d: b for d, b in list(batches.items())[:1]})  # warm both up
    list(evaluator.evaluate(items[:20]))
    start = time.process_time()
    plain_subsets(model, experts, batches)
    t_plain = time.process_time() - start
    start = time.process_time()
    for _ in evaluator.evaluate(items):
        pass
    t_ours = time.process_time() - start
    _PACKING[evaluator.resident.model] = False
    start = time.process_time()
    for _ in evaluator.evaluate(items):
        pass
    t_padded = time.process_time() - start
    return t_plain, t_ours, t_padded, len(items)


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one child process."""
    start, before = time.perf_counter(), os.times()
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    seconds, after = time.perf_counter() - start, os.times()
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return seconds, (after.children_user - before.children_user) + (after.children_system - before.children_system)


def sweep_losses(db: Path, family_name: str) -> dict:
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    rows = con.execute("SELECT experts_key, domain, loss FROM results WHERE family = ? AND method = 'average'",
                       [family_name]).fetchall()
    con.close()
    out: dict = {}
    for key, domain, loss in rows:
        out.setdefault(",".join(sorted(key.split("+"))), {})[domain] = loss
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3, help="runs of each (the fastest counts)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default="xs", help="micro family size: xs (the smallest, the issue's case) or s")
    parser.add_argument("--plain", nargs=2, metavar=("FAMILY", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        return plain_loop(*args.plain, args.device, args.size)

    from common import demo_family
    from mergelab.io.family import load_family

    manifest = demo_family("micro", ("xs",) if args.size == "xs" else ("xs", args.size))
    family = load_family(manifest)
    size = family.size(args.size)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MERGELAB_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    load_before = os.getloadavg()
    t_plain_loop, t_ours_loop, t_padded_loop, n_items = steady_state(manifest, args.device, size.name)
    t_sweep, t_plain = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.repeat):
            db = Path(tmp) / f"sweep{run}.duckdb"
            t_sweep.append(timed([sys.executable, "-m", "mergelab", "sweep", "--family", str(manifest), "--sizes",
                                  size.name, "--methods", "average", "--no-reference", "--device", args.device,
                                  "--db", str(db)], env))
            out = Path(tmp) / "plain.json"
            t_plain.append(timed([sys.executable, __file__, "--device", args.device, "--size", size.name, "--plain", str(manifest),
                                  str(out)], env))
        plain = json.loads(out.read_text())
        ours = sweep_losses(db, family.name)
    assert set(ours) == set(plain["losses"]), "the sweep and the plain loop scored different subsets"
    tolerance = 1e-4 if args.device == "cpu" else 1e-2  # bf16 forwards on a GPU round differently per batch shape
    worst = max(abs(ours[s][d] - loss) for s, losses in plain["losses"].items() for d, loss in losses.items())
    n_evals, per_eval = len(plain["losses"]), plain["scored_per_eval"]
    tokens = n_evals * per_eval
    load_after = os.getloadavg()
    print(f"size {size.name} ({size.n_params:,} params), {n_evals} subsets (average) x {per_eval:,} scored tokens "
          f"({len(family.domains)} domains, budget {family.token_budget}, max_length {family.max_length}), "
          f"device {args.device}, 1 torch thread, best of {args.repeat}")

    def line(name, runs):
        wall, cpu = min(r[0] for r in runs), min(r[1] for r in runs)
        print(f"{name}: {wall:.2f} s wall ({tokens / wall:,.0f} scored tokens/s), {cpu:.2f} s CPU "
              f"({tokens / cpu:,.0f} tokens/CPU-s); runs {', '.join(f'{w:.2f}/{c:.2f}' for w, c in runs)} s wall/CPU")
        return wall, cpu

    print("end to end, process start-up included:")
    sweep_wall, sweep_cpu = line("  mergelab sweep", t_sweep)
    plain_wall, plain_cpu = line("  plain loop (load_state_dict + one padded batch per domain)", t_plain)
    print(f"  ratio {plain_wall / sweep_wall:.2f}x wall, {plain_cpu / sweep_cpu:.2f}x CPU (target >= 2x on CPU); "
          f"plain start-up {plain['startup_cpu']:.2f} s CPU + loop {plain['loop_cpu']:.2f} s CPU")
    print(f"steady state, in one process after set-up ({n_items} merges each, CPU seconds):")
    print(f"  sweep merge+evaluate: {t_ours_loop:.2f} s ({t_ours_loop / n_items * 1e3:.2f} ms per merge+eval, "
          f"{n_items * per_eval / t_ours_loop:,.0f} tokens/s); plain loop {t_plain_loop:.2f} s "
          f"({t_plain_loop / n_items * 1e3:.2f} ms per subset): ratio {t_plain_loop / t_ours_loop:.2f}x")
    print(f"  the same loop on padded batches (packing off): {t_padded_loop:.2f} s "
          f"({t_padded_loop / n_items * 1e3:.2f} ms per merge+eval): packing gains {t_padded_loop / t_ours_loop:.2f}x")
    print(f"largest |CE difference| sweep vs plain loop: {worst:.2e} nats (must be <= {tolerance:g})")
    print(f"load average before {load_before[0]:.2f} / after {load_after[0]:.2f} (1 min), "
          f"{load_after[1]:.2f} (5 min), on {os.cpu_count()} cores")
    if worst > tolerance:
        sys.exit(f"CE differs from the plain loop by more than {tolerance:g} nats")


if __name__ == "__main__":
    main()
