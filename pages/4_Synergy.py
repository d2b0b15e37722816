"""Synergy: which donor experts lower the CE of which receiver domains."""

import streamlit as st

from mergelab import dashboard as ui
from mergelab.figures import bar_figure, synergy_heatmap
from mergelab.synergy import DEFAULT_BLOCKS, block_means, donor_strength, receiver_susceptibility, synergy_matrix, top_pairs

ui.page_header("Synergy", "S[d, e] = mean drop of the CE on receiver e when expert d joins a merge, over every pair of "
               "merges (S, S ∪ {d}) in the cache. Blue helps, red hurts; the diagonal is the own expert.")
family, rows, methods_all, sizes_all = ui.family_with_merges()
method, size = ui.pick_method_and_size(rows, methods_all, sizes_all)
chosen = rows[(rows["method"] == method) & (rows["size"] == size)]
hparams = sorted(chosen["hparams"].unique())
if len(hparams) > 1:
    chosen = chosen[chosen["hparams"] == st.sidebar.selectbox("Hyperparameters", hparams)]


@st.cache_data(show_spinner="Computing synergy…", max_entries=16)
def matrix_for(frame):
    return synergy_matrix(frame)


matrix = matrix_for(chosen)
if matrix.empty or matrix.isna().all().all():
    st.info("Synergy needs merges that differ by one expert (exhaustive subsets or orderings). Launch such a sweep.")
    st.stop()
st.plotly_chart(synergy_heatmap(matrix), width="stretch", key="heatmap")
left, right = st.columns(2)
with left:
    st.markdown("**Block means** (donor block → receiver block, own-expert pairs excluded)")
    st.dataframe(block_means(matrix, DEFAULT_BLOCKS).style.format("{:.4f}"), width="stretch")
    pairs = top_pairs(matrix, n=8)
    pairs.index = pairs["donor"] + " → " + pairs["receiver"]
    st.plotly_chart(bar_figure(pairs["synergy"], "Strongest pairs (both signs)", "donor → receiver", "CE drop (nats)"),
                    width="stretch", key="pairs")
with right:
    st.plotly_chart(bar_figure(donor_strength(matrix), "Donor strength: mean help to other domains", "donor",
                               "CE drop (nats)"), width="stretch", key="donors")
    st.plotly_chart(bar_figure(receiver_susceptibility(matrix), "Receiver susceptibility: mean gain from others",
                               "receiver", "CE drop (nats)"), width="stretch", key="receivers")
