"""Adaptive sweeps (mergelab.analysis.adaptive, mergelab.analysis.adaptive_sweep): target parsing, balanced subset
choice, the policy on simulated families, replay against the shipped exhaustive demo sweep, and a live
adaptive job that resumes after kill -9 from what the cache holds."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from mergelab.analysis.adaptive import (REPLAY_FIELDS, DesignCounts, Target, TargetError, balanced_subset,
                                        parse_target, replay_curve, run_policy, start_design)
from mergelab.analysis.simulate import SCENARIOS, Law, Pool, simulate_losses
from mergelab.demo.up import shipped_results_path
from tests.test_app import env  # noqa: F401  (the fixture: a swept tiny family, private queue and home)

EXPERTS = tuple(f"e{i}" for i in range(9))


@pytest.mark.parametrize("text, want", [
    ("L_inf:0.005", Target("L_inf", 0.005, False, None)),
    ("k90:0.5", Target("k_fraction", 0.5, False, 0.9)),
    ("k80:1", Target("k_fraction", 1.0, False, 0.8)),
    ("A:10%", Target("A", 0.1, True, None)),
    ("predict@9:0.003", Target("predict", 0.003, False, 9.0)),
    (" b : 0.2 ", Target("b", 0.2, False, None)),
    ("L_star:0.01", Target("L_star", 0.01, False, None)),
    ("min_size@1.2:20%", Target("min_size", 0.2, True, 1.2)),
])
def test_targets_parse(text, want):
    got = parse_target(text)
    assert (got.quantity, got.precision, got.relative, got.at) == (want.quantity, pytest.approx(want.precision),
                                                                   want.relative, want.at)
    assert got.text == text


@pytest.mark.parametrize("text, fragment", [
    ("L_inf", "expected QUANTITY:PRECISION"), ("L_inf:", "expected QUANTITY:PRECISION"),
    (":0.1", "expected QUANTITY:PRECISION"), ("L_inf:0", "positive"), ("L_inf:-0.1", "positive"),
    ("L_inf:inf", "positive finite"), ("L_inf:nan", "positive finite"), ("L_inf:x", "'x' is not a number"),
    ("A:%", "is not a number"), ("floor:0.1", "unknown quantity 'floor'"), ("k0:0.5", "unknown quantity 'k0'"),
    ("k100:0.5", "unknown quantity 'k100'"), ("predict:0.1", "predict@K"), ("predict@0:0.1", "K ≥ 1"),
    ("predict@x:0.1", "'x' after '@'"), ("L_inf@3:0.1", "unknown quantity"), ("min_size:0.1", "min_size@LOSS"),
])
def test_bad_targets_are_refused_naming_the_part(text, fragment):
    with pytest.raises(TargetError, match=None) as info:
        parse_target(text)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_target_values_at_known_parameters():
    p = {"L_inf": 1.0, "A": 0.5, "b": 0.0}
    assert parse_target("k90:0.5").value(p, 9) == pytest.approx(5.0)  # b = 0: k90 = M/(M − 0.9(M−1)) = 5 at M = 9
    assert parse_target("predict@9:0.01").value(p, 9) == pytest.approx(1.0 + 0.5 / 9)
    assert parse_target("A:10%").threshold(0.5) == pytest.approx(0.05)
    with pytest.raises(TargetError, match="joint-law"):
        run_policy("L_star:0.01", EXPERTS, lambda batch: [0.0] * len(batch))


def test_start_design_and_balanced_subsets():
    design = start_design(EXPERTS)
    assert len(design) == len(set(map(frozenset, design))) == 22
    ks = sorted({len(s) for s in design})
    assert ks == [1, 2, 4, 9]
    counts = DesignCounts(EXPERTS, design)
    assert set(counts.counts[2]) == {2.0}  # each expert in two pairs
    # three picks at k = 3 partition the pool: each expert once, no pair twice
    picks = []
    for _ in range(3):
        picks.append(balanced_subset(EXPERTS, 3, picks))
    assert sorted(e for s in picks for e in s) == sorted(EXPERTS)
    # 12 picks at k = 3: every expert exactly 4 times, and no subset repeated
    for _ in range(9):
        picks.append(balanced_subset(EXPERTS, 3, picks))
    c = DesignCounts(EXPERTS, picks).counts[3]
    assert c.min() == c.max() == 4 and len(set(map(frozenset, picks))) == 12
    # the choice depends only on the design: a resumed sweep picks the same subset
    assert balanced_subset(EXPERTS, 5, design, seed=3) == balanced_subset(EXPERTS, 5, list(design), seed=3)
    assert balanced_subset(EXPERTS, 9, design) is None  # the one 9-subset is merged
    with pytest.raises(TargetError, match="at least 3 experts"):
        start_design(("a", "b"))


def simulated(seed=0, scenario="mix", law=Law(1.0, 0.5, 1.0)):
    rng = np.random.default_rng(seed)
    pool = Pool.draw(law, SCENARIOS[scenario], 9, rng)
    cache, calls = {}, []

    def evaluate(batch):
        calls.append(len(batch))
        for s in batch:
            if frozenset(s) not in cache:
                idx = tuple(int(e[1:]) for e in s)
                cache[frozenset(s)] = float(simulate_losses(law, SCENARIOS[scenario], [idx], 9, rng, pool)[0])
        return [cache[frozenset(s)] for s in batch]

    return evaluate, cache, calls


def test_policy_on_a_simulated_family_meets_the_target_with_few_merges():
    law = Law(1.0, 0.5, 1.0)
    evaluate, cache, calls = simulated(law=law)
    steps = []
    result = run_policy("L_inf:0.05", EXPERTS, evaluate, seed=0, on_step=steps.append)
    assert result.reason == "target met"
    assert result.met and result.merges == len(cache) < 0.3 * 511
    assert result.lo <= law.L_inf <= result.hi  # the truth (this family, seeded) lies inside
    assert steps[-1].half_width <= 0.05 < steps[0].half_width
    assert steps[-1].predicted_remaining == 0
    assert [s.merges for s in steps] == sorted(s.merges for s in steps)
    assert sum(calls) == result.merges  # no merge asked for twice


def test_known_merges_are_used_first_and_a_rerun_continues_without_new_merges():
    evaluate, cache, _ = simulated(seed=1)
    first = run_policy("L_inf:0.05", EXPERTS, evaluate, seed=0)
    asked = []

    def fresh(batch):
        asked.extend(batch)
        return evaluate(batch)

    known = {"+".join(s): loss for s, loss in zip(first.subsets, first.losses)}
    again = run_policy("L_inf:0.05", EXPERTS, fresh, seed=0, known=known)
    assert asked == [] and again.merges == first.merges and again.reason == first.reason
    assert again.estimate == pytest.approx(first.estimate)
    # half the merges known (a sweep killed half-way): the rest are asked for, none twice
    half = dict(list(known.items())[: len(known) // 2])
    asked.clear()
    run_policy("L_inf:0.05", EXPERTS, fresh, seed=0, known=half)
    assert not {frozenset(s) for s in asked} & {frozenset(k.split("+")) for k in half}
    assert len(asked) == len({frozenset(s) for s in asked})


def test_budget_caps_the_merges_and_says_so():
    evaluate, cache, _ = simulated(seed=2)
    result = run_policy("L_inf:0.00001", EXPERTS, evaluate, budget=30, seed=0, give_up=0)
    assert result.merges == len(cache) == 30 and result.reason == "budget spent"
    assert np.isfinite(result.lo) and result.lo <= result.estimate <= result.hi


def test_an_unreachable_target_stops_as_out_of_reach():
    evaluate, cache, _ = simulated(seed=3, scenario="shared expert effects")
    result = run_policy("L_inf:0.00001", EXPERTS, evaluate, seed=0)
    assert result.reason == "out of reach" and 0.1 * 511 <= result.merges < 511
    assert all(s.predicted_remaining == math.inf for s in result.history[-3:])


@pytest.fixture(scope="module")
def shipped():
    return pd.read_parquet(shipped_results_path())


def test_replay_on_the_shipped_demo_meets_the_target_inside_the_exhaustive_interval(shipped):
    from mergelab.analysis.adaptive import curves_of

    rows = shipped[(shipped["size"] == "xs") & shipped["method"].isin(["average", "base", "expert"])]
    (info, losses), = curves_of(rows)
    assert info["setting"] == "average" and len(losses) == 511
    result, full = replay_curve("L_inf:0.01", info["experts"], losses)
    # the start design (22) looks precise enough; the confirmatory merge at each unseen k (3, 5–8) keeps it so
    assert result.reason == "target met" and result.merges == 27
    assert {len(s) for s in result.subsets} == set(range(1, 10))
    assert full.estimate == pytest.approx(1.0181, abs=1e-4)  # data/demo/README.md: fitted macro L∞ (average, xs)
    assert full.lo <= result.estimate <= full.hi
    assert result.half_width <= 0.011


def test_replay_cli_json_has_exactly_the_fields(shipped, tmp_path, capsys):
    from mergelab.store import ResultStore
    from tests.test_sweep import cli

    part = tmp_path / "xs.parquet"
    shipped[(shipped["size"] == "xs") & shipped["method"].isin(["average", "ties", "base", "expert"])].to_parquet(part)
    db = tmp_path / "r.duckdb"
    ResultStore(db).import_parquet(part)
    code, out, err = cli(capsys, "adaptive", "replay", "--db", db, "--family", "demo-standard", "--target", "k90:0.5",
                         "--format", "json")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [r["method"] for r in lines] == ["average", "ties lambda=0.5", "ties lambda=1.0"]
    for r in lines:
        assert tuple(r) == REPLAY_FIELDS
        assert r["size"] == "xs" and r["target"] == "k90:0.5" and r["exhaustive_merges"] == 511
        assert 27 <= r["merges_used"] <= 0.1 * 511
        assert r["ci"][0] <= r["estimate"] <= r["ci"][1] and (r["ci"][1] - r["ci"][0]) / 2 <= 0.5
    assert lines[0]["exhaustive_estimate"] == pytest.approx(5.0, abs=0.01)  # b = 0 on this curve: k90 = 5
    code, out, _ = cli(capsys, "adaptive", "replay", "--db", db, "--target", "k90:0.5", "--method", "average")
    assert code == 0 and "target met" in out and "exhaustive_ci" in out and out.count("\n") == 3


@pytest.mark.slow
def test_adaptive_job_resumes_after_kill_9_from_the_cache(micro_family, tmp_path):
    from mergelab.store import ResultStore
    from mergelab.sweep.jobs import JobQueue
    from mergelab.sweep.plan import SweepJob
    from mergelab.sweep.worker import reap_orphans
    from tests.helpers import wait_until
    from tests.reliability.faults import check_whole_merges, finish, kill_9, start_worker

    db = tmp_path / "adaptive.duckdb"
    spec = SweepJob(str(micro_family), {"average": {}}, sizes=("xs",), device="cpu", db=str(db),
                    adaptive="L_inf:0.0005", budget=60)
    queue = JobQueue(tmp_path / "jobs.sqlite")
    job_id = queue.submit(spec)
    worker = start_worker(queue.path, "--once")
    # past the first batch (10 reference rows + 22 merges, written when its run_sweep ends), inside a later one
    assert wait_until(lambda: queue.get(job_id).done >= 45, timeout=300, poll=0.05), queue.get(job_id)
    kill_9(worker)
    reap_orphans(queue)
    killed = queue.get(job_id)
    assert killed.status == "failed" and "worker process died" in killed.message
    n_domains = len(ResultStore(db).results()["domain"].unique())
    cached = check_whole_merges(db, n_domains)
    merged_before = set(cached.loc[cached["method"] == "average", "experts_key"])
    assert 22 <= len(merged_before) < 60
    queue.resume(job_id)
    log = finish(start_worker(queue.path, "--once"))
    job = queue.get(job_id)
    assert job.status == "done", (job.message, log[-2000:])
    rows = check_whole_merges(db, n_domains)
    curve = rows[rows["method"] == "average"]
    assert curve["experts_key"].nunique() <= 60  # the budget counts the merges cached before the kill
    assert merged_before <= set(curve["experts_key"])  # nothing lost, nothing merged twice (no duplicate keys)
    assert "xs · average: L∞ = " in job.message
    assert any(why in job.message for why in ("budget spent", "target met", "out of reach")), job.message
    assert "L∞ = " in (job.current or "")  # the interval was shown while it ran


def test_sweep_page_launches_an_adaptive_job_and_shows_its_interval(env, monkeypatch):
    from mergelab.sweep.jobs import JobQueue
    from tests.helpers import wait_until
    from tests.test_app import run

    monkeypatch.setenv("MERGELAB_WORKER_IDLE", "3")  # the worker the page starts leaves soon after
    at = run("pages/2_Sweep.py")
    at.selectbox(key="sweep-family").set_value("other path…").run()
    at.text_input[0].input(str(env)).run()
    at.toggle(key="sweep-adaptive").set_value(True).run()  # the adaptive fields are greyed out until then
    at.selectbox(key="sweep-adaptive-quantity").set_value("L_inf")
    at.text_input(key="sweep-adaptive-precision").input("nope")
    at.button[0].click().run()  # Estimate (the form's values are sent with it): the bad precision is refused
    assert any("Target 'L_inf:nope'" in e.value and "not a number" in e.value for e in at.error), [e.value for e in at.error]
    at.toggle(key="sweep-adaptive").set_value(True)
    at.text_input(key="sweep-adaptive-precision").input("10")
    at.button[1].click().run()  # Launch
    assert not at.exception
    assert any("starts with 7 merges" in i.value for i in at.info), [i.value for i in at.info]
    queue = JobQueue()
    (job,) = queue.list()
    assert job.spec.adaptive == "L_inf:10" and job.spec.subsets == "all" and job.spec.ks == ()
    assert wait_until(lambda: queue.get(job.id).status in ("done", "failed"), timeout=180, poll=0.2)
    done = queue.get(job.id)
    assert done.status == "done" and "s · average: L∞ = " in done.message, done.message
    at = run("pages/2_Sweep.py")
    assert any(e.label.startswith("Adaptive: L_inf:10") for e in at.expander), [e.label for e in at.expander]


def test_cli_adaptive_sweep_then_rerun_merges_nothing_new(tiny_family, tmp_path, capsys):
    from tests.test_sweep import cli

    db = tmp_path / "a.duckdb"
    args = ["sweep", "--family", tiny_family, "--methods", "average", "--adaptive", "L_inf:10", "--db", db,
            "--device", "cpu"]
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    # 3 experts: the start design is every subset (7), plus the base and the 3 single-expert reference rows
    assert "adaptive sweep to 95% CI half-width of L∞ ≤ 10: 11 merges evaluated, 0 already cached" in out
    assert "s · average: L∞ = " in out and "7 merges of 7" in out
    code, out, err = cli(capsys, *args)
    assert code == 0 and "0 merges evaluated, 7 already cached" in out, out + err


@pytest.mark.slow
def test_adaptive_intervals_cover_the_truth_under_the_stopping_rule():
    """A small seeded version of bench/adaptive.py's coverage check (200 families there: 97.0% for L∞, 94.0% for
    k90): the stopping rule must not make the reported 95% interval over-confident."""
    from mergelab.analysis.simulate import random_law

    rng = np.random.default_rng(11)
    hits, stopped = [], []
    for _ in range(40):
        law = random_law(rng)
        pool = Pool.draw(law, SCENARIOS["mix"], 9, rng)
        noise, cache = np.random.default_rng(rng.integers(2 ** 31)), {}

        def evaluate(batch):
            for s in batch:
                if frozenset(s) not in cache:
                    idx = tuple(int(e[1:]) for e in s)
                    cache[frozenset(s)] = float(simulate_losses(law, SCENARIOS["mix"], [idx], 9, noise, pool)[0])
            return [cache[frozenset(s)] for s in batch]

        result = run_policy(f"L_inf:{0.3 * law.drop(9)!r}", EXPERTS, evaluate, seed=int(rng.integers(2 ** 31)),
                            predict=False)
        hits.append(result.lo <= law.L_inf <= result.hi)
        stopped.append(result.reason)
    assert sum(hits) >= 34, (sum(hits), stopped)  # ≥ 85% of 40 (a 95% interval misses 7 or more 0.5% of the time)
    assert stopped.count("target met") >= 25, stopped
