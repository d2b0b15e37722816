"""Overview (the dashboard's first page, run by app.py): what is cached, the cross-domain curve per method with its fit,
and where to go next."""

import streamlit as st

from mergelab.ui import dashboard as ui
from mergelab.ui.downloads import figure_download
from mergelab.ui.curves import axis_title, normalisers
from mergelab.ui.figures import curve_figure
from mergelab.names import MACRO

ui.page_header("mergelab: model-merging scaling curves",
               "A merged model's measured metric vs the number of merged experts k, per method and model size, with "
               "the fitted law: cross-entropy falls to a floor, L(k) = L∞ + A/(k+b); a higher-is-better metric (an "
               "imported accuracy) rises to a ceiling, C − A/(k+b).")
results = ui.load_results()
if results.empty:
    if not ui.stale_rows().empty:
        ui.empty_state()  # every cached row is stale: says so, with the table of what and why
    st.info("The results cache is empty. Run `mergelab demo up` or `mergelab sweep --family FAMILY.toml` to add "
            "merges, or launch a sweep on the Sweep page.")
    st.page_link("pages/2_Sweep.py", label="Launch a sweep", icon="🚀")
    st.stop()

family, rows = ui.family_rows(results)
sizes, settings = ui.sizes_in_order(rows), ui.merge_settings(rows)
merges = rows[rows["setting"].isin(settings)]
n_merges = merges[["size", "method", "hparams", "experts_key"]].drop_duplicates().shape[0]
st.caption(f"{ui.results_store().path} · {n_merges:,} merges of {family} on {rows['domain'].nunique()} domains · "
           f"sizes {', '.join(map(ui.size_label(rows), sizes))}")
c1, c2, c3, c4 = st.columns(4)
c1.metric("families cached", results["family"].nunique())
c2.metric("sizes", len(sizes))
c3.metric("method settings", len(settings), help="a method with one set of hyperparameters is one setting")
c4.metric("merges", f"{n_merges:,}")
stale = ui.stale_rows(family)
if not stale.empty:
    st.warning(f"{stale['rows'].sum():,} cached rows of {family} are stale and shown nowhere: their checkpoints or eval "
               "sets changed since they were computed. `mergelab sweep` recomputes what you sweep again.")
    st.dataframe(stale, hide_index=True)

links = st.columns(5)
for col, (page, label) in zip(links, [("pages/1_Curves.py", "Curves"), ("pages/2_Sweep.py", "Sweep"),
                                      ("pages/3_Fit_and_Plan.py", "Fit & Plan"), ("pages/4_Synergy.py", "Synergy"),
                                      ("pages/5_Export.py", "Export")]):
    col.page_link(page, label=label)


if not settings:  # only base and single-expert rows so far: a sweep has just started on this family
    st.info(f"No merges of {family} yet, only its base and single experts: the curves appear as a sweep adds merges.")
    st.stop()
size = ui.choose("Size", sizes, "size", default=sizes[-1], format_func=ui.size_label(rows))
macro = ui.merges(family, MACRO, settings, [size])
fitted = ui.fits(family, MACRO, settings, [size])
metric = ui.current_metric()  # oriented values: drawn back in the metric's own sign
overview = curve_figure(macro, fitted, sizes_in_order=sizes, title=f"{family} · {size} · cross-domain mean, every method",
                        show_points=False, normalise=normalisers(macro, fitted, None, metric.sign),
                        y_title=axis_title(None, metric))
st.plotly_chart(overview, width="stretch", key="overview")
figure_download(overview, f"{family}_{size}_macro_curves", "dl-overview")
st.caption(f"{metric.described[:1].upper()}{metric.described[1:]}. One colour and marker per method; solid lines are the "
           f"fitted {metric.law}, "
           + ("dashed lines the ceilings of curves that rise" if metric.higher_better else
              "dashed lines the floors of curves that fall")
           + " (none for a fit with a parameter on its bound: the data do not pin it down). Open Curves for single "
             "subsets, bands and domains.")
