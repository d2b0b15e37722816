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
import os
import random
from dataclasses import asdict, dataclass, field, fields
from typing import Mapping, Sequence

from mergelab.engine.session import merge_rank
from mergelab.errors import MergelabError
from mergelab.io.family import Family, load_family
from mergelab.names import REFERENCE_METHODS


MAX_MERGES_ENV = "MERGELAB_MAX_MERGES"
MAX_MERGES = 1_000_000  # merges planned per size (all methods): above, a plan is refused before it is listed
MAX_ORDERINGS = 2_000   # orderings:N — the greedy choice compares each pick with max(2000, N) candidates
MAX_SEED = 2**63 - 1


def max_merges() -> int:
    """The most merges one size may plan: MERGELAB_MAX_MERGES if set, else MAX_MERGES (1,000,000)."""
    raw = os.environ.get(MAX_MERGES_ENV)
    if not raw:
        return MAX_MERGES
    if not raw.strip().isdigit() or int(raw) < 1:
        raise MergelabError(f"{MAX_MERGES_ENV}={raw!r}: expected a positive whole number of merges")
    return int(raw)


def parse_ks(text: str, pools: int | Mapping[str, int]) -> list[int]:
    """The subset sizes k of `--k`: 'all', a range '1-9', a list '1,2,4' or one k, sorted.

    `pools` is the number of experts M of one pool (an int), or of each swept size (size name -> M).
    'all' means 1..M of each size's own pool: the list 1..M for one pool, the empty list (which
    `SweepSpec` reads as each size's own 1..M) for a mapping. An explicit k must fit every swept size:
    one above a size's M is refused naming that size and its M (sweep that size apart, or lower --k).
    Raises MergelabError for text that is not ks."""
    sizes = {"": pools} if isinstance(pools, int) else dict(pools)
    if text.strip() == "all":
        return list(range(1, pools + 1)) if isinstance(pools, int) else []
    ranges = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            ranges.append((int(lo), int(hi or lo)))
    except ValueError as exc:
        raise MergelabError(f"--k {text!r}: expected a range like 1-9, a list like 1,2,4, or all") from exc
    if any(lo < 1 for lo, _ in ranges):
        raise MergelabError(f"--k {text!r}: k must lie in 1..{min(sizes.values())} (k counts experts merged)")
    if any(hi < lo for lo, hi in ranges):
        raise MergelabError(f"--k {text!r}: expected a range like 1-9 (low-high) or a list like 1,2,4")
    top = max(hi for _, hi in ranges)  # checked before any range is listed: '1-1000000000' lists nothing
    for size, m in sorted(sizes.items(), key=lambda item: item[1]):
        if top > m:
            where = f"size {size!r} has" if size else "the pool has"
            raise MergelabError(f"--k {text!r}: k must lie in 1..{m}: {where} {m} experts; lower --k"
                                + (" or sweep that size apart (--sizes)" if size else ""))
    return sorted({k for lo, hi in ranges for k in range(lo, hi + 1)})


def count_subsets(m: int, ks: Sequence[int], subsets: str | int = "all") -> int:
    """How many subsets `plan_subsets` lists for a pool of `m` experts, without listing them: the sum of
    C(m, k) ('all'), of min(N, C(m, k)) (N random per k), at most N per k (orderings:N, shared
    prefixes counted once in the plan itself)."""
    if isinstance(subsets, str) and subsets.startswith("orderings:"):
        n = int(subsets.split(":", 1)[1])
        return sum(min(n, math.comb(m, k)) for k in ks)
    if isinstance(subsets, (list, tuple)):  # an explicit list (an adaptive sweep's next batch)
        return len(subsets)
    return sum(math.comb(m, k) if subsets == "all" else min(int(subsets), math.comb(m, k)) for k in ks)


def check_plan_size(size: str, m: int, ks: Sequence[int], subsets: str | int, n_methods: int,
                    reference_rows: bool = True, limit: int | None = None) -> int:
    """The number of merges one size plans (`n_methods` settings over its subsets, plus the base and
    its `m` experts as reference rows), counted before anything is listed; returns it. Raises
    MergelabError above `limit` (default `max_merges()`), showing the count and what to lower."""
    limit = max_merges() if limit is None else limit
    _check_orderings(subsets)
    total = n_methods * count_subsets(m, ks, subsets) + (1 + m if reference_rows else 0)
    if total > limit:
        what = "all subsets" if subsets == "all" else f"subsets {subsets}"
        raise MergelabError(
            f"size {size!r}: {m} experts, k {_ks_text(ks)}, {what}, {n_methods} method setting(s) plan {total:,} merges, "
            f"above the limit of {limit:,} per size; sample N random subsets per k or N orderings (--subsets N "
            f"or orderings:N), narrow the k range (--k), or raise {MAX_MERGES_ENV}")
    return total


def _ks_text(ks: Sequence[int]) -> str:
    ks = sorted(ks)
    return f"{ks[0]}..{ks[-1]}" if ks and ks == list(range(ks[0], ks[-1] + 1)) else ",".join(map(str, ks))


def _check_orderings(subsets: str | int) -> None:
    if isinstance(subsets, str) and subsets.startswith("orderings:"):
        n = subsets.split(":", 1)[1]
        if not n.isdigit() or not 1 <= int(n) <= MAX_ORDERINGS:
            raise MergelabError(f"--subsets {subsets!r}: expected 'all', a positive number of subsets per k, or "
                                f"orderings:N with N from 1 to {MAX_ORDERINGS:,} (each ordering adds one merge per k)")


def plan_subsets(experts: Sequence[str], ks: Sequence[int], subsets: str | int = "all", seed: int = 0,
                 limit: int | None = None) -> list[tuple[str, ...]]:
    """The subsets to merge: 'all' C(M,k) per k; N (int) distinct random subsets per k (seeded);
    or 'orderings:N': the prefixes of N diverse orderings of the experts (one merge per k per ordering).
    The count is checked first (`count_subsets`): above `limit` subsets (default `max_merges()`) a
    MergelabError says how many and what to lower, before anything is listed."""
    limit = max_merges() if limit is None else limit
    _check_orderings(subsets)
    check_seed(seed)
    total = count_subsets(len(experts), ks, subsets)
    if total > limit:
        raise MergelabError(f"{len(experts)} experts, k {_ks_text(ks)}, subsets {subsets}: {total:,} subsets, above "
                            f"the limit of {limit:,}; sample with --subsets N or lower --k (or raise {MAX_MERGES_ENV})")
    if isinstance(subsets, (list, tuple)):  # an explicit list of subsets (names), merged as given
        return [tuple(s) for s in subsets]
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


def check_seed(seed: int) -> None:
    """Refuse a seed outside 0..2^63-1 (numpy's generators take no negative seed) with a MergelabError."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise MergelabError(f"--seed {seed!r}: expected an integer from 0 to {MAX_SEED}")


def diverse_orderings(experts: Sequence[str], n: int, seed: int = 0, candidates: int = 2000) -> list[list[str]]:
    """n orderings of the experts chosen greedily from random shuffles to maximise the minimum Hamming
    distance (positions that differ) to the orderings already chosen (the paper's Appendix E).

    Costs O(n · max(candidates, n) · M): n is refused above MAX_ORDERINGS, and seed must be 0..2^63-1
    (MergelabError)."""
    import numpy as np

    if not 1 <= n <= MAX_ORDERINGS:
        raise MergelabError(f"number of orderings must lie in 1..{MAX_ORDERINGS:,}, got {n}")
    check_seed(seed)
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
    if text.startswith("orderings:"):
        _check_orderings(text)
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
    ks: list[int]                     # empty: 1..M of each size's own pool (`ks_for`)
    subsets: str | int | list = "all"  # or an explicit list of subsets (tuples of expert names)
    seed: int = 0
    reference_rows: bool = True       # record base (k=0) and single experts (k=1)
    downstream: "object | None" = None  # mergelab.sweep.downstream.Downstream: lm-eval tasks beside CE (local only)

    def ks_for(self, size) -> list[int]:
        """The ks swept for `size` (a SizeSpec): `ks`, or when empty 1..M of the size's own pool of M
        experts. Raises MergelabError when a k exceeds that pool, naming the size and its M."""
        m = len(size.experts)
        if not self.ks:
            return list(range(1, m + 1))
        if max(self.ks) > m or min(self.ks) < 1:
            raise MergelabError(f"k = {max(self.ks) if max(self.ks) > m else min(self.ks)} does not fit size "
                                f"{size.name!r}, which has {m} experts (k in 1..{m}); lower k or sweep that size apart")
        return sorted(self.ks)



@dataclass(frozen=True)
class SweepJob:
    """A sweep in plain values: what the Sweep page queues and the worker runs (stored as JSON).

    family: path of the manifest; sizes: size names (empty: all); methods: method -> hyperparameters as
    given (defaults filled in when the sweep is planned); ks: subset sizes (empty: 1..M of each swept
    size's own pool; explicit ks must fit every swept size); subsets: 'all', N (random per k) or 'orderings:N'; device: 'auto', 'cpu',
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
    adaptive: str | None = None   # a target (mergelab.analysis.adaptive.parse_target): the policy picks the subsets
    budget: int | None = None     # adaptive: at most this many merges per curve, cached ones included

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
        return SweepSpec(family, list(self.sizes) or list(family.size_names), dict(self.methods), list(self.ks),
                         self.subsets, self.seed, self.reference_rows)

    @property
    def label(self) -> str:
        """One line for the job list: family name (from its manifest), sizes, methods."""
        return (f"{family_name(self.family)} · sizes {', '.join(self.sizes) or 'all'} · "
                f"{', '.join(self.methods)}" + (f" · adaptive {self.adaptive}" if self.adaptive else ""))


def family_name(manifest: str) -> str:
    """The `name` in the family.toml at `manifest` (what every page calls the family), else its folder's
    name when the manifest is gone or unreadable: a job card must draw whatever became of its family."""
    import tomllib
    from pathlib import Path

    try:
        name = tomllib.loads(Path(manifest).read_text()).get("name")
    except (OSError, ValueError, UnicodeDecodeError):
        name = None
    return name if isinstance(name, str) and name else Path(manifest).parent.name


def merge_order(items: list[WorkItem], experts: tuple[str, ...]) -> list[WorkItem]:
    """Reference rows first, then one method setting after another (each prepared once), subsets in
    `merge_rank` order so consecutive linear merges of one k differ by one swap."""
    groups: dict[tuple, list[WorkItem]] = {}
    for item in items:
        groups.setdefault((item.method not in REFERENCE_METHODS, item.method, item.hparams), []).append(item)
    return [i for key in sorted(groups, key=lambda g: (g[0], list(groups).index(g)))
            for i in sorted(groups[key], key=lambda item: merge_rank(item.subset, experts))]

