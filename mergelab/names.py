"""The words every layer shares, defined once: the reference pseudo-methods, the macro domain, the
canonical key of an expert set, and the unit of model size.

- A sweep records two kinds of reference rows beside the merges: the base model as method `base`
  (k = 0, no experts) and each single expert as method `expert` (k = 1). They are not merge methods:
  curves and fits leave them out.
- `macro` is the cross-domain loss: the mean over a family's domains of a merge evaluated on every
  one of them (computed by query, never stored as a domain).
- An expert set is keyed by its sorted names joined by '+' (`experts_key`); the base's key is ''.
- Names a manifest gives (family, sizes, domains = experts) may not contain the separators above or
  below, nor be a reserved word (`name_problem` says which and why; mergelab.io.family refuses them).
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
LIST_SEPARATOR = ","   # CLI lists (--sizes, --experts) and the dashboard's URL state (multiselects)
PAIR_SEPARATOR = ":"   # the sweep matches cached rows by 'domain:eval_hash' (ResultStore.cached_keys)
LABEL_SEPARATOR = "·"  # labels join names as 'method · size', 'size · method · experts', 'family · method · macro'
PARAMS_PER_BILLION = 1e9

# What each kind of name may not contain, and why: a domain is also its expert's name.
RESERVED_CHARACTERS = {
    "domain": {KEY_SEPARATOR: "expert sets are keyed by their names joined with '+'",
               LIST_SEPARATOR: "--experts and the dashboard's lists are comma-separated",
               PAIR_SEPARATOR: "cached rows are matched by 'domain:eval_hash'",
               LABEL_SEPARATOR: "labels join names with ' · '"},
    "size": {LIST_SEPARATOR: "--sizes and the dashboard's size list are comma-separated",
             LABEL_SEPARATOR: "labels join names with ' · '"},
    "family": {LABEL_SEPARATOR: "labels join names with ' · '"},
}
RESERVED_WORDS = {
    "domain": {MACRO: "the cross-domain mean is shown as domain 'macro'",
               BASE: "the base model (k = 0) is labelled 'base' beside expert sets"},
}


def experts_key(experts: Iterable[str]) -> str:
    """Canonical key of an expert set: sorted names joined by '+' ('' for the base model)."""
    return KEY_SEPARATOR.join(sorted(experts))


def key_experts(key: str) -> tuple[str, ...]:
    """The expert names of an experts_key (() for '')."""
    return tuple(key.split(KEY_SEPARATOR)) if key else ()


def name_problem(name: str, kind: str) -> str | None:
    """Why `name` cannot be a `kind` ("family", "size" or "domain") name, or None when it can: empty,
    surrounded by spaces (CLI lists strip them), holding a control character (messages are one line),
    a reserved character of RESERVED_CHARACTERS[kind], or a reserved word of RESERVED_WORDS[kind]."""
    if not name.strip():
        return "is empty"
    if name != name.strip():
        return "starts or ends with whitespace (CLI lists strip it)"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains a control character"
    for char, why in RESERVED_CHARACTERS.get(kind, {}).items():
        if char in name:
            return f"contains {char!r}, which mergelab reserves ({why})"
    if name in RESERVED_WORDS.get(kind, {}):
        return f"is a reserved word ({RESERVED_WORDS[kind][name]})"
    return None


def billions(n_params):
    """Parameter counts (a number, array or Series) in billions: the N of the joint law."""
    return n_params / PARAMS_PER_BILLION


SI_PREFIXES = ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"))  # B for billions, as model sizes are named


def params_label(n) -> str:
    """A parameter count as people write model sizes: three significant digits and an SI-style suffix
    (K, M, B, T), e.g. 7,376 → '7.38K', 19,224 → '19.2K', 625,000 → '625K', 1.5e9 → '1.5B'; counts
    under 1,000 as integers, a NaN or infinite count as str(n)."""
    import math

    n = float(n)
    if not math.isfinite(n):
        return str(n)
    for scale, suffix in SI_PREFIXES:
        value = float(f"{abs(n) / scale:.3g}")  # rounded first: 999,999 is '1M', not '1000K'
        if value >= 1:
            return f"{'-' if n < 0 else ''}{value:g}{suffix}"
    return f"{n:.0f}"
