"""Nothing mergelab starts is reachable from the network, and nothing it opens reaches for it: a local
Ray backend binds every server to 127.0.0.1; DuckDB never installs or loads an extension (a SQLite
file given as the cache used to make it download one)."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import shutil
import sqlite3
import subprocess
import sys

import pytest

from mergelab.errors import CacheError
from mergelab.io.family import load_family
from mergelab.store import ResultStore
from mergelab.sweep.plan import SweepSpec
from mergelab.sweep.runner import run_sweep
from tests.test_store import rows

SQLITE_REFUSAL = "cannot open the results cache (a SQLite database, not a DuckDB file); pick another --db path"


def sqlite_file(path):
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE results (loss REAL)")
    con.commit()
    con.close()
    return path


def network_connects(trace) -> list[str]:
    """The connect() calls to an internet address in an `strace -e trace=connect` log."""
    return [line for line in trace.read_text().splitlines() if "AF_INET" in line]


def test_a_sqlite_file_as_the_cache_is_refused_without_reaching_for_the_network(tiny_family, tmp_path, tally):
    db = sqlite_file(tmp_path / "results.sqlite")
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    home = tmp_path / "home"  # DuckDB installs extensions under ~/.duckdb: it must never even create it
    home.mkdir()
    env = dict(os.environ, HOME=str(home), HF_HUB_OFFLINE="1")
    strace = shutil.which("strace")
    for i, args in enumerate((["results", "--db", str(db)],
                              ["sweep", "--family", str(tiny_family), "--db", str(db), "--methods", "average"])):
        trace = tmp_path / f"trace-{i}.txt"
        command = [sys.executable, "-m", "mergelab", *args]
        if strace:
            command = [strace, "-f", "-qq", "-e", "trace=connect", "-o", str(trace), *command]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and str(db) in proc.stderr and proc.stderr.count("\n") == 1
        assert not any(word in proc.stderr.lower() for word in ("install", "download", "extension"))
        if strace:
            assert network_connects(trace) == [], network_connects(trace)
        tally["exposure: network reached for by a foreign cache file"] += 1
    for read_only in (True, False):  # the store itself, whatever the command checked before it
        with pytest.raises(CacheError) as refused:
            with ResultStore(db).connect(read_only=read_only):
                pass
        assert str(refused.value) == f"{db}: {SQLITE_REFUSAL}"
    assert not (home / ".duckdb").exists()
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before  # untouched


def test_no_cache_connection_may_install_or_load_an_extension(tmp_path):
    store = ResultStore(tmp_path / "r.duckdb")
    store.upsert(rows())
    for read_only in (False, True):
        with store.connect(read_only=read_only) as con:
            settings = con.execute("SELECT current_setting('autoinstall_known_extensions'), "
                                   "current_setting('autoload_known_extensions')").fetchone()
            assert settings == (False, False)
            # a remote file needs httpfs: refused as not loaded, where DuckDB would download and load it
            with pytest.raises(Exception, match="requires the extension httpfs to be loaded"):
                con.execute("SELECT * FROM read_parquet('http://127.0.0.1:9/rows.parquet')").fetchall()
    # through the store's own API, the same file is one clear line
    with pytest.raises(CacheError, match="requires the extension httpfs"):
        store.import_parquet("http://127.0.0.1:9/rows.parquet")


def loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    if getattr(address, "ipv4_mapped", None):
        address = address.ipv4_mapped
    return address.is_loopback


@pytest.mark.slow
def test_a_local_ray_backend_listens_on_loopback_only(tiny_family, tmp_path, capsys, tally):
    """`--backend ray` without --address: gcs_server, raylets, actors and the driver used to bind to `*`.
    While the sweep runs, every listening socket of this process and its descendants (Ray's servers,
    agents and actor processes) must be on 127.0.0.1. The sweep also carries a diverging merge through
    the actors: it is reported, the healthy rows are all kept."""
    import ray

    import psutil  # shipped with Ray (importable once ray is)

    assert not ray.is_initialized()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    seen = {}

    def listeners(report, total, item):
        if item is None or seen:
            return
        family = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
        for conn in psutil.net_connections("inet"):
            if conn.status == psutil.CONN_LISTEN and conn.pid in family:
                seen[(conn.laddr.ip, conn.laddr.port)] = psutil.Process(conn.pid).name()

    spec = SweepSpec(load_family(tiny_family), ["s"], {"average": {}, "ties": {"lambda": 1e30}}, [1, 2, 3])
    store = ResultStore(tmp_path / "r.duckdb")
    report = run_sweep(spec, store, progress=False, backend="ray", on_progress=listeners)
    assert not ray.is_initialized()  # the instance it started is shut down
    names = set(seen.values())
    assert {"gcs_server", "raylet"} <= names and any(n.startswith("ray::") for n in names), seen  # not vacuous
    exposed = {address: name for address, name in seen.items() if not loopback(address[0])}
    assert exposed == {}, exposed
    assert "started a private Ray instance on this machine, every server bound to 127.0.0.1" in capsys.readouterr().err
    assert report.merged == 4 + 2 * 7 and len(report.not_cached) == 7 and store.count() == (4 + 7) * 3
    tally["exposure: sockets of a local Ray backend checked"] += len(seen)
