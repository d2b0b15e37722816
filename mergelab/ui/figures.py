"""Plotly figure builders: pure functions, DataFrame in, Figure out (no streamlit here)."""

from __future__ import annotations

from mergelab.analysis.means import mean_by_k, per_k_means

SIZE_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
METHOD_COLOURS = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#eeca3b", "#9d755d", "#ff9da6",
                  "#bab0ac", "#17becf", "#bcbd22"]
# Each merge method's own colour, the same in every panel and on every page (curves, sizes, fractional return)
METHOD_COLOUR = {"average": "#4c78a8", "ties": "#f58518", "dare_ties": "#54a24b", "breadcrumbs": "#e45756",
                 "model_stock": "#72b7b2", "task_arithmetic": "#b279a2", "dare": "#eeca3b", "della": "#9d755d",
                 "breadcrumbs_ties": "#ff9da6", "tsv_m": "#bab0ac"}


def method_colours(settings) -> dict[str, str]:
    """setting -> colour for the method settings of one figure (labels such as 'ties' or 'ties lambda=0.5',
    mergelab.analysis.tables.setting_labels): a method's first setting gets its own METHOD_COLOUR, so a method
    looks the same everywhere; a further setting of it, or a method without one, gets the next colour of
    METHOD_COLOURS not yet used, so two settings in one figure never share a colour."""
    out, used = {}, set()
    rest = []
    for setting in sorted(set(settings)):
        own = METHOD_COLOUR.get(setting.split(" ")[0])
        if own and own not in used:
            out[setting] = own
            used.add(own)
        else:
            rest.append(setting)
    spare = iter([c for c in METHOD_COLOURS if c not in used] + METHOD_COLOURS * len(rest))
    for setting in rest:
        out[setting] = next(spare)
    return out


def _size_colour(sizes_in_order: list[str], size: str) -> str:
    return SIZE_COLOURS[sizes_in_order.index(size) % len(SIZE_COLOURS)] if size in sizes_in_order else "#444"


SYMBOLS = ["circle", "diamond", "square", "x", "triangle-up", "star"]


def _curve_style(frame, sizes_in_order: list[str]):
    """(size, setting) -> (colour, marker symbol) for the curves in `frame` (columns size, setting): colour
    by size and symbol by method setting, or colour by setting when there is one size, so that two
    settings of one size never look alike."""
    methods = sorted(frame["setting"].unique())
    by_method = frame["size"].nunique() == 1 and len(methods) > 1
    colours = method_colours(methods)

    def style(size: str, method: str) -> tuple[str, str]:
        i = methods.index(method)
        colour = colours[method] if by_method else _size_colour(sizes_in_order, size)
        return colour, SYMBOLS[i % len(SYMBOLS)]

    return style


def _in_size_order(frame, sizes_in_order: list[str]):
    """frame.groupby(["size", "setting"]) with the smallest size first (legends follow it)."""
    rank = {s: i for i, s in enumerate(sizes_in_order)}
    return sorted(frame.groupby(["size", "setting"]), key=lambda g: (rank.get(g[0][0], len(rank)), g[0][0], g[0][1]))


def _legend_below(fig):
    """A horizontal legend under the plot: half-width panels keep their plotting area at any window width."""
    fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.25, xanchor="left", x=0, font=dict(size=10)),
                      margin=dict(b=40))
    return fig


def _layout(fig, title: str, x: str, y: str, height: int = 440):
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, template="plotly_white", height=height,
                      margin=dict(t=60, r=20, l=60, b=50), legend=dict(font=dict(size=11)))
    return fig


def curve_figure(merges, fits: dict, *, sizes_in_order: list[str], title: str, log_x: bool = False,
                 log_y: bool = False, bands: dict | None = None, overlays: dict | None = None, show_points: bool = True,
                 normalise: dict | None = None, y_title: str = "cross-entropy (nats/token)"):
    """CE vs k for one domain (or macro): faint points per subset, per-k means with their 95%
    expert-bootstrap intervals (when the fit has draws), the fitted L∞ + A/(k+b) (solid; dashed per method
    when colour is by size) with its floor L∞ (dashed) and its expert-bootstrap band per curve.

    merges: rows with size, setting (method + hyperparameters), k, loss, experts_key.
    fits: {(size, setting): CurveFit}. bands: {(size, setting): (k, lo, hi)}. overlays: {label: (k, loss)} drawn in grey (paper laws).
    normalise: {(size, setting): (offset, scale)} draws every y of that curve as (y − offset)/scale (overlays are
    passed already normalised; mergelab.ui.curves.normalisers); y_title names the axis. A floor is drawn only for
    a curve that falls (mergelab.analysis.planning.not_falling) with no parameter on its bound
    (mergelab.ui.curves.has_floor), so the y axis stays set by the data."""
    import numpy as np
    import plotly.graph_objects as go

    from mergelab.ui.curves import has_floor

    fig = go.Figure()
    dashes = ["solid", "dot", "dash", "longdash", "dashdot"]
    methods = sorted(merges["setting"].unique())
    by_method = merges["size"].nunique() == 1 and len(methods) > 1  # one size: colour tells the methods apart
    colours = method_colours(methods)
    for (size, method), rows in _in_size_order(merges, sizes_in_order):
        colour = colours[method] if by_method else _size_colour(sizes_in_order, size)
        name = f"{method} · {size}" if len(methods) > 1 else size
        offset, scale = (normalise or {}).get((size, method), (0.0, 1.0))
        if show_points:
            fig.add_scatter(x=rows["k"], y=(rows["loss"] - offset) / scale, mode="markers", name=f"{name} subsets", legendgroup=name,
                            showlegend=False, marker=dict(color=colour, size=4, opacity=0.18),
                            hovertext=rows["experts_key"],
                            hovertemplate="k=%{x}<br>" + _short(y_title) + "=%{y:.4f}<br>%{hovertext}<extra></extra>")
        stats = mean_by_k(rows)
        fit = fits.get((size, method))
        error_y = None
        if fit is not None and fit.ok and fit.samples is not None:
            _, means, lo, hi = fit.mean_ci()  # expert-bootstrap interval of the population mean at each k
            error_y = dict(type="data", symmetric=False, array=(hi - means) / scale, arrayminus=(means - lo) / scale,
                           visible=True, thickness=1)
        fig.add_scatter(x=stats["k"], y=(stats["loss"] - offset) / scale, mode="markers", name=name, legendgroup=name,
                        marker=dict(color=colour, size=8, symbol=["circle", "diamond", "square", "x"][methods.index(method) % 4]),
                        error_y=error_y, customdata=stats["n_subsets"],
                        hovertemplate="k=%{x}<br>mean=%{y:.4f}<br>%{customdata} subsets<extra>" + name + "</extra>")
        if fit is None or not fit.ok:
            continue
        grid = np.linspace(stats["k"].min(), stats["k"].max(), 120)
        # colour and marker tell methods apart at one size; across sizes colour is the size, so the dash is the method
        dash = "solid" if by_method or len(methods) == 1 else dashes[methods.index(method) % len(dashes)]
        if bands and (size, method) in bands:
            bk, lo, hi = bands[(size, method)]
            fig.add_scatter(x=np.r_[bk, bk[::-1]], y=(np.r_[hi, lo[::-1]] - offset) / scale, fill="toself", fillcolor=colour, opacity=0.15,
                            line=dict(width=0), name=f"{name} 95% band", legendgroup=name, showlegend=False, hoverinfo="skip")
        fig.add_scatter(x=grid, y=(fit.predict(grid) - offset) / scale, mode="lines", line=dict(color=colour, width=2, dash=dash),
                        name=f"{name} fit", legendgroup=name, showlegend=False,
                        # a negative scale: the curve holds a higher-is-better metric mirrored, its L∞ is −C
                        hovertemplate=((f"C={-fit.L_inf:.4f}" if scale < 0 else f"L∞={fit.L_inf:.4f}")
                                       + f" A={fit.A:.4f} b={fit.b:.3f}<br>k=%{{x:.2f}} y=%{{y:.4f}}"
                                       f"<extra>{name} fit</extra>"))
        if has_floor(fit):  # only for a falling curve whose floor the data pin down (none at a bound)
            fig.add_hline(y=(fit.L_inf - offset) / scale, line=dict(color=colour, dash="dash", width=1), opacity=0.7)
    for i, (label, (k, loss)) in enumerate((overlays or {}).items()):  # grey; one dash pattern per overlay
        fig.add_scatter(x=k, y=loss, mode="lines", name=label,
                        line=dict(color="#888", width=1.5, dash=["dot", "dashdot", "longdashdot", "dash"][i % 4]))
    _layout(fig, title, "experts merged, k", y_title)
    fig.update_xaxes(type="log" if log_x else "linear", dtick=None if log_x else 1)
    fig.update_yaxes(type="log" if log_y else "linear")
    return fig


def _short(y_title: str) -> str:
    """The quantity of an axis title, for hover text: 'CE' for cross-entropy, else the name before the unit."""
    return "CE" if y_title.startswith("cross-entropy") else y_title.split(" (")[0]


def residual_figure(merges, fits: dict, *, sizes_in_order: list[str], title: str = "Residuals of the per-k means",
                    metric=None):
    """Per-k mean minus the fitted curve, per (size, setting): structure here means the law misses. `metric`
    (mergelab.metrics.Metric, default CE): the merges hold its oriented values; residuals are drawn in its own
    sign and unit."""
    import plotly.graph_objects as go

    fig = go.Figure()
    style = _curve_style(merges, sizes_in_order)
    for (size, method), rows in _in_size_order(merges, sizes_in_order):
        fit = fits.get((size, method))
        if fit is None or not fit.ok:
            continue
        ks, means = per_k_means(rows["k"], rows["loss"])
        colour, symbol = style(size, method)
        sign = metric.sign if metric is not None else 1
        fig.add_scatter(x=ks, y=sign * (means - fit.predict(ks)), mode="lines+markers", name=f"{method} · {size}",
                        line=dict(color=colour), marker=dict(symbol=symbol, size=7))
    fig.add_hline(y=0, line=dict(color="#999", width=1))
    unit = "nats/token" if metric is None else metric.units
    return _legend_below(_layout(fig, title, "experts merged, k", f"observed − fitted ({unit})", height=340))


def variance_figure(variances, fits: dict, *, sizes_in_order: list[str], title: str = "Variance across subsets",
                    metric=None):
    """Across-subset variance vs k with the plain and finite-pool 1/(k+b) laws; colour by size and marker
    by method setting (colour by setting for one size). `metric` (default CE) names the y axis: the variance
    of its values in its unit squared (a sign flip leaves a variance unchanged)."""
    import numpy as np
    import plotly.graph_objects as go

    fig = go.Figure()
    style = _curve_style(variances, sizes_in_order) if len(variances) else None
    for (size, method), rows in (_in_size_order(variances, sizes_in_order) if len(variances) else []):
        colour, symbol = style(size, method)
        fig.add_scatter(x=rows["k"], y=rows["var"], mode="markers", name=f"{method} · {size}",
                        marker=dict(color=colour, symbol=symbol, size=8))
        grid = np.linspace(rows["k"].min(), rows["k"].max(), 100)
        for law, dash in (("plain", "dot"), ("finite_pool", "solid")):
            fit = fits.get((size, method), {}).get(law)
            if fit is not None:
                fig.add_scatter(x=grid, y=fit.predict(grid), mode="lines", line=dict(color=colour, dash=dash, width=1.5),
                                name=f"{method} · {size} {law.replace('_', '-')} law", showlegend=False)
    _layout(fig, title, "experts merged, k", variance_title(metric), height=380)
    fig.update_yaxes(exponentformat="power")  # 4×10⁻⁵, not the SI '40µ'
    return _legend_below(fig)


def variance_title(metric=None) -> str:
    """'variance of CE (nats²)', or the metric's name and its unit squared: 'variance of accuracy (fraction²)'."""
    if metric is None or metric.name == "ce":
        return "variance of CE (nats²)"
    unit = metric.unit.split("/")[0] if metric.unit == "nats/token" else metric.unit
    return f"variance of {metric.label or metric.name}" + (f" ({unit}²)" if unit else "")


def size_figure(points, joint=None, *, k: int, title: str | None = None, y_title: str = "cross-entropy (nats/token)"):
    """CE vs model size at fixed k (log x in parameters, ticks at the sizes with SI-suffixed counts such as
    19.2K), with the fitted floor L∞(N) and L(N, k) of a joint fit (whose N is in billions).

    points: rows with setting, size, n_params, N (billions), loss. y_title names the y axis (another metric's)."""
    import numpy as np
    import plotly.graph_objects as go

    from mergelab.names import PARAMS_PER_BILLION, params_label

    fig = go.Figure()
    colours = method_colours(points["setting"].unique())  # the colours of the method's curves
    for method, rows in points.groupby("setting"):
        fig.add_scatter(x=rows["n_params"], y=rows["loss"], mode="markers+lines", name=f"{method}, k={k}",
                        line=dict(color=colours[method]), marker=dict(color=colours[method]),
                        customdata=np.c_[rows["size"], [params_label(n) for n in rows["n_params"]]],
                        hovertemplate="%{customdata[0]} (%{customdata[1]} params)<br>" + _short(y_title)
                                      + "=%{y:.4f}<extra></extra>")
    if joint is not None:
        grid = np.geomspace(points["N"].min() / 1.5, points["N"].max() * 1.5, 100)
        fig.add_scatter(x=grid * PARAMS_PER_BILLION, y=joint.predict(grid, k), mode="lines", name=f"joint law at k={k}",
                        line=dict(color="#333"))
        fig.add_scatter(x=grid * PARAMS_PER_BILLION, y=joint.floor(grid), mode="lines", name="floor L* + B·N^−β",
                        line=dict(color="#333", dash="dash"))
    short = _short(y_title)
    _layout(fig, title or f"{short} vs model size at k = {k}", "parameters N", y_title, height=380)
    _legend_below(fig)
    ticks = sorted(points["n_params"].unique()) if len(points) else []
    if len(points) and points["loss"].nunique() == 1:  # one value: plotly's auto range (−0.5..1 for 0.45) hides it
        y = float(points["loss"].iloc[0])
        pad = max(abs(y) * 0.1, 1e-3)
        fig.update_yaxes(range=[y - pad, y + pad])
    fig.update_xaxes(type="log", tickvals=ticks, ticktext=[params_label(n) for n in ticks])
    return fig


TEXT_MAX_COLUMNS = 12  # receivers beyond which the heatmap's cells carry no text (hover still shows each value)


def synergy_heatmap(matrix, title: str = "Synergy: CE drop on receiver when donor joins (nats)", lo=None, hi=None,
                    unit: str = "nats"):
    """Diverging colour scale centred on 0: blue helps, red hurts. `unit`: the values' unit (colour bar, hover;
    a higher-is-better metric's gain, e.g. 'fraction'). lo, hi: matrices of 95% intervals
    (mergelab.analysis.synergy.synergy_intervals), shown on hover; a value whose interval holds 0 is
    printed in parentheses, one without an interval with a trailing '?' (none when no cell has one: the
    page says so once), an empty cell has no pair. Many receivers get smaller cell text, and beyond
    TEXT_MAX_COLUMNS none (the values stay on hover): at 800 px the numbers would run into each other."""
    import numpy as np
    import plotly.graph_objects as go

    values = matrix.to_numpy(dtype=float)
    n_cols = values.shape[1]
    bound = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    rounded = np.round(np.nan_to_num(values), 3) + 0.0  # + 0.0: no '-0.0'
    text = np.where(np.isfinite(values), np.char.mod("%.3f", rounded), "")
    hover = "donor %{y} → receiver %{x}: %{z:.4f} " + unit + "<extra></extra>"
    custom = None
    if lo is not None and hi is not None:
        lo_v, hi_v = lo.to_numpy(dtype=float), hi.to_numpy(dtype=float)
        custom = np.dstack([lo_v, hi_v])
        no_interval = np.isfinite(values) & ~(np.isfinite(lo_v) & np.isfinite(hi_v))
        text = np.where((lo_v <= 0) & (hi_v >= 0), "(" + text + ")", text)  # interval holds 0: not distinguishable
        if np.isfinite(lo_v).any():
            text = np.where(no_interval, text + "?", text)
        hover = ("donor %{y} → receiver %{x}: %{z:.4f} " + unit + "<br>95% interval [%{customdata[0]:.4f}, "
                 "%{customdata[1]:.4f}] (NaN: none)<extra></extra>")
    fig = go.Figure(go.Heatmap(z=values, x=list(matrix.columns), y=list(matrix.index), zmid=0, zmin=-bound, zmax=bound,
                               colorscale="RdBu", colorbar=dict(title=unit), customdata=custom,
                               text=text, texttemplate="%{text}" if n_cols <= TEXT_MAX_COLUMNS else "",
                               textfont=dict(size=10 if n_cols <= 6 else 8), hovertemplate=hover))
    _layout(fig, title, "receiver domain", "donor expert", height=520)
    fig.update_yaxes(autorange="reversed")
    return fig


def bar_figure(series, title: str, x_title: str, y_title: str, height: int = 340, lo=None, hi=None):
    """Simple bar chart of a named Series (sorted), positive blue, negative red; lo, hi (Series on the
    same index) draw 95% intervals as error bars."""
    import plotly.graph_objects as go

    s = series.sort_values()
    error = None
    if lo is not None and hi is not None:
        error = dict(type="data", symmetric=False, array=(hi[s.index] - s).to_numpy(),
                     arrayminus=(s - lo[s.index]).to_numpy(), thickness=1)
    fig = go.Figure(go.Bar(x=list(s.index), y=s.to_numpy(), error_y=error,
                           marker_color=["#2166ac" if v >= 0 else "#b2182b" for v in s]))
    return _layout(fig, title, x_title, y_title, height=height)


def fractional_return_figure(curves: dict, M: int, marks: dict | None = None, colours: dict | None = None):
    """R(k) = (L(1) − L(k))/(L(1) − L(M)) per curve with k80 / k90 marked. colours: {label: colour} (the
    method's colour, method_colours); a curve without one (a reference such as b = 0) is grey and dashed."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for label, (k, r) in curves.items():
        colour = (colours or {}).get(label)
        fig.add_scatter(x=k, y=r, mode="lines", name=label,
                        line=dict(color=colour) if colour else dict(color="#888", dash="dash"))
    for level in (0.8, 0.9):
        fig.add_hline(y=level, line=dict(color="#999", dash="dot"), annotation_text=f"{int(level * 100)}%")
    for label, k in (marks or {}).items():
        fig.add_vline(x=k, line=dict(color="#999", dash="dash", width=1), annotation_text=label)
    _layout(fig, f"Fractional return R(k) (M = {M})", "experts merged, k", "share of the k=1→M gain", height=340)
    return fig
