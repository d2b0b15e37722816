"""Options every merge method accepts next to its own hyperparameters: per-expert weights and tensor filters.

    weights=algebra:0.5,code:1.5   expert i's task vector counts w_i times (unnamed experts: 1)
    include=model.layers.*         only tensors matching one of these patterns are merged
    exclude=*embed_tokens*,lm_head.weight   tensors matching one of these keep the base's values

They are given like hyperparameters (`--hp ties.weights=…`, `--hp weights=…` for every method, the
Sweep page, a family's `[merge]` table) and resolved by `MergeMethod.resolve` into canonical strings
(weights sorted by expert, weight-1 entries dropped; patterns sorted), which are part of the
hyperparameters and so of the cache key; an option left at its default is absent, so the keys of rows
cached before these options existed do not change.

Weights are applied to the prepared task vectors: merged = method(θ0, [w_1·v_1, …, w_k·v_k]). Every
per-expert step mergelab has (magnitude masks, seeded masks, rank-based probabilities) is invariant to
a positive scale of the vector, so weighting after `prepare` equals weighting before; that is why a
weight must be > 0. A linear method's incremental update adds scale·w_i·v_i. Patterns are fnmatch
patterns matched against the whole tensor name, or Python regular expressions (re.search) after `re:`;
a pattern may not contain ','.

Text only (no torch): the family manifest (io layer) checks its [merge] table with it; the engine's
`mergelab.engine.methods.options` adds the tensor operations.
"""

from __future__ import annotations

import fnmatch
import math
import re
from typing import Any, Mapping, Sequence

from mergelab.errors import HyperparameterError

OPTIONS = ("weights", "include", "exclude")
HELP = {
    "weights": "per-expert weights EXPERT:W,… (W > 0; unnamed experts 1)",
    "include": "merge only tensors matching one of these patterns (fnmatch, or re:REGEX), comma-separated",
    "exclude": "tensors matching one of these patterns keep the base (fnmatch, or re:REGEX), comma-separated",
}


def _items(method: str, name: str, value: Any) -> list[str]:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        if any("," in v for v in value):
            raise HyperparameterError(f"{method}.{name}: a pattern may not contain ',' (got {value!r})")
        return [v.strip() for v in value if v.strip()]
    raise HyperparameterError(f"{method}.{name} must be comma-separated text, got {value!r}")


def canonical_weights(method: str, value: Any) -> str:
    """'code:1.5, algebra:0.5' or {'code': 1.5, 'algebra': 0.5} -> 'algebra:0.5,code:1.5' (weight-1
    entries dropped). Raises HyperparameterError naming the entry for a malformed one or W ≤ 0."""
    pairs: dict[str, float] = {}
    if isinstance(value, Mapping):
        entries = [(str(k), v) for k, v in value.items()]
    else:
        entries = []
        for item in _items(method, "weights", value):
            expert, sep, raw = item.rpartition(":")
            if not sep or not expert.strip():
                raise HyperparameterError(f"{method}.weights entry {item!r}: expected EXPERT:WEIGHT, e.g. code:1.5")
            entries.append((expert.strip(), raw.strip()))
    for expert, raw in entries:
        try:
            w = float(raw)
        except (TypeError, ValueError):
            raise HyperparameterError(f"{method}.weights: weight of {expert!r} must be a number, got {raw!r}") from None
        if isinstance(raw, bool) or not math.isfinite(w) or w <= 0:
            raise HyperparameterError(f"{method}.weights: weight of {expert!r} must be a finite number > 0, got {raw!r}")
        if expert in pairs:
            raise HyperparameterError(f"{method}.weights names expert {expert!r} twice")
        pairs[expert] = w
    return ",".join(f"{e}:{w!r}" for e, w in sorted(pairs.items()) if w != 1.0)


def canonical_patterns(method: str, name: str, value: Any) -> str:
    """Comma-separated patterns, checked (a bad regular expression is refused) and sorted."""
    patterns = sorted(set(_items(method, name, value)))
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as exc:
                raise HyperparameterError(f"{method}.{name}: {p!r} is not a regular expression ({exc})") from None
    return ",".join(patterns)


def resolve_options(method: str, given: Mapping[str, Any]) -> dict[str, str]:
    """The options among `given` in canonical form; those equal to their default (no weights other than
    1, no patterns) are left out."""
    out = {}
    for name in OPTIONS:
        if name in given:
            value = (canonical_weights(method, given[name]) if name == "weights"
                     else canonical_patterns(method, name, given[name]))
            if value:
                out[name] = value
    return out


def weight_map(hp: Mapping[str, Any]) -> dict[str, float]:
    """expert -> weight from resolved hyperparameters (experts not named have weight 1)."""
    text = hp.get("weights") or ""
    return {e: float(w) for e, _, w in (item.rpartition(":") for item in text.split(",") if item)}


def expert_weights(hp: Mapping[str, Any], experts: Sequence[str]) -> list[float] | None:
    """The weight of each of `experts`, or None when every weight is 1 (nothing to scale)."""
    weights = weight_map(hp)
    return [weights.get(e, 1.0) for e in experts] if weights else None


def _matches(pattern: str, name: str) -> bool:
    return bool(re.search(pattern[3:], name)) if pattern.startswith("re:") else fnmatch.fnmatchcase(name, pattern)


def is_merged(hp: Mapping[str, Any], tensor: str) -> bool:
    """Whether `tensor` is merged under the resolved filters (else it keeps the base's values)."""
    include, exclude = hp.get("include"), hp.get("exclude")
    if include and not any(_matches(p, tensor) for p in include.split(",")):
        return False
    return not (exclude and any(_matches(p, tensor) for p in exclude.split(",")))


def kept_from_base(hp: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    """The tensors among `names` that the filters leave at the base."""
    if not (hp.get("include") or hp.get("exclude")):
        return []
    return [n for n in names if not is_merged(hp, n)]


def options_key(hp: Mapping[str, Any]) -> tuple:
    """What of `hp` changes the merged weights besides the method's own parameters (the engine's state key)."""
    return tuple((k, hp.get(k)) for k in OPTIONS)


def check_options(method: str, hp: Mapping[str, Any], tensors: Sequence[str], experts: Sequence[str], where: str,
                  experts_where: str | None = None) -> None:
    """Refuse options that would silently do nothing: a weight for an expert not among `experts`, a
    pattern no tensor of `tensors` matches. `where` names the size in the message (`experts_where`, when
    given, the sizes the experts come from). Raises HyperparameterError."""
    for expert in weight_map(hp):
        if expert not in experts:
            raise HyperparameterError(f"{method}.weights names expert {expert!r}, which is not an expert of "
                                      f"{experts_where or where} (experts: {', '.join(experts)}); check its spelling")
    for name in ("include", "exclude"):
        for p in (hp.get(name) or "").split(","):
            if p and not any(_matches(p, t) for t in tensors):
                raise HyperparameterError(f"{method}.{name} pattern {p!r} matches no tensor of {where} "
                                          f"(tensors are named like {tensors[0]!r})")
