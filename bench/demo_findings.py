"""The paper's findings (arXiv 2509.24244) side by side with what the shipped demo results show,
computed with mergelab's own analysis functions, printed as markdown.

    OMP_NUM_THREADS=1 python bench/demo_findings.py [--parquet data/demo/results.parquet]

Every number comes from the rows in the parquet file (the results cache's columns); nothing is
tuned or edited here. A finding "holds" only when the stated test passes at every size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_regime import regime_table  # noqa: E402

from mergelab.analysis.fit import FitError, fit_curves  # noqa: E402
from mergelab.analysis.heldout import compare_forms, forecast_errors, leave_one_size_out  # noqa: E402
from mergelab.analysis.planning import k_at_fraction  # noqa: E402
from mergelab.analysis.synergy import block_means, synergy_matrix  # noqa: E402
from mergelab.analysis.tables import curve_means, fit_table, joint_table, merge_losses  # noqa: E402
from mergelab.analysis.variance import fit_variance, subset_variance  # noqa: E402
from mergelab.demo.domains import BLOCKS, DOMAINS  # noqa: E402
from mergelab.demo.up import shipped_results_path  # noqa: E402
from mergelab.names import MACRO  # noqa: E402

AVERAGE = "average"
TIES_HALF = "ties λ=0.5"
PAPER_METHODS = ("average", "task_arithmetic", "ties λ=1", "dare")  # the paper's four, TIES at its default λ


def setting(method: str, hparams: str) -> str:
    """A readable name for a (method, hyperparameters) curve; the two TIES settings differ by λ."""
    if method == "ties":
        return f"ties λ={json.loads(hparams)['lambda']:g}"
    return method


def yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


def fmt(values, digits: int = 3) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


class Findings:
    def __init__(self, rows: pd.DataFrame):
        self.rows = rows
        self.sizes = list(rows.groupby("size")["n_params"].first().sort_values().index)
        self.n_params = rows.groupby("size")["n_params"].first()
        self.M = int(rows.loc[~rows["method"].isin(["base", "expert"]), "k"].max())
        self.wide = curve_means(rows)
        self.wide["setting"] = [setting(m, h) for m, h in zip(self.wide.index.get_level_values("method"),
                                                                self.wide.index.get_level_values("hparams"))]
        self.settings = sorted(self.wide["setting"].unique(), key=lambda s: (s != AVERAGE, s))
        self.fits = fit_table(rows, wide=self.wide.drop(columns="setting"))
        self.fits["setting"] = [setting(m, h) for m, h in zip(self.fits["method"], self.fits["hparams"])]

    def curve(self, size: str, name: str, domain: str = MACRO) -> pd.Series:
        """Per-k mean loss of one curve."""
        w = self.wide.reset_index()
        row = w[(w["size"] == size) & (w["setting"] == name) & (w["domain"] == domain)]
        return row[list(range(1, self.M + 1))].iloc[0].astype(float)

    def merges(self, size: str, name: str, domain: str = MACRO) -> pd.DataFrame:
        m = merge_losses(self.rows[self.rows["size"] == size], domain)
        m = m[[setting(a, b) == name for a, b in zip(m["method"], m["hparams"])]]
        return m

    def base_macro(self, size: str) -> float:
        r = self.rows
        return float(r[(r["size"] == size) & (r["method"] == "base")]["loss"].mean())

    # -- the findings ----------------------------------------------------------------------

    def floor_vs_size(self) -> dict:
        """Fitted L∞ per domain falls with size (strictly, size after size), and the joint law's β."""
        out = {}
        for name in self.settings:
            f = self.fits[(self.fits["setting"] == name)]
            per_domain = f.pivot_table(index="domain", columns="size", values="L_inf").reindex(columns=self.sizes)
            falls = (per_domain.diff(axis=1).iloc[:, 1:] < 0).all(axis=1)
            pairs = (per_domain.diff(axis=1).iloc[:, 1:] < 0).to_numpy().mean()
            kM = pd.DataFrame({s: [self.curve(s, name, d).iloc[-1] for d in per_domain.index] for s in self.sizes},
                              index=per_domain.index)
            kM_falls = (kM.diff(axis=1).iloc[:, 1:] < 0).all(axis=1)
            steps = per_domain.diff(axis=1).iloc[:, 1:].drop(MACRO)
            failed = {f"{a}→{b}": list(steps.index[steps[b] >= 0]) for a, b in zip(self.sizes, self.sizes[1:])}
            out[name] = {"domains_falling": int(falls.drop(MACRO).sum()), "macro_falls": bool(falls[MACRO]),
                         "failed_steps": {k: v for k, v in failed.items() if v},
                         "pair_fraction": float(pairs), "kM_domains_falling": int(kM_falls.drop(MACRO).sum()),
                         "macro_floor": per_domain.loc[MACRO].to_numpy(), "not_falling": list(falls.drop(MACRO)[~falls.drop(MACRO)].index)}
        joint = joint_table(self.rows)
        joint["setting"] = [setting(m, h) for m, h in zip(joint["method"], joint["hparams"])]
        for name in self.settings:
            j = joint[(joint["setting"] == name) & (joint["domain"] != MACRO)]
            out[name]["beta"] = j["beta"].to_numpy(dtype=float)
            out[name]["beta_macro"] = float(joint[(joint["setting"] == name) & (joint["domain"] == MACRO)]["beta"].iloc[0])
        return out

    def leave_one_size_out(self) -> pd.DataFrame:
        """The joint law fitted on all sizes but the largest, predicting the largest's macro per-k means."""
        rows = []
        for name in self.settings:
            m = pd.concat([self.merges(s, name) for s in self.sizes])
            try:
                out = leave_one_size_out(m["n_params"] / 1e9, m["k"], m["loss"]).table
                rows.append({"setting": name, "rmse": float(np.sqrt(np.mean(out["error"] ** 2))),
                             "max_abs": float(out["error"].abs().max()), "observed_kM": float(out["observed"].iloc[-1])})
            except FitError as exc:
                rows.append({"setting": name, "rmse": np.nan, "max_abs": np.nan, "observed_kM": np.nan, "note": str(exc)})
        return pd.DataFrame(rows)

    def forecasts(self) -> pd.DataFrame:
        """The 3-point forecast (from the per-k means at k = 1, 2, 4) of every curve at k = M: error
        relative to the curve's drop L(1) − L(M) and to L(M)."""
        rows = []
        for s in self.sizes:
            for name in self.settings:
                for domain in (MACRO, *DOMAINS):
                    m = self.merges(s, name, domain)
                    last = forecast_errors(m["k"], m["loss"]).table.iloc[-1]
                    rows.append({"setting": name, "domain": domain, "rel_drop": abs(last["error_rel_drop"]),
                                 "rel_loss": abs(last["error_rel_loss"])})
        return pd.DataFrame(rows)

    def k90(self) -> pd.DataFrame:
        rows = []
        for s in self.sizes:
            for name in self.settings:
                c = self.curve(s, name)
                try:
                    fit = fit_curves(np.array(c.index, dtype=float), c.to_numpy()[None])[0]
                    rows.append({"size": s, "setting": name, "k90": k_at_fraction(fit, 0.9, self.M).value, "b": fit.b})
                except FitError:
                    rows.append({"size": s, "setting": name, "k90": np.nan, "b": np.nan})
        return pd.DataFrame(rows)

    def forms(self) -> pd.DataFrame:
        """compare_forms on every curve: the 1/(k+b) form's ΔAICc from the best form."""
        rows = []
        for s in self.sizes:
            for name in self.settings:
                for domain in [MACRO, *DOMAINS]:
                    m = self.merges(s, name, domain)
                    table = compare_forms(m["k"], m["loss"])
                    ft = table[table["form"] == "floor_tail"].iloc[0]
                    rows.append({"size": s, "setting": name, "domain": domain, "delta_aicc": ft["delta_aicc"],
                                 "r2": ft["r2"], "best": table["form"].iloc[0]})
        return pd.DataFrame(rows)

    def variance(self) -> pd.DataFrame:
        rows = []
        for s in self.sizes:
            for name in self.settings:
                m = self.merges(s, name)
                v = subset_variance(m["k"], m["loss"]).set_index("k")["var"]
                inner = v.loc[1:self.M - 1]
                laws = fit_variance(v.index.to_numpy(dtype=float), v.to_numpy(), self.M)
                rows.append({"size": s, "setting": name, "monotone": bool((inner.diff().dropna() < 0).all()),
                             "r2_1": v[2] / v[1], "r4_1": v[4] / v[1],
                             "best_law": "finite_pool" if laws["best"] is laws["finite_pool"] else "plain"})
        return pd.DataFrame(rows)

    def ties_vs_average(self) -> pd.DataFrame:
        rows = []
        for s in self.sizes:
            avg, one = self.curve(s, AVERAGE), self.curve(s, "ties λ=1")
            half = self.curve(s, TIES_HALF) if TIES_HALF in self.settings else avg * np.nan
            rows.append({"size": s, "avg_kM": avg.iloc[-1], "ties05_kM": half.iloc[-1], "ties1_kM": one.iloc[-1],
                         "ties05_minus_avg_kM": half.iloc[-1] - avg.iloc[-1],
                         "ties05_minus_avg_mean": (half - avg).mean(),
                         "ties1_rises": bool(one.iloc[-1] > one.iloc[0]), "ties05_rises": bool(half.iloc[-1] > half.iloc[0])})
        return pd.DataFrame(rows)

    def spread(self, names) -> pd.DataFrame:
        rows = []
        for s in self.sizes:
            curves = pd.DataFrame({n: self.curve(s, n) for n in names})
            spread = (curves.max(axis=1) - curves.min(axis=1)) / curves.min(axis=1)
            rows.append({"size": s, "spread_k1": spread.iloc[0], "spread_kM": spread.iloc[-1],
                         "best_kM": curves.iloc[-1].idxmin(), "worst_kM": curves.iloc[-1].idxmax()})
        return pd.DataFrame(rows)

    def synergy(self, name: str = AVERAGE) -> pd.DataFrame:
        rows = []
        for s in self.sizes:
            r = self.rows
            group = r[(r["size"] == s) & ~r["method"].isin(["base", "expert"])]
            group = group[[setting(a, b) == name for a, b in zip(group["method"], group["hparams"])]]
            matrix = synergy_matrix(group)
            blocks = block_means(matrix, BLOCKS)
            own = float(np.nanmean(np.diag(matrix.reindex(index=list(DOMAINS), columns=list(DOMAINS)).to_numpy())))
            cross = [blocks.loc[a, b] for a in blocks.index for b in blocks.columns if a != b]
            mm, ss = blocks.loc["math", "math"], blocks.loc["science", "science"]
            ranked = sorted(((blocks.loc[a, b], f"{a}→{b}") for a in blocks.index for b in blocks.columns
                             if np.isfinite(blocks.loc[a, b])), reverse=True)
            rows.append({"size": s, "own": own, "math_math": mm, "sci_sci": ss, "max_cross": np.nanmax(cross),
                         "strongest": ranked[0][1], "second": ranked[1][1],
                         "holds": bool(min(mm, ss) > np.nanmax(cross))})
        return pd.DataFrame(rows)


def report(rows: pd.DataFrame) -> str:
    f = Findings(rows)
    sizes = f.sizes
    size_list = ", ".join(f"{s} {f.n_params[s]:,}" for s in sizes)
    lines = [f"Sizes: {size_list} parameters; M = {f.M} experts; settings: {', '.join(f.settings)}.", ""]

    regime = regime_table(rows.set_index("size").loc[sizes].reset_index(), [1, f.M])
    reg = regime[regime["method"] == AVERAGE].set_index("size").loc[sizes]

    floor = f.floor_vs_size()
    k90 = f.k90()
    forms = f.forms()
    var = f.variance()
    ties = f.ties_vs_average()
    spread4 = f.spread([n for n in PAPER_METHODS if n in f.settings])
    spread5 = f.spread(f.settings)
    syn = f.synergy()

    fa = floor[AVERAGE]
    all_settings_falling = {n: floor[n]["domains_falling"] for n in f.settings}
    betas = np.concatenate([floor[n]["beta"] for n in f.settings if n != TIES_HALF])
    k90_avg = k90[k90["setting"] == AVERAGE]["k90"]
    ft_ok = (forms["delta_aicc"] <= 2)
    n_forms = len(forms)
    mono = var["monotone"]
    finite = (var["best_law"] == "finite_pool")
    merged_beats = (reg["k9-base"] < 0) if f.M == 9 else (reg[f"k{f.M}-base"] < 0)
    kM = f"k{f.M}"

    linear = ~var["setting"].str.startswith("ties")
    ft_lin = forms[~forms["setting"].str.startswith("ties")]
    failed = "; ".join(f"{step}: {', '.join(ds)}" for step, ds in fa["failed_steps"].items()) or "none"
    best_kM = spread5["best_kM"].value_counts()
    table = [
        "| paper finding | paper's number | demo's number | holds? |",
        "|---|---|---|---|",
        "| merging beats the base on macro CE (the regime the theory assumes) | merged experts improve on the base "
        f"| average at k = {f.M} − base, per size: {fmt(reg[kM + '-base'], 4)} nats (base {fmt(reg['base_macro'])}) "
        f"| {yes(bool(merged_beats.all()))} |",
        "| floor L∞ falls with size, in every domain | Tables 3–5: every domain, β ∈ 0.27–0.54 "
        f"| macro L∞ (average) {fmt(fa['macro_floor'])}; per domain, fitted L∞ falls at every size step in "
        f"{fa['domains_falling']}/9 domains for average ({', '.join(f'{n} {c}/9' for n, c in all_settings_falling.items() if n != AVERAGE)}); "
        f"steps where it does not (average): {failed}; the k = {f.M} merge falls at every step in {fa['kM_domains_falling']}/9 domains; "
        f"joint-law β (average) {np.nanmin(fa['beta']):.2f}–{np.nanmax(fa['beta']):.2f} per domain, macro {fa['beta_macro']:.2f} "
        f"| macro {yes(fa['macro_falls'])}; every domain {yes(fa['domains_falling'] == 9)} |",
        "| most of the gain comes early (k90) | k90 ≈ 5–6 "
        f"| k90 of the macro average curve per size: {fmt(k90_avg, 1)}; all settings {np.nanmin(k90['k90']):.1f}–"
        f"{np.nanmax(k90['k90']):.1f}. Fitted b (average) {fmt(k90[k90['setting'] == AVERAGE]['b'], 2)}: with b = 0, "
        f"k90 = 5 at M = 9 follows from the form, whatever the experts | yes (by the form) |",
        "| L∞ + A/(k+b) describes the curves | the law fits every curve (R² 0.975–0.997, Tables 3–5) "
        f"| R² (k-weighted) of 1/(k+b) ≥ 0.975 on {int((forms['r2'] >= 0.975).sum())}/{n_forms} curves "
        f"({int((ft_lin['r2'] >= 0.975).sum())}/{len(ft_lin)} average/TA/DARE), median {forms['r2'].median():.4f}, "
        f"min {ft_lin['r2'].min():.3f} on average/TA/DARE, {forms['r2'].min():.3f} with TIES; "
        f"within ΔAICc ≤ 2 of the best form on {int(ft_ok.sum())}/{n_forms} curves "
        f"(macro {int(ft_ok[forms['domain'] == MACRO].sum())}/{int((forms['domain'] == MACRO).sum())}), best on "
        f"{int((forms['best'] == 'floor_tail').sum())}; most often best: {forms['best'].value_counts().idxmax()} "
        f"| R² ≥ 0.975 {yes(bool((forms['r2'] >= 0.975).all()))}; ΔAICc ≤ 2 {yes(ft_ok.mean() >= 0.9)} |",
        "| variance across subsets shrinks with k | Θ(1/k) (Tables 6, 8, 10) "
        f"| macro variance falls at every k = 1→{f.M - 1} on {int(mono[linear].sum())}/{int(linear.sum())} average/TA/DARE "
        f"curves and {int(mono[~linear].sum())}/{int((~linear).sum())} TIES curves (TIES: rises to k ≈ 3–4, then falls); "
        f"average/TA/DARE var(2)/var(1) median {var[linear]['r2_1'].median():.2f}, var(4)/var(1) {var[linear]['r4_1'].median():.2f} "
        f"(finite-pool 1/k: 0.44, 0.16); finite-pool law preferred by AICc on {int(finite.sum())}/{len(var)} "
        f"| average/TA/DARE {yes(bool(mono[linear].all()))}; TIES {yes(bool(mono[~linear].all()))} |",
        "| TIES (λ = 0.5) ahead of Average | TIES λ = 0.5 below Average "
        f"| TIES λ=0.5 − average at k = {f.M}, per size: {fmt(ties['ties05_minus_avg_kM'], 4)}; mean over k = 1…{f.M}: "
        f"{fmt(ties['ties05_minus_avg_mean'], 4)}; TIES λ=1 rises with k at {int(ties['ties1_rises'].sum())}/{len(sizes)} sizes "
        f"| at k = {f.M} {yes(bool((ties['ties05_minus_avg_kM'] < 0).all()))}; over k {yes(bool((ties['ties05_minus_avg_mean'] < 0).all()))} |",
        "| method spread narrows with k | ≲ 2% at k = 9 "
        f"| (max − min)/min over average, TA, TIES λ=1, DARE, per size: k = 1 {fmt(100 * spread4['spread_k1'], 1)}% → "
        f"k = {f.M} {fmt(100 * spread4['spread_kM'], 1)}% (with TIES λ=0.5 too: k = {f.M} {fmt(100 * spread5['spread_kM'], 1)}%); "
        f"lowest at k = {f.M}: {', '.join(f'{n} at {c}' for n, c in best_kM.items())} of {len(sizes)} sizes "
        f"| {yes(bool(((spread4['spread_kM'] < spread4['spread_k1']) & (spread4['spread_kM'] <= 0.02)).all()))} |",
        "| math–math and science–science are the strongest synergy blocks | the two diagonal blocks lead "
        f"| average, mean CE drop (nats) when a donor joins, per size: math→math {fmt(syn['math_math'], 4)}; science→science "
        f"{fmt(syn['sci_sci'], 4)}; strongest cross-block {fmt(syn['max_cross'], 4)} (own expert joining: {fmt(syn['own'], 4)}); "
        f"both diagonal blocks lead at {int(syn['holds'].sum())}/{len(sizes)} sizes | {yes(bool(syn['holds'].all()))} |",
    ]
    lines += table
    lines += ["", "Per size (average unless stated; nats; gain < 0 is better than the base):", "",
              "| size | parameters | base macro | expert own-domain gain (mean, worst) | experts improving own | "
              "off-domain forgetting (mean, max) | average k = 1 | average k = M | TIES λ=0.5 k = M | method spread k = 1 → M |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for s in sizes:
        r = reg.loc[s]
        t = ties.set_index("size").loc[s]
        sp = spread5.set_index("size").loc[s]
        lines.append(f"| {s} | {f.n_params[s]:,} | {r['base_macro']:.4f} | {r['own_gain_mean']:+.4f}, {r['own_gain_worst']:+.4f} "
                     f"| {int(r['n_experts_improving_own'])}/9 | {r['forget_mean']:+.4f} ({100 * r['forget_rel']:.1f}% of base), "
                     f"{r['forget_max']:+.4f} | {r['k1']:.4f} | {r[kM]:.4f} | {t['ties05_kM']:.4f} "
                     f"| {100 * sp['spread_k1']:.1f}% → {100 * sp['spread_kM']:.1f}% |")
    loso = f.leave_one_size_out()
    notes = set(loso["note"].dropna()) if "note" in loso else set()
    if len(notes) == 1 and loso["rmse"].isna().all():  # one reason for every setting: say it once
        result = f"refused for every setting ({notes.pop()})"
    else:
        result = "; ".join(f"{r.setting} RMSE {r.rmse:.4f} (max {r.max_abs:.4f}) nats" if r.rmse == r.rmse
                           else f"{r.setting}: refused ({r.note})" for r in loso.itertuples())
    lines += ["", f"Leave-one-size-out (the joint law fitted on {', '.join(sizes[:-1])}, predicting {sizes[-1]}'s macro "
              f"per-k means): {result}."]
    fc = f.forecasts()
    ties = fc["setting"].str.startswith("ties")
    lines += ["", "3-point forecast (the law through the per-k means at k = 1, 2, 4, predicting k = M): median |error| at "
              f"k = M over all {len(fc)} curves {fc['rel_drop'].median():.1%} of the curve's drop L(1) − L(M) "
              f"({fc['rel_loss'].median():.2%} of L(M)); macro curves {fc[fc['domain'] == MACRO]['rel_drop'].median():.1%}; "
              f"average, TA, DARE {fc[~ties]['rel_drop'].median():.1%}; TIES {fc[ties]['rel_drop'].median():.1%} "
              f"(90th percentile {fc[ties]['rel_drop'].quantile(0.9):.0%})."]
    lines += ["", "Fitted macro L∞ per size and setting:", "",
              "| setting | " + " | ".join(sizes) + " |", "|---|" + "---|" * len(sizes)]
    for n in f.settings:
        lines.append(f"| {n} | " + " | ".join(f"{v:.4f}" for v in floor[n]["macro_floor"]) + " |")
    not_falling = {n: floor[n]["not_falling"] for n in f.settings if floor[n]["not_falling"]}
    if not_falling:
        lines += ["", "Domains whose fitted L∞ does not fall at every size step: "
                  + "; ".join(f"{n}: {', '.join(d)}" for n, d in not_falling.items()) + "."]
    lines += ["", "Best form by AICc, count of curves per setting:", ""]
    counts = forms.groupby(["setting", "best"]).size().unstack(fill_value=0)
    lines += ["| setting | " + " | ".join(counts.columns) + " |", "|---|" + "---|" * len(counts.columns)]
    lines += [f"| {n} | " + " | ".join(str(v) for v in row) + " |" for n, row in counts.iterrows()]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parquet", type=Path, default=shipped_results_path())
    args = parser.parse_args(argv)
    print(report(pd.read_parquet(args.parquet)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
