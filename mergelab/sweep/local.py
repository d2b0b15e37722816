"""The local backend of a sweep: every size on this machine, one after another."""

from __future__ import annotations

from typing import Iterator

from mergelab.engine.evaluate import EvalData
from mergelab.engine.memory import plan_memory, require_fit
from mergelab.engine.session import pick_device
from mergelab.io.family import Family
from mergelab.sweep.evaluator import SizeEvaluator
from mergelab.sweep.plan import WorkItem


def local_results(family: Family, todo: dict[str, list[WorkItem]], eval_data: dict[str, EvalData],
                   device: str | None, progress: bool, downstream=None) -> Iterator[tuple[WorkItem, list[dict]]]:
    """The local backend: one size after another on this machine. The memory plan of every size is
    checked here, before anything is loaded, so a sweep that cannot fit refuses with the numbers.
    `downstream` (mergelab.sweep.downstream.Downstream) adds lm-eval task rows to the merges it samples."""
    device = pick_device(device)
    sizes = [family.size(name) for name, items in todo.items() if items]
    plans = {size.name: plan_memory(size.n_params, len(size.experts), size.name, device) for size in sizes}
    for plan in plans.values():
        require_fit(plan)
    # one size alive at a time: each evaluator is dropped once its generator is exhausted
    return (row for size in sizes
            for row in SizeEvaluator(family.name, size, eval_data[size.name], device, progress,
                                     plans[size.name].store, downstream).evaluate(todo[size.name]))

