"""The registry of merge methods (DESIGN §4). Each method lives in its own small module."""

from mergelab.errors import HyperparameterError
from mergelab.engine.methods import average, dare, task_arithmetic, ties
from mergelab.engine.methods.base import MergeContext, MergeMethod, Param, canonical_hparams

METHODS: dict[str, MergeMethod] = {m.name: m for m in (average.METHOD, task_arithmetic.METHOD, ties.METHOD, dare.METHOD)}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError as exc:
        raise HyperparameterError(f"unknown merge method {name!r} (known: {', '.join(METHODS)})") from exc


__all__ = ["METHODS", "MergeContext", "MergeMethod", "Param", "canonical_hparams", "get_method"]
