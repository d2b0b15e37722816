"""Streamlit helpers shared by the pages: cached reads of the results cache, selections that follow
the user across pages and into the URL, and friendly errors. Only the pages import this module."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import streamlit as st

from mergelab.errors import MergelabError
from mergelab.names import LIST_SEPARATOR, REFERENCE_METHODS, params_label
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


def stale_rows(family: str | None = None) -> pd.DataFrame:
    """Rows of `family` (default: every family) left out because their checkpoints or eval sets changed
    since (ResultStore.results): one row per family, size and reason with the number of rows and merges."""
    store = results_store()
    try:
        rows = _read_all(str(store.path), _stamp(store.path))
    except MergelabError:
        return pd.DataFrame(columns=["family", "size", "why stale", "rows", "merges"])
    stale = rows[(rows["stale"] != "") & ((rows["family"] == family) if family is not None else True)]
    stale = stale.assign(merge=stale["method"] + "|" + stale["hparams"] + "|" + stale["experts_key"])  # one per setting
    out = (stale.groupby(["family", "size", "stale"], as_index=False)
           .agg(rows=("loss", "size"), merges=("merge", "nunique"))
           .rename(columns={"stale": "why stale"}))
    return out.drop(columns="family") if family is not None else out


@st.cache_resource(show_spinner=False, max_entries=32)
def _merges(path: str, stamp: float, family: str, domain: str, metric: str = "ce") -> pd.DataFrame:
    from mergelab import metrics
    from mergelab.analysis.tables import merge_losses

    rows = _read(path, stamp)
    rows = metrics.select(rows[rows["family"] == family], metric)
    return merge_losses(metrics.oriented(rows), domain)


METRIC_KEY = "mergelab_metric"  # the metric family_rows picked, for the cached reads after it


def current_metric():
    """The metric the page shows (mergelab.metrics.Metric; CE until `family_rows` picks another)."""
    from mergelab import metrics

    return st.session_state.get(METRIC_KEY) or metrics.CE


def merges(family: str, domain: str, settings=None, sizes=None) -> pd.DataFrame:
    """One row per merge of `family` with its value on `domain` (or macro) in the page's metric
    (`current_metric`, oriented: negated when higher is better, see mergelab.metrics), for the given method
    settings (mergelab.analysis.tables.setting_labels) and sizes; cached per cache version, so switching
    selections does not recompute it."""
    path = results_store().path
    frame = _merges(str(path), _stamp(path), family, domain, current_metric().name)
    if settings is not None:
        frame = frame[frame["setting"].isin(list(settings))]
    if sizes is not None:
        frame = frame[frame["size"].isin(list(sizes))]
    return frame


@st.cache_resource(show_spinner="Fitting…", max_entries=64)
def _fits(path: str, stamp: float, family: str, domain: str, settings: tuple, sizes: tuple, n_boot: int,
          metric: str = "ce") -> dict:
    from mergelab.ui.curves import fit_groups

    return fit_groups(merges(family, domain, settings, sizes), n_boot)


def fits(family: str, domain: str, settings, sizes, n_boot: int = 0) -> dict:
    """{(size, setting): CurveFit or FitFailure}, cached per selection and cache version."""
    path = results_store().path
    return _fits(str(path), _stamp(path), family, domain, tuple(settings), tuple(sizes), n_boot, current_metric().name)


def load_results() -> pd.DataFrame:
    """All current cached rows (read-only, briefly, retried while a worker writes); stops the page with a
    message when the cache cannot be read. On the first run the default cache is created with the
    shipped demo results; a cache named by MERGELAB_DB, or the default one deleted after that, that
    does not exist is reported, not created (mergelab.demo.up.seed_first_cache). Starts the page's
    live refresh (`live_refresh`), so a page opened on an empty or unchanging cache still updates."""
    from mergelab.demo.up import missing_cache_note, seed_first_cache

    store = results_store()
    try:
        if not store.exists() and not seed_first_cache(store) and missing_cache_note(store):
            st.warning(missing_cache_note(store))
        stamp = _stamp(store.path)
        rows = _read(str(store.path), stamp)
    except MergelabError as exc:
        st.error(f"Cannot read the results cache: {exc}")
        st.info("Check the path (MERGELAB_DB) and that no other program holds the file, then reload.")
        st.stop()
    live_refresh(stamp)
    return rows


def duration_text(seconds: float | None) -> str:
    """A duration as a person reads it: '4 s' under 90 s (a tiny sweep is never 'about 0.0 min'),
    '12.5 min' under two hours, '3.2 h' beyond; '—' when unknown (None)."""
    if seconds is None:
        return "—"
    if seconds < 90:
        return f"{max(seconds, 0):.0f} s" if seconds >= 1 or seconds <= 0 else "under 1 s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


LIVE_EVERY = 5.0  # seconds between checks for new rows: a stat of the cache file and its WAL


def running_jobs() -> list:
    """The sweep jobs queued or running now ([] when there is no queue file yet or it cannot be read:
    a poll never creates the queue)."""
    from mergelab.sweep.jobs import ACTIVE, JobQueue

    queue = JobQueue()
    if not queue.path.exists():
        return []
    try:
        return [j for j in queue.list(limit=10) if j.status in ACTIVE]
    except MergelabError:
        return []


def live_refresh(seen: float, every: float = LIVE_EVERY) -> None:
    """Rerun the page when the cache changes after it was read at stamp `seen` (`_stamp`), checked every
    `every` seconds whatever the jobs' state: a tab opened before a sweep, or left open across a cancel
    and resume, shows new merges, methods and sizes as they land. Says so while a job is queued or running."""
    path = results_store().path

    @st.fragment(run_every=every)
    def watch():
        if _stamp(path) != seen:
            st.rerun()  # the whole page: pickers and charts read the new rows
        jobs = running_jobs()
        if jobs:
            st.caption(f"{len(jobs)} sweep job(s) queued or running: new merges appear here as they land "
                       f"(checked every {every:g} s).")

    watch()


def empty_state(what: str = "results") -> None:
    """Stop the page with how to get `what`; when every cached row is stale, say that instead (how many,
    of which families, and why), since the cache is not empty."""
    stale = stale_rows()
    if not stale.empty and what == "results":
        st.warning(f"All {stale['rows'].sum():,} cached rows are stale and shown nowhere: their checkpoints or eval "
                   "sets changed since they were computed. Sweep again (`mergelab sweep` or the **Sweep** page) to "
                   "recompute them.")
        st.dataframe(stale, hide_index=True)
        st.stop()
    st.info(f"No {what} yet. Launch a sweep on the **Sweep** page, or run `mergelab demo up` / "
            "`mergelab sweep --family FAMILY.toml` in a terminal.")
    st.stop()


def _remembered(key: str, decode):
    """The value a widget keyed `key` should show, before it is drawn: the URL's when the URL changed
    outside the page (a shared link, Back or Forward: the frontend reruns the page with the old query
    string), else the widget's own state (the user just changed it), else the value remembered from
    another page. None when there is none (or the URL's cannot be decoded)."""
    raw = st.query_params.get(key)
    if raw is not None and raw != st.session_state.get(f"url:{key}"):
        try:
            return decode(raw)
        except (KeyError, TypeError, ValueError):
            return None
    if f"w:{key}" in st.session_state:
        return st.session_state[f"w:{key}"]
    return st.session_state.get(f"sel:{key}")


def _remember(key: str, value, encode) -> None:
    """Keep `value` for the other pages and mirror it in the URL (a history entry, so Back undoes it)."""
    st.session_state[f"sel:{key}"] = value
    if value is None:
        return
    text = encode(value)
    st.session_state[f"url:{key}"] = text
    if st.query_params.get(key) != text:
        st.query_params[key] = text


def _split(raw: str) -> list[str]:
    return [v for v in raw.split(LIST_SEPARATOR) if v]


def choose(label: str, options: list, key: str, *, multi: bool = False, default=None, sidebar: bool = True,
           help: str | None = None, format_func=str):
    """A select box (or multiselect) whose choice persists across pages and is mirrored in the URL.

    A remembered choice that the options no longer hold (another family, a size not in this cache) falls
    back to `default`; so does one that was the previous default (the user kept the default), so that a
    new family's sizes, or sizes and methods that land while the page is open, are shown."""
    options = list(options)
    if multi:
        default = [v for v in (options[:1] if default is None else default) if v in options] or options[:1]
    else:
        default = default if default in options else (options[0] if options else None)
    remembered = _remembered(key, _split if multi else str)
    previous_default = st.session_state.get(f"def:{key}")
    if multi:
        remembered = list(remembered) if isinstance(remembered, (list, tuple)) else None
        value = [v for v in remembered if v in options] if remembered is not None else []
        # nothing left of a remembered choice, or the old default: the default. An emptied picker stays empty.
        if remembered is None or (remembered and not value) or (
                remembered and previous_default is not None and set(remembered) == set(previous_default)):
            value = default
    else:
        value = remembered
        if value not in options or (previous_default is not None and value == previous_default):
            value = default
    st.session_state[f"def:{key}"] = default
    st.session_state[f"w:{key}"] = value  # set before the widget is drawn: the widget's own state is never stale
    place = st.sidebar if sidebar else st
    if multi:
        chosen = place.multiselect(label, options, key=f"w:{key}", help=help, format_func=format_func)
    else:
        chosen = place.selectbox(label, options, key=f"w:{key}", help=help, format_func=format_func)
    _remember(key, chosen, (lambda v: LIST_SEPARATOR.join(map(str, v))) if multi else str)
    return chosen


def setting(widget, label: str, key: str, default, *, options=None, place=None, **kwargs):
    """A display setting (checkbox, toggle, radio, select_slider: `widget` is the st function) remembered
    across pages and mirrored in the URL like `choose`, so a shared link and Back/Forward restore it.
    `options` for radio and select_slider (the value must be one of them); `place` defaults to the sidebar."""
    place = place or st.sidebar
    if options is not None:
        options = list(options)
        decode = {str(o): o for o in options}.__getitem__
        value = _remembered(key, decode)
        value = value if value in options else default
        st.session_state[f"w:{key}"] = value
        chosen = getattr(place, widget)(label, options, key=f"w:{key}", **kwargs)
    else:  # a boolean
        value = _remembered(key, lambda raw: {"1": True, "0": False}[raw])
        st.session_state[f"w:{key}"] = bool(default if value is None else value)
        chosen = getattr(place, widget)(label, key=f"w:{key}", **kwargs)
    _remember(key, chosen, (lambda v: "1" if v else "0") if options is None else str)
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
    """The family picked in the sidebar and its rows of one metric (picked in the sidebar when the family has
    several, e.g. CE and imported accuracy), with their `setting` (method + hyperparameters)."""
    from mergelab import metrics
    from mergelab.analysis.tables import with_settings

    families = sorted(results["family"].unique())
    default = "demo-standard" if "demo-standard" in families else families[0]
    family = choose("Family", families, "family", default=default)
    rows = results[results["family"] == family]
    names = metrics.names(rows)
    name = choose("Metric", names, "metric", default=names[0]) if len(names) > 1 else names[0]
    rows = metrics.select(rows, name)
    st.session_state[METRIC_KEY] = metrics.of_rows(rows)
    return family, with_settings(rows)


def sizes_in_order(rows: pd.DataFrame) -> list[str]:
    return list(rows.drop_duplicates("size").sort_values("n_params")["size"])


def merge_settings(rows: pd.DataFrame) -> list[str]:
    """The merge method settings in `rows` (reference rows base/expert left out), sorted."""
    return sorted(rows.loc[~rows["method"].isin(REFERENCE_METHODS), "setting"].unique())


def size_label(rows: pd.DataFrame):
    params = rows.groupby("size")["n_params"].first()
    return lambda s: f"{s} ({params_label(params[s])} params)" if s in params else str(s)


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


def _use_app_navigation() -> None:
    """Make app.py's st.navigation (which names the first page "Overview") the one in use. With a pages/
    folder beside app.py, Streamlit runs a server's first session that opens a page URL directly (a
    bookmark, a reload after a restart) with navigation made from the folder, first entry "app", and
    never runs app.py; st.navigation turns that off for the process, so turn it off here and rerun
    once. (Streamlit's PagesManager.uses_pages_directory; nothing happens where it does not exist.)"""
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:
        return
    if getattr(PagesManager, "uses_pages_directory", None):
        PagesManager.uses_pages_directory = False
        st.rerun()


def page_header(title: str, caption: str) -> None:
    _use_app_navigation()
    st.set_page_config(page_title=f"mergelab · {title}", layout="wide")
    st.title(title)
    st.caption(caption)


def db_caption() -> str:
    return f"cache: {results_store().path} · MERGELAB_DB={os.environ.get('MERGELAB_DB', '(default)')}"
