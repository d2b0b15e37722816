"""Run a sweep: validate it, skip what is cached, merge and evaluate the rest on a backend (local or
Ray), and write the rows to the results cache as they arrive (this process alone writes)."""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from mergelab.engine.evaluate import METRIC_VERSION, EvalData, prepare_eval
from mergelab.engine.memory import require_fit
from mergelab.engine.methods import canonical_hparams, get_method
from mergelab.engine.methods.options import check_options
from mergelab.engine.threads import choose_threads, torch_threads
from mergelab.errors import CheckpointError, MergelabError
from mergelab.io.checkpoints import Checkpoint, check_compatible
from mergelab.io.family import Family, SizeSpec
from mergelab.io.fingerprint import size_fingerprints
from mergelab.names import BASE, EXPERT, experts_key
from mergelab.store import ResultStore, join_fingerprints
from mergelab.sweep.evaluator import NotFinite
from mergelab.sweep.local import local_results, plan_sizes
from mergelab.sweep.plan import SweepSpec, WorkItem, check_plan_size, plan_subsets
from mergelab.sweep.ray_backend import ray_results, require_ray


@dataclass
class SweepReport:
    planned: int = 0
    skipped: int = 0
    merged: int = 0
    rows_written: int = 0
    seconds: float = 0.0
    eval_hashes: dict[str, dict[str, str]] = field(default_factory=dict)
    # size -> (base_fp, {expert: fp}): the checkpoints' fingerprints its rows are keyed by
    fingerprints: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)
    eval_notes: dict[str, str] = field(default_factory=dict)  # size -> eval examples cut to max_length, if any
    # size -> how its checkpoints are read where that is not plain: LoRA adapter experts, a converted layout
    # (packed MoE experts, a multimodal wrapper's text model, with what is left out: Checkpoint.layout)
    layout_notes: dict[str, str] = field(default_factory=dict)
    # merges evaluated but not cached, one line each: weights or losses not finite (a diverging
    # hyperparameter), or a row the cache refused; the other merges' rows are kept, a rerun retries these
    not_cached: list[str] = field(default_factory=list)
    # torch intra-op threads the merges ran on here (`mergelab.engine.threads`), read back from torch
    # while they ran, and why; None with the Ray backend (each actor chooses its own)
    threads: int | None = None
    threads_reason: str = ""
    # size -> its memory plan in words (placement and numbers, `MemoryPlan.describe`); local backend only
    memory_plans: dict[str, str] = field(default_factory=dict)

    def threads_note(self) -> str:
        """What the merges ran on, e.g. '1 torch thread (7,376 parameters: one thread for a model this small)'."""
        if self.threads is None:
            return "the Ray actors' threads (each chooses its own)"
        return f"{self.threads} torch thread{'s' if self.threads != 1 else ''} ({self.threads_reason})"

    def not_cached_note(self, shown: int = 3) -> str | None:
        """One line on the merges not cached (None when there are none): how many, the first `shown` reasons."""
        if not self.not_cached:
            return None
        more = len(self.not_cached) - shown
        return (f"{len(self.not_cached)} merge(s) not cached, the rest kept (a rerun tries them again): "
                + "; ".join(self.not_cached[:shown]) + (f"; and {more} more" if more > 0 else ""))


class _RowWriter:
    """Buffers rows and upserts them at most every `flush_seconds` (and at the end), so a crash loses
    at most the last few seconds of work and the cache never sees half a merge."""

    def __init__(self, store: ResultStore, flush_seconds: float, report: SweepReport, family: str):
        self.store, self.flush_seconds, self.report, self.family = store, flush_seconds, report, family
        self.rows, self.last, self.recorded = [], time.monotonic(), set()

    def add(self, rows: list[dict]) -> None:
        self.rows.extend(rows)
        if time.monotonic() - self.last >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.record_inputs({row["size"] for row in self.rows})
            self.report.rows_written += self.store.upsert(self.rows, rejected=self.report.not_cached)
            self.rows = []
        self.last = time.monotonic()

    def record_inputs(self, sizes) -> None:
        """Make the inputs of `sizes` current, once each, before their first rows (never on an input error:
        nothing is written before the first merge is evaluated)."""
        for size in sorted(set(sizes) - self.recorded):
            base_fp, experts_fp = self.report.fingerprints[size]
            self.store.record_inputs(self.family, size, base_fp, experts_fp, self.report.eval_hashes[size], METRIC_VERSION)
            self.recorded.add(size)


ProgressCallback = Callable[["SweepReport", int, "WorkItem | None"], None]


BACKENDS = ("local", "ray")


def run_sweep(spec: SweepSpec, store: ResultStore, device: str | None = None, progress: bool = True,
              flush_seconds: float = 2.0, on_progress: ProgressCallback | None = None,
              backend: str = "local", address: str | None = None) -> SweepReport:
    """Run the sweep here (backend "local") or on a Ray cluster (backend "ray", `address` as for
    `ray.init`); either way this process alone writes the cache, as rows arrive.
    `on_progress(report, total, item)` is called once the plan is known (item None) and after every
    merge; it may raise to stop the sweep (rows done so far are kept).

    Rows hold the loss in nats per token per domain (`mergelab.engine.evaluate`) and the size as its
    parameter count; merges already cached for the same eval sets and metric version are skipped.
    A merge whose weights or losses are not finite is not cached and costs no other merge its rows: it
    is listed, with the reason, in the report's `not_cached` (a rerun tries it again).
    Raises HyperparameterError (unknown method or value), CheckpointError (incompatible checkpoints,
    unknown device), EvalSetError, MergelabError (a memory plan that does not fit, an unknown backend, Ray
    missing) before anything is written, and CacheError if the cache cannot be written."""
    from mergelab.bars import progress_bar

    if backend not in BACKENDS:
        raise MergelabError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "ray" and spec.downstream is not None:
        raise MergelabError("--downstream runs with --backend local only (lm-eval on the resident model here)")
    if backend == "ray":
        require_ray()  # before the (slow) planning: a missing extra fails at once
    choose_threads(0)  # a bad MERGELAB_THREADS is refused before the planning too
    started = time.perf_counter()
    report, todo, eval_data = plan_sweep(spec, store)  # validates methods, hyperparameters and checkpoints
    if backend == "local":
        plans = plan_sizes(spec.family, todo, device)
        for plan in plans.values():
            require_fit(plan)  # refused with the numbers before anything is loaded
        report.memory_plans = {name: plan.describe() for name, plan in plans.items()}
        if progress:  # the CLI shows where the weights will live before the first merge
            for text in report.memory_plans.values():
                print(f"memory plan: {text}", file=sys.stderr, flush=True)
        results = local_results(spec.family, todo, eval_data, device, progress, plans, spec.downstream)
    else:
        results = ray_results(spec.family, todo, eval_data, device, address)
    total = sum(map(len, todo.values()))
    writer = _RowWriter(store, flush_seconds, report, spec.family.name)
    bar = progress_bar(total, "merge+eval", unit="merge", disable=not progress)
    threads = contextlib.ExitStack()  # a local sweep's torch threads, as they were again once it ends
    try:
        if backend == "local":  # Ray actors choose their own (ray_backend.SweepActor)
            import torch

            largest = max((spec.family.size(name).n_params for name, items in todo.items() if items), default=0)
            choice = threads.enter_context(torch_threads(largest))
            report.threads, report.threads_reason = torch.get_num_threads(), choice.reason
        if on_progress:
            on_progress(report, total, None)
        for item, rows in results:
            if isinstance(rows, NotFinite):
                report.not_cached.append(rows.reason)
            else:
                base_fp, experts_fp = report.fingerprints[item.size]
                inputs = {"base_fp": base_fp, "experts_fp": join_fingerprints(experts_fp[e] for e in sorted(item.subset))}
                writer.add([{**row, **inputs} for row in rows])
            report.merged += 1
            bar.update(1)
            if on_progress:
                on_progress(report, total, item)
        writer.record_inputs(report.fingerprints)  # sizes with nothing to compute: their inputs are current too
    finally:
        results.close()  # stops the backend's work in flight (Ray actors) when the sweep is stopped early
        threads.close()
        bar.close()
        writer.flush()
        report.seconds = time.perf_counter() - started
    return report


def plan_sweep(spec: SweepSpec, store: ResultStore) -> tuple[SweepReport, dict[str, list[WorkItem]], dict[str, EvalData]]:
    """Validate the spec and checkpoints, tokenize the eval sets and list the merges not yet cached
    (per size). Nothing is written; the dashboard uses this for its estimate before launch. Each size's
    plan is counted first and refused above `mergelab.sweep.plan.max_merges()` (MergelabError), so
    neither the CLI nor the dashboard ever lists 2^30 subsets."""
    # the family's [merge] options (weights, filters) unless the sweep gives its own
    methods = {name: get_method(name).resolve({**spec.family.merge, **hp}) for name, hp in spec.methods.items()}
    sizes = [spec.family.size(name) for name in spec.sizes]
    for size in sizes:  # counted before any checkpoint is opened or any subset listed
        check_plan_size(size.name, len(size.experts), spec.ks_for(size), spec.subsets, len(methods), spec.reference_rows)
    _check_sizes(sizes)
    # a weight for an expert no swept size has, a filter matching no tensor of a size: refused, not ignored
    experts = list(dict.fromkeys(e for size in sizes for e in size.expert_names))
    owners = f"size {sizes[0].name!r}" if len(sizes) == 1 else f"any of sizes {', '.join(s.name for s in sizes)}"
    for size in sizes:
        base = Checkpoint(size.base)
        tensors = base.names
        base.close()
        for name, hp in methods.items():
            check_options(name, hp, tensors, experts, f"size {size.name!r}", owners)
    report, todo, eval_data = SweepReport(), {}, {}
    for size in sizes:
        eval_data[size.name] = _prepare_size_eval(spec.family, size)
        report.eval_hashes[size.name] = eval_data[size.name].hashes
        if eval_data[size.name].truncation_note():
            report.eval_notes[size.name] = eval_data[size.name].truncation_note()
        report.fingerprints[size.name] = size_fingerprints(size)
        if layout_note(size):
            report.layout_notes[size.name] = layout_note(size)
        planned = _plan_size(spec, size, methods)
        report.planned += len(planned)
        todo[size.name] = _uncached(store, spec.family, size, planned, eval_data[size.name].hashes,
                                    report.fingerprints[size.name])
        report.skipped += len(planned) - len(todo[size.name])
    return report, todo, eval_data


def _check_sizes(sizes: list[SizeSpec]) -> None:
    """Validate every checkpoint up front, before any row is written: the parameter count against the
    manifest's n_params (SizeSpec.n_params, which rows and the memory plan then use), and each expert's
    tensors, config and tokenizer against the base's (check_compatible)."""
    for size in sizes:
        size.n_params  # counted from the base's headers; ManifestError if the manifest says otherwise
        base = Checkpoint(size.base)
        for path in size.experts.values():
            check_compatible(base, Checkpoint(path), size.vocab_policy)


def layout_note(size: SizeSpec) -> str:
    """One line on how a size's checkpoints are read where that is not plain ('' if it is): the base's
    converted layout (`StoredLayout.note`) and the experts that are LoRA adapters of the base."""
    from mergelab.io.adapters import AdapterPath

    layout = Checkpoint(size.base).layout
    parts = [layout.note()] if layout is not None and layout.note() else []
    adapters = [name for name, path in size.experts.items() if isinstance(path, AdapterPath)]
    if adapters:
        parts.append(f"expert{'s' if len(adapters) > 1 else ''} {', '.join(adapters)} "
                     f"{'are LoRA adapters' if len(adapters) > 1 else 'is a LoRA adapter'} of the base, read as "
                     f"base + scale·B·A (no merged copy is written)")
    return "; ".join(parts)


def adopt_unrecorded(family: Family, store: ResultStore, sizes=None) -> dict[str, int]:
    """Stamp `family`'s rows cached without fingerprints with those of the checkpoints its manifest names
    now, where their eval sets match (ResultStore.adopt_unrecorded), size by size: {size: rows adopted}.
    Use it when the checkpoints have not changed since the rows were computed (a cache from before
    fingerprints); a sweep would otherwise recompute them. Raises as plan_sweep for unreadable inputs."""
    adopted = {}
    for name in sizes or family.size_names:
        size = family.size(name)
        base_fp, experts_fp = size_fingerprints(size)
        hashes = _prepare_size_eval(family, size).hashes
        adopted[name] = store.adopt_unrecorded(family.name, name, base_fp, experts_fp, hashes, METRIC_VERSION)
    return adopted


def _prepare_size_eval(family: Family, size: SizeSpec) -> EvalData:
    from transformers import AutoTokenizer

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
    subsets = plan_subsets(size.expert_names, spec.ks_for(size), spec.subsets, spec.seed)
    for name, hp in methods.items():
        items.extend(WorkItem(size.name, name, canonical_hparams(hp), s) for s in subsets)
    return items


def _uncached(store: ResultStore, family: Family, size: SizeSpec, items: list[WorkItem], hashes,
              fingerprints: tuple[str, dict[str, str]]) -> list[WorkItem]:
    cached = {}
    for method, hparams in {(i.method, i.hparams) for i in items}:
        cached[method, hparams] = store.cached_keys(family.name, size.name, method, hparams, hashes, METRIC_VERSION,
                                                    *fingerprints)
    return [i for i in items if experts_key(i.subset) not in cached[i.method, i.hparams]]
