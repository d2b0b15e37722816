"""The Ray backend on a real local Ray instance: the same rows as a local sweep, resumable after an
interruption, driven from the CLI, and a clear error where Ray is not installed."""

import os
import time

import pytest

from mergelab.io.family import load_family
from mergelab.store import ResultStore
from mergelab.sweep.plan import SweepSpec
from mergelab.sweep.runner import run_sweep
from tests.test_imports import run_blocked
from tests.test_sweep import cli

pytestmark = pytest.mark.slow
KEY = ["family", "size", "method", "hparams", "experts_key", "domain", "eval_hash", "metric_version"]


@pytest.fixture(scope="module")
def ray_cluster():
    """One small local Ray instance for the module (starting one costs seconds): 2 CPU slots, so two
    actors, and a small object store (rows are small; the eval data is put once)."""
    import ray  # a test requirement (requirements-dev.txt): never skipped

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20)
    yield ray
    ray.shutdown()


def table(store: ResultStore):
    return store.results().drop(columns="created_at").set_index(KEY).sort_index()


def assert_same_rows(got, want):
    assert got.index.equals(want.index)
    # not bitwise: CPU actors run torch on one thread each (matmul reductions split differently) and
    # their running sums follow another history across chunks; both are fp32 rounding (~5e-8 measured)
    assert (got["loss"] - want["loss"]).abs().max() < 1e-6
    assert got.drop(columns="loss").equals(want.drop(columns="loss"))


def test_ray_sweep_writes_the_rows_of_a_local_sweep(ray_cluster, micro_family, tmp_path):
    """Two sizes of nine experts: actors switch sizes, chunks cut each size's Gray-code order."""
    family = load_family(micro_family)
    spec = SweepSpec(family, list(family.size_names), {"average": {}, "ties": {"density": 0.5}}, [1, 2, 9], subsets=3)
    calls = {"local": [], "ray": []}
    reports = {}
    for backend in calls:
        reports[backend] = run_sweep(spec, ResultStore(tmp_path / f"{backend}.duckdb"), progress=False, backend=backend,
                                     on_progress=lambda r, total, item, b=backend: calls[b].append((r.merged, total, item)))
    local, ray = reports["local"], reports["ray"]
    merges = 2 * (1 + 9 + 2 * (3 + 3 + 1))  # per size: base, experts, 2 methods x (3 + 3 + 1) subsets
    assert ray.merged == local.merged == ray.planned == merges and ray.rows_written == local.rows_written == merges * 9
    assert_same_rows(table(ResultStore(tmp_path / "ray.duckdb")), table(ResultStore(tmp_path / "local.duckdb")))
    # progress arrives merge by merge, as in a local sweep: once with the plan, then after every merge
    assert calls["ray"][0] == (0, merges, None)
    assert [merged for merged, _, _ in calls["ray"][1:]] == list(range(1, merges + 1))
    ray_items = [(i.size, i.method, i.hparams, i.subset) for _, _, i in calls["ray"][1:]]
    assert sorted(ray_items) == sorted((i.size, i.method, i.hparams, i.subset) for _, _, i in calls["local"][1:])


def test_ray_actors_run_on_the_threads_the_policy_chose_for_their_cpus(ray_cluster, tiny_family, tmp_path):
    """Each actor sets its torch threads from its own CPU share (mergelab.engine.threads), overridable by
    MERGELAB_THREADS in its environment."""
    from mergelab.sweep.ray_backend import SweepActor
    from mergelab.sweep.runner import plan_sweep

    family = load_family(tiny_family)
    _, todo, eval_data = plan_sweep(SweepSpec(family, ["s"], {"average": {}}, [1]), ResultStore(tmp_path / "r.duckdb"))
    for env, expected in [({}, (1, "OMP_NUM_THREADS=1")),  # this run's, which Ray also sets for a one-CPU actor
                          ({"MERGELAB_THREADS": "2"}, (2, "MERGELAB_THREADS=2"))]:
        actor = ray_cluster.remote(SweepActor).options(num_cpus=1, runtime_env={"env_vars": env}).remote(
            family, eval_data, "cpu")
        try:
            assert len(ray_cluster.get(actor.evaluate_chunk.remote("s", todo["s"][:2]))) == 2
            assert ray_cluster.get(actor.threads_in_use.remote()) == expected
        finally:
            ray_cluster.kill(actor)


class Stop(Exception):
    pass


def test_interrupted_ray_sweep_resumes_computing_only_the_missing_merges(ray_cluster, tiny_family, tmp_path, capsys):
    spec = SweepSpec(load_family(tiny_family), ["s"], {"average": {}, "ties": {}}, [1, 2, 3])
    reference = ResultStore(tmp_path / "local.duckdb")
    run_sweep(spec, reference, progress=False)
    store = ResultStore(tmp_path / "ray.duckdb")

    def stop_after_six(report, total, item):
        if report.merged == 6:
            raise Stop

    with pytest.raises(Stop):  # e.g. a cancelled job: rows of finished merges are kept
        run_sweep(spec, store, progress=False, backend="ray", on_progress=stop_after_six)
    assert len(store.macro()) == 6 and store.count() == 6 * 3
    deadline = time.monotonic() + 20  # the stopped sweep's actors were killed: their CPU slots come back
    while ray_cluster.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_cluster.available_resources().get("CPU", 0) == 2

    code, out, err = cli(capsys, "sweep", "--family", tiny_family, "--methods", "average,ties", "--db", store.path,
                         "--backend", "ray")
    assert code == 0, err
    assert f"{18 - 6} merges evaluated, 6 already cached, {12 * 3} rows written" in out
    assert_same_rows(table(store), table(reference))
    code, out, err = cli(capsys, "sweep", "--family", tiny_family, "--methods", "average,ties", "--db", store.path,
                         "--backend", "ray")
    assert code == 0 and "0 merges evaluated, 18 already cached" in out


def test_address_without_the_ray_backend_is_refused(tiny_family, tmp_path, capsys):
    code, _, err = cli(capsys, "sweep", "--family", tiny_family, "--db", tmp_path / "r.duckdb", "--address", "auto")
    assert code == 2 and err == "error: --address is for --backend ray\n"
    code, _, err = cli(capsys, "sweep", "--family", tiny_family, "--db", tmp_path / "r.duckdb", "--backend", "dask")
    assert code == 2 and "--backend 'dask': expected one of local, ray" in err
    assert not (tmp_path / "r.duckdb").exists()


def test_ray_backend_without_ray_installed_names_the_extra(tiny_family, tmp_path):
    db = tmp_path / "r.duckdb"
    code = ("import sys, mergelab.sweep.ray_backend; from mergelab.cli import main; "
            f"sys.argv = ['mergelab', 'sweep', '--family', {str(tiny_family)!r}, '--db', {str(db)!r}, '--backend', 'ray']; "
            "main()")
    proc = run_blocked({"ray"}, code)  # Ray made unimportable in that process, as if not installed
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "error: --backend ray needs Ray, which is not installed: pip install 'mergelab[ray]'\n"
    assert not db.exists()
