"""The words every layer shares, defined once: the reference pseudo-methods, the macro domain, the
canonical key of an expert set, and the unit of model size.

- A sweep records two kinds of reference rows beside the merges: the base model as method `base`
  (k = 0, no experts) and each single expert as method `expert` (k = 1). They are not merge methods:
  curves and fits leave them out.
- `macro` is the cross-domain loss: the mean over a family's domains of a merge evaluated on every
  one of them (computed by query, never stored as a domain).
- An expert set is keyed by its sorted names joined by '+' (`experts_key`); the base's key is ''.
- Sizes are stored as parameter counts; the laws take N in billions of parameters (arXiv 2509.24244
  §3), so every fit over sizes converts with `billions`.
"""

from __future__ import annotations

from typing import Iterable

BASE = "base"          # method of the base-model reference row (k = 0)
EXPERT = "expert"      # method of each single-expert reference row (k = 1)
REFERENCE_METHODS = (BASE, EXPERT)
MACRO = "macro"        # the cross-domain (macro-mean) loss, as a domain name
KEY_SEPARATOR = "+"
PARAMS_PER_BILLION = 1e9


def experts_key(experts: Iterable[str]) -> str:
    """Canonical key of an expert set: sorted names joined by '+' ('' for the base model)."""
    return KEY_SEPARATOR.join(sorted(experts))


def key_experts(key: str) -> tuple[str, ...]:
    """The expert names of an experts_key (() for '')."""
    return tuple(key.split(KEY_SEPARATOR)) if key else ()


def billions(n_params):
    """Parameter counts (a number, array or Series) in billions: the N of the joint law."""
    return n_params / PARAMS_PER_BILLION
