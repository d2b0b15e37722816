"""Export: fitted parameters, raw results, synergy and plans as files, each with provenance; charts as HTML."""

import re

import streamlit as st

from mergelab.analysis import tables as analysis
from mergelab.ui import dashboard as ui
from mergelab import export
from mergelab.export import render
from mergelab.paper import PAPER_DRAWS
from mergelab.ui.downloads import figure_download
from mergelab.ui.curves import axis_title, normalisers
from mergelab.ui.figures import curve_figure
from mergelab.names import MACRO, REFERENCE_METHODS

ui.page_header("Export", "Downloads carry their provenance (code version, families, methods and hyperparameters, "
               "sizes, k range, number of merges, eval-set hashes, options) and units (each row's metric and its unit, "
               "named below; sizes as parameter counts). LaTeX is the compact table for a paper; CSV, JSON and Parquet hold every column.")
family, rows, methods_all, _ = ui.family_with_merges()
chosen = ui.choose("Method settings to export", methods_all, "export", multi=True, default=methods_all,
                   help="every table and the chart below hold these settings only (with the base and single-expert "
                        "rows they are measured against)")
if not chosen:
    st.warning("Pick at least one method setting in the sidebar.")
    st.stop()
rows = rows[rows["method"].isin(REFERENCE_METHODS) | rows["setting"].isin(chosen)]
n_boot = ui.setting("select_slider", "Expert-bootstrap draws for CIs", "boot_export", PAPER_DRAWS, options=[0, 100, 200, 500],
                    help="intervals resample experts (README, \"Intervals\"); 0 = no intervals. "
                         "Tables with intervals are computed when you click a download.")
st.caption(f"{family} · {len(chosen)} of {len(methods_all)} method settings: {', '.join(chosen)} · metric: "
           f"{ui.current_metric().described}")
MIME = {"csv": "text/csv", "json": "application/json", "latex": "text/x-tex", "parquet": "application/octet-stream"}
EXT = {"csv": "csv", "json": "json", "latex": "tex", "parquet": "parquet"}
BOOTSTRAPPED = ("paper", "fits", "plan", "synergy")  # the tables whose intervals cost a refit per draw


@st.cache_data(show_spinner="Preparing…", max_entries=16)
def table(what, frame, n_boot):
    return export.table(what, frame, n_boot=n_boot)


for what, label, formats in [("paper", "Paper table (macro: L∞, A with intervals, b, R², held-out error)",
                              ("latex", "csv")),
                             ("fits", "Fitted parameters per curve", ("csv", "json", "latex")),
                             ("joint", "Joint law over sizes", ("csv", "json", "latex")),
                             ("plan", "Plan (k80, k90, k_ε, stop rule)", ("csv", "json", "latex")),
                             ("synergy", "Synergy matrices (long form)", ("csv", "json", "parquet")),
                             ("results", "Raw results", ("csv", "parquet"))]:
    st.subheader(label)
    frame = table(what, rows, 0)  # the row count and warnings; downloads with intervals are computed on click
    provenance = analysis.provenance(rows, what=what, bootstrap=n_boot, weights="k")
    cols = st.columns(len(formats) + 1)
    cols[0].caption(f"{len(frame):,} rows")
    if what == "joint" and analysis.joint_warning(frame):
        st.warning(analysis.joint_warning(frame))
    if what == "fits":
        st.caption("ci_* columns (with bootstrap draws) are 95% expert-bootstrap intervals: report those. se_* are "
                   "Jacobian standard errors that treat the per-k means as independent and understate the "
                   "uncertainty; they are blank where the estimate or its interval reaches a bound.")
    for col, fmt in zip(cols[1:], formats):
        shown = "paper" if what == "fits" and fmt == "latex" else what  # LaTeX fits: the compact paper table
        prov = provenance if shown == what else analysis.provenance(rows, what=shown, bootstrap=n_boot, weights="k")
        ready = shown == what and not (n_boot and what in BOOTSTRAPPED)
        data = (render(frame, fmt, prov, shown) if ready else
                lambda shown=shown, fmt=fmt, prov=prov: render(export.table(shown, rows, n_boot=n_boot), fmt, prov, shown))
        col.download_button(f"{fmt.upper()}", data, file_name=f"{family}_{what}.{EXT[fmt]}", mime=MIME[fmt],
                            key=f"dl-{what}-{fmt}", on_click="ignore")

st.subheader("Chart")
method = ui.choose("Method in the chart", chosen, "method", sidebar=False)
sizes = ui.sizes_in_order(rows)
chart_merges, chart_fits = ui.merges(family, MACRO, [method], sizes), ui.fits(family, MACRO, [method], sizes)
metric = ui.current_metric()  # oriented values: drawn back in the metric's own sign, its name on the axis
fig = curve_figure(chart_merges, chart_fits, sizes_in_order=sizes, title=f"{family} · {method} · {MACRO}",
                   normalise=normalisers(chart_merges, chart_fits, None, metric.sign), y_title=axis_title(None, metric))
stem = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{family}_{method}")  # a setting label holds spaces and '='
st.plotly_chart(fig, width="stretch", key="export-chart",
                config={"toImageButtonOptions": {"format": "svg", "filename": stem}})
st.download_button("HTML (interactive)", fig.to_html(include_plotlyjs=True), file_name=f"{stem}.html",
                   mime="text/html", key="dl-chart-html")
figure_download(fig, f"{stem}_macro_curves", "dl-chart")
st.caption("The camera icon above saves the chart as SVG as drawn here; \"Download for a paper\" lays it out for "
           "print. The HTML file opens in any browser. `mergelab export --what figure` writes the same figures.")
