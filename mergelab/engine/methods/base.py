"""What a merge method is: a pure function on one tensor's stacked task vectors plus its hyperparameters.

A method merges one tensor at a time: `merge(base, deltas, ctx, hp)` gets the base tensor θ0 (fp32),
the stacked task vectors `deltas` of shape [k, *θ0.shape] (fp32, v_i = θ_i − θ0), a context naming the
tensor and the experts (for seeded randomness), and the resolved hyperparameters; it returns the
merged tensor in fp32.

For sweeps the same formula is split so that per-expert work happens once, not once per subset:
`prepare(deltas, ctx, hp)` transforms every expert's task vector on its own (TIES trimming, DARE
masking), and either `linear_scale(k, hp)` says the merge is θ0 + scale·Σ prepared (so a running sum
can be updated incrementally), or `combine(base, prepared, ctx, hp)` finishes it.
merge == combine ∘ prepare, and for linear methods combine = θ0 + linear_scale·Σ.

Most per-expert transforms only drop entries and rescale the survivors. Such a method gives
`keep(deltas, ctx, hp)` (a bool mask of the entries kept, deltas' shape) and `keep_scale(hp)`; its
prepare is then v ⊙ keep · keep_scale, and the engine may store the mask as bits next to the raw
task vector instead of a second dense copy (issue 16).

A method whose combine needs the whole tensor at once (an angle between task vectors, an SVD) sets
`whole_tensor=True`; the engine then passes whole tensors to combine instead of chunks of one.
Every method also accepts the options of `mergelab.merge_options` (per-expert weights, tensor filters),
which the engine applies around the method.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from mergelab.errors import HyperparameterError


@dataclass(frozen=True)
class MergeContext:
    tensor: str
    experts: tuple[str, ...]


@dataclass(frozen=True)
class Param:
    """One hyperparameter: its default, its kind and the range it must lie in."""

    default: Any
    help: str
    kind: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def check(self, method: str, name: str, value: Any) -> Any:
        where = f"{method}.{name}"
        if self.kind is bool:
            if not isinstance(value, bool):
                raise HyperparameterError(f"{where} must be true or false, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise HyperparameterError(f"{where} must be a number, got {value!r}")
        if self.kind is int and value != int(value):
            raise HyperparameterError(f"{where} must be an integer, got {value!r}")
        value = self.kind(value)
        if math.isnan(value) or math.isinf(value):
            raise HyperparameterError(f"{where} must be finite, got {value!r}")
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high:
            raise HyperparameterError(f"{where}={value!r} is out of range {self.range_text()}")
        return value

    def range_text(self) -> str:
        lo = "(" if self.low_open or self.low is None else "["
        hi = ")" if self.high_open or self.high is None else "]"
        return f"{lo}{'-inf' if self.low is None else self.low}, {'inf' if self.high is None else self.high}{hi}"


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: `merge(base, deltas, ctx, hp)` with base θ0 (fp32, any shape), deltas the stacked
    task vectors v_i = θ_i − θ0 ([k, *θ0.shape], fp32), ctx the tensor and expert names, hp the resolved
    hyperparameters (`resolve` fills defaults, raises HyperparameterError for unknown names or values out
    of range); returns the merged tensor in fp32. `prepare` / `linear_scale` / `combine` split the same
    formula for sweeps (module docstring). `paper` names where the formula comes from, `mergekit` its
    mergekit 0.1.5 equivalent (what `mergelab export-model --mergekit-yaml` writes)."""

    name: str
    merge: Callable[..., Any]
    doc: str
    params: dict[str, Param] = field(default_factory=dict)
    prepare: Callable[..., Any] | None = None       # per-expert transform of the stacked task vectors
    linear_scale: Callable[[int, dict], float] | None = None  # merged = θ0 + scale(k)·Σ prepared
    combine: Callable[..., Any] | None = None       # non-linear finish on prepared task vectors
    keep: Callable[..., Any] | None = None          # prepare as a mask: bool tensor of the kept entries
    keep_scale: Callable[[dict], float] | None = None  # ... and the factor the kept entries are scaled by
    whole_tensor: bool = False  # combine needs the whole tensor (angles, SVD), not chunks of it
    validate: Callable[[dict], None] | None = None  # checks across parameters; raises HyperparameterError
    paper: str = ""      # the method's paper (and where mergelab's default comes from)
    mergekit: str = ""   # the equivalent mergekit config, and how it differs

    def __post_init__(self):
        if self.keep is not None and self.prepare is None:  # prepare follows from the mask form
            keep, keep_scale = self.keep, self.keep_scale or (lambda hp: 1.0)
            object.__setattr__(self, "prepare", lambda deltas, ctx, hp: deltas * keep(deltas, ctx, hp) * keep_scale(hp))

    @property
    def defaults(self) -> dict[str, Any]:
        return {k: p.default for k, p in self.params.items()}

    def resolve(self, given: dict[str, Any] | None = None) -> dict[str, Any]:
        """Defaults filled in, unknown names refused, every value checked against its range; the options
        of `mergelab.merge_options` (weights, include, exclude) in canonical form, present only when not at
        their default (so cache keys of rows without them do not change)."""
        from mergelab.engine.methods.options import OPTIONS, resolve_options

        given = dict(given or {})
        unknown = sorted(set(given) - set(self.params) - set(OPTIONS))
        if unknown:
            known = ", ".join([*self.params, *OPTIONS])
            raise HyperparameterError(f"{self.name} has no hyperparameter {unknown[0]!r} (known: {known})")
        resolved = {k: p.check(self.name, k, given.get(k, p.default)) for k, p in self.params.items()}
        if self.validate is not None:
            self.validate(resolved)
        return {**resolved, **resolve_options(self.name, given)}


def canonical_hparams(hp: dict[str, Any]) -> str:
    """The cache key form of resolved hyperparameters: sorted compact JSON."""
    return json.dumps(hp, sort_keys=True, separators=(",", ":"))
