"""mergelab dashboard entry page: what is cached, and the cross-domain curve per method."""

import streamlit as st

from mergelab.demo.up import load_shipped_results
from mergelab.errors import MergelabError
from mergelab.figures import complete_merges, macro_curve_figure
from mergelab.store import ResultStore

st.set_page_config(page_title="mergelab", layout="wide")
st.title("mergelab: model-merging scaling curves")

store = ResultStore()
try:
    load_shipped_results(store)
    macro = store.macro()
except MergelabError as exc:
    st.error(f"Cannot read the results cache: {exc}")
    st.stop()

if macro.empty:
    st.info("The results cache is empty. Run `mergelab demo up` or `mergelab sweep --family FAMILY.toml` to add merges.")
    st.stop()

families = sorted(macro["family"].unique())
family = st.selectbox("Family", families, index=families.index("demo-standard") if "demo-standard" in families else 0)
rows = macro[macro["family"] == family]
n_domains = int(rows["n_domains"].max())
rows = complete_merges(rows, n_domains)
methods = [m for m in rows["method"].unique() if m not in ("base", "expert")]
st.caption(f"{store.path} · {len(rows):,} merges of {family} on {n_domains} domains · "
           f"sizes {', '.join(rows.sort_values('n_params')['size'].unique())}")
columns = st.columns(2)
for i, method in enumerate(sorted(methods)):
    with columns[i % 2]:
        st.plotly_chart(macro_curve_figure(rows, method), width="stretch")
