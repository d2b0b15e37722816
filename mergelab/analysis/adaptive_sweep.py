"""Live adaptive sweeps: the policy of mergelab.analysis.adaptive with merges made by `run_sweep` and read
back from the results cache (here, in the analysis layer, as it needs the fits; `mergelab worker` hands
`run_adaptive_job` to the job runner of mergelab.sweep.worker).

Everything the policy knows comes from the cache: before each curve it reads the merges already cached
for it (current rows of its family, size, method setting, evaluated on every domain), so a sweep killed
at any point (kill -9 included) continues where it stopped when it is run again, and merges cached by
earlier sweeps are used, not repeated. Each batch is one `run_sweep` of an explicit subset list; curves
are taken smallest size first (the cheapest merges first under a budget)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from mergelab.analysis.adaptive import AdaptiveResult, Step, Target, parse_target, require_per_curve
from mergelab.names import MACRO, experts_key
from mergelab.store import ResultStore
from mergelab.sweep.plan import SweepSpec

if TYPE_CHECKING:
    import pandas as pd

    from mergelab.sweep.runner import SweepReport

logger = logging.getLogger(__name__)


@dataclass
class AdaptiveReport:
    """Per curve (size, method setting) the policy's result; merges evaluated in this run, seconds."""

    target: Target
    curves: dict[tuple[str, str, str], AdaptiveResult] = field(default_factory=dict)
    merged: int = 0
    cached_before: int = 0
    seconds: float = 0.0
    not_cached: list[str] = field(default_factory=list)


def cached_curve(store: ResultStore, family: str, size: str, method: str, hparams: str) -> dict[str, float]:
    """{experts_key: macro loss} of the current cached merges of one curve (merges evaluated on every domain
    of the size's current rows); {} when the cache does not exist yet."""
    from mergelab.analysis.tables import merge_losses

    if not store.exists():
        return {}
    rows = store.results(family=family, size=size, method=method, hparams=hparams)
    if rows.empty:
        return {}
    every = store.results(family=family, size=size)
    n_domains = every["domain"].nunique()
    counts = rows.groupby("experts_key")["domain"].nunique()
    complete = set(counts[counts == n_domains].index)
    macro = merge_losses(rows, MACRO)
    macro = macro[macro["experts_key"].isin(complete)]
    return dict(zip(macro["experts_key"], map(float, macro["loss"])))


StepCallback = Callable[[tuple[str, str, str], Step], None]


def run_adaptive_sweep(spec: SweepSpec, target: "Target | str", store: ResultStore, *, budget: int | None = None,
                       device: str | None = None, progress: bool = True, on_progress=None,
                       on_step: StepCallback | None = None) -> AdaptiveReport:
    """Run the adaptive policy for every (size, method setting) curve of `spec` (its ks and subsets are
    ignored: the policy chooses), merging each batch with `run_sweep` (reference rows included) and reading
    the losses back from `store`. budget: at most this many merges per curve, cached ones included.
    on_progress(report, total, item) is passed to each batch's run_sweep (it may raise to stop); on_step
    ((size, method, hparams), Step) after every refit. Raises TargetError for a bad or joint-law target,
    and what run_sweep raises."""
    from mergelab.engine.methods import canonical_hparams, get_method
    from mergelab.sweep.runner import run_sweep

    target = parse_target(target) if isinstance(target, str) else target
    require_per_curve(target)
    report = AdaptiveReport(target)
    started = time.perf_counter()
    family = spec.family
    sizes = sorted((family.size(name) for name in spec.sizes), key=lambda s: s.n_params)
    settings = {name: (hp, canonical_hparams(get_method(name).resolve(hp))) for name, hp in spec.methods.items()}
    seconds_per_merge: dict[str, float] = {}
    for size in sizes:
        for method, (hp, hparams) in settings.items():
            key = (size.name, method, hparams)
            known = cached_curve(store, family.name, size.name, method, hparams)
            report.cached_before += len(known)

            def evaluate(batch, size=size, method=method, hp=hp, hparams=hparams):
                one = SweepSpec(family, [size.name], {method: hp}, [], [tuple(s) for s in batch], spec.seed,
                                spec.reference_rows)
                t0 = time.perf_counter()
                sweep = run_sweep(one, store, device=device, progress=progress, on_progress=on_progress)
                report.merged += sweep.merged
                report.not_cached += sweep.not_cached
                if sweep.merged:
                    seconds_per_merge[size.name] = (time.perf_counter() - t0) / sweep.merged
                losses = cached_curve(store, family.name, size.name, method, hparams)
                return [losses.get(experts_key(s), float("nan")) for s in batch]

            def step(record, key=key):
                logger.info("adaptive %s · %s: %d merges, %s = %.6g [%.6g, %.6g], ~%s merges to go", key[0], key[1],
                            record.merges, target.label, record.estimate, record.lo, record.hi,
                            "?" if record.predicted_remaining != record.predicted_remaining else
                            f"{record.predicted_remaining:g}")
                if on_step:
                    on_step(key, record)

            report.curves[key] = run_policy_live(target, size.expert_names, evaluate, budget, known, spec.seed,
                                                 seconds_per_merge.get(size.name, 1.0), step)
    report.seconds = time.perf_counter() - started
    return report


def run_policy_live(target, experts, evaluate, budget, known, seed, cost, step) -> AdaptiveResult:
    from mergelab.analysis.adaptive import run_policy

    return run_policy(target, experts, evaluate, budget=budget, known=known, seed=seed, cost=cost, on_step=step)


def run_adaptive_job(job, on_progress) -> "SweepReport":
    """An adaptive SweepJob (job.adaptive set) as the worker runs it: run_adaptive_sweep with its batches'
    progress folded into one SweepReport (merges and rows of every batch so far; `total` is the merges
    done plus those the policy predicts are still needed), so the job queue shows one job. The report's
    `adaptive_note` is the latest interval, e.g. 'L∞ = 0.4712 [0.468, 0.474], ~12 merges to go', and
    `adaptive_summary` one line per curve once done. Raises as run_adaptive_sweep."""
    from mergelab.sweep.runner import SweepReport

    combined = SweepReport()
    combined.adaptive_note = ""
    state = {"merged": 0, "rows": 0, "not_cached": [], "remaining": None, "batch": None}
    target = parse_target(job.adaptive)

    def fold(batch, total, item):
        if batch is not state["batch"]:  # a new batch: bank the last one's counts
            if state["batch"] is not None:
                state["merged"] += state["batch"].merged
                state["rows"] += state["batch"].rows_written
                state["not_cached"] += state["batch"].not_cached
            state["batch"] = batch
        combined.merged = state["merged"] + batch.merged
        combined.rows_written = state["rows"] + batch.rows_written
        combined.not_cached = state["not_cached"] + batch.not_cached
        combined.threads, combined.threads_reason = batch.threads, batch.threads_reason
        left = total - batch.merged
        remaining = state["remaining"]
        if remaining is not None and remaining == remaining and remaining != float("inf"):  # a finite prediction
            left = max(left, int(remaining))
        if on_progress:
            on_progress(combined, combined.merged + left, item)

    def step(key, record):
        state["remaining"] = record.predicted_remaining
        left = ("target met" if record.predicted_remaining == 0 else
                "merges to go unknown" if record.predicted_remaining != record.predicted_remaining else
                "out of reach (predicted)" if record.predicted_remaining == float("inf") else
                f"~{record.predicted_remaining:.0f} merges to go")
        ci = f"[{record.lo:.4g}, {record.hi:.4g}]" if record.lo == record.lo else "(no interval yet)"
        combined.adaptive_note = f"{key[0]} · {key[1]}: {target.label} = {record.estimate:.4g} {ci} after " \
                                 f"{record.merges} merges, {left}"

    spec = job.sweep_spec()
    report = run_adaptive_sweep(spec, target, ResultStore(job.db), budget=job.budget, device=job.device,
                                progress=False, on_progress=fold, on_step=step)
    combined.merged, combined.skipped = report.merged, report.cached_before
    combined.rows_written = state["rows"] + (state["batch"].rows_written if state["batch"] else 0)
    combined.not_cached = report.not_cached
    combined.adaptive_summary = "; ".join(
        f"{size} · {method}: {target.label} = {r.estimate:.4g} "
        + (f"[{r.lo:.4g}, {r.hi:.4g}]" if r.lo == r.lo else "(no interval)") + f" from {r.merges} merges, {r.reason}"
        for (size, method, _), r in report.curves.items())
    return combined


def interval_history(job, n_boot: int = 200) -> "pd.DataFrame":
    """How the target's interval shrank as an adaptive job's merges landed, from the cache alone: per
    curve of the job, the interval on the merges cached up to each batch boundary (merges ordered by
    when they were cached, boundaries as the policy's batches: the start design, then batch_size steps).
    Columns: curve ('size · method'), merges, estimate, lo, hi, threshold. Empty before the first interval."""
    import pandas as pd

    from mergelab.analysis.adaptive import batch_size, interval, start_design
    from mergelab.engine.methods import canonical_hparams, get_method
    from mergelab.names import key_experts

    target = parse_target(job.adaptive)
    spec = job.sweep_spec()
    store = ResultStore(job.db)
    rows = []
    if not store.exists():
        return pd.DataFrame(columns=["curve", "merges", "estimate", "lo", "hi", "threshold"])
    for name in spec.sizes:
        size = spec.family.size(name)
        M = len(size.experts)
        for method, hp in spec.methods.items():
            hparams = canonical_hparams(get_method(method).resolve(hp))
            losses = cached_curve(store, spec.family.name, name, method, hparams)
            if not losses:
                continue
            when = (store.results(family=spec.family.name, size=name, method=method, hparams=hparams)
                    .groupby("experts_key")["created_at"].max())
            keys = sorted(losses, key=lambda k: (when.get(k), k))
            n, marks = len(start_design(size.expert_names)), []
            while n < len(keys):
                marks.append(n)
                n += batch_size(M, n)
            for n in marks + [len(keys)]:
                chosen = keys[:n]
                iv = interval(target, [key_experts(k) for k in chosen], [losses[k] for k in chosen], M,
                              n_boot=n_boot, seed=n)
                if np.isfinite(iv.half_width):
                    rows.append({"curve": f"{name} · {method}", "merges": n, "estimate": iv.estimate, "lo": iv.lo,
                                 "hi": iv.hi, "threshold": target.threshold(iv.estimate)})
    return pd.DataFrame(rows, columns=["curve", "merges", "estimate", "lo", "hi", "threshold"])
