"""The `mergelab` command line (typer). Errors in user input print one line and exit with code 2."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from mergelab.errors import MergelabError
from mergelab.names import REFERENCE_METHODS

app = typer.Typer(help="Model-merging scaling curves: build families, sweep merges, read results.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
demo_app = typer.Typer(help="The built-in demo family.", no_args_is_help=True)
app.add_typer(demo_app, name="demo")
family_app = typer.Typer(help="Family manifests (family.toml).", no_args_is_help=True)
app.add_typer(family_app, name="family")
adaptive_app = typer.Typer(help="Adaptive sweeps: a law's quantity to a stated precision from few merges.",
                           no_args_is_help=True)
app.add_typer(adaptive_app, name="adaptive")


@app.callback()
def global_options(
    ctx: typer.Context,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="also show debug lines on stderr"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="show only warnings and errors, and no progress bars"),
):
    """Diagnostics go to stderr through the logging module (info lines by default); command results to
    stdout. The worker's lines carry timestamps and levels (they end up in worker.log)."""
    from mergelab.logs import configure

    if verbose and quiet:
        raise MergelabError("-v/--verbose and -q/--quiet: pick one")
    configure(1 if verbose else -1 if quiet else 0, timestamps=ctx.invoked_subcommand == "worker")


def _split(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def _names(option: str, text: str | None) -> list[str] | None:
    """A comma-separated list of names (None when the option is not given); refuses a list that names
    nothing (',') or a name twice."""
    if text is None:
        return None
    names = _split(text) or []
    if not names:
        raise MergelabError(f"{option} {text!r}: names nothing; give comma-separated names or leave the option out")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise MergelabError(f"{option} {text!r}: names {twice[0]!r} twice")
    return names


def _check_merge_method(method: str | None) -> None:
    """--method must name a merge method, not the base or single-expert reference rows."""
    if method in REFERENCE_METHODS:
        raise MergelabError(f"--method {method!r}: the base and single-expert rows are references, not a merge "
                            "method; name a merge method (see `mergelab methods`)")


def _check_seed(seed: int) -> None:
    from mergelab.sweep.plan import check_seed

    check_seed(seed)


def _reading_db(db: Path | None) -> Path | None:
    """A results cache to read (`results`, `fit`, `export`): it must exist and be a file."""
    from mergelab.paths import default_db_path

    path = db if db is not None else default_db_path()
    try:
        if path.is_dir():
            raise MergelabError(f"--db {path}: is a folder; name the results cache file (e.g. results.duckdb)")
        if not path.is_file():
            raise MergelabError(f"--db {path}: no results cache there; check the path or run `mergelab sweep` first")
    except OSError as exc:  # a symlink loop, a name too long
        raise MergelabError(f"--db {path}: not a usable path ({exc.strerror or exc})") from exc
    return db


HP_HELP = ("hyperparameter METHOD.PARAM=VALUE, repeatable; weights=EXPERT:W,…, include=PATTERNS and "
           "exclude=PATTERNS apply to every method (`mergelab methods`)")


def _parse_hparams(items: list[str], methods: list[str]) -> dict[str, dict]:
    """['ties.density=0.5', 'dare.seed=3'] -> {'ties': {'density': 0.5}, 'dare': {'seed': 3}}; an option
    of every method (weights, include, exclude: `methods.options`) may omit METHOD. and then applies to
    every method of --methods (a METHOD.option item overrides it for that method)."""
    from mergelab.engine.methods.options import OPTIONS
    import json

    if not methods:
        raise MergelabError("--methods: name at least one merge method (see `mergelab methods`)")
    hps: dict[str, dict] = {m: {} for m in methods}
    for item in items:
        target, sep, raw = item.partition("=")
        if sep and target in OPTIONS:  # weights=…: every method
            for method in methods:
                hps[method].setdefault(target, raw)
            continue
        method, dot, param = target.partition(".")
        if not sep or not dot:
            raise MergelabError(f"--hp {item!r}: expected METHOD.PARAM=VALUE, e.g. ties.density=0.5")
        if method not in hps:
            raise MergelabError(f"--hp {item!r}: method {method!r} is not among --methods ({', '.join(methods)})")
        try:
            hps[method][param] = json.loads(raw)
        except json.JSONDecodeError:
            hps[method][param] = raw  # left as a string; the method's range check reports it
    return hps


@demo_app.command("build")
def demo_build(
    preset: str = typer.Option("micro", help="micro (2 sizes, seconds) or standard (5 sizes, minutes)"),
    out: Path = typer.Option(..., help="directory to write the family into"),
    seed: int = typer.Option(0, help="seed of data, initialisation and training"),
    sizes: Optional[str] = typer.Option(None, help="comma-separated subset of the preset's sizes"),
    force: bool = typer.Option(False, help="replace a non-empty output directory"),
    jobs: Optional[int] = typer.Option(None, help="sizes built at once in separate processes (default: the preset's; "
                                                  "the checkpoints are the same whatever the number)"),
):
    """Build a demo family: base + one expert per domain per size, eval sets, family.toml."""
    import time

    from mergelab.demo.build import PRESETS, build_family
    from mergelab.paths import cache_files
    from mergelab.sweep.jobs import default_queue_path

    if preset not in PRESETS:
        raise MergelabError(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}")
    _check_seed(seed)
    if jobs is not None and jobs < 1:
        raise MergelabError(f"--jobs {jobs}: expected 1 or more processes")
    chosen = _names("--sizes", sizes)
    _check_demo_out(out, force, [*cache_files(None), (default_queue_path(), "the job queue")])
    t0 = time.perf_counter()
    manifest = build_family(preset, out, seed=seed, sizes=chosen, force=force, jobs=jobs)
    typer.echo(f"wrote {manifest} in {time.perf_counter() - t0:.1f} s")


def _check_demo_out(out: Path, force: bool, protected) -> None:
    """`demo build --out`: a new or empty folder, or with --force one holding an earlier family (never a
    folder that is not a family, nor one holding the results cache or the job queue)."""
    from mergelab.paths import check_output

    target = check_output(out, "--out", kind="folder", protected=protected, replace=force)
    if force and target.is_dir() and any(target.iterdir()) and not _is_demo_family(target):
        raise MergelabError(f"--out {out}: --force replaces only a demo family built before (a family.toml "
                            "named demo-…); this folder holds something else, so pick a new or empty folder")


def _is_demo_family(folder: Path) -> bool:
    import tomllib

    try:
        return str(tomllib.loads((folder / "family.toml").read_text()).get("name", "")).startswith("demo-")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False


@demo_app.command("up")
def demo_up(
    preset: str = typer.Option("micro", help="demo family to build if absent"),
    ui: bool = typer.Option(True, help="serve the dashboard and sweep in the background worker (--no-ui: only "
                                       "sweep, here, in the foreground)"),
    port: int = typer.Option(8501, help="dashboard port"),
    host: str = typer.Option("127.0.0.1", help="address to bind; anything but loopback exposes your results"),
    db: Optional[Path] = typer.Option(None, help="results cache (default: MERGELAB_DB or the user data dir)"),
):
    """The main job: build the demo family if absent, load the shipped results, start the dashboard on
    127.0.0.1, and run the family's default sweep in the background worker (progress on the Sweep page;
    a rerun resumes it). Ctrl-C stops the dashboard and the worker it started."""
    from mergelab.demo.build import PRESETS
    from mergelab.demo.up import check_port_free, run_foreground, serve_demo
    from mergelab.paths import check_output

    if preset not in PRESETS:
        raise MergelabError(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}")
    if not 1 <= port <= 65535:
        raise MergelabError(f"--port {port}: expected a TCP port from 1 to 65535")
    check_host(host)
    if db is not None:
        check_output(db, "--db", kind="cache")
    if not ui:
        raise typer.Exit(run_foreground(preset, db))
    check_port_free(host, port)
    warning = host_warning(host)
    if warning:
        typer.echo(warning, err=True)
    raise typer.Exit(serve_demo(preset, db, port, host))


def check_host(host: str) -> None:
    """Refuse a --host that is neither an IP address nor a host name (before anything is built)."""
    import ipaddress
    import re

    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if not re.fullmatch(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*",
                        host):
        raise MergelabError(f"--host {host!r}: expected an IP address or a host name (e.g. 127.0.0.1)")


def host_warning(host: str) -> str | None:
    """The warning owed when the dashboard binds beyond loopback (None on loopback)."""
    if host in ("127.0.0.1", "localhost", "::1"):
        return None
    return (f"warning: binding the dashboard to {host}: anyone who can reach this address can read your "
            "results and launch sweeps on this machine")


@app.command()
def sweep(
    family: Path = typer.Option(..., help="family manifest (family.toml) or its directory"),
    sizes: Optional[str] = typer.Option(None, help="comma-separated sizes (default: all)"),
    methods: str = typer.Option("average,task_arithmetic,ties,dare", help="comma-separated merge methods"),
    k: str = typer.Option("all", help="subset sizes: all (1..M of each size's own pool), a range like 1-9, or a "
                                      "list like 1,2,4 (must fit every swept size)"),
    subsets: str = typer.Option("all", help="'all' subsets per k, N random subsets per k, or orderings:N (prefixes of "
                                            "N ≤ 2000 diverse orderings); plans above 1,000,000 merges per size are "
                                            "refused (MERGELAB_MAX_MERGES)"),
    hp: list[str] = typer.Option([], "--hp", help=HP_HELP),
    seed: int = typer.Option(0, help="seed for random subsets"),
    db: Optional[Path] = typer.Option(None, help="results cache (default: MERGELAB_DB or the user data dir)"),
    device: str = typer.Option("auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ..."),
    reference: bool = typer.Option(True, help="also record the base (k=0) and single experts (k=1)"),
    backend: str = typer.Option("local", help="local (this machine) or ray (a Ray cluster; pip install 'mergelab[ray]')"),
    address: Optional[str] = typer.Option(None, help="with --backend ray: the cluster (auto, ray://HEAD:10001); default: start Ray on this machine"),
    downstream: Optional[Path] = typer.Option(None, help="a folder of lm-eval task YAMLs (local data) to run on each "
                                                         "merged model beside CE, one accuracy row per task "
                                                         "(pip install 'mergelab[lmeval]')"),
    downstream_per_k: int = typer.Option(0, help="with --downstream: 0 runs the tasks on every merge, N on the first "
                                                 "N merges of each k"),
    adaptive: Optional[str] = typer.Option(None, help="a target QUANTITY:PRECISION (95% CI half-width), e.g. "
                                                      "L_inf:0.005, k90:0.5, A:10%, predict@9:0.003: merge only the "
                                                      "subsets the adaptive policy picks, until the target is met per "
                                                      "curve; rerun to continue a stopped sweep"),
    budget: Optional[int] = typer.Option(None, help="with --adaptive: at most this many merges per curve, cached "
                                                    "ones included"),
):
    """Merge every chosen subset in memory, evaluate CE per domain (and lm-eval tasks), cache the rows."""
    from mergelab.io.family import load_family
    from mergelab.store import ResultStore
    from mergelab.sweep.plan import SweepSpec, parse_ks, parse_subsets
    from mergelab.analysis.tables import per_k_summary
    from mergelab.sweep.runner import run_sweep
    from mergelab.paths import check_output, default_db_path, family_files

    _check_seed(seed)
    if not device.strip():
        raise MergelabError("--device '': expected auto, cpu, cuda, cuda:N or mps")
    goal = _check_adaptive(adaptive, budget, k, subsets, backend)
    fam = load_family(family)
    method_names = _names("--methods", methods) or []
    swept = _names("--sizes", sizes) or list(fam.size_names)
    pools = {name: len(fam.size(name).experts) for name in swept}  # each swept size's own pool
    tasks = None
    if downstream is not None:
        from mergelab.sweep.downstream import Downstream

        tasks = Downstream(downstream, per_k=downstream_per_k)
    elif downstream_per_k:
        raise MergelabError("--downstream-per-k is for --downstream; name the task folder")
    spec = SweepSpec(fam, swept, _parse_hparams(hp, method_names), parse_ks(k, pools),
                     parse_subsets(subsets), seed, reference, tasks)
    if address and backend != "ray":
        raise MergelabError("--address is for --backend ray")
    check_output(db if db is not None else default_db_path(), "--db", kind="cache", protected=family_files(fam))
    store = ResultStore(db)
    if goal is not None:
        return _adaptive_sweep(spec, goal, store, budget, device)
    report = run_sweep(spec, store, device=device, backend=backend, address=address)
    typer.echo(f"{report.merged} merges evaluated, {report.skipped} already cached, "
               f"{report.rows_written} rows written to {store.path} in {report.seconds:.1f} s on {report.threads_note()}")
    summary = per_k_summary(store, fam.name, list(report.eval_hashes))
    if not summary.empty:
        typer.echo("mean cross-domain CE (nats) per k:")
        typer.echo(summary.to_string())
    for size_name, note in report.layout_notes.items():
        typer.echo(f"note: size {size_name}: {note}")
    for size_name, note in report.eval_notes.items():
        typer.echo(f"note: size {size_name}: {note} (raise max_length in the family manifest to score them whole)")
    if report.not_cached:
        typer.echo(f"warning: {report.not_cached_note()}", err=True)


@app.command()
def results(
    db: Optional[Path] = typer.Option(None, help="results cache (default: MERGELAB_DB or the user data dir)"),
    family: Optional[str] = typer.Option(None, help="only this family"),
    format: str = typer.Option("csv", help="csv or json"),
    out: Optional[Path] = typer.Option(None, help="write to this file instead of standard output"),
    stale: bool = typer.Option(False, help="also rows whose checkpoints or eval sets changed since, with a 'stale' "
                                           "column saying why ('' for current rows)"),
):
    """Print or export cached rows (current ones: computed from the latest inputs a sweep recorded)."""
    from mergelab.paths import cache_files, check_output
    from mergelab.store import ResultStore

    if format not in ("csv", "json"):
        raise MergelabError(f"--format {format!r}: expected csv or json")
    _reading_db(db)
    if out is not None:
        check_output(out, "--out", protected=cache_files(db))
    frame = ResultStore(db).results(include_stale=stale, family=family)
    if frame.empty and family is not None:
        raise MergelabError(f"--family {family!r}: no cached rows for it ({_cached_values(db, 'family')})")
    frame["experts"] = frame["experts"].map(list)
    text = frame.to_csv(index=False) if format == "csv" else frame.to_json(orient="records", date_format="iso", indent=1)
    if out:
        from mergelab.export import write_file

        write_file(out, text.encode())
        typer.echo(f"wrote {len(frame)} rows to {out}")
    else:
        typer.echo(text, nl=False)


@app.command("import")
def import_(
    files: list[Path] = typer.Argument(..., help="CSV, TSV, Parquet, JSON Lines or JSON (rows, or lm-eval results) "
                                                 "files; one file per merged model for per-model layouts"),
    db: Optional[Path] = typer.Option(None, help="results cache to write (default: MERGELAB_DB or the user data dir)"),
    family: Optional[str] = typer.Option(None, help="family of rows without a family column"),
    metric: Optional[str] = typer.Option(None, help="metric of rows without a metric column: ce (default), accuracy, "
                                                    "exact_match, pass@1, … or NAME:higher|lower[:UNIT]"),
    map: Optional[str] = typer.Option(None, "--map", help="FIELD=COLUMN,… (e.g. experts=subset,value=ce) or a .toml "
                                                          "file with a [map] table"),
    set_: Optional[str] = typer.Option(None, "--set", help="FIELD=VALUE,… for fields the file lacks "
                                                           "(e.g. size=0.5B,method=ties)"),
    pattern: Optional[str] = typer.Option(None, help="per-model files: a regular expression with named groups "
                                                     "(experts, method, size) matched against each file's path"),
    dry_run: bool = typer.Option(False, "--dry-run", help="check and show what would be written; write nothing"),
):
    """Import results measured elsewhere (rows marked imported: source file and content hash as eval hash)."""
    from mergelab import importing
    from mergelab.paths import cache_files

    if db is not None and db.is_dir():
        raise MergelabError(f"--db {db}: is a folder; name the results cache file (e.g. results.duckdb)")
    protected = {p.resolve() for p, _ in cache_files(db)}
    for path in files:
        if path.resolve() in protected:
            raise MergelabError(f"{path}: is the results cache itself; import a results file into it")
    planned = importing.plan(files, family=family, metric=metric, mapping=importing.parse_map(map),
                             constants=importing.parse_set(set_), pattern=pattern)
    added, known = (0, 0) if dry_run else importing.write(planned, db)
    # what was read, after the write: a refused import prints its one error line and nothing else
    from collections import Counter

    layouts = Counter(planned.layouts.values())  # one line per layout, not per file, for a folder of per-model files
    for name, layout in planned.layouts.items():
        if layouts[layout] == 1:
            typer.echo(f"{name}: {layout}", err=True)
    for layout, n in layouts.items():
        if n > 1:
            typer.echo(f"{n} files: {layout}", err=True)
    for note, n in Counter(planned.notes).items():
        typer.echo(f"note: {note}" + (f" (× {n})" if n > 1 else ""), err=True)
    summary = planned.summary()
    if not summary.empty:
        typer.echo(summary.to_string(index=False), err=True)
    if dry_run:
        typer.echo(f"would import {len(planned.rows)} rows (dry run: nothing written)")
        return
    typer.echo(f"imported {added} rows" + (f" ({known} already cached)" if known else ""))


DB_HELP = "results cache (default: MERGELAB_DB or the user data dir)"
SUMMARY_COLUMNS = ["family", "size", "setting", "domain", "metric", "L_inf", "A", "b", "r2", "r2_unweighted", "n_subsets",
                   "at_bound"]
JOINT_COLUMNS = ["family", "setting", "domain", "metric", "L_star", "B", "beta", "A0", "gamma", "b", "r2", "r2_unweighted",
                 "identified", "reason"]
JOINT_PARAMS = ["L_star", "B", "beta", "A0", "gamma", "b"]


MAX_BOOTSTRAP = 100_000  # draws; each refits every curve, so more would run for hours


def _check_table_options(format: str, bootstrap: int, weights: str, db: Path | None, out: Path | None,
                         method: str | None, what: str | None = None) -> None:
    """Refuse bad options before reading the cache or fitting anything: the format (a figure's or a
    table's, by `what`), the number of bootstrap draws, the weights, the cache to read, the output file
    (never over the cache or any other input) and a reference pseudo-method given as --method."""
    from mergelab.export import check_format
    from mergelab.paths import cache_files, check_output

    check_format(format, what)
    if format == "parquet" and out is None:
        raise MergelabError("--format parquet: parquet output needs --out FILE")
    if not 0 <= bootstrap <= MAX_BOOTSTRAP:
        raise MergelabError(f"--bootstrap {bootstrap}: expected 0 (no CIs) up to {MAX_BOOTSTRAP:,} draws")
    if weights not in ("k", "uniform"):
        raise MergelabError(f"--weights {weights!r}: expected k or uniform")
    _check_merge_method(method)
    _reading_db(db)
    if out is not None:
        check_output(out, "--out", protected=cache_files(db))


def _cached_values(db, column: str, **filters) -> str:
    """'cached: a, b' — the values of `column` among cached rows matching `filters`, for error messages."""
    from mergelab.store import ResultStore

    values = sorted(ResultStore(db).results(**filters)[column].dropna().astype(str).unique())
    if column == "method":
        values = [v for v in values if v not in REFERENCE_METHODS]
    return "cached: " + (", ".join(values[:20]) + (" …" if len(values) > 20 else "") if values else "none")


INPUTS_VERSION_HELP = ("use the rows of this inputs version (see `mergelab versions`; repeatable, one per size) "
                       "instead of the latest")


def _selected_results(db, family, method, size, inputs_versions=()):
    """Cached rows of the selection (of the chosen inputs versions, else the current ones), refusing a
    family, size or method with none (naming what is cached)."""
    from mergelab.store import ResultStore

    store = ResultStore(db)
    results = store.results(family=family, size=size, versions=store.resolve_versions(inputs_versions),
                            method=None if method is None else [method, *REFERENCE_METHODS])
    if results.empty or (method is not None and not (results["method"] == method).any()):
        if family is not None and store.results(family=family).empty:
            raise MergelabError(f"--family {family!r}: no cached results ({_cached_values(db, 'family')})")
        if size is not None and store.results(family=family, size=size).empty:
            raise MergelabError(f"--size {size!r}: no cached results ({_cached_values(db, 'size', family=family)})")
        if method is not None:
            raise MergelabError(f"--method {method!r}: no cached merges "
                                f"({_cached_values(db, 'method', family=family, size=size)})")
        raise MergelabError("no cached results match the selection (run `mergelab sweep` first)")
    return results


def _check_domain(results, domain: str | None) -> None:
    """--domain must be 'macro' or one of the domains cached for the selection."""
    from mergelab.analysis.tables import domains_of
    from mergelab.names import MACRO

    known = domains_of(results)
    if domain is not None and domain != MACRO and domain not in known:
        raise MergelabError(f"--domain {domain!r}: not a domain of the selected results (expected {MACRO} or one of "
                            f"{', '.join(known)})")


@app.command()
def fit(
    db: Optional[Path] = typer.Option(None, help=DB_HELP),
    family: Optional[str] = typer.Option(None, help="only this family"),
    method: Optional[str] = typer.Option(None, help="only this merge method"),
    size: Optional[str] = typer.Option(None, help="only this size"),
    domain: Optional[str] = typer.Option(None, help="one domain, or 'macro' (default: macro and every domain)"),
    joint: bool = typer.Option(False, help="fit L(N,k) jointly over sizes instead of one curve per size; parameters "
                                           "the data do not identify are left blank, with the reason"),
    bootstrap: Optional[int] = typer.Option(None, help="expert-bootstrap draws for CIs (e.g. 1000); they resample "
                                                       "experts (default: 200 for --format latex, else 0)"),
    weights: str = typer.Option("k", help="k (as the paper) or uniform"),
    format: str = typer.Option("table", help="table, json, csv or latex (latex: the compact paper table, "
                                             "one domain: --domain, default macro)"),
    out: Optional[Path] = typer.Option(None, help="write to this file"),
    inputs_version: list[str] = typer.Option([], "--inputs-version", help=INPUTS_VERSION_HELP),
):
    """Fit the merging law to cached results: L(k) = L∞ + A/(k+b) per curve, or L(N,k) with --joint."""
    from mergelab.analysis import tables as analysis
    from mergelab import export
    from mergelab.paper import PAPER_DRAWS

    paper = format == "latex" and not joint  # LaTeX is for a paper: the compact table, with intervals
    if bootstrap is None:
        bootstrap = PAPER_DRAWS if paper else 0
    _check_table_options(format, bootstrap, weights, db, out, method)
    results = _selected_results(db, family, method, size, inputs_version)
    _check_domain(results, domain)
    options = {"weights": weights, "joint": joint, "bootstrap": bootstrap, "domain": domain or "all"}
    if paper:
        options["domain"] = domain or "macro"
        table = export.table("paper", results, weights=weights, n_boot=bootstrap, domain=domain)
        text = export.write(table, format, analysis.provenance(results, what="paper", **options), out, what="paper")
        typer.echo(text if text is not None else f"wrote {len(table)} fits to {out}", nl=text is None)
        return
    # through export.table: one metric at a time, a higher-is-better one read as a ceiling
    table = export.table("joint" if joint else "fits", results, weights=weights, n_boot=bootstrap, domain=domain)
    if joint:  # the reason a joint fit is not identified, said once where it is read (tables may be cut)
        for reason in dict.fromkeys(table.loc[~table["identified"].fillna(False).astype(bool), "reason"].dropna()):
            typer.echo(f"note: joint fit not identified: {reason}", err=True)
    if format == "table":
        cols = [c for c in (JOINT_COLUMNS if joint else SUMMARY_COLUMNS) if c in table.columns
                and not (c == "metric" and set(table["metric"]) <= {"ce"})]  # named only beside another metric
        cis = [c for c in table.columns if c.startswith("ci_")]
        table = table[cols + cis].copy()
        for c in cis:
            table[c] = table[c].map(lambda v: f"[{v[0]:.4g}, {v[1]:.4g}]" if isinstance(v, list) else v)
        for c in (JOINT_PARAMS if joint else []):  # not identified: no number, the reason column says why
            if c in table.columns:
                table[c] = table[c].map(lambda v: "–" if v is None or v != v else f"{v:.4g}")
    text = export.write(table, format, analysis.provenance(results, **options), out, what="joint" if joint else "fits")
    typer.echo(text if text is not None else f"wrote {len(table)} fits to {out}", nl=text is None)


def _check_figure_options(what: str, format: str | None, out: Path, figure: str | None, columns: int | None,
                          dpi: int | None, domain: str | None) -> str | None:
    """Refuse figure options given for a table, and bad values of --figure, --columns, --dpi; --domain only
    where it narrows something. Returns the format (for a figure: --format, else the --out suffix)."""
    from mergelab import export
    from mergelab.figures import FIGURES, MAX_DPI

    if what not in (*export.EXPORTABLE, export.FIGURE):
        raise MergelabError(f"--what {what!r}: expected {', '.join(export.EXPORTABLE)} or {export.FIGURE}")
    if domain is not None and what not in (*export.DOMAIN_TABLES, export.FIGURE):
        raise MergelabError(f"--domain is for --what {', '.join(export.DOMAIN_TABLES)} or {export.FIGURE}, "
                            f"not {what}; leave it out")
    if what != export.FIGURE:
        for name, value in (("--figure", figure), ("--columns", columns), ("--dpi", dpi)):
            if value is not None:
                raise MergelabError(f"{name} is for --what {export.FIGURE}, not {what}; leave it out")
        return format
    if figure is not None and figure not in FIGURES:
        raise MergelabError(f"--figure {figure!r}: expected one of {', '.join(FIGURES)}")
    if columns is not None and columns not in (1, 2):
        raise MergelabError(f"--columns {columns}: expected 1 (3.5 in wide) or 2 (7 in wide)")
    if format is None:
        suffix = out.suffix.lstrip(".").lower()
        if suffix not in export.FIGURE_FORMATS:
            raise MergelabError(f"--format: give {', '.join(export.FIGURE_FORMATS)} for a figure (--out {out.name} "
                                "does not end in one)")
        format = suffix
    if dpi is not None:
        if format != "png":
            raise MergelabError(f"--dpi {dpi}: is for --format png ({format} is vector); leave it out")
        if not 1 <= dpi <= MAX_DPI:
            raise MergelabError(f"--dpi {dpi}: expected 1 to {MAX_DPI:,} dots per inch (300 for print)")
    return format


@app.command("export")
def export_cmd(
    what: str = typer.Option(..., help="fits, paper (the compact fits table), joint, results, synergy, plan, "
                                       "or figure"),
    format: Optional[str] = typer.Option(None, help="tables: csv (default), json, latex (compact, for a paper) or "
                                                    "parquet; a figure: png, pdf or svg (default: the --out suffix)"),
    out: Path = typer.Option(..., help="file to write"),
    db: Optional[Path] = typer.Option(None, help=DB_HELP),
    family: Optional[str] = typer.Option(None, help="only this family"),
    method: Optional[str] = typer.Option(None, help="only this merge method"),
    size: Optional[str] = typer.Option(None, help="only this size"),
    domain: Optional[str] = typer.Option(None, help="one domain or 'macro', for fits, joint, paper and figures "
                                                    "(default: fits and joint every domain, paper and figures macro)"),
    bootstrap: Optional[int] = typer.Option(None, help="expert-bootstrap draws for CIs (default: 200 for the paper "
                                                       "table, LaTeX fits and figures, else 0)"),
    weights: str = typer.Option("k", help="k (as the paper) or uniform"),
    figure: Optional[str] = typer.Option(None, help="with --what figure: curves (default: CE vs k), sizes (CE vs "
                                                    "N), variance or synergy"),
    columns: Optional[int] = typer.Option(None, help="with --what figure: 1 (3.5 in wide, default) or 2 (7 in)"),
    dpi: Optional[int] = typer.Option(None, help="with --what figure --format png: dots per inch (default 300)"),
    inputs_version: list[str] = typer.Option([], "--inputs-version", help=INPUTS_VERSION_HELP),
):
    """Export fitted parameters, the paper table, raw results, a synergy matrix or a plan with provenance,
    or a figure for a paper (PNG, PDF with embedded fonts, SVG)."""
    from mergelab.analysis import tables as analysis
    from mergelab import export
    from mergelab.names import MACRO
    from mergelab.paper import PAPER_DRAWS

    format = _check_figure_options(what, format, out, figure, columns, dpi, domain) or "csv"
    paper = what == "paper" or (what == "fits" and format == "latex")  # LaTeX fits: the compact table
    if bootstrap is None:
        bootstrap = PAPER_DRAWS if paper or what == export.FIGURE else 0
    _check_table_options(format, bootstrap, weights, db, out, method, what)
    if what == export.FIGURE:
        from mergelab import figures

        figures.check_renderer()  # before any fitting: say what to install
    results = _selected_results(db, family, method, size, inputs_version)
    _check_domain(results, domain)
    if what == export.FIGURE:
        name, columns = figure or "curves", columns or 1
        fig = figures.figure(name, results, family=family, method=method, size=size, domain=domain or MACRO,
                             n_boot=bootstrap)
        figures.write(fig, out, fmt=format, columns=columns, dpi=dpi or figures.DEFAULT_DPI)
        typer.echo(f"wrote the {name} figure ({columns} column{'s' if columns > 1 else ''}, "
                   f"{figures.WIDTH_IN[columns]:g} in wide) to {out}")
        return
    options = {"what": "paper" if paper else what, "weights": weights, "bootstrap": bootstrap}
    if domain is not None or paper:
        options["domain"] = domain or MACRO
    table = export.table("paper" if paper else what, results, weights=weights, n_boot=bootstrap, domain=domain)
    export.write(table, format, analysis.provenance(results, **options), out, what="paper" if paper else what)
    typer.echo(f"wrote {len(table)} rows of {'the paper table' if paper and what == 'fits' else what} to {out}")


@app.command("export-model")
def export_model_cmd(
    family: Path = typer.Option(..., help="family manifest (family.toml) or its directory"),
    size: str = typer.Option(..., help="size name"),
    method: str = typer.Option("average", help="merge method"),
    experts: str = typer.Option(..., help="comma-separated experts to merge"),
    out: Path = typer.Option(..., help="directory to write the merged HF model into"),
    hp: list[str] = typer.Option([], "--hp", help=HP_HELP),
    mergekit_yaml: Optional[Path] = typer.Option(None, "--mergekit-yaml", help="also write the equivalent mergekit config here"),
    db: Optional[Path] = typer.Option(None, help="results cache the model card takes the merge's measured CE from "
                                                 "(default: MERGELAB_DB or the user data dir; none there: 'not measured')"),
):
    """Materialise one merged model as a loadable HF directory (config, safetensors, tokenizer) with a
    model card (README.md): base, experts, method, hyperparameters, mergelab version, measured CE."""
    from mergelab import __version__
    from mergelab.engine.materialise import check_experts, export_model, model_card, mergekit_yaml as to_yaml
    from mergelab.engine.materialise import require_export_fit
    from mergelab.engine.methods import get_method
    from mergelab.export import write_file
    from mergelab.io.family import load_family
    from mergelab.paths import check_output, family_files

    fam = load_family(family)
    spec = fam.size(size)
    chosen = _split(experts) or []
    check_experts(spec, chosen)
    hparams = {**fam.merge, **_parse_hparams(hp, [method])[method]}  # the family's [merge] options unless --hp sets them
    get_method(method).resolve(hparams)  # an unknown method or value is refused before anything is loaded
    if out.is_dir() and any(out.iterdir()):
        raise MergelabError(f"--out {out}: already exists and is not empty; name a new or empty folder")
    target = check_output(out, "--out", kind="folder", protected=family_files(fam))
    if db is not None:  # named on purpose: it must be a cache (the default one may be absent: not measured)
        _reading_db(db)
    if mergekit_yaml:
        if check_output(mergekit_yaml, "--mergekit-yaml", protected=family_files(fam)) == target:
            raise MergelabError(f"--mergekit-yaml {mergekit_yaml}: is the --out folder; name a file")
        text = to_yaml(spec, method, hparams, chosen)
    require_export_fit(spec, chosen)  # first: a merge that cannot fit reads nothing more
    measured, why = _measured_ce(db, fam, spec, method, hparams, chosen)
    if measured is None:
        logging.getLogger("mergelab.cli").info("model card: CE not measured (%s)", why)
    card = model_card(fam, spec, method, hparams, chosen, measured, __version__)
    export_model(spec, method, hparams, chosen, out, card=card, memory_checked=True)
    if mergekit_yaml:  # written once the model is: a refused export leaves no config behind
        write_file(mergekit_yaml, text.encode())
    macro = measured["macro"] if measured else None
    typer.echo(f"wrote the {method} merge of {'+'.join(chosen)} to {out}"
               + (f" and its mergekit config to {mergekit_yaml}" if mergekit_yaml else "")
               + (f"; its card gives the cached CE (macro {macro:.4f})" if macro is not None
                  else "; its card gives the cached CE" if measured else ""))


def _measured_ce(db: Path | None, fam, spec, method: str, hparams: dict, chosen: list[str]):
    """(the merge's cached CE as `model_card` takes it, '') or (None, why not): the current rows of this
    family, size, method, canonical hyperparameters and expert set, if they were computed from the base and
    experts on disk now (a checkpoint replaced since the last sweep gives another merge). Reads no
    checkpoint of an expert that is not merged, unless the vocabulary policy ties the rows to them all."""
    from mergelab.engine.methods import canonical_hparams, get_method
    from mergelab.errors import CacheError, CheckpointError
    from mergelab.io.fingerprint import checkpoint_fingerprint, size_fingerprints
    from mergelab.names import experts_key
    from mergelab.paths import default_db_path
    from mergelab.store import UNRECORDED, ResultStore, join_fingerprints

    path = db if db is not None else default_db_path()
    if not path.is_file():
        return None, f"no results cache at {path}"
    try:
        rows = ResultStore(path).results(family=fam.name, size=spec.name, method=method,
                                         experts_key=experts_key(chosen),
                                         hparams=canonical_hparams(get_method(method).resolve(hparams)))
    except CacheError as exc:
        if db is not None:
            raise
        logging.getLogger("mergelab.cli").warning("the default results cache cannot be read: %s", exc)
        return None, "the results cache cannot be read"
    if rows.empty:
        return None, f"no current rows of this merge in {path}"
    experts_fp = join_fingerprints(checkpoint_fingerprint(spec.experts[e]) for e in sorted(chosen))
    base_fp = checkpoint_fingerprint(spec.base)
    if (rows["base_fp"] != base_fp).any() and (rows["base_fp"] != UNRECORDED).any():
        try:  # the vocabulary policy joins the base's fingerprint when rows differ (io/fingerprint.py)
            base_fp = size_fingerprints(spec)[0]
        except CheckpointError as exc:
            return None, f"cannot confirm the cached rows describe these checkpoints ({exc})"
    rows = rows[rows["base_fp"].isin([base_fp, UNRECORDED]) & rows["experts_fp"].isin([experts_fp, UNRECORDED])]
    if rows.empty:
        return None, f"the rows of this merge in {path} were computed from other checkpoints; sweep again"
    latest = rows.sort_values("created_at").groupby("domain").last()
    domains = {d: float(latest.at[d, "loss"]) for d in fam.domains if d in latest.index}
    complete = len(domains) == len(fam.domains)
    metric = (f"Mean cross-entropy per response token (nats) on the family's eval sets, up to {fam.token_budget} "
              f"scored tokens per domain, as cached by `mergelab sweep`"
              + ("." if complete else f"; {len(domains)} of {len(fam.domains)} domains measured, so no macro."))
    return {"domains": domains, "macro": sum(domains.values()) / len(domains) if complete else None,
            "metric": metric}, ""


@app.command()
def adopt(
    family: Path = typer.Option(..., help="family manifest (family.toml) or its directory"),
    db: Optional[Path] = typer.Option(None, help=DB_HELP),
    sizes: Optional[str] = typer.Option(None, help="comma-separated sizes (default: all)"),
):
    """Stamp rows cached before fingerprints (mergelab 0.2 caches, imported rows) with the fingerprints of
    the checkpoints the manifest names now, where their eval sets match: say so only if those checkpoints
    have not changed since the rows were computed. Otherwise leave them stale; a sweep recomputes them."""
    from mergelab.io.family import load_family
    from mergelab.store import ResultStore
    from mergelab.sweep.runner import adopt_unrecorded

    _reading_db(db)
    fam = load_family(family)
    chosen = _names("--sizes", sizes)
    for name in chosen or []:
        fam.size(name)  # an unknown size is refused before any work
    store = ResultStore(db)
    for size, n in adopt_unrecorded(fam, store, chosen).items():
        typer.echo(f"{fam.name} / {size}: {n:,} rows adopted")


@app.command()
def versions(
    db: Optional[Path] = typer.Option(None, help=DB_HELP),
    family: Optional[str] = typer.Option(None, help="only this family"),
):
    """List the inputs versions sweeps recorded per family and size (checkpoint fingerprints, eval sets,
    metric), newest first, with how many cached rows each describes; the newest is the one shown."""
    from mergelab.store import ResultStore

    _reading_db(db)
    store = ResultStore(db)
    table = store.inputs_versions(family)
    if table.empty and family is not None:
        raise MergelabError(f"--family {family!r}: no inputs versions recorded ({_cached_values(db, 'family')})")
    if table.empty:
        typer.echo("no inputs versions recorded (rows cached before fingerprints are shown as they are)")
        return
    counts = store.version_row_counts(family)
    table["rows"] = [counts.get((f, s, v), 0) for f, s, v in zip(table["family"], table["size"], table["version"])]
    table["current"] = ~table.duplicated(["family", "size"])
    typer.echo(table[["family", "size", "version", "current", "rows", "recorded_at", "metric_version"]]
               .to_string(index=False))


@app.command()
def worker(
    queue: Optional[Path] = typer.Option(None, help="job queue (default: MERGELAB_JOBS or jobs.sqlite in the data dir)"),
    once: bool = typer.Option(False, help="exit when the queue is empty"),
    idle_exit: Optional[float] = typer.Option(None, help="exit after this many idle seconds"),
):
    """Run queued sweep jobs (the dashboard starts one of these for you)."""
    import math

    from mergelab.paths import cache_files, check_output
    from mergelab.sweep.jobs import JobQueue, default_queue_path
    from mergelab.sweep.worker import run_worker

    if idle_exit is not None and not (math.isfinite(idle_exit) and idle_exit >= 0):
        raise MergelabError(f"--idle-exit {idle_exit}: expected a number of seconds, 0 or more")
    check_output(queue if queue is not None else default_queue_path(), "--queue", kind="queue",
                 protected=cache_files(None))
    from mergelab.analysis.adaptive_sweep import run_adaptive_job

    raise typer.Exit(run_worker(JobQueue(queue), idle_exit=idle_exit, once=once, adaptive_runner=run_adaptive_job))


def _check_adaptive(adaptive: str | None, budget: int | None, k: str, subsets: str, backend: str):
    """The parsed --adaptive target (None without it); refuses --budget without --adaptive, and --k,
    --subsets or --backend ray with it (the policy chooses the subsets and runs them here)."""
    from mergelab.analysis.adaptive import parse_target, require_per_curve

    if adaptive is None:
        if budget is not None:
            raise MergelabError(f"--budget {budget}: is for --adaptive sweeps; give --adaptive TARGET or leave it out")
        return None
    goal = parse_target(adaptive)
    require_per_curve(goal)
    _check_budget(budget)
    for option, value in (("--k", k), ("--subsets", subsets)):
        if value.strip() != "all":
            raise MergelabError(f"{option} {value!r} with --adaptive: the adaptive policy chooses the subsets; "
                                f"leave {option} out")
    if backend != "local":
        raise MergelabError(f"--backend {backend!r} with --adaptive: adaptive sweeps run on the local backend")
    return goal


def _adaptive_sweep(spec, goal, store, budget, device) -> None:
    """`mergelab sweep --adaptive`: run the policy per curve and print one line per curve."""
    from mergelab.analysis.adaptive_sweep import run_adaptive_sweep

    report = run_adaptive_sweep(spec, goal, store, budget=budget, device=device)
    typer.echo(f"adaptive sweep to {goal.describe()}: {report.merged} merges evaluated, {report.cached_before} "
               f"already cached, in {report.seconds:.1f} s ({store.path})")
    for (size, method, _), result in report.curves.items():
        ci = (f"[{result.lo:.4g}, {result.hi:.4g}]" if result.lo == result.lo else "no interval")
        typer.echo(f"{size} · {method}: {goal.label} = {result.estimate:.4g} {ci}, half-width "
                   f"{result.half_width:.3g}, {result.merges} merges of {2 ** len(result.experts) - 1}: {result.reason}")
    if report.not_cached:
        typer.echo(f"warning: {len(report.not_cached)} merge(s) not cached: {'; '.join(report.not_cached[:3])}",
                   err=True)


def _check_budget(budget: int | None) -> None:
    if budget is not None and budget < 1:
        raise MergelabError(f"--budget {budget}: expected a positive number of merges per curve")


@adaptive_app.command("replay")
def adaptive_replay(
    target: str = typer.Option(..., help="QUANTITY:PRECISION, the 95% CI half-width wanted: L_inf:0.005, k90:0.5, "
                                         "A:10% (of the estimate), predict@9:0.003"),
    db: Optional[Path] = typer.Option(None, help=DB_HELP),
    family: Optional[str] = typer.Option(None, help="only this family"),
    method: Optional[str] = typer.Option(None, help="only this merge method"),
    size: Optional[str] = typer.Option(None, help="only this size"),
    budget: Optional[int] = typer.Option(None, help="at most this many merges per curve"),
    seed: int = typer.Option(0, help="seed of subset choice ties and bootstrap draws"),
    format: str = typer.Option("table", help="table, or json (one JSON object per line, one line per curve)"),
):
    """Judge the adaptive policy against cached sweeps: per (method, size) macro curve, run the policy with
    each merge a lookup in the cache, and print the merges it used, its estimate and 95% CI, and the
    estimate from every cached merge of the curve."""
    import json

    from mergelab.analysis.adaptive import curves_of, parse_target, replay_curve, replay_record, require_per_curve

    goal = parse_target(target)
    require_per_curve(goal)
    _check_budget(budget)
    _check_seed(seed)
    if format not in ("table", "json"):
        raise MergelabError(f"--format {format!r}: expected table or json")
    _check_merge_method(method)
    _reading_db(db)
    results = _selected_results(db, family, method, size)
    curves = curves_of(results)
    if not curves:
        raise MergelabError("no complete merge curves among the selected rows (merges evaluated on every domain)")
    lines = []
    for info, losses in curves:
        result, full = replay_curve(goal, info["experts"], losses, budget=budget, seed=seed)
        record = replay_record(info, goal, result, full, len(losses))
        if format == "json":
            typer.echo(json.dumps(record))
            continue
        fmt = lambda v: "–" if v is None else f"{v:.4g}"  # noqa: E731
        lines.append({"family": info["family"], "size": record["size"], "method": record["method"],
                      "merges_used": record["merges_used"], "exhaustive_merges": record["exhaustive_merges"],
                      "estimate": fmt(record["estimate"]), "ci": f"[{fmt(record['ci'][0])}, {fmt(record['ci'][1])}]",
                      "exhaustive_estimate": fmt(record["exhaustive_estimate"]),
                      "exhaustive_ci": f"[{fmt(full.lo)}, {fmt(full.hi)}]", "stopped": result.reason})
    if format == "table":
        import pandas as pd

        typer.echo(f"target: {goal.describe()}")
        typer.echo(pd.DataFrame(lines).to_string(index=False))


@family_app.command("init")
def family_init(
    folder: Path = typer.Argument(..., help="folder holding SIZE/base/ and SIZE/experts/DOMAIN/ checkpoints (and "
                                            "eval/DOMAIN.jsonl); family.toml is written there"),
    name: Optional[str] = typer.Option(None, help="family name (default: the folder's name)"),
    force: bool = typer.Option(False, help="replace an existing family.toml"),
):
    """Write FOLDER/family.toml from the HF checkpoints in it, n_params counted from the safetensors
    headers; eval sets that are missing are written as placeholders marked MISSING."""
    from mergelab.io.scaffold import init_family

    report = init_family(folder, name, force)
    for domain in report.missing_eval:
        logging.getLogger("mergelab.cli").warning(
            "no eval set for domain %r: family.toml names eval/%s.jsonl (marked MISSING); write it before "
            "`mergelab sweep`", domain, domain)
    sizes = ", ".join(f"{n} ({p:,} parameters, {len(e)} experts)" for n, p, e in report.sizes)
    typer.echo(f"wrote {report.manifest}: family {report.name!r}, sizes {sizes}, domains {', '.join(report.domains)}")


@app.command("methods")
def list_methods():
    """List the merge methods with their hyperparameters, defaults and ranges, whether a sweep merges
    them incrementally, and the options every method takes (weights, include, exclude)."""
    from mergelab.engine.methods import METHODS, incremental
    from mergelab.engine.methods.options import HELP

    for method in METHODS.values():
        typer.echo(f"{method.name}: {method.doc}")
        typer.echo("    [incremental: linear in the prepared task vectors]" if incremental(method) else
                   f"    [not incremental: combined per subset{', whole tensors' if method.whole_tensor else ''}]")
        for name, p in method.params.items():
            typer.echo(f"    {name} = {str(p.default).lower() if p.kind is bool else p.default}"
                       f"  ({p.kind.__name__}{'' if p.kind is bool else ' in ' + p.range_text()}) {p.help}")
    typer.echo("every method also takes (--hp METHOD.OPTION=… or --hp OPTION=… for all; part of the cache key):")
    for name, text in HELP.items():
        typer.echo(f"    {name}: {text}")


def main() -> None:
    """The console entry point: every refusal — a MergelabError, a bad option value typer rejects, an
    OS error on a path — is one line on stderr and exit code 2; MERGELAB_TRACEBACK=1 shows the traceback."""
    try:  # typer >= 0.2x carries its own copy of click; older ones use click itself
        from typer import _click as click
    except ImportError:
        import click

    no_args = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2
    try:
        code = app(standalone_mode=False)
    except no_args as exc:  # `mergelab` or `mergelab demo` alone: the help, as before
        typer.echo(exc.ctx.get_help(), err=True)
        code = 2
    except click.ClickException as exc:  # typer's own checks: unknown options, values of the wrong type
        if os.environ.get("MERGELAB_TRACEBACK"):
            raise
        command = getattr(getattr(exc, "ctx", None), "command_path", "mergelab")
        message = " ".join(exc.format_message().split())  # one line whatever the wrapping
        typer.echo(f"error: {message} (see `{command} --help`)", err=True)
        code = 2
    except typer.Abort:
        typer.echo("aborted", err=True)
        code = 1
    except (MergelabError, OSError) as exc:
        if os.environ.get("MERGELAB_TRACEBACK"):
            raise
        if isinstance(exc, OSError):  # a path the checks could not foresee (it vanished, a device failed)
            exc = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else (exc.strerror or str(exc))
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)  # one line, whatever the message
        code = 2
    if code:
        sys.exit(code)
