"""Downstream accuracy beside CE: lm-evaluation-harness tasks run on the resident merged model in memory
(`mergelab[lmeval]`, lm_eval's HFLM wraps the loaded model; nothing is written to disk or reloaded).

A task folder holds lm-eval task YAMLs over local JSONL files (the hubs may be unreachable);
`mergelab.demo.tasks.write_demo_tasks` writes one small multiple-choice task per demo domain, generated like the demo eval sets
(mergelab.demo.domains): the question is a prompt, the choices its response and three responses of other
prompts of the domain. A sweep given a `Downstream` writes, per merge it evaluates, one row per task:
domain = task name, metric = the task's metric (acc, higher is better, a fraction), eval hash = the hash of
the task's YAML and data, so a changed task makes its rows stale like a changed eval set.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from mergelab.errors import MergelabError

TASK_PREFIX = "mergelab_mc_"
METRIC = "acc"
VERSION = 1  # the metric_version of downstream rows: how lm-eval scores them here
INSTALL_HINT = "pip install 'mergelab[lmeval]' (lm_eval==0.4.13)"


@dataclass
class Downstream:
    """lm-eval tasks to run on merged models during a sweep: `folder` (task YAMLs, e.g. from
    mergelab.demo.tasks.write_demo_tasks), `tasks` (their names; default every YAML in the folder), `per_k` (0: every merge;
    N: the first N merges of each k in the sweep's order, to sample), `batch_size` and `limit` (items per
    task; None: all)."""

    folder: Path
    tasks: list[str] = field(default_factory=list)
    per_k: int = 0
    batch_size: int = 16
    limit: int | None = None

    def __post_init__(self):
        self.folder = Path(self.folder)
        if not self.folder.is_dir():
            raise MergelabError(f"--downstream {self.folder}: not a folder of lm-eval task YAMLs")
        found = sorted(p.stem for p in self.folder.glob("*.yaml"))
        if not found:
            raise MergelabError(f"--downstream {self.folder}: no task YAML in it (write the demo's with "
                                f"mergelab.demo.tasks.write_demo_tasks)")
        missing = [t for t in self.tasks if t not in found]
        if missing:
            raise MergelabError(f"--downstream task {missing[0]!r}: not in {self.folder} ({', '.join(found)})")
        self.tasks = list(self.tasks) or found
        if self.per_k < 0:
            raise MergelabError(f"--downstream-per-k {self.per_k}: expected 0 (every merge) or more")

    def hashes(self) -> dict[str, str]:
        """{task: hash of its YAML and of every local file next to it that the YAML names}."""
        out = {}
        for task in self.tasks:
            digest = hashlib.sha256()
            yaml_path = self.folder / f"{task}.yaml"
            digest.update(yaml_path.read_bytes())
            for data in sorted(self.folder.glob(f"{task}.*")):
                if data.suffix != ".yaml":
                    digest.update(data.read_bytes())
            out[task] = "lmeval:" + digest.hexdigest()[:16]
        return out


class Runner:
    """Runs a `Downstream` on one size's resident model: the tokenizer and lm-eval's task manager are made
    once, then `scores(model)` evaluates the model as it is in memory now. Raises MergelabError when
    lm_eval is not installed."""

    def __init__(self, spec: Downstream, tokenizer_path: str | Path, cache_dir: str | Path | None = None):
        try:
            import lm_eval  # noqa: F401
        except ImportError as exc:
            raise MergelabError(f"downstream tasks need lm-evaluation-harness: {INSTALL_HINT}") from exc
        from lm_eval.tasks import TaskManager
        from transformers import AutoTokenizer

        self.spec = spec
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
        self.tasks = TaskManager(include_path=str(spec.folder))
        self.hashes = spec.hashes()
        self.sampled: dict[int, int] = {}
        if cache_dir is not None:  # `datasets` caches the local JSON it reads; keep it out of the user's home
            os.environ.setdefault("HF_DATASETS_CACHE", str(cache_dir))

    def wants(self, k: int) -> bool:
        """Whether the next merge of `k` experts is evaluated (every one, or the first per_k of each k)."""
        if not self.spec.per_k:
            return True
        self.sampled[k] = self.sampled.get(k, 0) + 1
        return self.sampled[k] <= self.spec.per_k

    def scores(self, model) -> dict[str, tuple[float, int]]:
        """{task: (accuracy, items)} of `model` (a loaded transformers model, evaluated in place)."""
        import logging

        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=self.spec.batch_size,
                  device=str(next(model.parameters()).device))
        out = simple_evaluate(model=lm, tasks=list(self.spec.tasks), task_manager=self.tasks, limit=self.spec.limit,
                              log_samples=False, verbosity="ERROR", bootstrap_iters=0)
        results = {}
        for task in self.spec.tasks:
            got = out["results"][task]
            results[task] = (float(got[f"{METRIC},none"]), int(out.get("n-samples", {}).get(task, {}).get(
                "effective", got.get("sample_len", 0)) or 0))
        return results
