"""Guards of the command line and the sweep planner (issue 14, items 4, 8, 11, 12, 14): k from each swept
size's own pool, plans counted before they are listed, no output over an input, a full disk and a killed
build handled, memory in units that show it, the joint fit's reason said. Real checkpoints saved by
save_pretrained, real DuckDB files, real processes."""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mergelab.errors import MergelabError
from mergelab.io.family import load_family, write_manifest
from mergelab.store import ResultStore
from tests.helpers import build_tiny_family, synthetic_results, wait_until
from tests.test_sweep import cli

ROOT = Path(__file__).resolve().parent.parent


def digests(*roots: Path) -> dict[Path, str]:
    files = [f for r in roots for f in ([r] if r.is_file() else sorted(r.rglob("*"))) if f.is_file()]
    return {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def two_pool_family(root: Path) -> Path:
    """Size s with 3 experts (alpha, beta, gamma) and size t with 2 (alpha, beta): copies of s's real
    checkpoints, so the pools differ and nothing else does."""
    manifest = build_tiny_family(root)
    family = load_family(manifest)
    for name in ("base", "experts/alpha", "experts/beta"):
        shutil.copytree(root / "s" / name, root / "t" / name)
    s = family.size("s")
    write_manifest(manifest, "pools", family.domains, {d: f"eval/{d}.jsonl" for d in family.domains}, [
        {"name": "s", "n_params": s.n_params, "base": "s/base", "experts": {e: f"s/experts/{e}" for e in s.experts}},
        {"name": "t", "n_params": s.n_params, "base": "t/base", "experts": {e: f"t/experts/{e}" for e in ("alpha", "beta")}},
    ], token_budget=40)
    return manifest


# -- item 4: k from each swept size's own pool -------------------------------------------------------------

def test_k_all_means_each_swept_sizes_own_pool(tmp_path, capsys):
    from mergelab.sweep.plan import SweepJob, SweepSpec, parse_ks
    from mergelab.sweep.runner import plan_sweep

    manifest = two_pool_family(tmp_path / "fam")
    family = load_family(manifest)
    db = tmp_path / "r.duckdb"
    # sweeping only s (3 experts): all means 1..3 — before, the smallest pool of any size (t's 2) capped it
    code, out, err = cli(capsys, "sweep", "--family", manifest, "--sizes", "s", "--methods", "average", "--k", "all",
                         "--db", db, "--device", "cpu")
    assert code == 0, err
    assert "11 merges evaluated" in out  # base + 3 experts + C(3,1) + C(3,2) + C(3,3)
    merged = ResultStore(db).results(method="average")
    assert sorted(merged["k"].unique()) == [1, 2, 3]

    pools = {"s": 3, "t": 2}
    assert parse_ks("all", pools) == [] and parse_ks("all", 3) == [1, 2, 3]
    report, todo, _ = plan_sweep(SweepSpec(family, ["s", "t"], {"average": {}}, parse_ks("all", pools)), ResultStore(db))
    assert report.planned == 11 + 6 and report.skipped == 11  # t: base + 2 experts + C(2,1) + C(2,2)
    assert sorted({len(i.subset) for i in todo["t"]}) == [0, 1, 2]
    assert parse_ks("1-2", pools) == [1, 2] and parse_ks("3", {"s": 3}) == [3]
    for text in ("3", "1-3", "2,3"):
        with pytest.raises(MergelabError, match=r"size 't' has 2 experts"):
            parse_ks(text, pools)
    code, _, err = cli(capsys, "sweep", "--family", manifest, "--methods", "average", "--k", "3", "--db", db)
    assert code == 2 and "k must lie in 1..2: size 't' has 2 experts" in err and err.count("\n") == 1

    job = SweepJob(str(manifest), {"average": {}}, ("s", "t"))  # queued by the Sweep page: ks () = each pool
    spec = SweepJob.from_json(job.to_json()).sweep_spec()
    assert spec.ks_for(family.size("s")) == [1, 2, 3] and spec.ks_for(family.size("t")) == [1, 2]
    with pytest.raises(MergelabError, match=r"k = 3 does not fit size 't', which has 2 experts"):
        plan_sweep(SweepJob(str(manifest), {"average": {}}, ("s", "t"), (1, 2, 3)).sweep_spec(), ResultStore(db))


def sweep_page(monkeypatch, tmp_path, manifest):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MERGELAB_DB", str(tmp_path / "page.duckdb"))
    monkeypatch.setenv("MERGELAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MERGELAB_ROOTS", str(manifest.parent))
    monkeypatch.setenv("MERGELAB_JOBS", str(tmp_path / "jobs.sqlite"))
    at = AppTest.from_file(str(ROOT / "pages" / "2_Sweep.py"), default_timeout=120).run()
    at.selectbox(key="sweep-family").set_value("other path…").run()
    at.text_input[0].input(str(manifest)).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_sweep_page_plans_each_size_on_its_own_pool(tmp_path, monkeypatch):
    manifest = two_pool_family(tmp_path / "fam")
    at = sweep_page(monkeypatch, tmp_path, manifest)
    assert any("experts per size: s 3, t 2" in m.value for m in at.markdown)
    assert at.slider[0].value == (1, 3)
    next(m for m in at.multiselect if m.label == "Sizes").set_value(["s", "t"])
    at.button[0].click().run()  # Estimate over the full range: 1..M of each size
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("17 merges planned" in i.value for i in at.info), [i.value for i in at.info]
    next(m for m in at.multiselect if m.label == "Sizes").set_value(["s", "t"])
    at.slider[0].set_value((2, 3))
    at.button[0].click().run()  # a narrower range must fit every chosen size
    assert not at.exception
    assert any("does not fit size 't', which has 2 experts" in e.value for e in at.error), [e.value for e in at.error]


# -- item 12: plans counted before they are listed ---------------------------------------------------------

THIRTY = tuple(f"d{i:02d}" for i in range(30))


@pytest.fixture(scope="module")
def thirty(tmp_path_factory) -> Path:
    """A family of 30 real tiny experts (one per domain) in one size."""
    return build_tiny_family(tmp_path_factory.mktemp("thirty"), domains=THIRTY)


def test_thirty_experts_with_the_defaults_are_refused_with_the_count(thirty, tmp_path, capsys, monkeypatch):
    from mergelab.sweep.plan import SweepSpec, count_subsets, diverse_orderings, parse_subsets, plan_subsets
    from mergelab.sweep.runner import plan_sweep

    assert count_subsets(30, range(1, 31)) == 2**30 - 1
    assert count_subsets(30, range(1, 31), 3) == 29 * 3 + 1 and count_subsets(9, [2], "orderings:15") == 15
    started = time.perf_counter()
    with pytest.raises(MergelabError, match="1,073,741,823 subsets, above the limit of 1,000,000"):
        plan_subsets(THIRTY, range(1, 31))
    assert time.perf_counter() - started < 0.5  # counted, not listed

    db = tmp_path / "r.duckdb"
    started = time.perf_counter()
    code, out, err = cli(capsys, "sweep", "--family", thirty, "--db", db, "--device", "cpu")  # the defaults: 4 methods
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "4,294,967,323 merges" in err and "--subsets N" in err and "MERGELAB_MAX_MERGES" in err  # 4·(2³⁰−1) + 31
    assert time.perf_counter() - started < 20 and not db.exists()

    spec = SweepSpec(load_family(thirty), ["s"], {"average": {}}, [], subsets=3)
    report, todo, _ = plan_sweep(spec, ResultStore(db))
    assert report.planned == 31 + 88 == sum(map(len, todo.values()))
    monkeypatch.setenv("MERGELAB_MAX_MERGES", "100")
    with pytest.raises(MergelabError, match="plan 119 merges, above the limit of 100 per size"):
        plan_sweep(spec, ResultStore(db))
    monkeypatch.delenv("MERGELAB_MAX_MERGES")

    for text in ("orderings:200000", "orderings:2001"):  # once planned for minutes; now refused at once
        with pytest.raises(MergelabError, match="orderings:N with N from 1 to 2,000"):
            parse_subsets(text)
        with pytest.raises(MergelabError, match="from 1 to 2,000"):
            plan_subsets(THIRTY, range(1, 31), text)
    with pytest.raises(MergelabError, match="1..2,000"):
        diverse_orderings(THIRTY, 200_000)
    started = time.perf_counter()
    orders = diverse_orderings(THIRTY, 2000, seed=1)  # the largest allowed: bounded work
    assert len(orders) == 2000 and time.perf_counter() - started < 10
    with pytest.raises(MergelabError, match="--seed -1"):
        plan_subsets(THIRTY, [1, 2], "orderings:3", seed=-1)


def test_sweep_page_estimate_refuses_thirty_experts_without_listing(thirty, tmp_path, monkeypatch):
    at = sweep_page(monkeypatch, tmp_path, thirty)
    started = time.perf_counter()
    at.button[0].click().run()  # Estimate with the page's defaults: all subsets, k 1..30
    assert not at.exception, [e.value for e in at.exception]
    assert any("1,073,741,854 merges" in e.value and "above the limit" in e.value for e in at.error), \
        [e.value for e in at.error]  # (2³⁰ − 1) + 31 reference rows, one method
    assert time.perf_counter() - started < 30


# -- item 8: outputs never over inputs ---------------------------------------------------------------------

@pytest.fixture
def cached(tiny_family, tmp_path):
    db = tmp_path / "cache" / "r.duckdb"
    db.parent.mkdir()
    ResultStore(db).upsert(synthetic_results({"average": lambda k: 2 + 1 / k}, ["a", "b", "c"]))
    return tiny_family, db


@pytest.mark.parametrize("command", [["results"], ["fit"], ["export", "--what", "results"], ["export", "--what", "fits"]])
def test_tables_never_overwrite_the_cache_or_a_family(cached, tmp_path, capsys, command):
    manifest, db = cached
    root = manifest.parent
    before = digests(db, root)
    rows = len(ResultStore(db).results())
    link_dir = tmp_path / "into-checkpoint"
    link_dir.symlink_to(root / "s" / "base", target_is_directory=True)
    for target, fragment in [(db, "would overwrite the results cache"), (manifest, "family manifest"),
                             (root / "eval" / "beta.jsonl", "eval set 'beta'"),
                             (root / "s" / "experts" / "gamma" / "model.safetensors", "checkpoint"),
                             (root / "s" / "experts" / "gamma" / "config.json", "checkpoint"),
                             (link_dir / "table.csv", "lies inside"), (tmp_path / "none" / "t.csv", "does not exist")]:
        code, out, err = cli(capsys, *command, "--db", db, "--out", target)
        assert code == 2 and fragment in err and err.startswith("error: --out ") and err.count("\n") == 1, (target, err)
    assert digests(db, root) == before and len(ResultStore(db).results()) == rows
    good = tmp_path / "table.csv"
    for _ in range(2):  # a fresh file, then the same file again: outputs may replace earlier outputs
        code, _, err = cli(capsys, *command, "--db", db, "--out", good)
        assert code == 0, err
    assert good.stat().st_size > 0 and not list(tmp_path.glob(".table.csv.partial-*"))


def test_export_model_refuses_writing_over_the_manifest_before_any_work(tiny_family, tmp_path, capsys):
    root = tiny_family.parent
    before = digests(root)
    out = tmp_path / "merged"
    code, _, err = cli(capsys, "export-model", "--family", tiny_family, "--size", "s", "--experts", "alpha,beta",
                       "--out", out, "--mergekit-yaml", tiny_family)
    assert code == 2 and "--mergekit-yaml" in err and "would overwrite the family manifest" in err
    assert digests(root) == before and not out.exists()  # the manifest intact, and no model written either
    for option, target in [("--out", root / "s" / "experts" / "alpha" / "merged"), ("--out", root / "eval" / "alpha.jsonl"),
                           ("--mergekit-yaml", root / "s" / "base" / "merge.yml")]:
        args = {"--out": out, "--mergekit-yaml": None, option: target}
        extra = [a for k, v in args.items() if v is not None for a in (k, v)]
        code, _, err = cli(capsys, "export-model", "--family", tiny_family, "--size", "s", "--experts", "alpha", *extra)
        assert code == 2 and err.startswith(f"error: {option} "), (option, target, err)
    assert digests(root) == before and not out.exists()
    yml = tmp_path / "merge.yml"
    code, _, err = cli(capsys, "export-model", "--family", tiny_family, "--size", "s", "--experts", "alpha,beta",
                       "--out", out, "--mergekit-yaml", yml)
    assert code == 0 and (out / "model.safetensors").is_file() and "merge_method: linear" in yml.read_text()


def test_sweep_db_and_worker_queue_and_demo_outputs_spare_inputs(cached, tmp_path, capsys, monkeypatch):
    manifest, db = cached
    root = manifest.parent
    monkeypatch.setenv("MERGELAB_DB", str(db))
    monkeypatch.setenv("MERGELAB_HOME", str(tmp_path / "home"))
    stuff = tmp_path / "stuff"
    stuff.mkdir()
    (stuff / "notes.txt").write_text("mine")
    before = digests(db, root)
    cases = [
        (["sweep", "--family", manifest, "--methods", "average", "--db", manifest], "family manifest"),
        (["sweep", "--family", manifest, "--methods", "average", "--db", root / "s" / "base" / "r.duckdb"], "base checkpoint"),
        (["worker", "--once", "--queue", db], "the results cache"),
        (["worker", "--once", "--queue", root / "eval" / "alpha.jsonl"], "eval set"),
        (["demo", "build", "--out", db.parent, "--force"], "holds the results cache"),  # --force would delete it
        (["demo", "build", "--out", root, "--force"], "holds"),  # the family itself, and the cache
        (["demo", "build", "--out", stuff, "--force"], "replaces only a demo family"),
        (["demo", "build", "--out", root / "s" / "base" / "demo"], "lies inside"),
        (["demo", "up", "--no-ui", "--db", manifest], "family manifest"),
    ]
    for args, fragment in cases:
        code, _, err = cli(capsys, *args)
        assert code == 2 and fragment in err and err.count("\n") == 1, (args, err)
    assert digests(db, root) == before and not (tmp_path / "home").exists()


# -- item 11: a full disk ----------------------------------------------------------------------------------

def _build(out: Path, limit: int | None = None):
    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "mergelab", "demo", "build", "--sizes", "xs", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, preexec_fn=small_files if limit else None)


@pytest.mark.slow
@pytest.mark.parametrize("limit, where", [(2048, "eval sets"), (20_000, "safetensors")])
def test_demo_build_onto_a_full_disk_fails_in_one_line(tmp_path, limit, where):
    """Files may not grow past `limit` bytes: the eval sets (Python writes) or the first checkpoint
    (safetensors' Rust writer) hit the full disk; either way one line, exit 2, nothing left behind."""
    out = tmp_path / "fam"
    result = _build(out, limit)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2, result.stderr[-2000:]
    assert last.startswith(f"error: {out}: cannot write the demo family (disk is full") and "free some space" in last
    assert "Traceback" not in result.stderr
    assert sum(line.startswith("error:") for line in result.stderr.splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".*partial-*")), list(tmp_path.iterdir())


# -- item 14: stale staging folders, memory units, the joint fit's reason -----------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.slow
def test_a_killed_demo_build_leaves_nothing_after_the_next_build(tmp_path):
    from mergelab.demo.build import build_family
    from mergelab.paths import OWNER_FILE, make_staging

    out = tmp_path / "fam"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "mergelab", "demo", "build", "--sizes", "xs", "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: any(tmp_path.glob(".fam.partial-*/eval/*.jsonl")), timeout=120)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed = list(tmp_path.glob(".fam.partial-*"))
    assert len(killed) == 1 and not out.exists()  # what a kill leaves: a hidden half-built family
    assert (killed[0] / OWNER_FILE).read_text().split()[0] == str(proc.pid)
    live = make_staging(out)  # a build still running in this process: kept
    reused = tmp_path / ".fam.partial-reused"  # its pid now belongs to another process (started later): stale
    reused.mkdir()
    (reused / OWNER_FILE).write_text(f"{os.getpid()} 1")
    manifest = build_family("micro", out, sizes=["xs"], progress=False)
    assert load_family(manifest).size_names == ("xs",)
    assert sorted(tmp_path.glob(".fam.partial-*")) == [live]
    assert not (out / OWNER_FILE).exists()


def test_a_killed_export_leaves_nothing_after_the_next_export(tiny_family, tmp_path, capsys):
    from mergelab.paths import OWNER_FILE

    out = tmp_path / "merged"
    stale, unmarked_old, fresh = (tmp_path / f".merged.partial-{n}" for n in ("dead", "old", "fresh"))
    for folder in (stale, unmarked_old, fresh):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    (stale / OWNER_FILE).write_text(str(_dead_pid()))
    os.utime(unmarked_old, (time.time() - 3600, time.time() - 3600))  # from an older mergelab, an hour ago
    code, _, err = cli(capsys, "export-model", "--family", tiny_family, "--size", "s", "--experts", "alpha", "--out", out)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.glob(".merged.partial-*")) == [fresh.name]  # being made right now: kept
    assert (out / "model.safetensors").is_file() and not (out / OWNER_FILE).exists()


def test_memory_sizes_read_in_a_unit_that_shows_them(tiny_family, tmp_path, capsys, monkeypatch):
    from mergelab.engine.memory import LIMIT_ENV, MemoryPlan, format_bytes

    assert [format_bytes(n) for n in (0, 512, 1024, 7380, 3 * 2**19, int(14.93 * 2**30), 1023 * 2**30, 6 * 2**40)] == \
        ["0 B", "512 B", "1.00 KiB", "7.21 KiB", "1.50 MiB", "14.9 GiB", "1023 GiB", "6.00 TiB"]
    assert MemoryPlan("s", "cpu", 151_000, 10_737).describe() == "size s on cpu: needs ~147 KiB, available 10.5 KiB"
    monkeypatch.setenv(LIMIT_ENV, "0.00001")  # 10.5 KiB: the tiny model's plan cannot fit
    db = tmp_path / "r.duckdb"
    code, _, err = cli(capsys, "sweep", "--family", tiny_family, "--methods", "average", "--k", "1", "--db", db,
                       "--device", "cpu")
    assert code == 2 and "needs ~148 KiB, available 10.5 KiB" in err and "0.00 GiB" not in err, err
    assert err.count("\n") == 1


def test_joint_fit_on_one_size_says_why(tmp_path, capsys):
    db = tmp_path / "r.duckdb"
    ResultStore(db).upsert(synthetic_results({"average": lambda k: 2 + 1 / k}, ["a", "b", "c", "d"]))
    code, out, err = cli(capsys, "fit", "--db", db, "--joint")
    assert code == 0
    assert err.strip() == "note: joint fit not identified: a joint fit needs at least 2 sizes, got 1 (N = 0.001); " \
                          "fit the curve alone", err
    assert "reason" in out.splitlines()[0] and out.count("needs at least 2 sizes") == 3  # macro, x, y
