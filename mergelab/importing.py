"""Bring your own results: read merging results measured elsewhere into the results cache (`mergelab import`,
the Import page).

Readers (never pickle, never executed): CSV/TSV (leading '#' comment lines skipped, e.g. the provenance of
`mergelab export`), Parquet, JSON Lines, and JSON (a `mergelab export --format json` file, or an
lm-evaluation-harness results file). Layouts, recognised from the columns:

- long: one row per (merge, domain) with the experts as 'a+b+c', 'a,b,c' or a JSON list, a domain column
  and a value column (`value`, `loss` with a `metric` column as `mergelab export --what results` writes, or a
  column named after a metric such as `ce` or `accuracy`);
- wide: one row per merge and one numeric column per domain (no domain and no value column);
- per model: one file per merged model, its domains as rows (the paper's code writes `problem,CE Loss,class`
  per model with 'Avg.' and 'Overall' rows, which are left out), or an lm-eval results JSON (one row per
  task); the merge (experts, method, size) comes from a sidecar `<file stem>.merge.json` or `merge.json`
  beside it, or from `pattern`, a regular expression with named groups matched against the file's path.

Imported rows are marked: their eval_hash is `import:<file name>:<sha256 of the file, 12 hex>` (never a hash
mergelab measures under), device 'imported', no checkpoint fingerprints. Everything is checked before anything
is written, and all rows go in with one statement: an error writes nothing and names the file, line and column.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mergelab import metrics
from mergelab.errors import MergelabError
from mergelab.io.jsonl import json_objects
from mergelab.names import BASE, EXPERT, KEY_SEPARATOR, name_problem
from mergelab.store import IMPORTED_PREFIX, ResultStore

FIELDS = ("family", "size", "n_params", "method", "hparams", "experts", "experts_key", "k", "domain", "metric",
          "value", "n_tokens", "higher_better", "unit", "metric_version", "created_at", "n_truncated")
ALIASES = {"loss": "value", "score": "value", "subset": "experts", "model": "experts", "task": "domain",
           "problem": "domain", "params": "n_params", "merge_method": "method",
           "model_size": "size", "size_name": "size"}  # 'model' stays the experts: per-model files name merges
# value columns named after their metric, as other pipelines write them (the paper's code: 'CE Loss')
METRIC_COLUMNS = {"ce loss": "ce", "ce_loss": "ce", "cross_entropy": "ce", "cross-entropy": "ce"}
SUMMARY_ROWS = {"avg.", "avg", "average", "overall", "mean", "all"}  # per-model files' own means: not domains
LM_EVAL_PREFERENCE = ("acc", "acc_norm", "exact_match", "pass@1", "f1", "mc2", "word_perplexity", "bits_per_byte")
DEFAULT_METHOD = "imported"
DEFAULT_SIZE = "default"
SIZE_SUFFIX = re.compile(r"(\d+(?:\.\d+)?)\s*([kKmMbBtT])\b")
SIZE_SCALE = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


@dataclass
class ImportPlan:
    """What an import will write: `rows` (the cache's columns), per file its `layout`, and `notes` (defaults
    taken, rows left out) for the preview."""

    rows: pd.DataFrame
    layouts: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> pd.DataFrame:
        """One row per (family, size, method, metric): merges, domains, k range and rows."""
        if self.rows.empty:
            return pd.DataFrame()
        return (self.rows.groupby(["family", "size", "method", "metric"], as_index=False)
                .agg(merges=("experts_key", "nunique"), domains=("domain", "nunique"), k_min=("k", "min"),
                     k_max=("k", "max"), rows=("loss", "size")))

    def preview(self, limit: int = 200) -> pd.DataFrame:
        """The first `limit` rows as a user reads them: size, method, experts, k, domain and the value, its
        header naming the metric and unit ('accuracy (fraction)'); family, settings and metric columns only
        when the rows differ in them. The cache's own columns (experts_key, n_tokens, metric_version,
        n_params, eval_hash) stay out of sight."""
        rows = self.rows.head(limit)
        if rows.empty:
            return pd.DataFrame(columns=["size", "method", "experts", "k", "domain", "value"])
        names = sorted(self.rows["metric"].unique())
        value = metrics.of_rows(self.rows).axis if len(names) == 1 else "value"
        out = pd.DataFrame(index=rows.index)
        if self.rows["family"].nunique() > 1:
            out["family"] = rows["family"]
        out["size"] = rows["size"]
        out["method"] = rows["method"]
        if (rows["hparams"] != "{}").any():  # settings only when some row has any
            out["settings"] = rows["hparams"].replace("{}", "")
        out["experts"] = rows["experts_key"].str.replace(KEY_SEPARATOR, " + ", regex=False)
        out["k"] = rows["k"]
        out["domain"] = rows["domain"]
        if len(names) > 1:
            out["metric"] = [metrics.from_row(row).axis for _, row in rows.iterrows()]
        out[value] = rows["loss"]
        return out.reset_index(drop=True)


def parse_map(text: str | None) -> dict[str, str]:
    """`--map` as {field: column}: 'experts=subset,value=ce', or the path of a TOML file with a [map] table
    (or top-level keys). Raises MergelabError naming the bad entry or unknown field."""
    if not text:
        return {}
    path = Path(text)
    if text.endswith(".toml") and path.is_file():
        import tomllib

        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise MergelabError(f"--map {text}: not a TOML file ({exc})") from exc
        items = data.get("map", data)
        mapping = {str(k): str(v) for k, v in items.items()}
    else:
        mapping = {}
        for item in text.split(","):
            key, sep, column = item.partition("=")
            if not sep or not key.strip() or not column.strip():
                raise MergelabError(f"--map {item!r}: expected FIELD=COLUMN, e.g. experts=subset,value=ce")
            mapping[key.strip()] = column.strip()
    unknown = [k for k in mapping if k not in FIELDS]
    if unknown:
        raise MergelabError(f"--map {unknown[0]!r}: not a field (fields: {', '.join(FIELDS)})")
    return mapping


def parse_set(text: str | None) -> dict[str, str]:
    """`--set` as {field: value}: constants for fields the file lacks, e.g. 'size=0.5B,method=ties'."""
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in FIELDS:
            raise MergelabError(f"--set {item!r}: expected FIELD=VALUE with a field of {', '.join(FIELDS)}")
        out[key.strip()] = value.strip()
    return out


def plan(files, *, family: str | None = None, metric: str | None = None, mapping: dict | None = None,
         constants: dict | None = None, pattern: str | None = None, names: list[str] | None = None,
         contents: list[bytes] | None = None) -> ImportPlan:
    """The rows an import of `files` (paths; or, with `contents`, their bytes and `names` their file names, as
    the Import page uploads them) would write, checked. `family` / `metric` (a name or NAME:higher|lower[:UNIT])
    apply where the file has no such column; `mapping` {field: column}; `constants` {field: value}; `pattern`
    a regular expression with named groups (experts, method, size, family, hparams) matched against each
    per-model file's path. Raises MergelabError naming the file, line and column of the first problem."""
    if pattern is not None:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise MergelabError(f"--pattern {pattern!r}: not a regular expression ({exc})") from exc
    else:
        regex = None
    chosen = metrics.parse(metric) if metric else None
    frames, layouts, notes = [], {}, []
    digests, labels = [], []
    for i, source in enumerate(files):
        data = contents[i] if contents is not None else _read_bytes(Path(source))
        name = names[i] if names is not None else str(source)
        digests.append(hashlib.sha256(data).hexdigest())
        labels.append(Path(name).name)
        frame, layout = _rows_of(name, data, chosen, dict(mapping or {}), dict(constants or {}), family, regex,
                                 None if contents is not None else Path(source), notes)
        layouts[name] = layout
        frames.append(frame)
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    _check_unique(rows)
    # one import, one eval set: its rows are current together (a later import of the same family, size and
    # metric replaces them; a measured one always wins, see mergelab.store.stale_reasons)
    source = labels[0] if len(labels) == 1 else f"{labels[0]}+{len(labels) - 1} more"
    if not rows.empty:
        digest = digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()
        rows["eval_hash"] = f"{IMPORTED_PREFIX}{source.replace(':', '_')}:{digest[:12]}"
    return ImportPlan(rows.drop(columns=["_where"]) if "_where" in rows else rows, layouts, notes)


def write(plan_: ImportPlan, db=None) -> tuple[int, int]:
    """Write a checked plan into the cache at `db` in one statement: (rows new, rows already cached)."""
    if plan_.rows.empty:
        return 0, 0
    rejected: list[str] = []
    added = ResultStore(db).upsert(plan_.rows, rejected=rejected)
    if rejected:  # plan() checked every value: the cache refused something it did not
        raise MergelabError(f"the cache refused {len(rejected)} merge(s): {rejected[0]}")
    return added, len(plan_.rows) - added


# -- reading -------------------------------------------------------------------------------------------

def _read_bytes(path: Path) -> bytes:
    try:
        if path.is_dir():
            raise MergelabError(f"{path}: is a folder; name the files to import (e.g. {path}/*.csv)")
        return path.read_bytes()
    except OSError as exc:
        raise MergelabError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def _kind(name: str, data: bytes) -> str:
    lower = name.lower()
    for suffix, kind in ((".parquet", "parquet"), (".pq", "parquet"), (".jsonl", "jsonl"), (".ndjson", "jsonl"),
                         (".json", "json"), (".tsv", "tsv"), (".csv", "csv")):
        if lower.endswith(suffix):
            return kind
    if data[:4] == b"PAR1":
        return "parquet"
    if data[8:12] == b"DUCK":
        raise MergelabError(f"{name}: a DuckDB database, not a results file; write its rows with "
                            f"`mergelab export --what results --db {name} --out rows.parquet` and import that")
    raise MergelabError(f"{name}: cannot tell the format from the name; expected .csv, .tsv, .parquet, .jsonl or .json")


def _text(name: str, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise MergelabError(f"{name} line {line}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc


def _table(name: str, data: bytes) -> tuple[pd.DataFrame, list[int], str]:
    """(the file as a table of strings or numbers, the line of each row, its kind)."""
    import io

    kind = _kind(name, data)
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            frame = pq.read_table(pa.BufferReader(data)).to_pandas()
        except (pa.ArrowException, OSError) as exc:
            raise MergelabError(f"{name}: not a readable Parquet file ({str(exc).splitlines()[0]})") from exc
        return frame, list(range(1, len(frame) + 1)), kind
    text = _text(name, data)
    if kind == "jsonl":
        pairs = list(json_objects(text, MergelabError, lambda n: f"{name} line {n}"))
        records, lines = [row for _, row in pairs], [n for n, _ in pairs]
        return pd.DataFrame.from_records(records), lines, kind
    if kind == "json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MergelabError(f"{name} line {exc.lineno}, column {exc.colno}: not JSON ({exc.msg})") from exc
        if isinstance(doc, dict) and isinstance(doc.get("rows"), list):  # mergelab export --format json
            return pd.DataFrame.from_records(doc["rows"]), list(range(1, len(doc["rows"]) + 1)), "json rows"
        if isinstance(doc, dict) and isinstance(doc.get("results"), dict):
            return _lm_eval(name, doc), [], "lm-eval"
        if isinstance(doc, list) and all(isinstance(r, dict) for r in doc):
            return pd.DataFrame.from_records(doc), list(range(1, len(doc) + 1)), "json rows"
        raise MergelabError(f"{name}: a JSON file holds rows (a list of objects or {{'rows': [...]}}) or lm-eval "
                            f"results ({{'results': {{task: {{metric: value}}}}}})")
    lines = text.splitlines()
    skip = 0
    while skip < len(lines) and lines[skip].startswith("#"):  # provenance comments of `mergelab export`
        skip += 1
    _check_fields(name, "\n".join(lines[skip:]), "\t" if kind == "tsv" else ",", skip, kind)
    try:
        frame = pd.read_csv(io.StringIO(text), skiprows=skip, sep="\t" if kind == "tsv" else ",", dtype=str,
                            keep_default_na=False, skip_blank_lines=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        found = re.search(r"line (\d+)", str(exc))
        where = f" line {int(found.group(1)) + skip}" if found else ""
        raise MergelabError(f"{name}{where}: not a readable {kind.upper()} table ({str(exc).strip()})") from exc
    body = [i + 1 for i, line in enumerate(lines) if i > skip and line.strip()]  # 1-based lines of data rows
    return frame, body[:len(frame)], kind


def _check_fields(name: str, text: str, sep: str, skip: int, kind: str) -> None:
    """Every row of a CSV/TSV has as many fields as its header, and every quote is closed: else MergelabError
    naming the file line where the row starts (pandas would take a longer row's first field as an index, or
    count rows instead of lines)."""
    import csv
    import io

    reader = csv.reader(io.StringIO(text), delimiter=sep, strict=True)
    width, start = None, 1
    try:
        for row in reader:
            if row:
                if width is None:
                    width = len(row)
                elif len(row) != width:
                    raise MergelabError(f"{name} line {start + skip}: {len(row)} fields, the header has {width}")
            start = reader.line_num + 1
    except csv.Error as exc:
        raise MergelabError(f"{name} line {start + skip}: not a readable {kind.upper()} row ({exc}; an unclosed "
                            f"quote?)") from exc


def _lm_eval(name: str, doc: dict) -> pd.DataFrame:
    """One row per task of an lm-evaluation-harness results file: domain = task, metric and value."""
    rows = []
    for task, values in doc["results"].items():
        if not isinstance(values, dict):
            continue
        scores = {}
        for key, value in values.items():
            metric, _, _ = str(key).partition(",")
            if metric.endswith("_stderr") or metric == "alias" or not isinstance(value, (int, float)):
                continue
            scores.setdefault(metric, value)
        if scores:
            rows.append({"domain": task, **scores})
    if not rows:
        raise MergelabError(f"{name}: lm-eval results hold no numeric metric for any task")
    return pd.DataFrame(rows)


# -- mapping -------------------------------------------------------------------------------------------

def _rows_of(name, data, chosen, mapping, constants, family, regex, path, notes) -> tuple[pd.DataFrame, str]:
    frame, lines, kind = _table(name, data)
    label = Path(name).name
    if frame.empty and kind != "lm-eval":
        raise MergelabError(f"{name}: no rows to import")
    for key, column in mapping.items():
        if column not in frame.columns:
            raise MergelabError(f"{name}: --map {key}={column}: no column {column!r} (columns: "
                                f"{', '.join(map(str, frame.columns))})")
    columns = _columns(frame, mapping)
    per_model = kind == "lm-eval" or ("experts" not in columns and "experts_key" not in columns)
    merge = _merge_of(name, path, regex) if per_model else {}
    if kind == "lm-eval":
        metric_name = chosen.name if chosen else next((m for m in LM_EVAL_PREFERENCE if m in frame.columns),
                                                      next(c for c in frame.columns if c != "domain"))
        if metric_name not in frame.columns:
            raise MergelabError(f"{name}: --metric {metric_name}: lm-eval reports "
                                f"{', '.join(c for c in frame.columns if c != 'domain')}")
        frame = frame[["domain", metric_name]].dropna().rename(columns={metric_name: "value"})
        frame["metric"] = metric_name
        columns = {"domain": "domain", "value": "value", "metric": "metric"}
        lines = []
        layout = f"lm-eval results ({metric_name}), one merge"
    elif "value" in columns or "domain" in columns:
        layout = "long: one row per merge and domain" if not per_model else "per model: one row per domain"
    else:
        layout = "wide: one column per domain"
    where = pd.Series([f"{name} line {n}" for n in lines] if lines else
                      [f"{name} row {i + 1}" for i in range(len(frame))], index=frame.index)
    out = pd.DataFrame(index=frame.index)
    if layout.startswith("wide"):
        frame, out, where, columns = _melt(name, frame, columns, out, where)
    for field_ in FIELDS:
        if field_ in columns:
            out[field_] = frame[columns[field_]]
    for field_, value in {**merge, **constants}.items():
        if field_ not in out:
            out[field_] = value
    if "value" not in out:
        raise MergelabError(f"{name}: no value column (name one with --map value=COLUMN; columns: "
                            f"{', '.join(map(str, frame.columns))})")
    if "domain" not in out:
        out["domain"] = "all"
        notes.append(f"{label}: no domain column: every row is domain 'all'")
    if per_model and kind != "lm-eval":  # the paper's per-model files end with their own means
        summary = out["domain"].astype(str).str.strip().str.lower().isin(SUMMARY_ROWS)
        if summary.any():
            notes.append(f"{label}: {int(summary.sum())} summary row(s) left out "
                         f"({', '.join(sorted(set(out.loc[summary, 'domain'].astype(str))))})")
            out, where = out[~summary], where[~summary]
    out = _complete(name, out, where, family, chosen, columns, notes, label)
    out["device"] = "imported"
    out["_where"] = where
    return out, layout


def _columns(frame: pd.DataFrame, mapping: dict) -> dict[str, str]:
    """{field: column} from `mapping`, then from the columns' names (FIELDS, ALIASES, metric names)."""
    columns = dict(mapping)
    taken = set(columns.values())
    by_lower = {str(c).strip().lower(): c for c in frame.columns}
    for lower, column in by_lower.items():
        if column in taken:
            continue
        field_ = lower if lower in FIELDS else ALIASES.get(lower)
        if field_ and field_ not in columns:
            columns[field_] = column
            taken.add(column)
    if "value" not in columns:
        for lower, column in by_lower.items():
            name = METRIC_COLUMNS.get(lower, lower)
            if column not in taken and name in metrics.REGISTRY:
                columns["value"] = column
                columns.setdefault("_metric_from_column", name)
                break
    return columns


def _melt(name, frame, columns, out, where):
    """A wide table (one numeric column per domain) as long rows."""
    keys = [c for f, c in columns.items() if not f.startswith("_")]
    domains = [c for c in frame.columns if c not in keys]
    if not domains:
        raise MergelabError(f"{name}: no value column and no domain columns (map one with --map value=COLUMN)")
    frame = frame.assign(_where=where)
    long = frame.melt(id_vars=keys + ["_where"], value_vars=domains, var_name="_domain", value_name="_value")
    long["_where"] = long["_where"] + ", column " + long["_domain"].map(lambda d: repr(str(d)))
    columns = {**columns, "domain": "_domain", "value": "_value"}
    return long, pd.DataFrame(index=long.index), long["_where"], columns


def _merge_of(name: str, path: Path | None, regex) -> dict:
    """The merge a per-model file holds: from its sidecar, or from `regex` matched against its path."""
    found = {}
    if path is not None:
        for sidecar in (path.with_name(path.stem + ".merge.json"), path.with_name("merge.json")):
            if sidecar.is_file():
                try:
                    found = json.loads(sidecar.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise MergelabError(f"{sidecar}: not a JSON object naming the merge ({exc})") from exc
                if not isinstance(found, dict):
                    raise MergelabError(f"{sidecar}: expected a JSON object such as {{\"experts\": [\"a\", \"b\"]}}")
                found = {k: (json.dumps(v) if k == "experts" and isinstance(v, list) else
                             json.dumps(v, sort_keys=True) if k == "hparams" and isinstance(v, dict) else v)
                         for k, v in found.items() if k in FIELDS}
                break
    if regex is not None and not found:
        match = regex.search(Path(name).as_posix())
        if match is None:
            raise MergelabError(f"{name}: --pattern {regex.pattern!r} does not match this path")
        found = {k: v for k, v in match.groupdict().items() if v is not None and k in FIELDS}
    if "experts" not in found and "experts_key" not in found:
        raise MergelabError(f"{name}: one file per merged model needs its experts: a sidecar "
                            f"{Path(name).stem}.merge.json ({{\"experts\": [\"a\", \"b\"], \"method\": \"ties\"}}) or "
                            f"--pattern with a named group, e.g. '(?P<experts>[^/]+)/all/results.csv'")
    return found


def _complete(name, out, where, family, chosen, columns, notes, label) -> pd.DataFrame:
    """Every cache column filled and checked; raises MergelabError at the first bad cell."""
    def fail(mask, field_, why):
        first = mask[mask].index[0]
        column = columns.get(field_, field_)
        shown = out.at[first, field_] if field_ in out else ""
        raise MergelabError(f"{where[first]}, column {column!r}: {why.format(value=shown)}")

    # values: numbers, finite
    value = pd.to_numeric(out["value"].map(lambda v: v.strip() if isinstance(v, str) else v), errors="coerce")
    bad = value.isna() | ~np.isfinite(value.astype(float))
    if bad.any():
        fail(bad, "value", "{value!r} is not a finite number")
    # family
    if "family" not in out:
        if not family:
            raise MergelabError(f"{name}: no family column: name the family with --family NAME")
        out["family"] = family
    elif family:
        out["family"] = out["family"].where(out["family"].astype(str).str.strip() != "", family)
    # metric
    if "metric" not in out:
        metric = chosen or metrics.get(columns.get("_metric_from_column"))
        out["metric"] = metric.name
        if "higher_better" not in out:
            out["higher_better"], out["unit"] = metric.higher_better, metric.unit
    out["metric"] = out["metric"].astype(str).str.strip()
    for field_, default in (("size", DEFAULT_SIZE), ("method", DEFAULT_METHOD), ("hparams", "{}")):
        if field_ not in out:
            out[field_] = default
            if field_ != "hparams":
                notes.append(f"{label}: no {field_} column: {field_} '{default}'")
        out[field_] = out[field_].astype(str).str.strip()
    out["hparams"] = out["hparams"].where(out["hparams"] != "", "{}")
    for field_, kind in (("family", "family"), ("size", "size"), ("domain", "domain")):
        out[field_] = out[field_].astype(str).str.strip()
        problems = out[field_].map(lambda v, kind=kind: name_problem(v, kind))
        if problems.notna().any():
            first = problems[problems.notna()].index[0]
            fail(problems.notna(), field_, "{value!r} " + problems[first])
    hp_bad = out["hparams"].map(_bad_hparams)
    if hp_bad.any():
        fail(hp_bad, "hparams", "{value!r} is not a JSON object of hyperparameters")
    out["hparams"] = out["hparams"].map(lambda h: json.dumps(json.loads(h), sort_keys=True))
    # experts → experts_key, k
    source = "experts_key" if "experts_key" in out and "experts" not in out else "experts"
    if source not in out:
        raise MergelabError(f"{name}: no experts column (map one with --map experts=COLUMN)")
    parsed = {raw: _experts(raw) for raw in out[source].map(_hashable).unique()}
    keys = out[source].map(lambda raw: parsed[_hashable(raw)])
    broken = keys.map(lambda k: isinstance(k, str) and k.startswith("\0"))
    if broken.any():
        first = broken[broken].index[0]
        fail(broken, source, "{value!r}: " + keys[first][1:])
    out["experts_key"] = keys
    derived = keys.map(lambda k: len(k.split(KEY_SEPARATOR)) if k else 0)
    if "k" in out:  # k is derived from the experts; a k column must agree with them
        given = pd.to_numeric(out["k"], errors="coerce")
        wrong = given.isna() | (given != derived)
        if wrong.any():
            first = wrong[wrong].index[0]
            raise MergelabError(f"{where[first]}, column {columns['k']!r}: k = {out.at[first, 'k']!r} but the experts "
                                f"{keys[first] or '(none)'!r} are {derived[first]}")
    out["k"] = derived
    empty = (out["k"] == 0) & (out["method"] != BASE)
    if empty.any():
        fail(empty, source, "{value!r} names no expert (only method 'base' merges none)")
    # n_params: a column, else read from the size's name ('0.5B', '125M')
    if "n_params" in out:
        n = pd.to_numeric(out["n_params"], errors="coerce")
        bad = n.isna() | (n < 0)
        if bad.any():
            fail(bad, "n_params", "{value!r} is not a parameter count")
        out["n_params"] = n.astype("int64")
    else:
        sizes = {s: _params_from_size(s) for s in out["size"].unique()}
        out["n_params"] = out["size"].map(sizes).astype("int64")
        unknown = sorted(s for s, n in sizes.items() if n == 0)
        if unknown:
            named = ", ".join(repr(s) for s in unknown)
            notes.append(f"{label}: no n_params column, and the size name{'s' if len(unknown) > 1 else ''} {named} "
                         f"{'do' if len(unknown) > 1 else 'does'} not give a parameter count the way '0.5B' or "
                         f"'125M' does, so n_params is 0. Curves and fits per size still work; the law across "
                         f"sizes needs counts: add an n_params column or --set n_params=N (e.g. 500000000).")
    for field_, default in (("n_tokens", 0), ("metric_version", 0)):
        if field_ in out:
            got = pd.to_numeric(out[field_], errors="coerce")
            if got.isna().any():
                fail(got.isna(), field_, "{value!r} is not a whole number")
            out[field_] = got.astype("int64")
        else:
            out[field_] = default
    if "higher_better" in out:
        out["higher_better"] = out["higher_better"].map(_boolean)
        if out["higher_better"].isna().any():
            fail(out["higher_better"].isna(), "higher_better", "{value!r} is not true or false")
    else:
        out["higher_better"] = out["metric"].map(lambda m: metrics.REGISTRY.get(m, chosen or metrics.CE).higher_better
                                                 if m in metrics.REGISTRY or chosen else None)
        if out["higher_better"].isna().any():
            first = out["higher_better"].isna()
            fail(first, "metric", "metric {value!r} is not known: declare its direction with --metric NAME:higher|lower")
    if "unit" not in out:
        out["unit"] = out["metric"].map(lambda m: metrics.REGISTRY[m].unit if m in metrics.REGISTRY else
                                        (chosen.unit if chosen else ""))
    out["unit"] = out["unit"].fillna("").astype(str)
    refs = out["method"].isin([BASE, EXPERT])
    wrong = refs & (out["k"] != out["method"].map({BASE: 0, EXPERT: 1}))
    if wrong.any():
        fail(wrong, source, "method {} needs {}: got {{value!r}}".format(
            *(("base", "no experts") if out.loc[wrong[wrong].index[0], "method"] == BASE else ("expert", "one expert"))))
    out["loss"] = value.astype(float)
    keep = ["family", "size", "n_params", "method", "hparams", "experts_key", "k", "domain", "loss", "n_tokens",
            "metric_version", "metric", "higher_better", "unit"]
    extra = [c for c in ("created_at", "n_truncated") if c in out]
    result = out[keep + extra].copy()
    if "created_at" in result:
        result["created_at"] = pd.to_datetime(result["created_at"], errors="coerce")
        if result["created_at"].isna().any():
            fail(result["created_at"].isna(), "created_at", "{value!r} is not a date and time")
    if "n_truncated" in result:
        result["n_truncated"] = pd.to_numeric(result["n_truncated"].replace("", None), errors="coerce").astype("Int64")
    return result


def _hashable(raw):
    if isinstance(raw, (list, tuple, np.ndarray)):
        return json.dumps([str(x) for x in raw])
    return "" if raw is None or (isinstance(raw, float) and raw != raw) else str(raw)


def _experts(raw: str) -> str:
    """The experts_key of an expert list written 'a+b', 'a,b', 'a b' or as a JSON list; '\\0why' when bad."""
    text = raw.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            import ast

            try:  # a Python list literal, as `mergelab results --format csv` prints it; literals only, never run
                items = ast.literal_eval(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                return "\0not a JSON list of expert names"
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            return "\0not a JSON list of expert names"
    else:
        items = re.split(r"[+,;|]", text) if text else []
    items = [i.strip() for i in items]
    if any(not i for i in items):
        return "\0an empty expert name"
    for item in items:
        problem = name_problem(item, "domain")
        if problem:
            return f"\0expert {item!r} {problem}"
    if len(set(items)) != len(items):
        return "\0names an expert twice"
    return KEY_SEPARATOR.join(sorted(items))


def _bad_hparams(text: str) -> bool:
    try:
        return not isinstance(json.loads(text), dict)
    except (json.JSONDecodeError, TypeError):
        return True


def _boolean(value):
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    text = str(value).strip().lower()
    return {"true": True, "1": True, "yes": True, "higher": True, "false": False, "0": False, "no": False,
            "lower": False}.get(text)


def _params_from_size(size: str) -> int:
    """A parameter count from a size's name ('0.5B' → 5e8, '125M', '7b'); 0 when it names none."""
    found = SIZE_SUFFIX.search(size)
    return int(round(float(found.group(1)) * SIZE_SCALE[found.group(2).lower()])) if found else 0


def _check_unique(rows: pd.DataFrame) -> None:
    """Two rows of one merge, domain and metric (in one file or across files) are refused, naming both."""
    if rows.empty:
        return
    key = ["family", "size", "method", "hparams", "experts_key", "domain", "metric"]
    twice = rows.duplicated(key, keep=False)
    if twice.any():
        first, again = rows[twice].groupby(key, sort=False)["_where"].apply(list).iloc[0][:2]
        file_, _, at = first.rpartition(" line ") if " line " in first else first.rpartition(" row ")
        shown = first[len(file_) + 1:] if again.startswith(file_ + " ") else first  # same file: 'line 2'
        raise MergelabError(f"{again} repeats the merge, domain and metric of {shown}: keep one "
                            f"(or give them different methods, sizes or hparams)")
    sizes = rows.groupby(["family", "size"])["n_params"].nunique()
    if (sizes > 1).any():
        family, size = sizes[sizes > 1].index[0]
        raise MergelabError(f"size {size!r} of family {family!r} has several n_params values: one size, one count")
