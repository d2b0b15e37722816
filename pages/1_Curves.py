"""Curves: CE vs k per domain or macro, with the fitted floor and 1/k tail, bands, residuals,
variance across subsets and CE vs model size."""

import numpy as np
import streamlit as st

from mergelab.ui import dashboard as ui
from mergelab.analysis import reference
from mergelab.ui.curves import (axis_title, bands, fit_summary, normalise_curve, normalisers, scale_options,
                                size_points, variance_tables)
from mergelab.ui.downloads import figure_download
from mergelab.ui.figures import curve_figure, residual_figure, size_figure, variance_figure
from mergelab.analysis.fit import FitError
from mergelab.analysis.tables import fit_joint_merges
from mergelab.names import MACRO

ui.page_header("Curves", "Cross-entropy (or the family's other metric, picked in the sidebar) of merged models vs the "
               "number of experts k. Faint dots: single subsets; "
               "markers: mean over subsets with its 95% interval; solid: fitted L∞ + A/(k+b); dashed: the floor L∞ (for a "
               "higher-is-better metric, C − A/(k+b) and the ceiling C). "
               "Intervals and bands resample experts, not subsets (README, \"Intervals\").")
family, rows, methods_all, sizes_all = ui.family_with_merges()
metric = ui.current_metric()  # the values are oriented (negated when higher is better), drawn back in its sign
methods = ui.choose("Methods", methods_all, "methods", multi=True, default=methods_all[:1])
sizes = ui.choose("Sizes", sizes_all, "sizes", multi=True, default=sizes_all, format_func=ui.size_label(rows))
domain = ui.choose("Domain", [MACRO, *sorted(rows["domain"].unique())], "domain", default=MACRO,
                   help="macro = mean over the family's domains")
with st.sidebar.expander("Display", expanded=True) as display:
    # every display setting is kept in the URL with the selections: a shared link and Back/Forward restore it
    n_boot = ui.setting("select_slider", "Bootstrap draws (band, CIs)", "boot", 200, options=[0, 100, 200, 500, 1000],
                        place=display, help="expert bootstrap: each draw is a new pool of experts resampled from yours, "
                                            "with their estimated effects, evaluated on the subsets you merged; 0 = no intervals")
    scales = scale_options(metric)  # the first option is the metric's name: y=accuracy in the URL, not y=cross-entropy
    scale_label = ui.setting("radio", "y axis", "y", next(iter(scales)), options=list(scales), place=display,
                             help="L(k) − L(1) or L(k)/L(1) put curves of different scales side by side (the demo's "
                                  "tiny models and the paper's law); L(1) is each curve's own mean at k = 1")
    how = scales[scale_label]
    log_x = ui.setting("checkbox", "log k axis", "logx", False, place=display)
    log_y = ui.setting("checkbox", "log y axis", "logy", False, place=display, disabled=how == "difference",
                       help="not for L(k) − L(1), which is negative")
    show_points = ui.setting("checkbox", "show every subset", "points", True, place=display)
    overlay = ui.setting("checkbox", "overlay the paper's published law", "paper", False, place=display,
                         help="arXiv 2509.24244, Tables 3–5 (Qwen2.5, N in billions); its scale is a real model's: "
                              "use L(k) − L(1) or L(k)/L(1) to compare shapes")
    paper_N = ui.setting("select_slider", "paper model size N (billions)", "paperN", 0.5,
                         options=[0.5, 1.5, 3, 7, 14, 32, 72], place=display, disabled=not overlay)

if not methods or not sizes:
    st.warning("Pick at least one method and one size in the sidebar.")
    st.stop()
merges = ui.merges(family, domain, methods, sizes)
if merges.empty:
    st.warning("No merges for this selection.")
    st.stop()
fits = ui.fits(family, domain, methods, sizes, n_boot)
overlays = {}
if overlay and metric.name == "ce":  # the paper's laws are CE laws
    ks = np.arange(1, int(merges["k"].max()) + 1)
    for method in sorted(merges["method"].unique()):
        if method in reference.methods():
            overlays[f"paper {method}, N={paper_N}B"] = (
                ks, normalise_curve(ks, reference.law_loss(method, domain, paper_N, ks), how))
fig = curve_figure(merges, fits, sizes_in_order=sizes_all, title=f"{family} · {domain}", log_x=log_x,
                   log_y=log_y and how != "difference", bands=bands(fits, merges) if n_boot else None, overlays=overlays,
                   show_points=show_points, normalise=normalisers(merges, fits, how, metric.sign),
                   y_title=axis_title(how, metric))
st.plotly_chart(fig, width="stretch", key="curve")
figure_download(fig, f"{family}_{domain}_curves", "dl-curve")
st.dataframe(fit_summary(fits, metric), hide_index=True, width="stretch")
if overlay and metric.name != "ce":  # ticked, nothing drawn: say why rather than leave the box doing nothing
    st.caption(f"The paper's overlay is not drawn: its published laws (arXiv 2509.24244) are cross-entropy laws in "
               f"nats/token, not laws of {metric.label or metric.name}; they are drawn over CE curves (what sweeps "
               "measure; a family with both picks its metric in the sidebar).")
if metric.higher_better:
    st.caption(f"{metric.label or metric.name} is higher-is-better: fitted as C − A/(k+b), the dashed line is the "
               f"ceiling C.")
if any(not f.ok for f in fits.values()):
    st.warning("Some curves could not be fitted: see the note column.")

left, right = st.columns(2)
with left:
    if st.checkbox("Residuals", value=False):
        st.plotly_chart(residual_figure(merges, fits, sizes_in_order=sizes_all, metric=metric), width="stretch", key="residuals")
    variances, var_fits = variance_tables(merges, rows)
    var_fig = variance_figure(variances, var_fits, sizes_in_order=sizes_all, metric=metric)
    st.plotly_chart(var_fig, width="stretch", key="variance")
    figure_download(var_fig, f"{family}_{domain}_variance", "dl-variance")
    st.caption("Dotted: the plain law V∞ + C/(k+b); solid: the finite-pool law, that times (M−k)/(M−1), 0 at k = M.")
    unfitted = [f"{s} · {m}: {f['reason']}" for (s, m), f in var_fits.items() if "reason" in f]
    if unfitted:
        st.caption("Variance laws not fitted: " + "; ".join(unfitted))
with right:
    k_max = int(merges["k"].max())  # 1 while a sweep has only merged single experts so far
    k_fixed = (ui.setting("select_slider", "k for the size panel", "ksize", k_max, options=list(range(1, k_max + 1)),
                          place=st) if k_max > 1 else k_max)
    points = size_points(ui.merges(family, domain, methods, sizes_all), k_fixed)
    points["loss"] = points["loss"] * metric.sign
    joint = None
    if points["N"].nunique() >= 2 and len(methods) == 1 and not metric.higher_better:
        try:
            joint = fit_joint_merges(ui.merges(family, domain, methods, sizes_all))
        except FitError as exc:
            st.caption(f"joint fit: {exc}")
    drawn = joint if joint is not None and joint.identified else None
    size_fig = size_figure(points, drawn, k=k_fixed, y_title=metric.axis)
    st.plotly_chart(size_fig, width="stretch", key="sizes")
    figure_download(size_fig, f"{family}_{domain}_sizes_k{k_fixed}", "dl-sizes")
    if joint is not None:
        if drawn is None:
            st.warning("Joint law L* + B·N^−β + A0·N^−γ/(k+b) not drawn: the data do not identify it. "
                       + "; ".join(joint.reasons()))
        st.caption(joint.describe() + ("" if not joint.notes else " · " + "; ".join(joint.notes)))
