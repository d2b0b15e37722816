"""Tables out: what can be exported (`table`, used by `mergelab export` and the Export page) and how
(CSV, JSON, LaTeX and Parquet, each carrying its provenance and the units). CSV, JSON and Parquet hold
every column; LaTeX is the compact, paper-ready view of mergelab.paper (the fits as the paper table)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from mergelab.errors import MergelabError

FORMATS = ("csv", "json", "latex", "parquet", "table")
EXPORTABLE = ("fits", "paper", "joint", "results", "synergy", "plan")
FIGURE = "figure"  # `mergelab export --what figure`: mergelab.figures, not a table
FIGURE_FORMATS = ("png", "pdf", "svg")
DOMAIN_TABLES = ("fits", "paper", "joint")  # the tables --domain narrows (plans are macro, synergy every domain)


def table(what: str, results: pd.DataFrame, *, weights: str = "k", n_boot: int = 0,
          domain: str | None = None) -> pd.DataFrame:
    """The table `what` computed from cached rows `results` (ResultStore.results()): fitted parameters per
    curve ("fits", every column), the compact paper table ("paper", mergelab.paper.paper_table: L∞, A with
    intervals, b, R², held-out error per curve), the joint law per setting and domain ("joint"), the rows
    themselves ("results"), donor→receiver synergy ("synergy") or a plan with k80, k90, k_ε and the stop
    rule ("plan"). n_boot > 0 adds expert-bootstrap intervals to fits, paper, synergy and plans. `domain`
    (a domain or 'macro') narrows fits and joint (default: macro and every domain) and picks the paper
    table's (default: macro). Rows of several metrics (mergelab.metrics) are analysed one metric at a time,
    a higher-is-better one mirrored (its L∞ / L* read as a ceiling), and every table but "results" gains
    metric, direction and unit columns. Raises MergelabError for an unknown `what`."""
    from mergelab import metrics

    if what not in EXPORTABLE:
        raise MergelabError(f"--what {what!r}: expected {', '.join(EXPORTABLE)} or {FIGURE}")
    if what == "results":
        return results
    frames = []
    from mergelab.names import MACRO

    for name in metrics.names(results):
        rows = metrics.select(results, name)
        if domain not in (None, MACRO) and what in DOMAIN_TABLES and domain not in set(rows["domain"]):
            continue  # a task of one metric (e.g. an lm-eval task) is no domain of another
        metric = metrics.of_rows(rows)
        frames.append(metrics.shown(_one_metric(what, metrics.oriented(rows), weights=weights, n_boot=n_boot,
                                                domain=domain), metric))
    if not frames:
        raise MergelabError(f"--domain {domain!r}: no metric of these results has that domain")
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)


def _one_metric(what: str, results: pd.DataFrame, *, weights: str, n_boot: int, domain: str | None) -> pd.DataFrame:
    """`table` for the rows of one metric, oriented so that lower is better."""
    from mergelab.analysis import tables
    from mergelab.names import MACRO

    domains = [domain] if domain else None
    if what == "paper":
        from mergelab.paper import paper_table

        return paper_table(results, domain=domain or MACRO, weights=weights, n_boot=n_boot)
    if what == "fits":
        return tables.fit_table(results, domains=domains, weights=weights, n_boot=n_boot)
    if what == "joint":
        return tables.joint_table(results, domains=domains, weights=weights)
    if what == "synergy":
        return tables.synergy_table(results, n_boot=n_boot)
    if what == "plan":
        return tables.plan_table(results, weights=weights, n_boot=n_boot)
    raise MergelabError(f"--what {what!r}: expected {', '.join(EXPORTABLE)} or {FIGURE}")


def _cell(value):
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    return json.dumps(value, default=str) if isinstance(value, (list, tuple, dict)) else value


def _plain(frame: pd.DataFrame) -> pd.DataFrame:
    """Lists, arrays and dicts as JSON text, so every format holds them the same way."""
    out = frame.copy()
    for col in out.columns:
        if out[col].dtype == object:
            out[col] = out[col].map(_cell)
    return out


def check_format(fmt: str, what: str | None = None) -> None:
    """Refuse a format `what` cannot be written in: png, pdf or svg for a figure, a table format otherwise."""
    if what == FIGURE:
        if fmt not in FIGURE_FORMATS:
            raise MergelabError(f"--format {fmt!r}: a figure is written as {', '.join(FIGURE_FORMATS)}")
        return
    if fmt not in FORMATS:
        hint = f" ({fmt} is for --what {FIGURE})" if fmt in FIGURE_FORMATS else ""
        raise MergelabError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}{hint}")


def render(frame: pd.DataFrame, fmt: str, provenance: dict, what: str | None = None) -> str | bytes:
    """The table in `fmt`; provenance (with the units, mergelab.paper.UNITS) in a leading comment (csv,
    latex), a field (json) or the file metadata (parquet). LaTeX is the compact view of `what`
    (mergelab.paper.latex; default: provenance's options.what); the other formats hold every column."""
    from mergelab.paper import UNITS, latex

    check_format(fmt)
    units = dict(UNITS)
    if "metric" in frame and set(frame["metric"].dropna()) - {"ce"}:  # values of other metrics: their own units
        key = next(k for k in units if k.startswith("loss"))
        units[key] = "the unit of each row's metric (metric, direction and unit columns; ce: nats per token)"
    provenance = {**provenance, "units": units}
    prov = json.dumps(provenance, sort_keys=True, default=str)
    plain = _plain(frame)
    if fmt == "csv":
        return f"# provenance: {prov}\n" + plain.to_csv(index=False)
    if fmt == "json":
        records = json.loads(plain.to_json(orient="records", date_format="iso"))
        return json.dumps({"provenance": provenance, "rows": records}, indent=1, default=str) + "\n"
    if fmt == "latex":
        return latex(what or provenance.get("options", {}).get("what", ""), frame, provenance)
    if fmt == "table":
        return plain.to_string(index=False, float_format=lambda v: f"{v:.4g}") + "\n"
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(plain, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"mergelab_provenance": prov.encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def write(frame: pd.DataFrame, fmt: str, provenance: dict, out: Path | None, what: str | None = None) -> str | None:
    """Write to `out` (returns None) or return the text (parquet needs a file); `what` as for `render`."""
    data = render(frame, fmt, provenance, what)
    if out is None:
        if isinstance(data, bytes):
            raise MergelabError("parquet output needs --out FILE")
        return data
    write_file(out, data if isinstance(data, bytes) else data.encode())
    return None


def write_file(out: Path, data: bytes) -> None:
    """Write `data` to the file `out` (checked first with `mergelab.paths.check_output`): beside it, then
    renamed over it, so a failed write (disk full, permissions) leaves no partial file and any earlier
    file as it was; raises MergelabError naming the file. A device or pipe (/dev/stdout) is written in place."""
    import os

    out = Path(out).resolve()  # through a symlink: the file it names is replaced, not the link
    try:
        if out.exists() and not out.is_file():
            out.write_bytes(data)
            return
        partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
        try:
            partial.write_bytes(data)
            os.replace(partial, out)
        finally:
            partial.unlink(missing_ok=True)
    except OSError as exc:
        from mergelab.paths import write_failure

        raise MergelabError(f"{out}: cannot write ({write_failure(exc)})") from exc


def read_provenance(path: Path) -> dict:
    """The provenance stored by `write` in any of the file formats."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return json.loads(pq.read_schema(path).metadata[b"mergelab_provenance"])
    text = path.read_text()
    if text.startswith("{"):
        return json.loads(text)["provenance"]
    first = text.splitlines()[0]
    return json.loads(first.split("provenance: ", 1)[1])
