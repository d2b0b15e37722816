"""Fit & Plan: parameters with CIs, held-out validation, alternative forms, and planning widgets."""

import numpy as np
import streamlit as st

from mergelab.ui import dashboard as ui
from mergelab.analysis import planning
from mergelab.analysis.tables import pool_size
from mergelab.ui.curves import fit_summary, forms_table, held_out_table
from mergelab.ui.downloads import figure_download
from mergelab.ui.figures import fractional_return_figure, method_colours
from mergelab.analysis.fit import FitError
from mergelab.analysis.intervals import expert_bootstrap_joint
from mergelab.analysis.heldout import compare_forms, forecast_errors, leave_one_size_out
from mergelab.names import MACRO, PARAMS_PER_BILLION, billions, params_label

ui.page_header("Fit & Plan", "How well the law holds out of sample, which form fits best, and how many experts "
               "or how large a model a target needs. Intervals are 95% expert-bootstrap intervals: they resample "
               "the experts, the unit of randomness (README, \"Intervals\").")
family, rows, methods_all, sizes_all = ui.family_with_merges()
metric = ui.current_metric()  # values oriented (negated when higher is better); targets in the metric's own values
units = metric.units
method, size = ui.pick_method_and_size(rows, methods_all, sizes_all)
domain = ui.choose("Domain", [MACRO, *sorted(rows["domain"].unique())], "domain", default=MACRO)
n_boot = ui.setting("select_slider", "Bootstrap draws", "boot", 200, options=[100, 200, 500, 1000])
JOINT_DRAWS = 200  # each joint draw refits 6 parameters over every size: fewer than the curve fits' draws

all_sizes = ui.merges(family, domain, [method], sizes_all)
merges = all_sizes[all_sizes["size"] == size]
if merges.empty:
    st.warning("No merges for this selection.")
    st.stop()


fits = ui.fits(family, domain, [method], sizes_all, n_boot)
st.subheader("Parameters per size")
summary = fit_summary(fits, metric)
st.dataframe(summary, hide_index=True, width="stretch")
st.caption("Report the 95% expert-bootstrap intervals: they resample the experts. Jacobian standard errors (in the "
           "Export tables) treat the per-k means as independent and understate the uncertainty; they are left blank "
           "where an interval reaches a bound. '(bound)' marks an interval end on the parameter's bound.")
on_bound = {}  # one warning per parameter, naming the curves, not one per curve
for (s, m), fit in fits.items():
    for name in (n for n, hit in (fit.at_bound.items() if fit.ok else []) if hit):
        on_bound.setdefault(name, []).append(f"{m} · {s}")
for name, curves in on_bound.items():
    st.warning(f"{name} sits on its bound for {', '.join(curves)}: the data do not pin it down.")
fit = fits.get((size, method))
if fit is None or not fit.ok:
    st.warning(f"The curve for {method} · {size} cannot be fitted yet: {fit.reason if fit else 'no merges'}. "
               "Validation and planning need a fitted curve: sweep more values of k (the Sweep page).")
    st.stop()

st.subheader("Held-out validation")
c1, c2 = st.container(), st.container()  # one above the other: each table keeps the page's width
with c1:
    st.markdown("**3-point forecast** from k = 1, 2, 4")
    try:
        check = forecast_errors(merges["k"], merges["loss"], merges["experts_key"], n_boot=n_boot,
                                metric=metric)
        bound = f"C = {-check.fit.L_inf:.4f}" if metric.higher_better else f"L∞ = {check.fit.L_inf:.4f}"
        st.caption(f"forecast: {bound} {units}, A = {check.fit.A:.4f}, b = {check.fit.b:.3f} "
                   f"({'; '.join(check.fit.notes)}). The interval is for the population mean at each k; the observed "
                   "mean carries its own pool's error (at k = M it is one subset).")
        st.dataframe(held_out_table(check.table, metric), hide_index=True, width="stretch")
    except FitError as exc:
        st.info(str(exc))
with c2:
    st.markdown("**Leave-one-size-out**: fit the joint law on the smaller sizes, predict the largest")
    try:
        st.dataframe(held_out_table(leave_one_size_out(billions(all_sizes["n_params"]), all_sizes["k"],
                                                       all_sizes["loss"], metric=metric).table, metric),
                     hide_index=True, width="stretch")
    except FitError as exc:
        st.warning(str(exc))
forms = compare_forms(merges["k"], merges["loss"])
n_points = int(forms["n"].max()) if "n" in forms and forms["n"].notna().any() else merges["k"].nunique()
st.markdown(f"**Alternative forms** (ranked by AICc, AIC corrected for small samples, here {n_points} per-k means; "
            "forms within ΔAICc ≤ 2 of the best fit about as well; R² is k-weighted as in the paper, the unweighted "
            "R² beside it; leave-one-k-out RMSE is out of sample)")
st.dataframe(forms_table(forms, units), hide_index=True, width="stretch")
if "aicc" in forms and forms["aicc"].isna().any():
    st.caption("AICc is undefined (—) when a form has n − 1 or more parameters for n points: those forms are not "
               "ranked; sweep more values of k to rank them.")

st.subheader("Plan")
M = pool_size(rows[rows["size"] == size])
reason = planning.not_falling(fit, metric)
if reason:
    st.warning(f"No {metric.bound}-based planning for {method} · {size}: {reason}.")
defaults = planning.default_targets(fit, M)
k_swept = int(merges["k"].max())
st.caption(f"Pool: M = {M} experts at this size; merges measured up to k = {k_swept}. Defaults are the values the fitted "
           f"law reaches at k = {(1 + min(M, k_swept)) / 2:g}; answers beyond the largest k measured or beyond M are "
           "extrapolations of the law and marked so.")
p1, p2, p3 = st.columns(3)  # a curve without a floor gets only the data-based question, not ε or the stop rule
with p1:
    target = st.number_input(f"target {metric.label or metric.name} ({units})",
                             value=round(defaults["target"] * metric.sign, 4), format="%.4f",
                             help="experts needed: k = A/(L_target − L∞) − b" if not metric.higher_better else
                                  "experts needed: the first k whose fitted value reaches the target from below")
    ui.estimate_metric("experts needed, k", planning.k_for_target(fit, target, M, metric).whole(), "{:.0f}")
if reason:
    p2.caption(f"No ε-from-the-{metric.bound} or stop-rule answers: the curve does not "
               f"{'rise' if metric.higher_better else 'fall'}, so it has no {metric.bound}.")
else:
    with p2:
        eps = st.number_input(f"ε {'below the ceiling' if metric.higher_better else 'above the floor'} ({units})", value=float(f"{defaults['epsilon']:.3g}"), min_value=1e-6,
                              format="%.4f", help="k_ε = A/ε − b")
        ui.estimate_metric(f"k within ε of the {metric.bound}", planning.k_epsilon(fit, eps, M).whole(), "{:.0f}")
    with p3:
        tol = st.number_input(f"stop when one more expert gains less than ({units})",
                              value=float(f"{defaults['tolerance']:.3g}"), min_value=1e-6, format="%.5f",
                              help="first k with A/((k+b)(k+1+b)) below this")
        ui.estimate_metric("stop after k", planning.stop_rule(fit, tol, M), "{:.0f}")


def _with_interval(est) -> str:
    """'4.08 [3.51, 4.70]', or the value alone when the bounds are NaN (no interval)."""
    return f"{est.value:.2f}" + (f" [{est.lo:.2f}, {est.hi:.2f}]" if est.lo == est.lo and est.hi == est.hi else "")


k80, k90 = planning.k_at_fraction(fit, 0.8, M), planning.k_at_fraction(fit, 0.9, M)
if not reason:
    ks = np.linspace(1, M, 100)
    curve = {f"{method} · {size}": (ks, [planning.fractional_return(fit, k, M).value for k in ks]),
             "b = 0 (form alone)": (ks, M / (M - 1) * (1 - 1 / ks))}
    r_fig = fractional_return_figure(curve, M, {"k80": k80.value, "k90": k90.value},
                                     colours={f"{method} · {size}": method_colours([method])[method]})
    st.plotly_chart(r_fig, width="stretch", key="R")
    figure_download(r_fig, f"{family}_{method}_{size}_fractional_return", "dl-R")
    st.caption(f"k80 = {_with_interval(k80)}, k90 = {_with_interval(k90)}. " + k90.note + ".")

if len(sizes_all) >= 2 and not metric.higher_better:  # the joint law over sizes is a law of falling losses
    st.markdown(f"**Minimum size** for a target floor (joint law over sizes; its interval from {JOINT_DRAWS} expert-bootstrap "
                "draws, each a refit of the joint law)")
    # 5% under this curve's floor, or under its lowest measured mean when it has no floor (it does not fall)
    below = fit.L_inf if not reason else float(merges.groupby("k")["loss"].mean().min())
    floor_target = st.number_input(f"target floor ({units})", value=float(round(below * 0.95, 4)), format="%.4f")

    @st.cache_resource(show_spinner="Bootstrapping the joint law…", max_entries=8)
    def joint(frame):
        return expert_bootstrap_joint(billions(frame["n_params"]), frame["experts_key"], frame["loss"], n_boot=JOINT_DRAWS)

    try:
        jfit = joint(all_sizes)
        n_min = planning.minimum_size(jfit, floor_target, sizes=billions(all_sizes["n_params"].unique()))
        if np.isnan(n_min.value):
            st.warning(n_min.note)
        else:
            st.metric("minimum size (parameters)", "unreachable" if np.isinf(n_min.value) else
                      params_label(n_min.value * PARAMS_PER_BILLION) + (" (extrapolated)" if n_min.extrapolated else ""),
                      help=f"95% interval [{params_label(n_min.lo * PARAMS_PER_BILLION)}, "
                           f"{params_label(n_min.hi * PARAMS_PER_BILLION)}] parameters")
            st.caption(n_min.note or "; ".join(jfit.notes))
    except FitError as exc:
        st.warning(str(exc))
