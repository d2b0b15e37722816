"""A tiny local downstream task per demo domain, for `mergelab sweep --downstream` (lm-evaluation-harness,
`mergelab[lmeval]`): multiple choice generated like the demo eval sets, readable with the hubs unreachable."""

from __future__ import annotations

import json
import random
from pathlib import Path

from mergelab.errors import MergelabError
from mergelab.sweep.downstream import TASK_PREFIX

TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_demo_tasks(folder: str | Path, domains, n_items: int = 32, seed: int = 0) -> list[str]:
    """Write one multiple-choice lm-eval task per demo domain (`domains`, names of mergelab.demo.domains)
    into `folder`: <task>.yaml and <task>.jsonl with `n_items` questions of 4 choices each. Returns the task
    names. Raises MergelabError for a domain the demo does not generate."""
    from mergelab.demo.domains import DOMAINS, generate

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for domain in domains:
        if domain not in DOMAINS:
            raise MergelabError(f"downstream task for {domain!r}: not a demo domain ({', '.join(DOMAINS)})")
        pool = generate(domain, 4 * n_items, seed + 1000)  # other draws than the eval sets' (seed 0..)
        rng = random.Random(f"mc:{domain}:{seed}")
        rows = []
        for example in pool[:n_items]:
            prompt, response = example["prompt"], example["response"]
            others = list(dict.fromkeys(e["response"] for e in pool if e["response"] != response))
            choices = [response, *rng.sample(others, 3)]
            rng.shuffle(choices)
            rows.append({"question": prompt, "choices": choices, "answer": choices.index(response)})
        task = f"{TASK_PREFIX}{domain}"
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"{task}.yaml").write_text(TASK_YAML.format(task=task, data=json.dumps(str(data.resolve()))))
        names.append(task)
    return names
