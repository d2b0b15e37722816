"""Evaluating one size's merges: its task vectors and resident model loaded once, then every planned
merge (and reference row) merged, evaluated and turned into cache rows. The local backend and each
Ray actor run one of these."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Iterator

from mergelab.engine.evaluate import METRIC_VERSION, EvalData, evaluate
from mergelab.engine.methods import get_method
from mergelab.engine.session import ExpertPool, MergeSession, ResidentModel
from mergelab.io.family import SizeSpec
from mergelab.names import BASE, EXPERT, experts_key
from mergelab.sweep.plan import WorkItem, merge_order


FINITE_CHUNK = 1 << 20  # weights checked per step: isfinite makes an |x| temporary (4 MiB fp32) and bools, whatever the model's size


@dataclass(frozen=True)
class NotFinite:
    """What `SizeEvaluator.evaluate` yields instead of rows for a merge whose weights or losses are not
    finite (a diverging hyperparameter such as ties λ = 1e30): no row of it may reach the cache, and
    it must cost no other merge its rows. `reason` is one line naming the merge and what went wrong."""

    reason: str


def merge_label(item: WorkItem) -> str:
    """One merge as messages name it: 'ties density=0.2 lambda=1e+30 {alpha,beta} (size s)'."""
    hparams = " ".join(f"{k}={v}" for k, v in json.loads(item.hparams).items())
    return f"{item.method}{' ' + hparams if hparams else ''} {{{','.join(item.subset)}}} (size {item.size})"


def non_finite_weights(layout, flat) -> str | None:
    """None when every weight in the flat buffer is finite, else how many are not and the first tensor
    holding one. Checked in chunks of FINITE_CHUNK entries, with one device sync unless one is found."""
    import torch

    ok = torch.ones((), dtype=torch.bool, device=flat.device)
    for lo in range(0, flat.numel(), FINITE_CHUNK):
        ok &= torch.isfinite(flat[lo:lo + FINITE_CHUNK]).all()
    if bool(ok):
        return None
    count, first = 0, None
    for name, view in layout.views(flat).items():
        n = int((~torch.isfinite(view)).sum())
        count, first = count + n, first or (name if n else None)
    return f"merged weights hold {count:,} non-finite values (first in tensor {first!r})"


def non_finite_losses(losses: dict[str, float]) -> str | None:
    """None when every domain's loss is finite, else which domains' are not and their values."""
    by_value: dict[str, list[str]] = {}
    for domain, loss in losses.items():
        if not math.isfinite(loss):
            by_value.setdefault("NaN" if math.isnan(loss) else str(loss), []).append(repr(domain))
    if not by_value:
        return None
    return "loss is " + ", ".join(f"{value} on domain{'s' if len(ds) > 1 else ''} {', '.join(ds)}"
                                  for value, ds in by_value.items())


class SizeEvaluator:
    """One size's experts and resident model, loaded once (where `store` and `devices` say: a memory
    plan's placement, `mergelab.engine.memory`), then evaluating any list of that size's
    WorkItems (in `merge_order`) and yielding each merge's rows. The local backend makes one per size;
    each Ray actor holds one and feeds it chunks of the plan."""

    def __init__(self, family_name: str, size: SizeSpec, data: EvalData, device: str, progress: bool = False,
                 store: str | None = None, devices: list[str] | None = None, downstream=None):
        from mergelab.bars import progress_bar

        self.family_name, self.size, self.device, self.data = family_name, size, device, data.to(device)
        with progress_bar(len(size.experts), f"load {size.name}", unit="expert", disable=not progress) as loading:
            self.pool = ExpertPool.load(size, device, progress=loading, store=store, shards=devices)
        self.resident = ResidentModel(self.pool.base_checkpoint, device, self.pool.shards)
        self.session = MergeSession(self.pool, self.resident)
        # lm-eval tasks on the resident model as it is after each merge (mergelab.sweep.downstream)
        self.downstream = None
        if downstream is not None:
            from mergelab.sweep.downstream import Runner

            self.downstream = Runner(downstream, size.base)

    def evaluate(self, items: list[WorkItem]) -> Iterator[tuple[WorkItem, "list[dict] | NotFinite"]]:
        """Merge and evaluate each item; yield (item, its rows), or (item, NotFinite) for a merge whose
        weights or losses are not finite (nothing of it is evaluated further or cached)."""
        for item in merge_order(items, self.pool.expert_names):
            if item.method == BASE:
                self.session.load_base()
            elif item.method == EXPERT:
                self.session.load_expert(item.subset[0])
            else:
                self.session.merge(get_method(item.method), json.loads(item.hparams), item.subset)
            problem = next(filter(None, (non_finite_weights(part, flat) for part, flat in self.resident.parts)), None)
            if problem is None:
                losses = evaluate(self.resident.model, self.data)
                problem = non_finite_losses(losses)
            if problem is not None:
                self.session.discard()  # so one diverging merge costs no other merge its rows
                yield item, NotFinite(f"{merge_label(item)}: {problem}")
                continue
            rows = [self._row(item, domain, loss) for domain, loss in losses.items()]
            if self.downstream is not None and self.downstream.wants(len(item.subset)):
                rows += self._downstream_rows(item)
            yield item, rows

    def _downstream_rows(self, item: WorkItem) -> list[dict]:
        """One row per lm-eval task of the merge in memory: its accuracy, a higher-is-better fraction."""
        from mergelab.sweep.downstream import METRIC, VERSION

        rows = []
        for task, (value, n) in self.downstream.scores(self.resident.model).items():
            row = self._row(item, task, value)
            row.update(n_tokens=n, eval_hash=self.downstream.hashes[task], metric_version=VERSION, n_truncated=None,
                       metric=METRIC, higher_better=True, unit="fraction")
            rows.append(row)
        return rows

    def _row(self, item: WorkItem, domain: str, loss: float) -> dict:
        return {"family": self.family_name, "size": self.size.name, "n_params": self.size.n_params,
                "method": item.method, "hparams": item.hparams, "experts_key": experts_key(item.subset),
                "domain": domain, "loss": loss, "n_tokens": self.data.n_tokens.get(domain, 0),
                "eval_hash": self.data.hashes.get(domain, ""), "metric_version": METRIC_VERSION, "device": self.device,
                "n_truncated": self.data.n_truncated.get(domain)}

