"""Streamlit helpers shared by the pages: cached reads of the results cache, selections that follow
the user across pages and into the URL, and friendly errors. Only the pages import this module."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import streamlit as st

from mergelab.errors import MergelabError
from mergelab.names import REFERENCE_METHODS
from mergelab.store import ResultStore


def results_store() -> ResultStore:
    return ResultStore()


def _stamp(path: Path) -> float:
    """Changes whenever a writer commits (the file or its WAL changes)."""
    wal = Path(str(path) + ".wal")
    return sum(p.stat().st_mtime_ns + p.stat().st_size for p in (path, wal) if p.exists())


# cache_resource, not cache_data: the frames are shared read-only (pages filter, never mutate), which
# saves copying 50k+ rows on every rerun.
@st.cache_resource(show_spinner=False, max_entries=4)
def _read_all(path: str, stamp: float) -> pd.DataFrame:
    # the expert list is derivable from experts_key; dropping the array column keeps frames hashable
    return ResultStore(path).results(include_stale=True).drop(columns=["experts"])


@st.cache_resource(show_spinner=False, max_entries=4)
def _read(path: str, stamp: float) -> pd.DataFrame:
    """The current rows: pages never mix rows of changed checkpoints or eval sets into a curve."""
    rows = _read_all(path, stamp)
    return rows[rows["stale"] == ""].drop(columns="stale").reset_index(drop=True)


def stale_rows(family: str) -> pd.DataFrame:
    """Rows of `family` left out because their checkpoints or eval sets changed since (ResultStore.results):
    one row per size and reason with the number of rows and merges."""
    store = results_store()
    rows = _read_all(str(store.path), _stamp(store.path))
    stale = rows[(rows["family"] == family) & (rows["stale"] != "")]
    return (stale.groupby(["size", "stale"], as_index=False)
            .agg(rows=("loss", "size"), merges=("experts_key", "nunique"))
            .rename(columns={"stale": "why stale"}))


@st.cache_resource(show_spinner=False, max_entries=32)
def _merges(path: str, stamp: float, family: str, domain: str) -> pd.DataFrame:
    from mergelab.analysis.tables import merge_losses

    rows = _read(path, stamp)
    return merge_losses(rows[rows["family"] == family], domain)


def merges(family: str, domain: str, settings=None, sizes=None) -> pd.DataFrame:
    """One row per merge of `family` with its loss on `domain` (or macro), for the given method
    settings (mergelab.analysis.tables.setting_labels) and sizes; cached per cache version, so switching
    selections does not recompute it."""
    path = results_store().path
    frame = _merges(str(path), _stamp(path), family, domain)
    if settings is not None:
        frame = frame[frame["setting"].isin(list(settings))]
    if sizes is not None:
        frame = frame[frame["size"].isin(list(sizes))]
    return frame


@st.cache_resource(show_spinner="Fitting…", max_entries=64)
def _fits(path: str, stamp: float, family: str, domain: str, settings: tuple, sizes: tuple, n_boot: int) -> dict:
    from mergelab.ui.curves import fit_groups

    return fit_groups(merges(family, domain, settings, sizes), n_boot)


def fits(family: str, domain: str, settings, sizes, n_boot: int = 0) -> dict:
    """{(size, setting): CurveFit or FitFailure}, cached per selection and cache version."""
    path = results_store().path
    return _fits(str(path), _stamp(path), family, domain, tuple(settings), tuple(sizes), n_boot)


def load_results() -> pd.DataFrame:
    """All cached rows (read-only, briefly, retried while a worker writes); stops the page with a
    message when the cache cannot be read. On the first run the default cache is created with the
    shipped demo results; a cache named by MERGELAB_DB, or the default one deleted after that, that
    does not exist is reported, not created (mergelab.demo.up.seed_first_cache)."""
    from mergelab.demo.up import missing_cache_note, seed_first_cache

    store = results_store()
    try:
        if not store.exists() and not seed_first_cache(store) and missing_cache_note(store):
            st.warning(missing_cache_note(store))
        return _read(str(store.path), _stamp(store.path))
    except MergelabError as exc:
        st.error(f"Cannot read the results cache: {exc}")
        st.info("Check the path (MERGELAB_DB) and that no other program holds the file, then reload.")
        st.stop()


def live_refresh(every: float = 5.0) -> None:
    """While a sweep job runs, rerun the page whenever the cache changes, so new points appear."""
    from mergelab.sweep.jobs import JobQueue

    try:
        running = any(j.status == "running" for j in JobQueue().list(limit=5))
    except MergelabError:
        return
    if not running:
        return
    st.caption(f"A sweep is running: new merges appear here as they land (checked every {every:g} s).")
    path = results_store().path
    seen = _stamp(path)

    @st.fragment(run_every=every)
    def watch():
        if _stamp(path) != seen:
            st.rerun()

    watch()


def empty_state(what: str = "results") -> None:
    st.info(f"No {what} yet. Launch a sweep on the **Sweep** page, or run `mergelab demo up` / "
            "`mergelab sweep --family FAMILY.toml` in a terminal.")
    st.stop()


def _url_value(key: str, multi: bool):
    raw = st.query_params.get(key)
    if raw is None:
        return None
    return [v for v in raw.split(",") if v] if multi else raw


def choose(label: str, options: list, key: str, *, multi: bool = False, default=None, sidebar: bool = True,
           help: str | None = None, format_func=str):
    """A select box (or multiselect) whose choice persists across pages and is mirrored in the URL."""
    options = list(options)
    state_key = f"sel:{key}"
    saved = st.session_state.get(state_key, _url_value(key, multi))
    if multi:
        value = [v for v in (saved or []) if v in options] or [v for v in (default or options[:1]) if v in options]
    else:
        value = saved if saved in options else (default if default in options else (options[0] if options else None))
    place = st.sidebar if sidebar else st
    widget_key = f"w:{key}"
    if multi:
        chosen = place.multiselect(label, options, default=value, key=widget_key, help=help, format_func=format_func)
    else:
        chosen = place.selectbox(label, options, index=options.index(value) if value in options else 0,
                                 key=widget_key, help=help, format_func=format_func)
    st.session_state[state_key] = chosen
    if chosen is not None:
        st.query_params[key] = ",".join(map(str, chosen)) if multi else str(chosen)
    return chosen


def family_with_merges() -> tuple[str, pd.DataFrame, list[str], list[str]]:
    """The page preamble: all rows, the family picked in the sidebar, its rows (with their `setting`),
    its merge method settings and its sizes by parameter count; stops with an empty state when there
    is nothing to show."""
    results = load_results()
    if results.empty:
        empty_state()
    family, rows = family_rows(results)
    methods = merge_settings(rows)
    if not methods:
        empty_state(f"merges for {family}")
    return family, rows, methods, sizes_in_order(rows)


def pick_method_and_size(rows: pd.DataFrame, settings: list[str], sizes: list[str]) -> tuple[str, str]:
    """One method setting and one size (the largest by default), remembered across pages."""
    method = choose("Method", settings, "method", help="a method with its hyperparameters when the family has "
                                                        "several settings of it (e.g. 'ties lambda=0.5')")
    return method, choose("Size", sizes, "size", default=sizes[-1], format_func=size_label(rows))


def family_rows(results: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """The family picked in the sidebar and its rows, with their `setting` (method + hyperparameters)."""
    from mergelab.analysis.tables import with_settings

    families = sorted(results["family"].unique())
    default = "demo-standard" if "demo-standard" in families else families[0]
    family = choose("Family", families, "family", default=default)
    return family, with_settings(results[results["family"] == family])


def sizes_in_order(rows: pd.DataFrame) -> list[str]:
    return list(rows.drop_duplicates("size").sort_values("n_params")["size"])


def merge_settings(rows: pd.DataFrame) -> list[str]:
    """The merge method settings in `rows` (reference rows base/expert left out), sorted."""
    return sorted(rows.loc[~rows["method"].isin(REFERENCE_METHODS), "setting"].unique())


def size_label(rows: pd.DataFrame):
    params = rows.groupby("size")["n_params"].first()
    return lambda s: f"{s} ({params[s] / 1e6:.2f}M params)" if s in params else str(s)


def estimate_metric(label: str, est, fmt: str) -> None:
    """A planner's answer as a metric: its 95% interval in the tooltip, 'extrapolated' beside a
    value beyond the data, the note (why it is missing, unreachable or extrapolated) below."""
    import math

    if math.isnan(est.value):
        value = "—"
    elif math.isinf(est.value):
        value = "unreachable"
    else:
        value = fmt.format(est.value) + (" (extrapolated)" if est.extrapolated else "")
    interval = f"95% interval [{est.lo:.3g}, {est.hi:.3g}]" if not math.isnan(est.lo) else "no interval"
    st.metric(label, value, help=interval)
    if est.note:
        st.caption(est.note)


def page_header(title: str, caption: str) -> None:
    st.set_page_config(page_title=f"mergelab · {title}", layout="wide")
    st.title(title)
    st.caption(caption)


def db_caption() -> str:
    return f"cache: {results_store().path} · MERGELAB_DB={os.environ.get('MERGELAB_DB', '(default)')}"
