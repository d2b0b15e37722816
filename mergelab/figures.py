"""Plotly figure builders: pure functions, DataFrame in, Figure out (no streamlit here)."""

from __future__ import annotations

SIZE_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]


def complete_merges(macro, n_domains: int):
    """Merges evaluated on every domain of the family (macro rows from ResultStore.macro)."""
    return macro[macro["n_domains"] == n_domains]


def macro_curve_figure(macro, method: str, title: str | None = None):
    """Cross-domain CE vs k for one method: every subset as a faint point, the per-k mean as a line,
    one colour per size (sizes ordered by parameter count); the base model (k=0) as a dotted line."""
    import plotly.graph_objects as go

    fig = go.Figure()
    rows = macro[macro["method"] == method]
    sizes = rows.drop_duplicates("size").sort_values("n_params")[["size", "n_params"]].itertuples(index=False)
    for i, (size, n_params) in enumerate(sizes):
        colour = SIZE_COLOURS[i % len(SIZE_COLOURS)]
        label = f"{size} ({n_params / 1e6:.2f}M params)"
        points = rows[rows["size"] == size]
        fig.add_scatter(x=points["k"], y=points["loss"], mode="markers", name=f"{label} subsets",
                        marker=dict(color=colour, size=4, opacity=0.25), legendgroup=size, showlegend=False,
                        hovertext=points["experts_key"], hovertemplate="k=%{x}<br>CE=%{y:.4f}<br>%{hovertext}")
        means = points.groupby("k", as_index=False)["loss"].mean()
        fig.add_scatter(x=means["k"], y=means["loss"], mode="lines+markers", name=label,
                        line=dict(color=colour, width=2), legendgroup=size,
                        hovertemplate="k=%{x}<br>mean CE=%{y:.4f}")
        base = macro[(macro["method"] == "base") & (macro["size"] == size)]
        if not base.empty:
            fig.add_hline(y=float(base["loss"].iloc[0]), line=dict(color=colour, dash="dot", width=1),
                          annotation_text=f"base {size}", annotation_position="top right")
    fig.update_layout(title=title or method, xaxis_title="experts merged, k", yaxis_title="cross-domain CE (nats/token)",
                      legend_title="size", template="plotly_white", height=420, margin=dict(t=60, r=20))
    fig.update_xaxes(dtick=1)
    return fig
