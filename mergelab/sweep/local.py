"""The local backend of a sweep: every size on this machine, one after another."""

from __future__ import annotations

from typing import Iterator

from mergelab.engine.evaluate import EvalData
from mergelab.engine.memory import MemoryPlan, plan_memory, require_fit
from mergelab.engine.session import pick_device
from mergelab.io.family import Family, SizeSpec
from mergelab.sweep.evaluator import SizeEvaluator
from mergelab.sweep.plan import WorkItem


def size_plan(size: SizeSpec, items: list[WorkItem], device: str, host_share: float = 1.0) -> MemoryPlan:
    """The memory plan of sweeping `items` of `size` on `device` (`plan_memory`): the base's and experts'
    stored dtypes read from their safetensors headers, keep bits counted when a method gives a keep mask,
    dense prepared vectors when one has a prepare without it."""
    from mergelab.engine.methods import METHODS
    from mergelab.engine.session import stored_itemsizes

    base_itemsize, expert_itemsizes = stored_itemsizes(size)
    methods = [METHODS[item.method] for item in items if item.method in METHODS]
    return plan_memory(size.n_params, len(size.experts), size.name, device, host_share,
                       expert_itemsize=sum(expert_itemsizes) / max(1, len(expert_itemsizes)),
                       base_itemsize=base_itemsize, masks=any(m.keep is not None for m in methods),
                       dense=any(m.prepare is not None and m.keep is None for m in methods))


def plan_sizes(family: Family, todo: dict[str, list[WorkItem]], device: str | None,
               idle: bool = False) -> dict[str, MemoryPlan]:
    """Each size's memory plan (`size_plan`) on this machine, sizes with nothing to do left out (unless
    `idle`: the Sweep page shows where a size would live even when all its merges are cached)."""
    device = pick_device(device)
    return {name: size_plan(family.size(name), items, device) for name, items in todo.items() if items or idle}


def local_results(family: Family, todo: dict[str, list[WorkItem]], eval_data: dict[str, EvalData],
                  device: str | None, progress: bool,
                  plans: dict[str, MemoryPlan] | None = None,
                  downstream=None) -> Iterator[tuple[WorkItem, list[dict]]]:
    """The local backend: one size after another on this machine. The memory plan of every size is
    checked here (`plans`, else `plan_sizes`), before anything is loaded, so a sweep that cannot fit
    refuses with the numbers. `downstream` (mergelab.sweep.downstream.Downstream) adds lm-eval task
    rows to the merges it samples."""
    device = pick_device(device)
    plans = plans if plans is not None else plan_sizes(family, todo, device)
    for plan in plans.values():
        require_fit(plan)
    # one size alive at a time: each evaluator is dropped once its generator is exhausted
    return (row for name in plans
            for row in SizeEvaluator(family.name, family.size(name), eval_data[name], device, progress,
                                     plans[name].store, plans[name].devices, downstream).evaluate(todo[name]))
