"""The DuckDB results cache: idempotent upserts, derived expert lists, queries, errors."""

import duckdb
import pytest

from mergelab.errors import CacheError
from mergelab.store import SCHEMA_VERSION, ResultStore
from mergelab.names import experts_key


def rows(keys=("", "a", "a+b"), domains=("x", "y"), loss=1.0, **over):
    base = dict(family="f", size="s", n_params=10, method="average", hparams="{}", eval_hash="h",
                metric_version=1, n_tokens=5, device="cpu")
    base.update(over)
    return [dict(base, experts_key=k, domain=d, loss=loss + i) for i, k in enumerate(keys) for d in domains]


@pytest.fixture
def store(tmp_path):
    return ResultStore(tmp_path / "sub" / "r.duckdb")


def test_upsert_is_idempotent_and_never_duplicates(store):
    assert store.upsert(rows()) == 6
    assert store.upsert(rows() + rows()) == 0
    assert store.upsert(rows(loss=99.0)) == 0  # first result wins; no silent overwrite
    assert store.count() == 6
    frame = store.results()
    assert frame.duplicated(["experts_key", "domain"]).sum() == 0
    assert set(frame["loss"]) == {1.0, 2.0, 3.0}


def test_duplicates_within_one_batch_are_dropped(store):
    batch = rows(keys=("a",), domains=("x",)) * 3
    assert store.upsert(batch) == 1


def test_expert_list_and_k_derive_from_key(store):
    store.upsert(rows())
    frame = store.results(domain="x").set_index("experts_key")
    assert list(frame.loc["a+b", "experts"]) == ["a", "b"] and frame.loc["a+b", "k"] == 2
    assert list(frame.loc["", "experts"]) == [] and frame.loc["", "k"] == 0


def test_experts_key_is_sorted():
    assert experts_key(["physics", "algebra"]) == "algebra+physics" == experts_key(("algebra", "physics"))


def test_filters_are_parameterised_and_lists_mean_any_of(store):
    store.upsert(rows())
    store.upsert(rows(method="ties", hparams='{"density":0.2}'))
    assert set(store.results(method="ties")["hparams"]) == {'{"density":0.2}'}
    assert len(store.results(experts_key=["a", "a+b"], method="average")) == 4
    # a hostile value is just a value: no rows match, nothing breaks
    assert store.results(method="average' OR '1'='1").empty
    with pytest.raises(CacheError, match="unknown column"):
        store.results(**{"loss; DROP TABLE results": 1})


def test_cached_keys_need_every_domain_and_matching_hash(store):
    store.upsert(rows(keys=("a", "b"), domains=("x", "y")))
    store.upsert(rows(keys=("c",), domains=("x",)))
    assert store.cached_keys("f", "s", "average", "{}", {"x": "h", "y": "h"}, 1) == {"a", "b"}
    assert store.cached_keys("f", "s", "average", "{}", {"x": "other", "y": "h"}, 1) == set()
    assert store.cached_keys("f", "s", "average", "{}", {"x": "h", "y": "h"}, 2) == set()


def test_parquet_round_trip_keeps_rows_and_timestamps(store, tmp_path):
    store.upsert(rows())
    assert store.export_parquet(tmp_path / "out.parquet") == 6
    other = ResultStore(tmp_path / "other.duckdb")
    assert other.import_parquet(tmp_path / "out.parquet") == 6
    assert other.import_parquet(tmp_path / "out.parquet") == 0
    a, b = store.results(), other.results()
    assert a.drop(columns="experts").equals(b.drop(columns="experts"))


def test_missing_file_reads_as_empty(tmp_path):
    store = ResultStore(tmp_path / "none.duckdb")
    assert store.results().empty and store.count() == 0 and not store.exists()


def test_corrupt_file_gives_clear_error(tmp_path):
    path = tmp_path / "bad.duckdb"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(CacheError, match="bad.duckdb: cannot open the results cache"):
        ResultStore(path).upsert(rows())
    assert path.read_bytes() == b"this is not a database" * 100  # untouched


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "new.duckdb"
    store = ResultStore(path)
    store.upsert(rows())
    con = duckdb.connect(str(path))
    con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION + 1)])
    con.close()
    with pytest.raises(CacheError, match="newer mergelab"):
        store.results()
    with pytest.raises(CacheError, match="newer mergelab"):
        store.upsert(rows(keys=("z",)))


def test_locked_cache_times_out_with_clear_error(tmp_path):
    import subprocess
    import sys
    import time

    path = tmp_path / "locked.duckdb"
    ResultStore(path).upsert(rows())
    holder = subprocess.Popen([sys.executable, "-c", f"import duckdb,time; c=duckdb.connect({str(path)!r}); print('held', flush=True); time.sleep(30)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with pytest.raises(CacheError, match="locked by another process"):
            ResultStore(path, lock_timeout=0.5).upsert(rows(keys=("z",)))
        assert time.monotonic() - start < 10
    finally:
        holder.kill()
        holder.wait()
    assert ResultStore(path).count() == 6  # nothing lost
