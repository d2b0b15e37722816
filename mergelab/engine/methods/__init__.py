"""The registry of merge methods (DESIGN §4). Each method lives in its own small module, composed from
the shared steps of `primitives` (sparsify, elect signs, disjoint mean); `docs/add-a-merge-method.md`
shows how to add one."""

from mergelab.errors import HyperparameterError
from mergelab.engine.methods import (average, breadcrumbs, breadcrumbs_ties, dare, dare_ties, della, model_stock,
                                     task_arithmetic, ties, tsv_m)
from mergelab.engine.methods.base import MergeContext, MergeMethod, Param, canonical_hparams

METHODS: dict[str, MergeMethod] = {m.name: m for m in (
    average.METHOD, task_arithmetic.METHOD, ties.METHOD, dare.METHOD, dare_ties.METHOD, breadcrumbs.METHOD,
    breadcrumbs_ties.METHOD, della.METHOD, della.LINEAR, model_stock.METHOD, tsv_m.METHOD)}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError as exc:
        raise HyperparameterError(f"unknown merge method {name!r} (known: {', '.join(METHODS)})") from exc


def incremental(method: MergeMethod) -> bool:
    """Whether a sweep updates `method`'s merges by the experts that enter or leave (linear combine)."""
    return method.linear_scale is not None


__all__ = ["METHODS", "MergeContext", "MergeMethod", "Param", "canonical_hparams", "get_method", "incremental"]
