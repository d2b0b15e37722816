"""Plan a merge sweep (which subsets of which experts, per size and method), skip what is cached,
run the rest in memory on one resident model per size, and write rows to the results cache."""

from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from mergelab.errors import MergelabError
from mergelab.evaluate import METRIC_VERSION, EvalData, evaluate, prepare_eval
from mergelab.family import Family, SizeSpec
from mergelab.methods import canonical_hparams, get_method
from mergelab.store import ResultStore, experts_key

if TYPE_CHECKING:
    import pandas as pd

# Reference rows recorded with every sweep: the base model (k = 0) and each single expert (k = 1).
BASE, EXPERT = "base", "expert"


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


@dataclass
class SweepReport:
    planned: int = 0
    skipped: int = 0
    merged: int = 0
    rows_written: int = 0
    seconds: float = 0.0
    eval_hashes: dict[str, dict[str, str]] = field(default_factory=dict)
    eval_notes: dict[str, str] = field(default_factory=dict)  # size -> eval examples cut to max_length, if any


class _RowWriter:
    """Buffers rows and upserts them at most every `flush_seconds` (and at the end), so a crash loses
    at most the last few seconds of work and the cache never sees half a merge."""

    def __init__(self, store: ResultStore, flush_seconds: float, report: SweepReport):
        self.store, self.flush_seconds, self.report = store, flush_seconds, report
        self.rows, self.last = [], time.monotonic()

    def add(self, rows: list[dict]) -> None:
        self.rows.extend(rows)
        if time.monotonic() - self.last >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.report.rows_written += self.store.upsert(self.rows)
            self.rows = []
        self.last = time.monotonic()


ProgressCallback = Callable[["SweepReport", int, "WorkItem | None"], None]


BACKENDS = ("local", "ray")


def run_sweep(spec: SweepSpec, store: ResultStore, device: str | None = None, progress: bool = True,
              flush_seconds: float = 2.0, on_progress: ProgressCallback | None = None,
              backend: str = "local", address: str | None = None) -> SweepReport:
    """Run the sweep here (backend "local") or on a Ray cluster (backend "ray", `address` as for
    `ray.init`); either way this process alone writes the cache, as rows arrive.
    `on_progress(report, total, item)` is called once the plan is known (item None) and after every
    merge; it may raise to stop the sweep (rows done so far are kept)."""
    from tqdm.auto import tqdm

    if backend not in BACKENDS:
        raise MergelabError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "ray":
        from mergelab.ray_backend import require_ray

        require_ray()  # before the (slow) planning: a missing extra fails at once
    started = time.perf_counter()
    report, todo, eval_data = plan_sweep(spec, store)  # validates methods, hyperparameters and checkpoints
    if backend == "local":
        results = _local_results(spec.family, todo, eval_data, device, progress)
    else:
        from mergelab.ray_backend import ray_results

        results = ray_results(spec.family, todo, eval_data, device, address)
    total = sum(map(len, todo.values()))
    writer = _RowWriter(store, flush_seconds, report)
    bar = tqdm(total=total, desc="merge+eval", unit="merge", disable=not progress)
    try:
        if on_progress:
            on_progress(report, total, None)
        for item, rows in results:
            writer.add(rows)
            report.merged += 1
            bar.update(1)
            if on_progress:
                on_progress(report, total, item)
    finally:
        results.close()  # stops the backend's work in flight (Ray actors) when the sweep is stopped early
        bar.close()
        writer.flush()
        report.seconds = time.perf_counter() - started
    return report


def _local_results(family: Family, todo: dict[str, list[WorkItem]], eval_data: dict[str, EvalData],
                   device: str | None, progress: bool) -> Iterator[tuple[WorkItem, list[dict]]]:
    """The local backend: one size after another on this machine. The memory plan of every size is
    checked here, before anything is loaded, so a sweep that cannot fit refuses with the numbers."""
    from mergelab.engine import pick_device
    from mergelab.memory import plan_memory, require_fit

    device = pick_device(device)
    sizes = [family.size(name) for name, items in todo.items() if items]
    plans = {size.name: plan_memory(size.n_params, len(size.experts), size.name, device) for size in sizes}
    for plan in plans.values():
        require_fit(plan)
    # one size alive at a time: each evaluator is dropped once its generator is exhausted
    return (row for size in sizes
            for row in SizeEvaluator(family.name, size, eval_data[size.name], device, progress,
                                     plans[size.name].store).evaluate(todo[size.name]))


def plan_sweep(spec: SweepSpec, store: ResultStore) -> tuple[SweepReport, dict[str, list[WorkItem]], dict[str, EvalData]]:
    """Validate the spec and checkpoints, tokenize the eval sets and list the merges not yet cached
    (per size). Nothing is written; the dashboard uses this for its estimate before launch."""
    methods = {name: get_method(name).resolve(hp) for name, hp in spec.methods.items()}
    sizes = [spec.family.size(name) for name in spec.sizes]
    _check_sizes(sizes)
    report, todo, eval_data = SweepReport(), {}, {}
    for size in sizes:
        eval_data[size.name] = _prepare_size_eval(spec.family, size)
        report.eval_hashes[size.name] = eval_data[size.name].hashes
        if eval_data[size.name].truncation_note():
            report.eval_notes[size.name] = eval_data[size.name].truncation_note()
        planned = _plan_size(spec, size, methods)
        report.planned += len(planned)
        todo[size.name] = _uncached(store, spec.family, size, planned, eval_data[size.name].hashes)
        report.skipped += len(planned) - len(todo[size.name])
    return report, todo, eval_data


def _check_sizes(sizes: list[SizeSpec]) -> None:
    """Validate every checkpoint's tensor names and shapes up front, before any row is written."""
    from mergelab.checkpoints import Checkpoint, check_compatible

    for size in sizes:
        base = Checkpoint(size.base)
        for path in size.experts.values():
            check_compatible(base, Checkpoint(path), size.vocab_policy)


def _prepare_size_eval(family: Family, size: SizeSpec) -> EvalData:
    from transformers import AutoTokenizer

    from mergelab.errors import CheckpointError

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(size.base), trust_remote_code=False)
    except Exception as exc:
        raise CheckpointError(f"{size.base}: cannot load the tokenizer ({str(exc).splitlines()[0]})") from exc
    return prepare_eval(family.eval_sets, tokenizer, family.token_budget, family.max_length)


def _plan_size(spec: SweepSpec, size: SizeSpec, methods: dict[str, dict]) -> list[WorkItem]:
    items = []
    if spec.reference_rows:
        items.append(WorkItem(size.name, BASE, "{}", ()))
        items.extend(WorkItem(size.name, EXPERT, "{}", (e,)) for e in size.expert_names)
    subsets = plan_subsets(size.expert_names, spec.ks, spec.subsets, spec.seed)
    for name, hp in methods.items():
        items.extend(WorkItem(size.name, name, canonical_hparams(hp), s) for s in subsets)
    return items


def _uncached(store: ResultStore, family: Family, size: SizeSpec, items: list[WorkItem], hashes) -> list[WorkItem]:
    cached = {}
    for method, hparams in {(i.method, i.hparams) for i in items}:
        cached[method, hparams] = store.cached_keys(family.name, size.name, method, hparams, hashes, METRIC_VERSION)
    return [i for i in items if experts_key(i.subset) not in cached[i.method, i.hparams]]


class SizeEvaluator:
    """One size's task vectors and resident model, loaded once, then evaluating any list of that size's
    WorkItems (in `merge_order`) and yielding each merge's rows. The local backend makes one per size;
    each Ray actor holds one and feeds it chunks of the plan."""

    def __init__(self, family_name: str, size: SizeSpec, data: EvalData, device: str, progress: bool = False,
                 store: str | None = None):
        from tqdm.auto import tqdm

        from mergelab.engine import ExpertPool, MergeSession, ResidentModel

        self.family_name, self.size, self.device, self.data = family_name, size, device, data.to(device)
        with tqdm(total=len(size.experts), desc=f"load {size.name}", unit="expert",
                  disable=not progress, leave=False) as loading:
            self.pool = ExpertPool.load(size, device, progress=loading, store=store)
        self.resident = ResidentModel(self.pool.base_checkpoint, device)
        self.session = MergeSession(self.pool, self.resident)

    def evaluate(self, items: list[WorkItem]) -> Iterator[tuple[WorkItem, list[dict]]]:
        import json

        for item in merge_order(items, self.pool.expert_names):
            if item.method == BASE:
                self.resident.load_base(self.pool)
            elif item.method == EXPERT:
                self.resident.load_expert(self.pool, item.subset[0])
            else:
                self.session.merge(get_method(item.method), json.loads(item.hparams), item.subset)
            losses = evaluate(self.resident.model, self.data)
            yield item, [self._row(item, domain, loss) for domain, loss in losses.items()]

    def _row(self, item: WorkItem, domain: str, loss: float) -> dict:
        return {"family": self.family_name, "size": self.size.name, "n_params": self.size.n_params,
                "method": item.method, "hparams": item.hparams, "experts_key": experts_key(item.subset),
                "domain": domain, "loss": loss, "n_tokens": self.data.n_tokens[domain],
                "eval_hash": self.data.hashes[domain], "metric_version": METRIC_VERSION, "device": self.device,
                "n_truncated": self.data.n_truncated[domain]}


def merge_order(items: list[WorkItem], experts: tuple[str, ...]) -> list[WorkItem]:
    """Reference rows first, then one method setting after another (each prepared once), subsets in
    `merge_rank` order so consecutive linear merges of one k differ by one swap."""
    from mergelab.engine import merge_rank

    groups: dict[tuple, list[WorkItem]] = {}
    for item in items:
        groups.setdefault((item.method not in (BASE, EXPERT), item.method, item.hparams), []).append(item)
    return [i for key in sorted(groups, key=lambda g: (g[0], list(groups).index(g)))
            for i in sorted(groups[key], key=lambda item: merge_rank(item.subset, experts))]


def per_k_summary(store: ResultStore, family: str, eval_hashes: dict[str, dict[str, str]]) -> "pd.DataFrame":
    """Mean cross-domain CE per k (rows) for each size and method (columns), over the cached merges."""
    import pandas as pd

    frames = []
    for size, hashes in eval_hashes.items():
        macro = store.macro(family=family, size=size, eval_hash=list(hashes.values()))
        frames.append(macro[macro["n_domains"] == len(hashes)])
    macro = pd.concat(frames) if frames else pd.DataFrame()
    if macro.empty:
        return macro
    return macro.pivot_table(index="k", columns=["size", "method"], values="loss", aggfunc="mean").round(4)


def ordering_estimate(losses: dict[str, float], orderings: list[list[str]], ks) -> "pd.DataFrame":
    """E[L | k] estimated from the prefixes of diverse orderings: per k the mean over orderings of
    the loss of each ordering's k-prefix, with its standard error std/√n (orderings are the units).

    `losses` maps experts_key (sorted '+'-joined) to a loss, e.g. the macro CE of each merge."""
    import numpy as np
    import pandas as pd

    rows = []
    for k in ks:
        values = np.array([losses[experts_key(order[:k])] for order in orderings])
        se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
        rows.append({"k": k, "mean": values.mean(), "se": se, "n_orderings": len(values)})
    return pd.DataFrame(rows)
