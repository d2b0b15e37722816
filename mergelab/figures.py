"""Figures for papers and notebooks, with no Streamlit: the dashboard's plotly figures built from a results
frame (`curves`, `sizes`, `variance`, `synergy`, or `figure(name, …)`), restyled for print (`for_paper`:
one column 3.5 in or two columns 7 in wide, 8 pt text) and written as PNG, PDF or SVG (`write`, `to_bytes`)
through plotly's kaleido and a Chrome or Chromium browser (Debian's /usr/bin/chromium is found on PATH;
BROWSER_PATH names another). PDFs embed their fonts; PNGs are 300 dpi unless told otherwise.

The low-level builders the pages use (`curve_figure`, `variance_figure`, …, defined in
mergelab.ui.figures) are re-exported here. plotly is imported only when a figure is built.

    from mergelab.store import ResultStore
    from mergelab import figures
    fig = figures.curves(ResultStore().results(), family="demo-standard", method="ties")
    figures.write(fig, "curves.pdf", columns=1)
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from mergelab.errors import MergelabError
from mergelab.names import MACRO, PARAMS_PER_BILLION, REFERENCE_METHODS
from mergelab.ui.figures import (bar_figure, curve_figure, fractional_return_figure, residual_figure,  # noqa: F401
                                 size_figure, synergy_heatmap, variance_figure)

FIGURES = ("curves", "sizes", "variance", "synergy")
FORMATS = ("png", "pdf", "svg")
WIDTH_IN = {1: 3.5, 2: 7.0}    # one and two columns of a two-column paper
HEIGHT_IN = {1: 2.8, 2: 3.2}
CSS_PX_PER_IN = 96             # plotly lays out in CSS pixels; Chromium prints 96 of them per inch
FONT_PT = 8
DEFAULT_DPI = 300
MAX_DPI = 1200
FONT_FAMILY = "Arial, Liberation Sans, DejaVu Sans, sans-serif"
KALEIDO_PIN = "kaleido==1.5.0"


# -- which rows ------------------------------------------------------------------------------------------

def _family_rows(results: pd.DataFrame, family: str | None) -> tuple[str, pd.DataFrame]:
    """The family to draw and its rows of one metric (CE when it has CE rows, else its first; mergelab.metrics),
    oriented (negated when higher is better, drawn back by `_metric_view`), with their `setting`."""
    from mergelab import metrics
    from mergelab.analysis.tables import with_settings

    if results.empty:
        raise MergelabError("no cached results to draw (run `mergelab sweep` first)")
    families = sorted(results["family"].unique())
    if family is None:
        if len(families) > 1:
            raise MergelabError(f"several families are cached ({', '.join(families)}): name one (--family)")
        family = families[0]
    if family not in families:
        raise MergelabError(f"--family {family!r}: no cached results (cached: {', '.join(families)})")
    return family, with_settings(metrics.oriented(metrics.select(results[results["family"] == family])))


def _metric_view(merges: pd.DataFrame, fits: dict | None = None) -> dict:
    """curve_figure's `normalise` and `y_title` for the metric of `merges`: drawn in its own sign and words."""
    from mergelab import metrics
    from mergelab.ui.curves import axis_title, normalisers

    metric = metrics.of_rows(merges) if "metric" in merges else metrics.CE
    return {"normalise": normalisers(merges, fits or {}, None, metric.sign), "y_title": axis_title(None, metric)}


def _settings(rows: pd.DataFrame, method: str | None, *, all_by_default: bool) -> list[str]:
    """The method settings to draw: every setting of `method`, else every setting (`all_by_default`) or the first."""
    merges = rows[~rows["method"].isin(REFERENCE_METHODS)]
    if method is not None:
        merges = merges[merges["method"] == method]
        if merges.empty:
            cached = sorted(rows.loc[~rows["method"].isin(REFERENCE_METHODS), "method"].unique())
            raise MergelabError(f"--method {method!r}: no cached merges (cached: {', '.join(cached) or 'none'})")
    settings = sorted(merges["setting"].unique())
    if not settings:
        raise MergelabError("no merges to draw: only reference rows (base, single experts) are cached")
    return settings if all_by_default or method is not None else settings[:1]


def _sizes(rows: pd.DataFrame, size: str | None) -> list[str]:
    ordered = list(rows.drop_duplicates("size").sort_values("n_params")["size"])
    if size is None:
        return ordered
    if size not in ordered:
        raise MergelabError(f"--size {size!r}: no cached results (cached: {', '.join(ordered)})")
    return [size]


def _merges(rows: pd.DataFrame, domain: str, settings, sizes) -> pd.DataFrame:
    from mergelab.analysis.tables import merge_losses

    if domain != MACRO and domain not in set(rows["domain"]):
        raise MergelabError(f"--domain {domain!r}: not a domain of the results (expected {MACRO} or one of "
                            f"{', '.join(sorted(rows['domain'].unique()))})")
    merges = merge_losses(rows, domain)
    merges = merges[merges["setting"].isin(settings) & merges["size"].isin(sizes)]
    if merges.empty:
        raise MergelabError(f"no merges of {', '.join(settings)} at {', '.join(sizes)} on {domain} "
                            "(a macro row needs the merge evaluated on every domain)")
    return merges


# -- figures ---------------------------------------------------------------------------------------------

def curves(results: pd.DataFrame, *, family: str | None = None, method: str | None = None, size: str | None = None,
           domain: str = MACRO, n_boot: int = 0, seed: int = 0, log_x: bool = False):
    """CE (nats/token) vs experts merged k on `domain` (default the cross-domain macro mean): per-k means
    with their 95% expert-bootstrap intervals and bands (n_boot draws; 0 for none), the fitted
    L∞ + A/(k+b) and its floor, per size and method setting. `results`: ResultStore.results() rows;
    `method` (every setting of it; default the first method setting), `size` (default every size).
    Raises MergelabError for a family, method, size or domain with no merges."""
    from mergelab.ui.curves import bands, fit_groups

    family, rows = _family_rows(results, family)
    sizes_all = _sizes(rows, None)
    merges = _merges(rows, domain, _settings(rows, method, all_by_default=False), _sizes(rows, size))
    fits = fit_groups(merges, n_boot, seed)
    return curve_figure(merges, fits, sizes_in_order=sizes_all, title=f"{family} · {domain}", log_x=log_x,
                        bands=bands(fits, merges) if n_boot else None, show_points=False, **_metric_view(rows))


def sizes(results: pd.DataFrame, *, family: str | None = None, method: str | None = None, size: str | None = None,
          domain: str = MACRO, k: int | None = None, n_boot: int = 0, seed: int = 0):
    """Mean CE (nats/token) vs parameter count N at one k (default the largest k measured at every size)
    per method setting (every setting, or those of `method`), with the joint law L(N, k) and its floor
    when one setting is drawn and the data identify it. `size` is not used (every size is drawn)."""
    from mergelab.analysis.fit import FitError
    from mergelab.analysis.tables import fit_joint_merges
    from mergelab.ui.curves import size_points

    family, rows = _family_rows(results, family)
    settings = _settings(rows, method, all_by_default=True)
    merges = _merges(rows, domain, settings, _sizes(rows, None))
    common = merges.groupby("size")["k"].max().min()
    k = int(common if k is None else k)
    points = size_points(merges, k)
    if points.empty:
        raise MergelabError(f"k = {k}: no merges of that many experts (measured k: "
                            f"{', '.join(map(str, sorted(merges['k'].unique())))})")
    from mergelab import metrics

    metric = metrics.of_rows(rows) if "metric" in rows else metrics.CE
    points["loss"] = points["loss"] * metric.sign  # oriented means, drawn in the metric's own sign
    joint = None
    if len(settings) == 1 and points["N"].nunique() >= 2 and not metric.higher_better:  # a law of falling losses
        try:
            fit = fit_joint_merges(merges)
            joint = fit if fit.identified else None
        except FitError:
            joint = None
    fig = size_figure(points, joint, k=k, title=f"{family} · {domain} · k = {k}", y_title=metric.axis)
    if "billion" in str(fig.layout.xaxis.title.text or ""):  # the laws take N in billions; a reader wants counts
        for trace in fig.data:
            trace.x = [x * PARAMS_PER_BILLION for x in trace.x]
        fig.update_xaxes(title_text="parameters N", tickformat="~s", dtick="D2")
    return fig


def variance(results: pd.DataFrame, *, family: str | None = None, method: str | None = None, size: str | None = None,
             domain: str = MACRO, n_boot: int = 0, seed: int = 0):
    """Across-subset variance of CE (nats²) vs k with its plain and finite-pool 1/(k+b) laws, per size
    and method setting (as `curves`)."""
    from mergelab.ui.curves import variance_tables

    family, rows = _family_rows(results, family)
    merges = _merges(rows, domain, _settings(rows, method, all_by_default=False), _sizes(rows, size))
    variances, fits = variance_tables(merges, rows)
    fits = {key: value for key, value in fits.items() if "reason" not in value}
    return variance_figure(variances, fits, sizes_in_order=_sizes(rows, None), title=f"{family} · {domain}")


def synergy(results: pd.DataFrame, *, family: str | None = None, method: str | None = None, size: str | None = None,
            domain: str = MACRO, n_boot: int = 0, seed: int = 0):
    """Donor × receiver synergy (CE drop in nats when the donor joins) for one method setting (the first
    of `method`, default the first setting) at one size (default the largest); with n_boot > 0 a value
    whose 95% interval holds 0 is shown in parentheses. `domain` is not used (every domain is a receiver)."""
    from mergelab.analysis.synergy import synergy_intervals, synergy_matrix

    family, rows = _family_rows(results, family)
    setting = _settings(rows, method, all_by_default=False)[0]
    chosen_size = _sizes(rows, size)[-1]
    chosen = rows[(rows["setting"] == setting) & (rows["size"] == chosen_size)]
    matrix = synergy_matrix(chosen)
    if matrix.empty or matrix.isna().all().all():
        raise MergelabError(f"no synergy for {setting} at {chosen_size}: it needs merges that differ by one expert")
    lo, hi = synergy_intervals(chosen, n_boot=n_boot, seed=seed) if n_boot else (None, None)
    return synergy_heatmap(matrix, title=f"{family} · {setting} · {chosen_size}: CE drop when the donor joins (nats)",
                           lo=lo, hi=hi)


BUILDERS = {"curves": curves, "sizes": sizes, "variance": variance, "synergy": synergy}


def figure(name: str, results: pd.DataFrame, **options):
    """The figure `name` (one of FIGURES) from `results`; `options` as for that builder (family, method,
    size, domain, n_boot, seed). Raises MergelabError for an unknown name or a selection with no merges."""
    if name not in BUILDERS:
        raise MergelabError(f"--figure {name!r}: expected one of {', '.join(FIGURES)}")
    return BUILDERS[name](results, **options)


# -- print -----------------------------------------------------------------------------------------------

def size_px(columns: int = 1) -> tuple[int, int]:
    """(width, height) in CSS pixels of a figure `columns` (1 or 2) columns wide."""
    if columns not in WIDTH_IN:
        raise MergelabError(f"--columns {columns}: expected 1 (3.5 in wide) or 2 (7 in wide)")
    return round(WIDTH_IN[columns] * CSS_PX_PER_IN), round(HEIGHT_IN[columns] * CSS_PX_PER_IN)


def for_paper(fig, columns: int = 1):
    """A copy of `fig` laid out for print `columns` columns wide: 8 pt text, no title (the caption says
    it), white background, the legend below the axes, tight margins."""
    import plotly.graph_objects as go

    width, height = size_px(columns)
    font_px = FONT_PT * CSS_PX_PER_IN / 72
    out = go.Figure(fig)
    out.update_layout(title=None, width=width, height=height, template="plotly_white",
                      font=dict(family=FONT_FAMILY, size=font_px, color="#000"),
                      margin=dict(l=round(5.2 * font_px), r=8, t=10, b=round(4 * font_px)),
                      legend=dict(font=dict(size=font_px * 0.9), orientation="h", yanchor="top", y=-0.28, x=0,
                                  bgcolor="rgba(0,0,0,0)"))
    axes = dict(title_font=dict(size=font_px), tickfont=dict(size=font_px), showline=True, linecolor="#000",
                ticks="outside", title_standoff=4, exponentformat="power")  # 4×10⁻⁵, not the SI '40µ'
    out.update_xaxes(**axes)
    out.update_yaxes(**axes)
    for trace in out.data:
        if trace.type == "heatmap" and trace.z is not None and len(trace.z):
            cell_px = (width - 9 * font_px) / max(len(trace.z[0]), 1)
            if cell_px < 5 * 0.6 * font_px:  # values would overprint each other: the colour scale says them
                trace.texttemplate = None
                trace.text = None
            else:
                trace.textfont = dict(size=font_px * 0.85)
    legend_rows = _legend_rows(out, width, font_px)
    if legend_rows:  # room below the axes for the legend
        out.update_layout(height=height + round(legend_rows * 1.4 * font_px),
                          margin=dict(b=round(4 * font_px + legend_rows * 1.4 * font_px)),
                          legend=dict(y=-round(3.2 * font_px) / (height - 10 - 4 * font_px)))
    return out


def _legend_rows(fig, width: float, font_px: float) -> int:
    names = [t.name for t in fig.data if t.showlegend is not False and t.name and t.type != "heatmap"]
    if not names:
        return 0
    per_row = max(1, int(width // (max(len(n) for n in names) * 0.55 * font_px + 40)))
    return -(-len(names) // per_row)


def check_renderer() -> None:
    """Refuse early, before any fitting, when figures cannot be written: kaleido missing, or no Chrome
    or Chromium found (on PATH, or at BROWSER_PATH). Raises MergelabError saying what to install."""
    try:
        import kaleido  # noqa: F401
        from choreographer.browsers.chromium import Chromium
    except ImportError as exc:
        raise MergelabError(f"figure export needs kaleido ({exc}): pip install {KALEIDO_PIN} "
                            "(it is in requirements.txt)") from exc
    try:
        path = Chromium.find_browser(skip_local=False)
    except (AttributeError, TypeError, RuntimeError, ValueError):  # a newer choreographer: let kaleido say
        return
    if not path or not os.access(path, os.X_OK):
        where = f" (BROWSER_PATH={os.environ['BROWSER_PATH']} is not an executable)" if os.environ.get("BROWSER_PATH") else ""
        raise MergelabError(f"figure export needs Chrome or Chromium, none found{where}: install it "
                            "(Debian: apt-get install chromium) or set BROWSER_PATH to its binary")


def to_bytes(fig, fmt: str, *, columns: int = 1, dpi: int = DEFAULT_DPI) -> bytes:
    """`fig` laid out by `for_paper` and rendered as `fmt` (png, pdf or svg). A PNG is WIDTH_IN[columns]
    inches wide at `dpi` (3.5 in at 300 dpi: 1050 pixels); PDF and SVG are vector, the PDF with its fonts
    embedded. Raises MergelabError when kaleido or the browser is missing or fails."""
    if fmt not in FORMATS:
        raise MergelabError(f"--format {fmt!r}: a figure is written as {', '.join(FORMATS)}")
    if not (isinstance(dpi, int) and 0 < dpi <= MAX_DPI):
        raise MergelabError(f"--dpi {dpi}: expected 1 to {MAX_DPI} dots per inch (300 for print)")
    check_renderer()
    paper = for_paper(fig, columns)
    scale = dpi / CSS_PX_PER_IN if fmt == "png" else 1
    try:
        return paper.to_image(format=fmt, width=paper.layout.width, height=paper.layout.height, scale=scale)
    except (RuntimeError, ValueError, OSError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise MergelabError(f"cannot render the figure as {fmt} ({detail}); check that Chrome/Chromium runs "
                            f"(BROWSER_PATH) and {KALEIDO_PIN} is installed") from exc


def write(fig, path: str | Path, *, fmt: str | None = None, columns: int = 1, dpi: int = DEFAULT_DPI) -> Path:
    """Write `fig` for print to `path` (format from `fmt` or the file's suffix: .png, .pdf, .svg; see
    `to_bytes`), atomically (mergelab.export.write_file). Returns the path. Raises MergelabError."""
    from mergelab.export import write_file

    path = Path(path)
    fmt = fmt or path.suffix.lstrip(".").lower()
    write_file(path, to_bytes(fig, fmt, columns=columns, dpi=dpi))
    return path
