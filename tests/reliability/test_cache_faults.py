"""The cache under faults: a full disk, an unwritable folder, corrupt, newer-schema, foreign and locked files,
and caches written by an older mergelab (migrated in place, rows kept)."""

from __future__ import annotations

import hashlib
import resource
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from mergelab.errors import CacheError
from mergelab.store import KEY_COLUMNS, SCHEMA_VERSION, ResultStore
from tests.reliability.faults import unpack_cache

pytestmark = pytest.mark.slow


def sweep(family, db, *extra, preexec_fn=None):
    return subprocess.run([sys.executable, "-m", "mergelab", "sweep", "--family", str(family), "--sizes", "xs",
                           "--methods", "average", "--device", "cpu", "--db", str(db), *extra],
                          capture_output=True, text=True, timeout=600, preexec_fn=preexec_fn)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_full_disk_fails_clearly_keeps_rows_and_a_rerun_completes(micro_family, tmp_path, tally):
    db = tmp_path / "r.duckdb"
    assert sweep(micro_family, db, "--k", "1").returncode == 0
    before = ResultStore(db).results()

    def small_files():  # the write-ahead log cannot grow past 2 KiB: the disk is "full" mid-sweep
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    full = sweep(micro_family, db, "--k", "1-2", preexec_fn=small_files)
    assert full.returncode != 0
    assert str(db) in full.stderr and "disk is full" in full.stderr and "Traceback" not in full.stderr
    after_failure = ResultStore(db).results()
    kept = after_failure.set_index(KEY_COLUMNS)["loss"].reindex(before.set_index(KEY_COLUMNS).index)
    assert kept.equals(before.set_index(KEY_COLUMNS)["loss"])  # nothing already cached was lost or changed

    assert sweep(micro_family, db, "--k", "1-2").returncode == 0  # space is back: the rerun completes
    assert ResultStore(db).results()["experts_key"].nunique() == 1 + 9 + 36
    tally["cache faults: disk full"] += 1


def test_unwritable_cache_locations_fail_clearly(micro_family, tmp_path, tally):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for db in (Path("/sys/mergelab/r.duckdb"), blocker / "r.duckdb"):  # even root cannot write in sysfs
        result = sweep(micro_family, db, "--k", "1")
        assert result.returncode != 0 and "cannot create the cache directory" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        tally["cache faults: unwritable location"] += 1
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("kind", ["corrupt", "newer schema", "foreign DuckDB file"])
def test_bad_cache_files_are_refused_and_left_untouched(micro_family, tmp_path, tally, kind):
    db = tmp_path / "r.duckdb"
    if kind == "corrupt":
        db.write_bytes(b"\x00garbage, not a database" * 1000)
        expected = "cannot open the results cache"
    elif kind == "newer schema":
        with duckdb.connect(str(db)) as con:
            con.execute("CREATE TABLE results (x INT); CREATE TABLE meta (key VARCHAR, value VARCHAR)")
            con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION + 1)])
        expected = "newer mergelab"
    else:
        with duckdb.connect(str(db)) as con:
            con.execute("CREATE TABLE invoices (id INT, amount DOUBLE); INSERT INTO invoices VALUES (1, 9.5)")
        expected = "not a mergelab results cache"
    fingerprint = digest(db)
    for command in (sweep(micro_family, db, "--k", "1"),
                    subprocess.run([sys.executable, "-m", "mergelab", "results", "--db", str(db)],
                                   capture_output=True, text=True, timeout=120)):
        assert command.returncode != 0 and expected in command.stderr and str(db) in command.stderr, command.stderr
        assert "Traceback" not in command.stderr
    assert digest(db) == fingerprint  # nothing written, nothing "repaired"
    tally["cache faults: bad files"] += 1


def test_cache_locked_by_another_program(micro_family, tmp_path, tally):
    db = tmp_path / "r.duckdb"
    assert sweep(micro_family, db, "--k", "1").returncode == 0
    rows = len(ResultStore(db).results())
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(60)", str(db)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        result = sweep(micro_family, db, "--k", "1-2")
        assert result.returncode != 0 and "locked by another process" in result.stderr, result.stderr
        assert time.monotonic() - started >= ResultStore(db).lock_timeout  # it waited before giving up
    finally:
        holder.kill()
        holder.wait()
    assert len(ResultStore(db).results()) == rows
    tally["cache faults: locked by another program"] += 1


def v1_cache(tmp_path: Path) -> Path:
    """A cache written by mergelab at schema 1 (shipped as a fixture, made by that version)."""
    return unpack_cache("cache_v1.duckdb.gz", tmp_path)


def test_a_schema_1_cache_is_readable_then_migrated_in_place(tmp_path, tally):
    db = v1_cache(tmp_path)
    old = ResultStore(db).results()  # read-only, before any writer migrated it
    assert len(old) == 8 and old["n_truncated"].isna().all()
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "1"

    new = dict(family="fam", size="s", method="average", hparams="{}", experts_key="a+b+c", domain="alpha",
               eval_hash="halpha", metric_version=1, n_params=1000, loss=1.5, n_tokens=40, device="cpu", n_truncated=3)
    assert ResultStore(db).upsert([new]) == 1
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    migrated = ResultStore(db).results()
    kept = migrated[migrated["experts_key"] != "a+b+c"].drop(columns=["n_truncated"])
    assert kept.reset_index(drop=True).equals(old.drop(columns=["n_truncated"]).reset_index(drop=True))
    assert migrated.set_index("experts_key").loc["a+b+c", "n_truncated"] == 3
    tally["schema migrations exercised"] += 1


def test_a_failed_migration_leaves_the_old_cache_as_it_was(tmp_path, monkeypatch):
    from mergelab import store

    db = v1_cache(tmp_path)
    fingerprint = ResultStore(db).results()
    monkeypatch.setitem(store.MIGRATIONS, 1, store.MIGRATIONS[1] + ["ALTER TABLE no_such_table ADD COLUMN x INT"])
    row = dict(family="fam", size="s", method="average", hparams="{}", experts_key="c", domain="alpha",
               eval_hash="halpha", metric_version=1, n_params=1000, loss=1.5, n_tokens=40, device="cpu")
    with pytest.raises(CacheError, match="no_such_table"):
        ResultStore(db).upsert([row])
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "1"
        columns = [r[0] for r in con.execute("DESCRIBE results").fetchall()]
    assert "n_truncated" not in columns
    assert ResultStore(db).results().equals(fingerprint)
