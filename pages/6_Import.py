"""Import: results measured elsewhere (CSV, TSV, Parquet, JSON Lines, lm-eval JSON) into the cache, with a preview
of the mapped rows and of what will be written, then their curves. Uploads are read as data only (no pickle, no
code) and size-limited; the mapping is mergelab.importing's, the same as `mergelab import`."""

import inspect
import math

import streamlit as st

from mergelab import importing, metrics
from mergelab.analysis.tables import merge_losses, with_settings
from mergelab.errors import MergelabError
from mergelab.names import MACRO
from mergelab.paths import upload_limit_mb
from mergelab.ui import dashboard as ui
from mergelab.ui.curves import axis_title, fit_groups, normalisers
from mergelab.ui.figures import curve_figure

try:  # per file; MERGELAB_UPLOAD_MB changes it, and the uploader's own limit and message follow it
    MAX_MB = upload_limit_mb()
except MergelabError as exc:
    st.error(str(exc))
    st.stop()
if "max_upload_size" in inspect.signature(st.file_uploader).parameters:  # Streamlit ≥ 1.49: per widget
    own_limit = {"max_upload_size": max(1, math.ceil(MAX_MB))}
else:  # older: server.maxUploadSize alone (set from MERGELAB_UPLOAD_MB by `mergelab demo up`)
    own_limit, MAX_MB = {}, min(MAX_MB, float(st.get_option("server.maxUploadSize")))

ui.page_header("Import", "Bring results measured elsewhere: one row per merge and domain (experts as a+b, a,b or a "
               "JSON list), one column per domain, one file per merged model (the paper's results.csv, lm-eval "
               "results JSON), or a `mergelab export --what results` file. Rows are marked imported (file name and "
               "content hash) and never mixed with rows mergelab measured. Same rules as `mergelab import`.")
uploads = st.file_uploader(f"Results files (up to {MAX_MB:g} MB each)", type=["csv", "tsv", "parquet", "jsonl", "json"],
                           accept_multiple_files=True, key="import-files", **own_limit)
left, right = st.columns(2)
family = left.text_input("Family (for rows without a family column)", value="imported", key="import-family")
metric = right.text_input("Metric (for rows without a metric column)", value="",
                          placeholder="ce · accuracy · exact_match · pass@1 · NAME:higher|lower[:UNIT]",
                          key="import-metric")
with st.expander("Mapping (optional)"):
    mapping = st.text_input("Columns: FIELD=COLUMN,…", placeholder="experts=subset,value=acc", key="import-map")
    constants = st.text_input("Constants: FIELD=VALUE,…", placeholder="size=0.5B,method=ties", key="import-set")
    pattern = st.text_input("Per-model files: a regular expression on the file name with named groups",
                            placeholder=r"(?P<method>[a-z_]+)__(?P<experts>[^.]+)\.json", key="import-pattern")
    st.caption(f"Fields: {', '.join(importing.FIELDS)}.")

if not uploads:
    st.info("Upload one or more files to preview what they hold.")
    st.stop()
too_big = [f.name for f in uploads if f.size > MAX_MB * 2**20]
if too_big:
    st.error(f"{', '.join(too_big)}: larger than {MAX_MB:g} MB; import it with `mergelab import FILE` instead.")
    st.stop()
try:
    plan = importing.plan([f.name for f in uploads], names=[f.name for f in uploads],
                          contents=[f.getvalue() for f in uploads], family=family.strip() or None,
                          metric=metric.strip() or None, mapping=importing.parse_map(mapping or None),
                          constants=importing.parse_set(constants or None), pattern=pattern or None)
except MergelabError as exc:
    st.error(str(exc))
    st.stop()

st.subheader("What the files hold")
for name, layout in plan.layouts.items():
    st.markdown(f"- `{name}`: {layout}")
for note in plan.notes:
    st.caption(note)
st.dataframe(plan.preview(200), hide_index=True, width="stretch", key="import-preview")
st.caption(f"{len(plan.rows):,} mapped rows (the first 200 shown).")
st.subheader("What will be written")
st.dataframe(plan.summary(), hide_index=True, width="stretch", key="import-summary")
store = ui.results_store()
st.caption(f"into {store.path} · eval hash {plan.rows['eval_hash'].iat[0]}")

# the curves as they will appear: per metric of the import, macro mean over its domains
for name in metrics.names(plan.rows):
    rows = metrics.select(plan.rows, name)
    chosen = metrics.of_rows(rows)
    for fam in sorted(rows["family"].unique()):
        merges = merge_losses(metrics.oriented(with_settings(rows[rows["family"] == fam])), MACRO)
        if merges.empty or merges["k"].nunique() < 2:
            continue
        fits = fit_groups(merges)
        sizes = list(merges.drop_duplicates("size").sort_values("n_params")["size"])
        fig = curve_figure(merges, fits, sizes_in_order=sizes, title=f"{fam} · {chosen.name} · {MACRO} (preview)",
                           normalise=normalisers(merges, fits, None, chosen.sign), y_title=axis_title(None, chosen))
        st.plotly_chart(fig, width="stretch", key=f"import-curve-{fam}-{name}")

if st.button(f"Import {len(plan.rows):,} rows", type="primary", key="import-go"):
    try:
        added, known = importing.write(plan, store.path)
    except MergelabError as exc:
        st.error(str(exc))
        st.stop()
    st.session_state["import-done"] = (added, known, sorted(plan.rows["family"].unique()))
if "import-done" in st.session_state:
    added, known, families = st.session_state["import-done"]
    st.success(f"Imported {added:,} rows" + (f" ({known:,} were cached already)" if known else "")
               + f" into {', '.join(families)}.")
    from streamlit.errors import StreamlitAPIException

    try:
        st.page_link("pages/1_Curves.py", label="Open their curves", icon="📈")
    except StreamlitAPIException:  # the page run on its own, outside app.py's navigation (a test)
        st.caption("Open Curves in the sidebar to see them.")
