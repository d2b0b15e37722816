"""Sweep: launch a merge sweep in the background worker and watch it run."""

import os

import streamlit as st

from mergelab.ui import dashboard as ui
from mergelab.errors import MergelabError
from mergelab.io.family import load_family
from mergelab.sweep.jobs import JobQueue
from mergelab.engine.methods import METHODS, incremental
from mergelab.engine.methods.options import HELP as OPTION_HELP
from mergelab.paths import ROOTS_ENV, allowed_roots, confined, family_manifests
from mergelab.sweep.plan import SweepJob, family_name
from mergelab.sweep.runner import plan_sweep
from mergelab.sweep.local import plan_sizes
from mergelab.sweep.worker import ensure_worker, reap_orphans

FALLBACK_SECONDS_PER_MERGE = 0.1

ui.page_header("Sweep", "Merge chosen subsets of experts and evaluate them in a background worker process; "
               "progress survives reloads and closed tabs, cached merges are skipped, new points land in the cache.")
queue = JobQueue()
try:
    jobs = queue.list(limit=30)
except MergelabError as exc:  # a garbage, foreign or unopenable jobs.sqlite: say which file and what to do
    st.error(str(exc))
    st.stop()


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def sweep_form() -> None:
    """Pick a family, set up a sweep, estimate and launch it. Returns early, with a message, when the
    family field is empty or invalid: the jobs list below is drawn whatever happens here."""
    # every family.toml up to three folders below the allowed roots, and the families of earlier jobs
    known = sorted({str(p) for p in family_manifests()} | {j.spec.family for j in jobs} - {""})
    roots = ", ".join(f"`{r}`" for r in allowed_roots())
    choice = st.selectbox("Family manifest", known + ["other path…"], key="sweep-family",
                          format_func=lambda m: m if m == "other path…" else f"{family_name(m)} — {m}",
                          help=f"the family.toml files found up to three folders below {roots} (the data dir and "
                               f"{ROOTS_ENV}); `mergelab demo build` makes more")
    manifest = st.text_input("path to family.toml") if choice == "other path…" or not known else choice
    if not manifest:
        st.info(f"No family yet: no family.toml up to three folders below the allowed folders ({roots}). Run "
                f"`mergelab demo up` or `mergelab demo build --preset micro --out DIR`, or add the folder that holds "
                f"your family.toml to {ROOTS_ENV} (separated by `{os.pathsep}`) and restart the dashboard; "
                "then pick it here.")
        return
    try:
        family = load_family(confined(manifest))
    except MergelabError as exc:
        st.error(str(exc))
        return

    pools = {s.name: len(s.experts) for s in family.sizes}  # each size's own pool of experts
    M = max(pools.values())
    st.markdown(f"**{family.name}** · {plural(len(family.domains), 'domain')} · "
                + (f"{plural(M, 'expert')} per size" if len(set(pools.values())) == 1
                   else "experts per size: " + ", ".join(f"{n} {m}" for n, m in pools.items())))
    # outside the form, so the fields that do not apply are greyed out at once (a form's widgets rerun nothing)
    adaptive = st.toggle("Adaptive: stop at a precision", key="sweep-adaptive",
                         help="the policy picks which k and which subsets to merge, batch by batch, until the 95% "
                              "interval of the quantity is as narrow as asked (k range and subsets below are then "
                              "ignored); a resumed or relaunched job continues from the cached merges")
    mode = st.radio("Subsets", ["all subsets", "N random per k", "diverse orderings"], horizontal=True,
                    disabled=adaptive, key="sweep-subsets",
                    help="orderings: the prefixes of N orderings of the experts chosen far apart (one merge per k each)")
    with st.form("sweep"):
        # full width each: eleven method names in half a column at 800 px cut the first chip to its ×
        sizes = st.multiselect("Sizes", family.size_names, default=list(family.size_names[:1]))
        methods = st.multiselect("Methods", list(METHODS), default=["average"])
        hparams = {}
        # two columns: Streamlit cannot see the viewport, and at 800 px four columns broke words per letter
        per_row = 2
        names = list(METHODS)
        cols = [c for i in range(0, len(names), per_row) for c in st.columns(per_row)]
        for col, (name, method) in zip(cols, METHODS.items()):
            with col.expander(f"{name} settings", expanded=False):
                st.caption(method.doc)
                st.caption("incremental: linear in the prepared task vectors" if incremental(method)
                           else "not incremental: combined per subset" + (" (whole tensors)" if method.whole_tensor else ""))
                values = {}
                for pname, p in method.params.items():
                    # the range carries its own brackets: "density ∈ (0.0, 1.0]", never "density ((0.0, 1.0])"
                    label = pname if p.kind is bool else f"{pname} ∈ {p.range_text()}"
                    if p.kind is bool:
                        values[pname] = st.checkbox(label, value=p.default, key=f"hp-{name}-{pname}", help=p.help)
                    elif p.kind is int:
                        values[pname] = int(st.number_input(label, value=int(p.default), step=1, key=f"hp-{name}-{pname}",
                                                            help=p.help))
                    else:
                        values[pname] = float(st.number_input(label, value=float(p.default), format="%.3f",
                                                              key=f"hp-{name}-{pname}", help=p.help))
                hparams[name] = values
        o1, o2 = st.columns(2)
        weights = o1.text_input("Per-expert weights (every chosen method)", "", key="hp-weights",
                                placeholder="algebra:0.5,code:1.5", help=OPTION_HELP["weights"])
        exclude = o2.text_input("Tensors kept from the base (every chosen method)", "", key="hp-exclude",
                                placeholder="*embed_tokens*,lm_head.weight", help=OPTION_HELP["exclude"])
        for name, given in (("weights", weights), ("exclude", exclude)):
            if given.strip():
                for values in hparams.values():
                    values[name] = given.strip()
        c3, c4 = st.columns(2)  # at most two columns: labels and +/− stay whole at 800 px
        k_lo, k_hi = (c3.slider("k range", 1, M, (1, M), disabled=adaptive,
                                help="the full range sweeps 1..M of each size's own pool; "
                                "a narrower one must fit every chosen size") if M > 1 else (1, 1))
        if M == 1:
            c3.caption("k = 1: one expert per size")
        per_k = c4.number_input("N (subsets per k, or orderings)", min_value=1, value=10, key="sweep-n",
                                disabled=adaptive or mode == "all subsets")
        seed = c3.number_input("seed (random subsets)", min_value=0, value=0)
        device = c4.selectbox("device", ["auto", "cpu", "cuda"])
        a1, a2 = st.columns(2)
        quantity = a1.selectbox("Adaptive quantity", list(ADAPTIVE_QUANTITIES), key="sweep-adaptive-quantity",
                                format_func=ADAPTIVE_LABELS.get, disabled=not adaptive)
        precision = a2.text_input("95% CI half-width", key="sweep-adaptive-precision", disabled=not adaptive,
                                  placeholder=f"default {ADAPTIVE_QUANTITIES[quantity]}",
                                  help="in the quantity's unit (nats for L∞, experts for k90), or a percentage of the "
                                       "estimate, e.g. 10%; empty: the default shown (" + ", ".join(
                                           f"{q} {v}" for q, v in ADAPTIVE_QUANTITIES.items()) + ")")
        budget = a1.number_input("budget (merges per curve, 0: none)", min_value=0, value=0, key="sweep-adaptive-budget",
                                 disabled=not adaptive)
        estimate = st.form_submit_button("Estimate")
        launch = st.form_submit_button("Launch sweep", type="primary")

    ks = () if (k_lo, k_hi) == (1, M) else tuple(range(k_lo, k_hi + 1))  # () = 1..M of each size's own pool
    job = SweepJob(str(confined(manifest)), {m: hparams[m] for m in methods}, tuple(sizes), ks,
                   {"all subsets": "all", "N random per k": int(per_k), "diverse orderings": f"orderings:{int(per_k)}"}[mode],
                   int(seed), device, str(ui.results_store().path))

    if not (estimate or launch):
        return
    if not sizes or not methods:
        st.error("Pick at least one size and one method.")
        return
    if adaptive:
        return adaptive_launch(job, quantity, precision, int(budget), launch, family, sizes, methods)
    try:
        report, todo, _ = plan_sweep(job.sweep_spec(), ui.results_store())
    except MergelabError as exc:
        st.error(str(exc))
        return
    n_todo = sum(map(len, todo.values()))
    rates = [j.seconds_per_merge for j in jobs if j.status == "done" and j.spec.family == job.family
             and j.seconds_per_merge]
    rate = rates[0] if rates else FALLBACK_SECONDS_PER_MERGE
    st.info(f"{report.planned:,} merges planned, {report.skipped:,} already cached → **{n_todo:,} to run**, "
            f"about {ui.duration_text(n_todo * rate)} at {rate * 1000:.0f} ms per merge"
            + ("" if rates else " (a first guess: no finished job on this family yet)") + ".")
    try:  # where each size's weights will live (memory placement) and the numbers behind it
        plans = plan_sizes(job.sweep_spec().family, todo, device, idle=True)
        if plans:
            st.caption("Memory plan: " + " · ".join(plan.describe() for plan in plans.values()))
    except MergelabError as exc:
        st.warning(str(exc))
    for size_name, note in report.layout_notes.items():  # LoRA adapter experts, packed or left-out tensors
        st.caption(f"Size {size_name}: {note}")
    if launch:
        submit(job, "Job")


ADAPTIVE_QUANTITIES = {"L_inf": "0.005", "k90": "0.5", "A": "10%", "predict@M": "0.003"}  # default precisions
# what the picker shows; the key (the target's own name) is what the job is given
ADAPTIVE_LABELS = {"L_inf": "L∞ (floor)", "k90": "k90 (experts to 90% of the gain)",
                   "A": "A (the tail's amplitude)", "predict@M": "L(M) (the law at the full pool)"}


def adaptive_launch(job, quantity, precision, budget, launch, family, sizes, methods) -> None:
    """Check the target, say what the policy will do, and queue the adaptive job."""
    import dataclasses

    from mergelab.analysis.adaptive import parse_target, require_per_curve, start_design

    M = len(family.size(sizes[0]).experts)
    text = f"{quantity.replace('@M', f'@{M}')}:{precision.strip() or ADAPTIVE_QUANTITIES[quantity]}"
    try:
        target = parse_target(text)
        require_per_curve(target)
        first = len(start_design(family.size(sizes[0]).expert_names))
    except MergelabError as exc:
        st.error(str(exc).replace("--adaptive ", "Target "))
        return
    job = dataclasses.replace(job, ks=(), subsets="all", adaptive=text, budget=budget or None)
    curves = len(sizes) * len(methods)
    st.info(f"Adaptive: {target.describe()} per curve ({plural(curves, 'curve')}); each starts with {first} merges "
            f"(single experts, balanced pairs, a few at k ≈ √(2M), the full pool), then adds batches where they narrow "
            f"the interval most, and stops when it is met" + (f" or after {budget} merges" if budget else "")
            + " (merges already cached count). The job shows the interval and the merges still predicted.")
    if launch:
        submit(job, "Adaptive job")


def submit(job, label: str) -> None:
    """Queue `job`, start a worker if none runs, and say which happened (or why the job was refused)."""
    try:
        job_id = queue.submit(job)
        started = ensure_worker(queue)
    except MergelabError as exc:
        st.error(str(exc))
        return
    st.success(f"{label} {job_id} queued" + (" and a worker started." if started else "; the running worker will pick it up."))


sweep_form()


@st.cache_data(ttl=5, show_spinner=False)
def interval_history(job_json: str, rows: int):
    """The interval of an adaptive job after each batch, from the cache (refreshed as rows land)."""
    from mergelab.analysis.adaptive_sweep import interval_history as history

    return history(SweepJob.from_json(job_json))


def adaptive_chart(job) -> None:
    """The adaptive job's interval shrinking as merges land, against the target half-width."""
    try:
        frame = interval_history(job.spec.to_json(), job.rows)
    except MergelabError as exc:
        st.caption(f"no interval to show: {exc}")
        return
    if frame.empty:
        st.caption("The interval appears once the first design is merged.")
        return
    frame = frame.assign(half_width=(frame["hi"] - frame["lo"]) / 2)
    st.line_chart(frame, x="merges", y=["half_width", "threshold"], color=None, height=180)
    last = frame.groupby("curve").tail(1)
    st.caption(" · ".join(f"{r.curve}: {r.estimate:.4g} [{r.lo:.4g}, {r.hi:.4g}] after {r.merges} merges"
                          for r in last.itertuples()))


@st.fragment(run_every=1.0)
def job_panel():
    st.subheader("Jobs")
    try:
        jobs_section()
    except MergelabError as exc:  # the queue file broke after the page loaded
        st.error(str(exc))


def jobs_section():
    reap_orphans(queue)  # a job whose worker died shows as failed, with Resume, instead of running forever
    recent = queue.list(limit=10)
    if not recent:
        st.caption("No jobs yet.")
        return
    for job in recent:
        with st.container(border=True):
            head, buttons = st.columns([5, 1])
            head.markdown(f"**Job {job.id}** · {job.status} · {job.spec.label}")
            head.progress(min(job.fraction, 1.0), text=f"{job.done:,} / {job.total:,} merges · {job.rows:,} rows written · "
                                                       f"ETA {ui.duration_text(job.eta_seconds)} · {job.current or ''}")
            if job.message:
                (head.error if job.status == "failed" else head.caption)(job.message)
            if job.spec.adaptive:
                with head.expander(f"Adaptive: {job.spec.adaptive} — the interval as merges land"):
                    adaptive_chart(job)
            if job.not_cached and job.status != "failed":
                head.warning(f"{job.not_cached:,} merge(s) not cached: weights or loss not finite (the first reasons "
                             f"are in the job's message once it ends); every other merge's rows are kept")
            if job.status in ("queued", "running") and buttons.button("Cancel", key=f"cancel-{job.id}"):
                queue.cancel(job.id)
            if job.status in ("cancelled", "failed") and buttons.button("Resume", key=f"resume-{job.id}"):
                queue.resume(job.id)
                ensure_worker(queue)


job_panel()
