"""Synergy: which donor experts improve the metric (lower the CE, raise an accuracy) of which receiver domains."""

import pandas as pd
import streamlit as st

from mergelab import metrics
from mergelab.ui import dashboard as ui
from mergelab.ui.downloads import figure_download
from mergelab.ui.figures import bar_figure, synergy_heatmap
from mergelab.analysis.synergy import (DEFAULT_BLOCKS, block_means, donor_strength, receiver_susceptibility, synergy_intervals,
                               synergy_matrix, top_pairs, unmeasured_donors)

ui.page_header("Synergy", "S[d, e] = mean improvement of the metric on receiver e when expert d joins a merge (CE: its "
               "drop; a higher-is-better metric such as accuracy: its gain), over every pair of merges (S, S ∪ {d}) in "
               "the cache. Blue helps, red hurts; the diagonal is the own expert. Intervals (hover, error bars) resample "
               "the co-experts (README, \"Intervals\"); a value in parentheses has an interval that holds 0.")
family, rows, methods_all, sizes_all = ui.family_with_merges()
metric = ui.current_metric()
NAME = "CE" if metric.name == "ce" else metric.label or metric.name
# what a helpful donor does to the metric, and what a harmful one does: the sign of 'better'
HELPS, HURTS = ("raises", "lowers") if metric.higher_better else ("lowers", "raises")
method, size = ui.pick_method_and_size(rows, methods_all, sizes_all)
# oriented (negated when higher is better): a positive synergy is always an improvement of the metric
chosen = metrics.oriented(rows[(rows["setting"] == method) & (rows["size"] == size)])
GAIN = "CE drop (nats)" if metric.name == "ce" else f"{metric.label or metric.name} gain ({metric.units})"


n_boot = st.sidebar.select_slider("Bootstrap draws (intervals)", [0, 100, 200, 500], value=200,
                                  help="new pools of co-experts around each donor; 0 = no intervals")


@st.cache_data(show_spinner="Computing synergy…", max_entries=16)
def matrix_for(frame, n_boot):
    lo, hi = synergy_intervals(frame, n_boot=n_boot) if n_boot else (None, None)
    return synergy_matrix(frame), lo, hi


matrix, lo, hi = matrix_for(chosen, n_boot)
if matrix.empty or matrix.isna().all().all():
    st.info("Synergy needs merges that differ by one expert (exhaustive subsets or orderings). Launch such a sweep.")
    st.stop()
heatmap = (synergy_heatmap(matrix, lo=lo, hi=hi) if metric.name == "ce" else
           synergy_heatmap(matrix, title=f"Synergy: {GAIN} on receiver when donor joins", lo=lo, hi=hi,
                           unit=metric.units))
st.plotly_chart(heatmap, width="stretch", key="heatmap")
figure_download(heatmap, f"{family}_{method}_{size}_synergy", "dl-heatmap")
has_intervals = lo is not None and bool(lo.notna().any().any())
if lo is not None and lo.attrs.get("notes"):
    st.caption(("Values marked '?' have no interval: " if has_intervals else "No intervals: ")
               + "; ".join(lo.attrs["notes"]) + ".")
blank = unmeasured_donors(matrix)
if blank:
    st.caption(f"Blank rows ({', '.join(blank)}): no two cached merges differ by that expert alone (S and S ∪ {{d}}), "
               "so its synergy is not measured. Random subsets rarely give such pairs; sweep exhaustive subsets or "
               "orderings.")
left, right = st.columns(2)
with left:
    blocks = block_means(matrix, DEFAULT_BLOCKS)
    if blocks.notna().any().any():
        st.markdown("**Block means** (donor block → receiver block, own-expert pairs excluded; — : no such pair)")
        st.dataframe(blocks.map(lambda v: f"{v:.4f}" if v == v else "—"), width="stretch")
    else:  # the blocks name the demo's domains (math, science, code)
        st.caption("Block means: none of this family's domains is in the math / science / code blocks.")
    pairs = top_pairs(matrix, n=8)
    pairs.index = pairs["donor"] + " → " + pairs["receiver"]
    bounds = {}
    if lo is not None:
        bounds = {"lo": pd.Series([lo.loc[d, r] for d, r in zip(pairs["donor"], pairs["receiver"])], pairs.index),
                  "hi": pd.Series([hi.loc[d, r] for d, r in zip(pairs["donor"], pairs["receiver"])], pairs.index)}
    n_help, n_harm = int((pairs["synergy"] > 0).sum()), int((pairs["synergy"] < 0).sum())
    pairs_fig = bar_figure(pairs["synergy"], "Strongest pairs", "donor → receiver", GAIN, **bounds)
    st.plotly_chart(pairs_fig, width="stretch", key="pairs")
    figure_download(pairs_fig, f"{family}_{method}_{size}_synergy_pairs", "dl-pairs")
    st.caption(f"{n_help} helpful pairs (blue) and {n_harm} harmful (red)" + (", with 95% intervals" if has_intervals else "")
               + ("" if n_harm else f": no donor {HURTS} any other domain's {NAME} here") + ".")
with right:
    st.plotly_chart(bar_figure(donor_strength(matrix), "Donor strength", "donor",
                               "mean CE drop on others (nats)" if metric.name == "ce" else f"mean {GAIN} on others"),
                    width="stretch", key="donors")
    st.caption(f"Donor strength: how much each expert {HELPS} the {NAME} of the other domains, on average.")
    st.plotly_chart(bar_figure(receiver_susceptibility(matrix), "Receiver susceptibility", "receiver",
                               "mean CE drop from others (nats)" if metric.name == "ce" else f"mean {GAIN} from others"),
                    width="stretch", key="receivers")
    st.caption("Receiver susceptibility: how much each domain gains from the other experts, on average.")
