"""What a sweep is: which subsets of which experts, per size and method, in which order.

`SweepSpec` is a sweep over a loaded family; `SweepJob` is the same in plain values, as the Sweep page
queues it and the worker reads it back (JSON in the job queue). Subsets are all C(M, k) per k, N random
ones per k (seeded), or the prefixes of N diverse orderings (the paper's Appendix E). `merge_order`
sorts work so that consecutive linear merges differ by one swap (`mergelab.engine.session.merge_rank`).
"""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import asdict, dataclass, field, fields
from typing import Sequence

from mergelab.engine.session import merge_rank
from mergelab.errors import MergelabError
from mergelab.io.family import Family, load_family
from mergelab.names import REFERENCE_METHODS


def parse_ks(text: str, n_experts: int) -> list[int]:
    """'all', '1-9', '1,2,4' or '3' -> sorted ks within 1..n_experts."""
    if text.strip() == "all":
        return list(range(1, n_experts + 1))
    ks = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            ks.update(range(int(lo), int(hi or lo) + 1))
    except ValueError as exc:
        raise MergelabError(f"--k {text!r}: expected a range like 1-9 or a list like 1,2,4") from exc
    bad = sorted(k for k in ks if not 1 <= k <= n_experts)
    if not ks or bad:
        raise MergelabError(f"--k {text!r}: k must lie in 1..{n_experts} (the number of experts)")
    return sorted(ks)


def plan_subsets(experts: Sequence[str], ks: Sequence[int], subsets: str | int = "all", seed: int = 0) -> list[tuple[str, ...]]:
    """The subsets to merge: 'all' C(M,k) per k; N (int) distinct random subsets per k (seeded);
    or 'orderings:N': the prefixes of N diverse orderings of the experts (one merge per k per ordering)."""
    if isinstance(subsets, str) and subsets.startswith("orderings:"):
        plan = []
        for order in diverse_orderings(experts, int(subsets.split(":", 1)[1]), seed):
            plan.extend(tuple(sorted(order[:k], key=list(experts).index)) for k in ks)
        return list(dict.fromkeys(plan))  # shared prefixes once, order kept
    plan = []
    for k in ks:
        total = math.comb(len(experts), k)
        if subsets == "all" or int(subsets) >= total:
            plan.extend(itertools.combinations(experts, k))
            continue
        rng, chosen = random.Random(f"subsets:{seed}:{k}"), set()
        while len(chosen) < int(subsets):
            chosen.add(tuple(sorted(rng.sample(range(len(experts)), k))))
        plan.extend(tuple(experts[i] for i in idx) for idx in sorted(chosen))
    return plan


def diverse_orderings(experts: Sequence[str], n: int, seed: int = 0, candidates: int = 2000) -> list[list[str]]:
    """n orderings of the experts chosen greedily from random shuffles to maximise the minimum Hamming
    distance (positions that differ) to the orderings already chosen (the paper's Appendix E)."""
    import numpy as np

    if n < 1:
        raise MergelabError(f"number of orderings must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    pool = np.array([rng.permutation(len(experts)) for _ in range(max(candidates, n))])
    chosen = [0]
    nearest = (pool != pool[0]).sum(axis=1)
    while len(chosen) < n:
        nearest[chosen] = -1
        best = int(np.argmax(nearest))
        chosen.append(best)
        nearest = np.minimum(nearest, (pool != pool[best]).sum(axis=1))
    return [[experts[i] for i in pool[c]] for c in chosen]


def parse_subsets(text: str) -> str | int:
    """CLI form of the subset plan: 'all', 'N' (random per k) or 'orderings:N'."""
    text = text.strip()
    if text == "all":
        return "all"
    if text.isdigit() and int(text) > 0:
        return int(text)
    if text.startswith("orderings:") and text.split(":", 1)[1].isdigit() and int(text.split(":", 1)[1]) > 0:
        return text
    raise MergelabError(f"--subsets {text!r}: expected 'all', a positive number of subsets per k, or orderings:N")


@dataclass
class WorkItem:
    size: str
    method: str
    hparams: str
    subset: tuple[str, ...]


@dataclass
class SweepSpec:
    family: Family
    sizes: list[str]
    methods: dict[str, dict]          # method -> hyperparameters as given (defaults filled in by resolve)
    ks: list[int]
    subsets: str | int = "all"
    seed: int = 0
    reference_rows: bool = True       # record base (k=0) and single experts (k=1)




@dataclass(frozen=True)
class SweepJob:
    """A sweep in plain values: what the Sweep page queues and the worker runs (stored as JSON).

    family: path of the manifest; sizes: size names (empty: all); methods: method -> hyperparameters as
    given (defaults filled in when the sweep is planned); ks: subset sizes (empty: 1..M, M the smallest
    pool of the family); subsets: 'all', N (random per k) or 'orderings:N'; device: 'auto', 'cpu',
    'cuda', … (None: auto); db: the results cache (None: the default)."""

    family: str
    methods: dict = field(default_factory=lambda: {"average": {}})
    sizes: tuple = ()
    ks: tuple = ()
    subsets: str | int = "all"
    seed: int = 0
    device: str | None = None
    db: str | None = None
    reference_rows: bool = True

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "SweepJob":
        """The job stored by `to_json`; keys it does not know (from another mergelab version) are ignored."""
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("family"), str):
            raise MergelabError(f"not a sweep job: {text[:200]!r}")
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        for key in ("sizes", "ks"):
            data[key] = tuple(data.get(key) or ())
        return cls(**data)

    def sweep_spec(self) -> "SweepSpec":
        """The spec to run: the family loaded from its manifest (raises ManifestError), defaults filled in."""
        family = load_family(self.family)
        ks = list(self.ks) or list(range(1, min(len(s.experts) for s in family.sizes) + 1))
        return SweepSpec(family, list(self.sizes) or list(family.size_names), dict(self.methods), ks,
                         self.subsets, self.seed, self.reference_rows)

    @property
    def label(self) -> str:
        """One line for the job list: family folder, sizes, methods."""
        from pathlib import Path

        return (f"{Path(self.family).parent.name} · sizes {', '.join(self.sizes) or 'all'} · "
                f"{', '.join(self.methods)}")


def merge_order(items: list[WorkItem], experts: tuple[str, ...]) -> list[WorkItem]:
    """Reference rows first, then one method setting after another (each prepared once), subsets in
    `merge_rank` order so consecutive linear merges of one k differ by one swap."""
    groups: dict[tuple, list[WorkItem]] = {}
    for item in items:
        groups.setdefault((item.method not in REFERENCE_METHODS, item.method, item.hparams), []).append(item)
    return [i for key in sorted(groups, key=lambda g: (g[0], list(groups).index(g)))
            for i in sorted(groups[key], key=lambda item: merge_rank(item.subset, experts))]

