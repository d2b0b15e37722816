"""Evaluation throughput: mergelab's evaluate() against a plain loop of model(input_ids, labels=…)
per example on the same data (scored tokens per second), in one run.

    python bench/eval_throughput.py [--device cpu|cuda]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import best_of, demo_family  # noqa: E402


def main():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergelab.engine.session import pick_device, weight_dtype
    from mergelab.engine.evaluate import evaluate, load_eval_set, prepare_eval, tokenize_example
    from mergelab.io.family import load_family

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    device = pick_device(parser.parse_args().device)
    family = load_family(demo_family())
    size = family.sizes[-1]
    tokenizer = AutoTokenizer.from_pretrained(str(size.base))
    model = AutoModelForCausalLM.from_pretrained(str(size.base), dtype=weight_dtype(device)).to(device).eval()
    data = prepare_eval(family.eval_sets, tokenizer, family.token_budget).to(device)
    scored = sum(data.n_tokens.values())
    examples = []
    for domain, path in family.eval_sets.items():
        count = 0
        for ex in load_eval_set(path):
            ids, n_prompt = tokenize_example(tokenizer, ex["prompt"], ex["response"])
            labels = list(ids)
            labels[:n_prompt] = [-100] * n_prompt
            examples.append((torch.tensor([ids], device=device), torch.tensor([labels], device=device)))
            count += len(ids) - n_prompt
            if count >= family.token_budget:
                break

    def naive():
        with torch.no_grad():
            for ids, labels in examples:
                model(input_ids=ids, labels=labels).loss.item()

    def ours():
        evaluate(model, data)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    ours(), naive()
    t_ours, t_naive = best_of(ours, 5), best_of(naive, 3)
    print(f"{size.name}: {size.n_params:,} params, {scored:,} scored tokens in {len(examples)} examples, device {device}")
    print(f"mergelab evaluate: {scored / t_ours:,.0f} scored tokens/s ({t_ours * 1e3:.1f} ms per eval)")
    print(f"naive model(input_ids, labels) loop: {scored / t_naive:,.0f} scored tokens/s ({t_naive * 1e3:.1f} ms)")
    print(f"ratio {t_naive / t_ours:.1f}x (target >= 1.5x)")


if __name__ == "__main__":
    main()
