"""Evaluating one size's merges: its task vectors and resident model loaded once, then every planned
merge (and reference row) merged, evaluated and turned into cache rows. The local backend and each
Ray actor run one of these."""

from __future__ import annotations

import json
from typing import Iterator

from mergelab.engine.evaluate import METRIC_VERSION, EvalData, evaluate
from mergelab.engine.methods import get_method
from mergelab.engine.session import ExpertPool, MergeSession, ResidentModel
from mergelab.io.family import SizeSpec
from mergelab.names import BASE, EXPERT, experts_key
from mergelab.sweep.plan import WorkItem, merge_order


class SizeEvaluator:
    """One size's task vectors and resident model, loaded once, then evaluating any list of that size's
    WorkItems (in `merge_order`) and yielding each merge's rows. The local backend makes one per size;
    each Ray actor holds one and feeds it chunks of the plan."""

    def __init__(self, family_name: str, size: SizeSpec, data: EvalData, device: str, progress: bool = False,
                 store: str | None = None):
        from tqdm.auto import tqdm

        self.family_name, self.size, self.device, self.data = family_name, size, device, data.to(device)
        with tqdm(total=len(size.experts), desc=f"load {size.name}", unit="expert",
                  disable=not progress, leave=False) as loading:
            self.pool = ExpertPool.load(size, device, progress=loading, store=store)
        self.resident = ResidentModel(self.pool.base_checkpoint, device)
        self.session = MergeSession(self.pool, self.resident)

    def evaluate(self, items: list[WorkItem]) -> Iterator[tuple[WorkItem, list[dict]]]:
        for item in merge_order(items, self.pool.expert_names):
            if item.method == BASE:
                self.session.load_base()
            elif item.method == EXPERT:
                self.session.load_expert(item.subset[0])
            else:
                self.session.merge(get_method(item.method), json.loads(item.hparams), item.subset)
            losses = evaluate(self.resident.model, self.data)
            yield item, [self._row(item, domain, loss) for domain, loss in losses.items()]

    def _row(self, item: WorkItem, domain: str, loss: float) -> dict:
        return {"family": self.family_name, "size": self.size.name, "n_params": self.size.n_params,
                "method": item.method, "hparams": item.hparams, "experts_key": experts_key(item.subset),
                "domain": domain, "loss": loss, "n_tokens": self.data.n_tokens[domain],
                "eval_hash": self.data.hashes[domain], "metric_version": METRIC_VERSION, "device": self.device,
                "n_truncated": self.data.n_truncated[domain]}

