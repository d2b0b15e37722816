"""The DuckDB results cache: one row per (merge, domain), idempotent upserts, DataFrame queries.

DuckDB allows one read-write process or many read-only ones, so every operation opens the file,
does its work and closes it again; readers open read-only and retry briefly while a writer holds it.
A turnstile file (`<db>.writer-lock`) gives writers priority: a writer holds it exclusively while it waits
for and uses the file, readers pass through it before opening, so a stream of dashboard reads cannot
starve a sweep's writes.
"""

from __future__ import annotations

import fcntl
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from mergelab.errors import CacheError
from mergelab.names import KEY_SEPARATOR, key_experts
from mergelab.locks import flock_until
from mergelab.paths import default_db_path

if TYPE_CHECKING:
    import pandas as pd

SCHEMA_VERSION = 4
# What a merge was evaluated on: the (merge, domain) identity. Its inputs are the fingerprints of the
# checkpoints it was computed from (mergelab.io.fingerprint): the base (with the vocabulary policy, when it
# applies) and each merged expert in key order. A changed checkpoint gives new rows, never a cache hit.
MERGE_KEY = ["family", "size", "method", "hparams", "experts_key", "domain", "eval_hash", "metric_version"]
INPUT_COLUMNS = ["base_fp", "experts_fp"]
# What the number is (mergelab.metrics): a merge may carry CE and downstream accuracy side by side.
METRIC_COLUMNS = ["metric", "higher_better", "unit"]
KEY_COLUMNS = MERGE_KEY + ["metric"] + INPUT_COLUMNS
ROW_COLUMNS = MERGE_KEY + ["n_params", "loss", "n_tokens", "device"]
UNRECORDED = ""  # the fingerprint of rows cached before schema 3, or imported without one
# Columns a writer may leave out, and the SQL value they then get.
OPTIONAL_COLUMNS = {"n_truncated": "NULL",  # eval examples cut at max length (NULL: unknown, before schema 2)
                    "base_fp": f"'{UNRECORDED}'", "experts_fp": f"'{UNRECORDED}'",
                    # before schema 4 every row was CE; a writer that names no metric writes CE
                    "metric": "'ce'", "higher_better": "false", "unit": "'nats/token'"}
RESULT_COLUMNS = ["family", "size", "n_params", "method", "hparams", "experts_key", "experts", "k", "domain",
                  "loss", "n_tokens", "eval_hash", "metric_version", "device", "created_at", "n_truncated",
                  "base_fp", "experts_fp", "metric", "higher_better", "unit"]
# The same defaults as Python values, for frames read from a cache at an older schema.
OPTIONAL_VALUES = {"n_truncated": None, "base_fp": UNRECORDED, "experts_fp": UNRECORDED, "metric": "ce",
                   "higher_better": False, "unit": "nats/token"}
IMPORTED_PREFIX = "import:"  # eval_hash of imported rows: import:<file name>:<content hash>, never a measured one's


def _results_table(name: str, version: int = 4) -> str:
    """The results table as schema `version` (3 or 4) declares it; migrations build the one they reach."""
    metric = ("" if version < 4 else """    metric VARCHAR NOT NULL DEFAULT 'ce',
    higher_better BOOLEAN NOT NULL DEFAULT false,
    unit VARCHAR NOT NULL DEFAULT 'nats/token',
""")
    key = KEY_COLUMNS if version >= 4 else MERGE_KEY + INPUT_COLUMNS
    return f"""CREATE TABLE {name} (
    family VARCHAR NOT NULL,
    size VARCHAR NOT NULL,
    n_params BIGINT NOT NULL,
    method VARCHAR NOT NULL,
    hparams VARCHAR NOT NULL,
    experts_key VARCHAR NOT NULL,
    experts VARCHAR[] NOT NULL,
    k INTEGER NOT NULL,
    domain VARCHAR NOT NULL,
    loss DOUBLE NOT NULL,
    n_tokens BIGINT NOT NULL,
    eval_hash VARCHAR NOT NULL,
    metric_version INTEGER NOT NULL,
    device VARCHAR,
    created_at TIMESTAMP NOT NULL,
    n_truncated BIGINT,
    base_fp VARCHAR NOT NULL DEFAULT '{UNRECORDED}',
    experts_fp VARCHAR NOT NULL DEFAULT '{UNRECORDED}',
{metric}    PRIMARY KEY ({", ".join(key)})
)"""


# The inputs a sweep ran on, per family and size: checkpoint fingerprints ({expert: fp} as JSON), eval-set
# hashes ({domain: hash} as JSON) and metric version. The latest recorded is current (see ResultStore.results).
INPUTS_TABLE = """CREATE TABLE inputs (
    family VARCHAR NOT NULL,
    size VARCHAR NOT NULL,
    version VARCHAR NOT NULL,
    base_fp VARCHAR NOT NULL,
    experts_fp VARCHAR NOT NULL,
    eval_hashes VARCHAR NOT NULL,
    metric_version INTEGER NOT NULL,
    recorded_at TIMESTAMP NOT NULL,  -- UTC
    PRIMARY KEY (family, size, version)
)"""

# MIGRATIONS[v] upgrades a cache at schema v to v + 1; each runs in one transaction with its version bump.
MIGRATIONS = {
    1: ["ALTER TABLE results ADD COLUMN n_truncated BIGINT"],  # eval examples cut at max length, per domain
    # fingerprints join the key: DuckDB cannot alter a primary key, so the table is rebuilt; old rows get
    # UNRECORDED fingerprints (what they were computed from is not known)
    2: ["ALTER TABLE results RENAME TO results_v2", _results_table("results", 3),
        "INSERT INTO results SELECT *, '', '' FROM results_v2", "DROP TABLE results_v2", INPUTS_TABLE],
    # the metric joins the key (rebuilt as for 2): every row before it was CE in nats per token
    3: ["ALTER TABLE results RENAME TO results_v3", _results_table("results"),
        "INSERT INTO results SELECT *, 'ce', false, 'nats/token' FROM results_v3", "DROP TABLE results_v3"],
}

SCHEMA = f"""
{_results_table("results")};
{INPUTS_TABLE};
CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR);
"""

# DuckDB installs and loads known extensions on demand by default: a --db naming a SQLite file made it
# download its sqlite scanner. The cache needs none (parquet and pandas scans are built in), so no
# connection may install or load one, and nothing reaches for the network.
CONNECT_CONFIG = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
SQLITE_MAGIC = b"SQLite format 3\x00"

# The expert list and k are derived from the key, so they can never disagree with it.
_INSERT_SELECT = """
INSERT INTO results
SELECT family, size, n_params, method, hparams, experts_key,
       CASE WHEN experts_key = '' THEN []::VARCHAR[] ELSE string_split(experts_key, '+') END,
       CASE WHEN experts_key = '' THEN 0 ELSE len(string_split(experts_key, '+')) END,
       domain, loss, n_tokens, eval_hash, metric_version, device, {created}, {n_truncated}, {base_fp}, {experts_fp},
       {metric}, {higher_better}, {unit}
FROM {source}
ON CONFLICT DO NOTHING
"""


class ResultStore:
    """The results cache at `path` (default: MERGELAB_DB, else results.duckdb in the data dir): one row
    per (merge, domain, metric) with its value in the `loss` column (CE in nats per token unless `metric`,
    `higher_better` and `unit` say otherwise, mergelab.metrics) and the size as a parameter count (KEY_COLUMNS,
    RESULT_COLUMNS). `upsert` inserts rows idempotently, `results` / `macro` / `cached_keys` read them as
    DataFrames. Every call opens the file briefly; readers retry while a writer holds it, for up to
    `lock_timeout` seconds. Raises CacheError (a MergelabError) for a file it cannot open, a foreign or
    newer-schema file, a full disk, or an unknown filter column."""

    def __init__(self, path: str | Path | None = None, lock_timeout: float = 10.0):
        self.path = Path(path) if path else default_db_path()
        self.lock_timeout = lock_timeout

    # -- connections ---------------------------------------------------------------------------

    @contextmanager
    def connect(self, read_only: bool = False):
        import duckdb

        if not read_only:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CacheError(f"{self.path}: cannot create the cache directory ({exc.strerror})") from exc
        deadline = time.monotonic() + self.lock_timeout
        with self._turnstile(read_only, deadline):
            con = self._open(read_only, deadline)
            try:
                if not read_only:
                    self._ensure_schema(con)
                else:
                    self._check_version(con)
                yield con
            except duckdb.Error as exc:
                raise CacheError(f"{self.path}: {str(exc).splitlines()[0]}{_hint(str(exc))}") from exc
            finally:
                con.close()

    @contextmanager
    def _turnstile(self, read_only: bool, deadline: float):
        """Writers hold the turnstile for their whole connection; readers only pass through it."""
        try:
            handle = open(self.path.with_name(self.path.name + ".writer-lock"), "a+")
        except OSError:  # a read-only folder: no writer can be there either
            yield
            return
        with handle:
            if not flock_until(handle, exclusive=not read_only, deadline=deadline):
                raise CacheError(f"{self.path}: cannot open the results cache (another mergelab process "
                                 f"kept writing for {self.lock_timeout:.0f} s)")
            if read_only:
                fcntl.flock(handle, fcntl.LOCK_UN)
            yield

    def _open(self, read_only: bool, deadline: float):
        import duckdb

        self._refuse_other_formats()
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only, config=dict(CONNECT_CONFIG))
            except duckdb.Error as exc:
                locked = "lock" in str(exc).lower()
                if locked and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                if locked:
                    reason = "locked by another process"
                elif "extension" in str(exc).lower():  # a format DuckDB reads only through an extension
                    reason = "not a DuckDB file, and mergelab loads no DuckDB extension; pick another --db path"
                else:
                    reason = str(exc).splitlines()[0]
                raise CacheError(f"{self.path}: cannot open the results cache ({reason})") from exc

    def _refuse_other_formats(self) -> None:
        """A SQLite database is refused by its header, before DuckDB would reach for its sqlite extension."""
        try:
            with open(self.path, "rb") as handle:
                head = handle.read(len(SQLITE_MAGIC))
        except OSError:  # absent (a new cache) or unreadable: DuckDB's own error says which
            return
        if head == SQLITE_MAGIC:
            raise CacheError(f"{self.path}: cannot open the results cache (a SQLite database, not a DuckDB file); "
                             f"pick another --db path")

    def _ensure_schema(self, con) -> None:
        version = self._check_version(con)
        if version is None:
            con.execute(SCHEMA).fetchall()  # DuckDB wants each result consumed before the next statement
            con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)]).fetchall()
        while version is not None and version < SCHEMA_VERSION:
            for statement in ["BEGIN TRANSACTION", *MIGRATIONS[version]]:
                con.execute(statement).fetchall()
            version += 1
            con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(version)]).fetchall()
            con.execute("COMMIT").fetchall()

    def _check_version(self, con) -> int | None:
        """The cache's schema version (None for an empty file); refuses newer caches and foreign files."""
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if not tables:
            return None
        found = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall() if "meta" in tables else []
        row = found[0] if found else None
        if row is None or "results" not in tables:
            raise CacheError(f"{self.path}: a DuckDB file but not a mergelab results cache (tables: "
                             f"{', '.join(sorted(tables))}); pick another --db path")
        if int(row[0]) > SCHEMA_VERSION:
            raise CacheError(f"{self.path}: written by a newer mergelab (schema {row[0]} > {SCHEMA_VERSION}); upgrade mergelab")
        return int(row[0])

    def exists(self) -> bool:
        return self.path.is_file()

    # -- writes --------------------------------------------------------------------------------

    def upsert(self, rows, rejected: list[str] | None = None) -> int:
        """Insert rows (a DataFrame or dicts with ROW_COLUMNS) not already cached; returns how many were new.

        A row with no value in a column the cache requires (every NOT NULL column of the table) or a
        number that is not finite (a NaN or infinite loss) is never inserted, nor any other row of its
        merge (the cache holds whole merges only); every other merge of the batch is. Each merge left
        out is described in one line, appended to `rejected` when it is given; without it, a CacheError
        naming the first and the count is raised once the rest are in. Raises CacheError as `connect`."""
        import pandas as pd

        frame = pd.DataFrame(rows)
        if frame.empty:
            return 0
        missing = [c for c in ROW_COLUMNS if c not in frame.columns]
        if missing:
            raise CacheError(f"rows to cache lack columns {missing}")
        frame = frame[ROW_COLUMNS + [c for c in OPTIONAL_COLUMNS if c in frame.columns]]
        for column in METRIC_COLUMNS:  # rows that name no metric (beside rows that do) are CE
            if column in frame.columns and frame[column].isna().any():
                frame[column] = frame[column].astype(object).where(frame[column].notna(), OPTIONAL_VALUES[column])
        frame = frame.drop_duplicates([c for c in KEY_COLUMNS if c in frame.columns], keep="first")
        with self.connect() as con:
            frame, problems = _valid_merges(frame, _required_columns(con))
            added = 0
            if not frame.empty:
                con.register("incoming", frame)
                before = con.execute("SELECT count(*) FROM results").fetchone()[0]
                con.execute(_INSERT_SELECT.format(source="incoming", created="current_localtimestamp()",
                                                  **_optional(frame.columns)))
                added = con.execute("SELECT count(*) FROM results").fetchone()[0] - before
        if problems and rejected is None:
            raise CacheError(f"{self.path}: {len(problems)} merge(s) not cached, their other rows kept: "
                             f"{problems[0]}")
        if rejected is not None:
            rejected.extend(problems)
        return added

    def import_parquet(self, path: str | Path) -> int:
        """Load exported rows (e.g. the shipped demo results) without touching rows already cached.
        Raises CacheError, importing nothing, when a row lacks a required value or its loss is not finite."""
        with self.connect() as con:
            before = con.execute("SELECT count(*) FROM results").fetchone()[0]
            source = f"read_parquet('{_sql_literal(path)}')"
            columns = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()]
            required = [c for c, _ in _required_columns(con) if c in columns]
            checks = [f"{c} IS NULL" for c in required] + (["NOT isfinite(loss)"] if "loss" in columns else [])
            bad = con.execute(f"SELECT count(*) FROM {source} WHERE {' OR '.join(checks)}").fetchone()[0] if checks else 0
            if bad:
                raise CacheError(f"{path}: {bad} rows lack a required value ({', '.join(required)}) or have a loss "
                                 f"that is not finite; nothing imported")
            con.execute(_INSERT_SELECT.format(source=source, created="created_at", **_optional(columns)))
            return con.execute("SELECT count(*) FROM results").fetchone()[0] - before

    def export_parquet(self, path: str | Path, family: str | None = None) -> int:
        """Write (one family's) rows to a compact, sorted Parquet file."""
        where, params = _where(family=family)
        with self.connect(read_only=True) as con:
            query = f"SELECT * FROM results {where} ORDER BY family, size, method, hparams, k, experts_key, domain"
            frame = con.execute(query, params).df()
        frame.to_parquet(path, compression="zstd", index=False)
        return len(frame)

    # -- reads ---------------------------------------------------------------------------------

    def results(self, include_stale: bool = False, versions: dict | None = None, **filters) -> "pd.DataFrame":
        """Cached rows that describe the current inputs of their family and size, filtered by equality on
        any column of RESULT_COLUMNS (a list value means 'any of'). Current: computed from the checkpoints
        and eval sets of the inputs version in `versions` ({(family, size): version id}, see
        `inputs_versions`), by default the latest a sweep recorded (or, for rows no sweep here recorded,
        the inputs of the newest row). `include_stale=True` returns every row with a `stale` column: ''
        for current rows, else why not (e.g. "expert checkpoint changed", "eval set changed")."""
        _where(**filters)  # refuses unknown columns before any read
        # Which rows are current depends on all rows of their family and size (the newest ones, when no sweep
        # recorded them), so those are read whole and the other filters applied after.
        groups = {c: filters.pop(c) for c in ("family", "size") if c in filters}
        where, params = _where(**groups)
        frame = self._read(f"SELECT * FROM results {where} ORDER BY family, size, method, hparams, k, experts_key, domain", params)
        for column, default in OPTIONAL_VALUES.items():  # a cache at an older schema, before any writer migrated it
            if column not in frame.columns:
                frame[column] = default
        frame["stale"] = stale_reasons(frame, self.inputs_versions(), versions)
        for column, value in filters.items():
            if value is not None:
                frame = frame[frame[column].isin(list(value)) if isinstance(value, (list, tuple, set)) else frame[column] == value]
        frame = frame.reset_index(drop=True)
        if include_stale:
            return frame
        return frame[frame["stale"] == ""].drop(columns="stale").reset_index(drop=True)

    def macro(self, **filters) -> "pd.DataFrame":
        """Cross-domain (macro-mean) loss per merge over the current rows matching `filters`; n_domains tells
        how many domains it averages (compare with the family's to keep complete merges only)."""
        rows = self.results(**filters)
        keys = ["family", "size", "method", "hparams", "experts_key", "metric"]  # never a mean across metrics
        return (rows.groupby(keys, as_index=False, sort=True)
                .agg(n_params=("n_params", "first"), k=("k", "first"), loss=("loss", "mean"), n_domains=("loss", "size"))
                .sort_values(["family", "size", "method", "hparams", "k", "experts_key", "metric"], ignore_index=True))

    def inputs_versions(self, family: str | None = None) -> "pd.DataFrame":
        """The inputs versions sweeps recorded (columns of the inputs table, `experts_fp` and `eval_hashes`
        as JSON), newest first per family and size. Empty for caches before schema 3."""
        import pandas as pd

        columns = ["family", "size", "version", "base_fp", "experts_fp", "eval_hashes", "metric_version", "recorded_at"]
        if not self.exists():
            return pd.DataFrame(columns=columns)
        where, params = _where(family=family)
        with self.connect(read_only=True) as con:
            tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
            if "inputs" not in tables:
                return pd.DataFrame(columns=columns)
            return con.execute(f"SELECT * FROM inputs {where} ORDER BY family, size, recorded_at DESC", params).df()

    def resolve_versions(self, ids) -> dict[tuple[str, str], str]:
        """{(family, size): version} for inputs version ids (`inputs_versions`); raises CacheError for an
        unknown id or two ids of one family and size."""
        if not ids:
            return {}
        records = self.inputs_versions()
        chosen: dict[tuple[str, str], str] = {}
        for version in ids:
            match = records[records["version"] == version]
            if match.empty:
                raise CacheError(f"inputs version {version!r} is not recorded in {self.path} (see `mergelab versions`)")
            where = (match["family"].iloc[0], match["size"].iloc[0])
            if chosen.setdefault(where, version) != version:
                raise CacheError(f"inputs versions {chosen[where]} and {version} are both of {where[0]} / {where[1]}: pick one")
        return chosen

    def version_row_counts(self, family: str | None = None) -> dict[tuple[str, str, str], int]:
        """{(family, size, version): rows current under that version} for every recorded version."""
        records = self.inputs_versions(family)
        counts = {}
        for family_, size, version in zip(records["family"], records["size"], records["version"]):
            counts[family_, size, version] = len(self.results(family=family_, size=size, versions={(family_, size): version}))
        return counts

    def record_inputs(self, family: str, size: str, base_fp: str, experts_fp: dict[str, str],
                      eval_hashes: dict[str, str], metric_version: int) -> str:
        """Record that a sweep of `family` / `size` runs on these inputs (they become current; recording a
        version again makes it current again). Returns the version id (12 hex characters)."""
        import hashlib
        import json

        experts_json = json.dumps(experts_fp, sort_keys=True)
        eval_json = json.dumps(eval_hashes, sort_keys=True)
        from datetime import datetime, timezone

        # the id names the family and size too: the same checkpoints under two family names are two versions
        parts = [family, size, base_fp, experts_json, eval_json, str(metric_version)]
        version = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]
        now = datetime.now(timezone.utc).replace(tzinfo=None)  # UTC: writers in other time zones agree on "latest"
        with self.connect() as con:
            con.execute("""INSERT INTO inputs VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                           ON CONFLICT DO UPDATE SET recorded_at = excluded.recorded_at""",
                        [family, size, version, base_fp, experts_json, eval_json, metric_version, now]).fetchall()
        return version

    def adopt_unrecorded(self, family: str, size: str, base_fp: str, experts_fp: dict[str, str],
                         eval_hashes: dict[str, str], metric_version: int) -> int:
        """Stamp the rows of `family` / `size` cached without fingerprints (before schema 3, or imported) with
        these fingerprints, where their eval set and metric match, and make these inputs current: the user's
        statement that the checkpoints have not changed since. Rows of experts outside `experts_fp` stay as
        they are. Returns the number of rows adopted."""
        import pandas as pd

        rows = self.results(include_stale=True, family=family, size=size)
        legacy = rows[(rows["base_fp"] == UNRECORDED) & (rows["experts_fp"] == UNRECORDED)
                      & (rows["eval_hash"] == rows["domain"].map(eval_hashes)) & (rows["metric_version"] == metric_version)]
        keys = [k for k in legacy["experts_key"].unique() if all(e in experts_fp for e in key_experts(k))]
        if not keys:
            self.record_inputs(family, size, base_fp, experts_fp, eval_hashes, metric_version)
            return 0
        mapping = pd.DataFrame({"experts_key": keys,
                                "new_fp": [join_fingerprints(experts_fp[e] for e in key_experts(k)) for k in keys]})
        pairs = [f"{d}:{h}" for d, h in eval_hashes.items()]
        scope = """family = ? AND size = ? AND base_fp = '' AND experts_fp = '' AND metric_version = ?
                   AND list_contains(?, domain || ':' || eval_hash)
                   AND experts_key IN (SELECT experts_key FROM mapping)"""
        args = [family, size, metric_version, pairs]
        with self.connect() as con:
            con.register("mapping", mapping)
            con.execute("BEGIN TRANSACTION").fetchall()
            con.execute(f"""INSERT INTO results
                            SELECT family, size, n_params, method, hparams, r.experts_key, experts, k, domain, loss, n_tokens,
                                   eval_hash, metric_version, device, created_at, n_truncated, ?, m.new_fp,
                                   metric, higher_better, unit
                            FROM results r JOIN mapping m ON r.experts_key = m.experts_key
                            WHERE {scope.replace("experts_key IN", "r.experts_key IN")}
                            ON CONFLICT DO NOTHING""", [base_fp, *args]).fetchall()
            adopted = con.execute(f"DELETE FROM results WHERE {scope}", args).fetchall()
            con.execute("COMMIT").fetchall()
        self.record_inputs(family, size, base_fp, experts_fp, eval_hashes, metric_version)
        return int(adopted[0][0]) if adopted else 0

    def cached_keys(self, family: str, size: str, method: str, hparams: str, eval_hashes: dict[str, str],
                    metric_version: int, base_fp: str = UNRECORDED, experts_fp: dict[str, str] | None = None) -> set[str]:
        """Expert sets already cached for every domain of `eval_hashes` under this exact setting, from these
        checkpoints: the base's fingerprint `base_fp` and each expert's in `experts_fp` ({name: fp})."""
        if not self.exists():
            return set()
        pairs = [f"{d}:{h}" for d, h in eval_hashes.items()]
        info = self._read("SELECT column_name FROM information_schema.columns WHERE table_name = 'results'", [])
        columns = set(info.get("column_name", []))
        # a cache before schema 3 (read before any writer migrated it) has no fingerprints: all unrecorded
        extra = [f"{v!r} AS {c}" for c, v in (("base_fp", ""), ("experts_fp", ""), ("metric", "ce")) if c not in columns]
        source = f"(SELECT *, {', '.join(extra)} FROM results)" if extra else "results"
        # a sweep measures CE: rows of another metric (imported, downstream) never stand in for it
        query = f"""SELECT experts_key, experts_fp FROM {source}
                   WHERE family = ? AND size = ? AND method = ? AND hparams = ? AND metric_version = ? AND base_fp = ?
                     AND metric = 'ce'
                     AND list_contains(?, domain || ':' || eval_hash)
                   GROUP BY experts_key, experts_fp HAVING count(*) = ?"""
        frame = self._read(query, [family, size, method, hparams, metric_version, base_fp, pairs, len(pairs)])
        experts_fp = experts_fp or {}
        return {key for key, fps in zip(frame["experts_key"], frame["experts_fp"])
                if fps == join_fingerprints(experts_fp.get(e, UNRECORDED) for e in key_experts(key))}

    def count(self) -> int:
        return int(self._read("SELECT count(*) AS n FROM results", [])["n"].iloc[0]) if self.exists() else 0

    def _read(self, query: str, params: list) -> "pd.DataFrame":
        import pandas as pd

        if not self.exists():
            return pd.DataFrame(columns=RESULT_COLUMNS)
        with self.connect(read_only=True) as con:
            tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
            if "results" not in tables:
                return pd.DataFrame(columns=RESULT_COLUMNS)
            return con.execute(query, params).df()


def join_fingerprints(fps) -> str:
    """The experts_fp of a merge: its experts' fingerprints in key order, '+'-joined ('' when none is recorded)."""
    fps = list(fps)
    return KEY_SEPARATOR.join(fps) if any(fps) else UNRECORDED


def stale_reasons(rows: "pd.DataFrame", records: "pd.DataFrame", versions: dict | None = None) -> "pd.Series":
    """Per row of `rows` (RESULT_COLUMNS), '' when it was computed from the current inputs of its family and
    size, else the first reason it was not. Current inputs: the version `versions[(family, size)]` of the
    recorded ones (`records`, ResultStore.inputs_versions), else the latest recorded; for a family and size
    no sweep recorded, those of its newest rows (per expert the newest row merging it, per domain the newest
    eval set, the domains of the newest merge). A recorded sweep states the eval sets of CE; those of any
    other metric (imported, downstream) are its newest rows'. Imported rows (eval_hash IMPORTED_PREFIX…)
    carry no fingerprints, so only their eval set (source file) and metric are judged.
    Raises CacheError for an unknown version id."""
    import json

    import pandas as pd

    reasons = pd.Series("", index=rows.index, dtype=object)
    versions = versions or {}
    for (family, size), group in rows.groupby(["family", "size"], sort=False):
        recorded = records[(records["family"] == family) & (records["size"] == size)]
        chosen = versions.get((family, size))
        if chosen is not None and chosen not in set(recorded["version"]):
            raise CacheError(f"{family} / {size}: no inputs version {chosen!r} (recorded: "
                             f"{', '.join(recorded['version']) or 'none'})")
        metric_of = group["metric"] if "metric" in group else pd.Series("ce", index=group.index)
        imported = group["eval_hash"].astype(str).str.startswith(IMPORTED_PREFIX)
        if len(recorded):
            record = recorded[recorded["version"] == chosen].iloc[0] if chosen else recorded.iloc[0]
            base_fp, metric = record["base_fp"], int(record["metric_version"])
            experts, evals = json.loads(record["experts_fp"]), json.loads(record["eval_hashes"])
        else:
            # fingerprints from measured rows (imported ones have none); CE's eval sets from CE rows,
            # measured ones when there are any: an import never displaces rows mergelab measured
            measured = group[~imported] if (~imported).any() else group
            base_fp, metric, experts, evals = _inferred_inputs(measured)
            ce = group[metric_of == "ce"]
            if len(ce):
                ce = ce[~imported[ce.index]] if (~imported[ce.index]).any() else ce
                _, metric, _, evals = _inferred_inputs(ce)
        # per metric: its eval set per domain and its metric version (CE: the recorded or inferred above)
        want_eval = group["domain"].map(evals)
        evaluated = group["domain"].isin(list(evals))
        want_version = pd.Series(metric, index=group.index)
        for name, rows_m in group.groupby(metric_of, sort=False):
            if name == "ce":
                continue
            chosen_m = rows_m[~imported[rows_m.index]] if (~imported[rows_m.index]).any() else rows_m
            _, version_m, _, evals_m = _inferred_inputs(chosen_m)
            want_eval[rows_m.index] = rows_m["domain"].map(evals_m)
            evaluated[rows_m.index] = rows_m["domain"].isin(list(evals_m))
            want_version[rows_m.index] = version_m
        expected = {key: join_fingerprints(experts.get(e, UNRECORDED) for e in key_experts(key))
                    for key in group["experts_key"].unique()}
        gone = {key: next((e for e in key_experts(key) if e not in experts), None) for key in expected}
        why = pd.Series("", index=group.index, dtype=object)
        for mask, reason in [
            ((group["metric_version"] != want_version) & ~imported, "computed with another metric version"),
            (~evaluated, "domain no longer evaluated"),
            (group["eval_hash"] != want_eval, "eval set changed" if not imported.any() else
             imported.map({True: "another import or measured eval set of this metric is current",
                           False: "eval set changed"})),
            ((group["base_fp"] == UNRECORDED) & (base_fp != UNRECORDED) & ~imported,
             "cached before fingerprints (`mergelab adopt` if its checkpoints are unchanged)"),
            ((group["base_fp"] != base_fp) & ~imported, "base checkpoint or vocab policy changed"),
            (group["experts_key"].map(gone).notna() & ~imported, "expert no longer in the family"),
            ((group["experts_fp"] != group["experts_key"].map(expected)) & ~imported, "expert checkpoint changed"),
        ]:
            hit = (why == "") & mask
            why[hit] = reason[hit] if isinstance(reason, pd.Series) else reason
        reasons[group.index] = why
    return reasons


def _inferred_inputs(group: "pd.DataFrame") -> tuple[str, int, dict, dict]:
    """The inputs of the newest rows of one family and size (no sweep recorded them here)."""
    newest = group.sort_values("created_at", kind="stable")
    latest = newest.iloc[-1]
    experts: dict[str, str] = {}
    for key, fps in zip(newest["experts_key"], newest["experts_fp"]):  # oldest first: newer rows overwrite
        names = key_experts(key)
        experts.update(zip(names, fps.split(KEY_SEPARATOR) if fps else [UNRECORDED] * len(names)))
    evals = dict(zip(newest["domain"], newest["eval_hash"]))  # newest row per domain wins
    return latest["base_fp"], int(newest["metric_version"].max()), experts, evals


def _where(**filters) -> tuple[str, list]:
    """A parameterised WHERE clause from column=value filters (None = no filter, list = any of)."""
    allowed = set(RESULT_COLUMNS)
    clauses, params = [], []
    for column, value in filters.items():
        if value is None:
            continue
        if column not in allowed:
            raise CacheError(f"cannot filter results on unknown column {column!r}")
        if isinstance(value, (list, tuple, set)):
            clauses.append(f"list_contains(?, {column})")
            params.append(list(value))
        else:
            clauses.append(f"{column} = ?")
            params.append(value)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", params


def _hint(message: str) -> str:
    """What to do about an I/O failure; DuckDB rolls the failed transaction back, so earlier rows stay."""
    if any(s in message for s in ("File too large", "No space left", "Disk quota")):
        return (" — the disk is full or a file size limit was hit; rows cached before this write are kept: "
                "free space and rerun, cached merges are skipped")
    return ""


def _required_columns(con) -> list[tuple[str, str]]:
    """(name, type) of every NOT NULL column of the results table, as the open cache declares them."""
    return con.execute("SELECT column_name, data_type FROM information_schema.columns "
                       "WHERE table_name = 'results' AND is_nullable = 'NO' ORDER BY ordinal_position").fetchall()


NUMERIC_TYPES = ("DOUBLE", "FLOAT", "REAL", "DECIMAL", "BIGINT", "INTEGER", "SMALLINT", "TINYINT", "HUGEINT")


def _valid_merges(frame, required: list[tuple[str, str]]):
    """`frame` less every merge (rows differing only in domain) with a row that lacks a required value
    or holds a number that is not finite (a row without a key value, which names no merge, is left out
    alone); and one line per merge left out, naming the column and value."""
    import numpy as np
    import pandas as pd

    bad = pd.Series(False, index=frame.index)
    why = pd.Series("", index=frame.index)
    for column, dtype in required:
        if column not in frame.columns:
            continue  # derived on insert (experts, k, created_at)
        values = frame[column]
        wrong, numeric = values.isna(), dtype.upper().startswith(NUMERIC_TYPES)
        if numeric:
            wrong |= ~np.isfinite(pd.to_numeric(values, errors="coerce").astype("float64"))
        shown = values.map(_shown) if numeric else values.map(repr).where(~values.isna(), "missing")
        why = why.where(~(wrong & ~bad), column + " is " + shown)
        bad |= wrong
    if not bad.any():
        return frame, []
    drop, problems = pd.Series(False, index=frame.index), []
    for index in frame.index[bad]:
        if drop[index]:
            continue  # its merge is reported already
        row = frame.loc[index]
        merge = [c for c in KEY_COLUMNS if c != "domain" and c in frame.columns]
        if row[merge].isna().any():  # no merge to attribute it to: it alone is left out
            drop[index] = True
        else:
            drop |= (frame[merge] == row[merge]).all(axis=1)
        shown = {c: "?" if pd.isna(row[c]) else str(row[c]) for c in ("size", "method", "hparams", "experts_key")}
        where = "" if pd.isna(row["domain"]) else f" on domain {row['domain']!r}"
        problems.append(f"{shown['size']} {shown['method']} {shown['hparams']} {{{shown['experts_key'].replace('+', ',')}}}: "
                        f"{why[index]}{where}")
    return frame[~drop], problems


def _shown(value) -> str:
    """A value refused by `_valid_merges`, as its message shows it."""
    if value is None:
        return "missing"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return repr(value)


def _optional(columns) -> dict[str, str]:
    """The SQL for each optional column: itself where the source has it, else its default."""
    return {c: c if c in set(columns) else default for c, default in OPTIONAL_COLUMNS.items()}


def _sql_literal(path) -> str:
    return str(path).replace("'", "''")
