"""Tables a paper can use: the compact fits table (`paper_table`) and LaTeX for every exportable table
(`latex`). LaTeX output has booktabs rules, 3–4 significant digits, symbols and minus signs in math mode,
every name escaped, only ASCII characters, and the units and the interval method in the caption. The full
tables (every column, lists as JSON) stay in CSV, JSON and Parquet (mergelab.export)."""

from __future__ import annotations

import json
import math
import unicodedata

import numpy as np
import pandas as pd

from mergelab.names import MACRO, params_label

PAPER_DRAWS = 200  # expert-bootstrap draws behind the paper table's intervals unless told otherwise
PAPER_COLUMNS = ["family", "domain", "method", "setting", "hparams", "size", "n_params",
                 "L_inf", "L_inf_lo", "L_inf_hi", "A", "A_lo", "A_hi", "b", "b_lo", "b_hi", "at_bound",
                 "r2", "heldout_rmse", "heldout_points", "n_subsets", "k_max", "n_bootstrap", "note"]
UNITS = {  # carried in every export's provenance (CSV/JSON/Parquet) and said in LaTeX captions
    "loss, L_inf, A, L_star, B, A0, synergy, lo, hi, value of a loss, heldout_rmse, error": "nats per token (cross-entropy)",
    "n_params": "parameters (count)",
    "N in the joint law (L_star + B*N^-beta + A0*N^-gamma/(k+b))": "billions of parameters",
    "k, k80, k90, k_eps, stop, M": "experts",
    "b, beta, gamma, r2": "dimensionless",
}


def si_params(n) -> str:
    """A parameter count as mergelab.names.params_label writes it (7376 -> '7.38K', 1.5e9 -> '1.5B'); ''
    for a missing count, so an empty cell stays empty."""
    if n is None or (isinstance(n, float) and not math.isfinite(n)):
        return ""
    return params_label(n)


# -- the compact fits table -------------------------------------------------------------------------------

def paper_table(results: pd.DataFrame, *, domain: str = MACRO, weights: str = "k", n_boot: int = PAPER_DRAWS,
                seed: int = 0) -> pd.DataFrame:
    """One row per curve (family, method setting, size) on `domain` (default the cross-domain macro
    mean): L∞, A, b with their 95% expert-bootstrap intervals (`*_lo`, `*_hi`; n_boot draws, 0 for
    none), the k-weighted R², and the held-out error of the 3-point forecast (`heldout_rmse`: RMS of
    predicted − observed per-k means over every measured k other than 1, 2, 4, in nats per token, with
    `heldout_points` such k; NaN and a note when k = 1, 2, 4 are not all measured or no other k is).
    Losses in nats per token, n_params a parameter count. `results`: ResultStore.results() rows.
    Raises MergelabError when no curve can be formed."""
    from mergelab.analysis.fit import FitError
    from mergelab.analysis.heldout import forecast_errors
    from mergelab.analysis.tables import fit_table, subset_lookup
    from mergelab.errors import MergelabError

    try:
        fits = fit_table(results, domains=[domain], weights=weights, n_boot=n_boot, seed=seed)
    except (FitError, KeyError, ValueError) as exc:
        raise MergelabError(f"no curve to tabulate on domain {domain!r}: {exc}") from exc
    subsets_of = subset_lookup(results)
    rows = []
    for _, fit in fits.iterrows():
        row = {c: fit.get(c) for c in PAPER_COLUMNS if c in fit.index}
        for name in ("L_inf", "A", "b"):
            ci = fit.get(f"ci_{name}")
            row[f"{name}_lo"], row[f"{name}_hi"] = (ci[0], ci[1]) if isinstance(ci, (list, tuple)) else (np.nan, np.nan)
        bound = fit.get("at_bound")
        row["at_bound"] = ",".join(bound) if isinstance(bound, (list, tuple)) else ""
        notes = [str(n) for n in (fit.get("notes") if isinstance(fit.get("notes"), list) else [])]
        row["heldout_rmse"], row["heldout_points"] = np.nan, 0
        if pd.notna(fit.get("L_inf")):
            merges = subsets_of(fit.to_dict())
            try:
                table = forecast_errors(merges["k"], merges["loss"]).table
                held = table[table["held_out"]]
                if len(held):
                    row["heldout_rmse"] = float(np.sqrt(np.mean(held["error"] ** 2)))
                    row["heldout_points"] = len(held)
                else:
                    notes.append("no held-out error: no k beyond 1, 2, 4 measured")
            except FitError as exc:
                notes.append(f"no held-out error: {exc}")
        n_draws = fit.get("n_bootstrap")
        row["n_bootstrap"] = int(n_draws) if pd.notna(n_draws) else 0
        row["note"] = "; ".join(notes)
        rows.append(row)
    out = pd.DataFrame(rows, columns=PAPER_COLUMNS)
    out["heldout_points"] = out["heldout_points"].astype(int)
    return out


# -- LaTeX ------------------------------------------------------------------------------------------------

_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
            "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}",
            ">": r"\textgreater{}", "|": r"\textbar{}"}
_SYMBOLS = {"∞": r"$\infty$", "β": r"$\beta$", "γ": r"$\gamma$", "ε": r"$\varepsilon$", "α": r"$\alpha$",
            "λ": r"$\lambda$", "−": r"$-$", "–": "--", "—": "---", "·": r"$\cdot$", "×": r"$\times$",
            "≤": r"$\le$", "≥": r"$\ge$", "→": r"$\to$", "±": r"$\pm$", "²": r"$^2$", "∝": r"$\propto$",
            "…": r"\dots{}", "‘": "`", "’": "'", "“": "``", "”": "''", "\u00a0": "~", "ß": r"\ss{}",
            "ø": r"\o{}", "Ø": r"\O{}", "æ": r"\ae{}", "Æ": r"\AE{}", "ł": r"\l{}", "Ł": r"\L{}"}
_ACCENTS = {"\u0301": "'", "\u0300": "`", "\u0302": "^", "\u0308": '"', "\u0303": "~", "\u0327": "c",
            "\u030c": "v", "\u0306": "u", "\u0304": "=", "\u030a": "r", "\u0328": "k", "\u030b": "H"}


def escape(text) -> str:
    """`text` as LaTeX text mode in plain ASCII: the special characters `\\ & % $ # _ { } ~ ^ < > |`
    escaped, known symbols (∞, β, −, ·, …) in math mode, accented Latin letters as accent commands
    (é -> \\'{e}), control characters dropped and any other character written as its code point
    (\\texttt{U+65E5}), so pdflatex compiles it with no extra package."""
    out = []
    for ch in str(text):
        if ch in _SPECIAL:
            out.append(_SPECIAL[ch])
        elif " " <= ch <= "~":
            out.append(ch)
        elif ch in _SYMBOLS:
            out.append(_SYMBOLS[ch])
        elif unicodedata.category(ch).startswith("C") or ch in "\n\r\t":
            out.append(" " if ch in "\n\r\t" else "")
        else:
            base, *marks = unicodedata.normalize("NFD", ch)
            if " " < base <= "~" and marks and all(m in _ACCENTS for m in marks):
                letter = {"i": r"\i", "j": r"\j"}.get(base, base)
                for mark in marks:
                    letter = f"\\{_ACCENTS[mark]}{{{letter}}}"
                out.append(letter)
            else:
                out.append(rf"\texttt{{U+{ord(ch):04X}}}")
    return "".join(out)


def number(value, digits: int = 4) -> str:
    """`value` in math mode with `digits` significant digits (a proper minus sign, powers of ten as
    $1.2\\times10^{-5}$), or '--' for a missing or non-finite value."""
    return f"${_math(value, digits)}$" if _finite(value) else "--"


def _finite(value) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _math(value, digits: int) -> str:
    value = float(value)
    if value.is_integer() and abs(value) < 1e6:  # counts (k, M, pairs) and round numbers: no exponent
        return str(int(value))
    text = f"{value:.{digits}g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        return ("" if mantissa == "1" else mantissa + r"\times ") + f"10^{{{int(exponent)}}}"
    return text


def _kept(value, digits: int) -> str:
    """`value` with `digits` significant digits, trailing zeros kept, in math mode (R² = 0.99998 reads
    '1.000', not '1'), or '--'."""
    return f"${float(value):#.{digits}g}$" if _finite(value) else "--"


def _scale(values) -> int:
    """The power of ten (a multiple of 3, at most 0) that brings a column's largest value to 1–1000, so a
    column of small errors reads '2.17' with '10^{-4}' in the header rather than mixing 0.000217 and 9.12e-5."""
    finite = pd.to_numeric(pd.Series(values), errors="coerce").abs()
    finite = finite[np.isfinite(finite) & (finite > 0)]
    if finite.empty:
        return 0
    return min(0, int(math.floor(math.log10(finite.max()) / 3) * 3))


def _with_interval(value, lo, hi, digits: int = 4, mark: bool = False) -> str:
    """'$v\\;[lo,\\,hi]$' (the interval left out when it is missing); a dagger when `mark`."""
    if not _finite(value):
        return "--"
    text = _math(value, digits)
    if mark:  # braced: 1.4\times 10^{3} takes the dagger without a double superscript
        text = f"{{{text}}}^{{\\dagger}}"
    interval = rf"\;[{_math(lo, digits)},\,{_math(hi, digits)}]" if _finite(lo) and _finite(hi) else ""
    return f"${text}{interval}$"


def _tabular(header: list[str], rows: list[list[str]], align: str, caption: str, label: str,
             breaks: list[int] = ()) -> str:
    """A booktabs table: `header` and `rows` are LaTeX already; a \\midrule before each row index in `breaks`."""
    lines = [r"\begin{table}[tbp]", r"\centering", r"\small", r"\setlength{\tabcolsep}{4pt}", rf"\caption{{{caption}}}", rf"\label{{{label}}}",
             rf"\begin{{tabular}}{{{align}}}", r"\toprule", " & ".join(header) + r" \\", r"\midrule"]
    for i, row in enumerate(rows):
        if i in breaks:
            lines.append(r"\midrule")
        lines.append(" & ".join(row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def _groups(frame: pd.DataFrame, keys: list[str]) -> tuple[list[str], list[int]]:
    """The keys that vary in `frame` (shown as columns) and the row indices where a new group starts."""
    varying = [k for k in keys if k in frame and frame[k].nunique() > 1]
    if not varying or frame.empty:
        return varying, []
    labels = frame[varying].astype(str).agg("\x1f".join, axis=1).tolist()
    return varying, [i for i in range(1, len(labels)) if labels[i] != labels[i - 1]]


def _context(frame: pd.DataFrame, keys=("family", "domain")) -> str:
    """'demo-standard, cross-domain mean (macro)': the family and domain when there is one of each."""
    parts = []
    for key in keys:
        if key in frame and frame[key].nunique() == 1:
            value = frame[key].iloc[0]
            parts.append("cross-domain mean (macro)" if key == "domain" and value == MACRO else
                         (f"domain {escape(value)}" if key == "domain" else escape(value)))
    return ", ".join(parts)


def _draws(frame: pd.DataFrame, column: str = "n_bootstrap") -> int:
    values = pd.to_numeric(frame[column], errors="coerce") if column in frame else pd.Series(dtype=float)
    return int(values.max()) if values.notna().any() else 0


_HEADERS = {"family": "Family", "domain": "Domain"}


def _paper_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """A full fits table (mergelab.analysis.tables.fit_table: intervals as ci_* pairs, at_bound a list) in
    the paper table's columns; a paper_table passes through."""
    if "L_inf_lo" in frame or "L_inf" not in frame:
        return frame
    out = frame.copy()
    for name in ("L_inf", "A", "b"):
        ci = out[f"ci_{name}"] if f"ci_{name}" in out else pd.Series([None] * len(out), index=out.index)
        out[f"{name}_lo"] = [c[0] if isinstance(c, (list, tuple)) else np.nan for c in ci]
        out[f"{name}_hi"] = [c[1] if isinstance(c, (list, tuple)) else np.nan for c in ci]
    if "at_bound" in out:
        out["at_bound"] = [",".join(v) if isinstance(v, (list, tuple)) else "" for v in out["at_bound"]]
    return out


def _metric_words(frame: pd.DataFrame) -> tuple[bool, str]:
    """(whether the table's metric is higher-is-better, its name and unit for a caption); CE by default."""
    if "metric" not in frame or frame.empty or set(frame["metric"].dropna()) <= {"ce"}:
        return False, "cross-entropy in nats/token"
    names = sorted(set(frame["metric"].dropna()))
    units = sorted(set(frame["unit"].dropna())) if "unit" in frame else []
    higher = "direction" in frame and (frame["direction"] == "higher").all()
    return bool(higher), escape(", ".join(names)) + (f" in {escape(', '.join(u for u in units if u))}"
                                                     if any(units) else "")


def _paper(frame: pd.DataFrame, provenance: dict) -> str:
    frame = _paper_columns(frame)
    frame = frame.sort_values([c for c in ("family", "domain", "setting", "n_params") if c in frame], kind="stable")
    frame = frame.reset_index(drop=True)
    shown, breaks = _groups(frame, ["family", "domain"])
    has_heldout = "heldout_rmse" in frame
    ceiling, words = _metric_words(frame)
    header = [_HEADERS[k] for k in shown] + ["Method", "Size $N$", "$C$" if ceiling else r"$L_\infty$", "$A$", "$b$",
                                             "$R^2$"]
    scale = _scale(frame["heldout_rmse"]) if has_heldout else 0
    header += [f"Held-out error ($10^{{{scale}}}$)" if scale else "Held-out error"] if has_heldout else []
    rows, bound_marks = [], False
    for _, r in frame.iterrows():
        bound = r.get("at_bound") if isinstance(r.get("at_bound"), str) else ""
        bound_marks |= bool(bound)
        cells = [escape(r[k]) for k in shown] + [escape(r["setting"]), escape(si_params(r["n_params"]))]
        cells += [_with_interval(r[p], r.get(f"{p}_lo"), r.get(f"{p}_hi"), 4, p in bound.split(","))
                  for p in ("L_inf", "A")]
        cells += [_with_interval(r["b"], np.nan, np.nan, 3, "b" in bound.split(",")), _kept(r["r2"], 4)]
        cells += [number(r["heldout_rmse"] / 10.0 ** scale, 3)] if has_heldout else []
        rows.append(cells)
    draws, requested = _draws(frame), int(provenance.get("options", {}).get("bootstrap") or 0)
    missing = frame["L_inf"].notna() & ~(frame["L_inf_lo"].notna() if "L_inf_lo" in frame else False)
    if draws:
        intervals = (rf"Brackets: 95\% expert-bootstrap intervals ({draws} draws, each a new pool of experts "
                     "resampled from the measured ones)" +
                     ("; a value without brackets had too few merges for one." if missing.any() else "."))
    elif requested:  # asked for, none could be given: say why rather than 'off'
        why = sorted({n.split("no interval: ", 1)[1].split(";")[0] for n in frame.get("note", pd.Series(dtype=object))
                      .dropna().astype(str) if "no interval: " in n})
        intervals = ("No intervals: " + (escape(why[0]) if why else "the expert bootstrap gave none") + ".")
    else:
        intervals = r"No intervals (bootstrap off)."
    context = _context(frame)
    law = r"$y(k) = C - A/(k+b)$ (higher is better: $C$ is a ceiling)" if ceiling else r"$L(k) = L_\infty + A/(k+b)$"
    caption = (r"Merging-law fits " + law + (f" for {context}" if context else "") +
               (r". $C$, $A$: " if ceiling else r". $L_\infty$, $A$: ") + words +
               r"; $N$: parameter count; $k$: experts merged. "
               + intervals + r" $R^2$ weighted $\propto k$." +
               (r" Held-out error: RMS error (nats/token) of the 3-point forecast from $k = 1, 2, 4$ over the "
                r"other measured $k$; -- where none was measured." if has_heldout else "") +
               (r" $^{\dagger}$At its bound: not pinned down by the data." if bound_marks else "") +
               " Unfitted curves show --.")
    return _tabular(header, rows, "l" * (len(shown) + 2) + "r" * (len(header) - len(shown) - 2), caption,
                    "tab:mergelab-fits", breaks)


def _joint(frame: pd.DataFrame, provenance: dict) -> str:
    frame = frame.sort_values([c for c in ("family", "domain", "setting") if c in frame], kind="stable")
    frame = frame.reset_index(drop=True)
    shown, breaks = _groups(frame, ["family", "domain"])
    params = [("L_star", "$L^*$", 4), ("B", "$B$", 4), ("beta", r"$\beta$", 3), ("A0", "$A_0$", 4),
              ("gamma", r"$\gamma$", 3), ("b", "$b$", 3)]
    header = [_HEADERS[k] for k in shown] + ["Method"] + [h for _, h, _ in params] + ["$R^2$"]
    rows = [[escape(r[k]) for k in shown] + [escape(r["setting"])] +
            [number(r.get(p), d) for p, _, d in params] + [number(r.get("r2"), 4)] for _, r in frame.iterrows()]
    reasons = sorted({str(x) for x in frame.get("reason", pd.Series(dtype=object)).dropna() if str(x)})
    context = _context(frame)
    caption = (r"Joint law $L(N,k) = L^* + B N^{-\beta} + A_0 N^{-\gamma}/(k+b)$" +
               (f" for {context}" if context else "") +
               r". Cross-entropy in nats/token; $N$ in billions of parameters; $R^2$ weighted $\propto k$." +
               (" --: not identified by the data (" + escape("; ".join(reasons)) + ")." if reasons else ""))
    return _tabular(header, rows, "l" * (len(shown) + 1) + "r" * (len(params) + 1), caption, "tab:mergelab-joint",
                    breaks)


def _plan(frame: pd.DataFrame, provenance: dict) -> str:
    if "quantity" not in frame or frame.empty:
        return _generic(frame, provenance)
    keys = [c for c in ("family", "setting", "size", "n_params") if c in frame]
    frame = frame.sort_values([c for c in ("family", "setting", "n_params") if c in frame], kind="stable")
    ok = frame[frame["quantity"] != "fit"]
    quantities = list(dict.fromkeys(ok["quantity"]))
    shown, _ = _groups(frame, ["family"])
    header = ([_HEADERS[k] for k in shown] + ["Method", "Size $N$", "$M$"] +
              [_quantity_header(q) for q in quantities])
    rows, extrapolated = [], False
    for key, group in frame.groupby(keys, sort=False):
        info = dict(zip(keys, key))
        by_q = {r["quantity"]: r for _, r in group.iterrows()}
        M = next((r.get("M") for r in by_q.values() if _finite(r.get("M"))), None)
        cells = [escape(info[k]) for k in shown] + [escape(info["setting"]), escape(si_params(info.get("n_params"))),
                                                    number(M, 3)]
        for q in quantities:
            r = by_q.get(q)
            if r is None:
                cells.append("--")
                continue
            mark = bool(r.get("extrapolated")) and _finite(r.get("value"))
            extrapolated |= mark
            value = r.get("value")
            cells.append(r"$\infty$" if _finite_or_inf(value) == "inf" else
                         _with_interval(value, r.get("lo"), r.get("hi"), 3, mark))
        rows.append(cells)
    has_ci = "lo" in frame and pd.to_numeric(frame["lo"], errors="coerce").notna().any()
    draws = int(provenance.get("options", {}).get("bootstrap") or 0) if has_ci else 0
    caption = (r"Planning from the fitted law $L(k) = L_\infty + A/(k+b)$ per curve (cross-domain mean): $k_{80}$, "
               r"$k_{90}$ experts for 80\%, 90\% of the gain from $k=1$ to $M$ (the pool of experts); "
               r"$k_\varepsilon$ experts to come within $\varepsilon$ nats/token of the floor; stop: the first $k$ "
               r"where one more expert gains less than the tolerance (nats/token). $N$: parameter count. " +
               (rf"Brackets: 95\% expert-bootstrap intervals ({draws} draws). " if draws else "") +
               (r"$^{\dagger}$Extrapolated beyond the measured $k$ or the pool. " if extrapolated else "") +
               r"$\infty$: not reached; --: the curve does not fall (no floor).")
    return _tabular(header, rows, "l" * (len(shown) + 2) + "r" * (len(header) - len(shown) - 2), caption,
                    "tab:mergelab-plan")


def _finite_or_inf(value) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "nan"
    return "inf" if math.isinf(v) else ("nan" if math.isnan(v) else "finite")


def _quantity_header(name: str) -> str:
    if name.startswith("k_eps("):
        return rf"$k_\varepsilon$ ($\varepsilon={_math(float(name[6:-1]), 3)}$)"
    if name.startswith("stop(tol="):
        return rf"stop (tol.\ ${_math(float(name[9:-1]), 3)}$)"
    return {"k80": "$k_{80}$", "k90": "$k_{90}$"}.get(name, escape(name))


def _synergy(frame: pd.DataFrame, provenance: dict) -> str:
    shown, breaks = _groups(frame, ["family", "setting", "size"])
    header = [{"family": "Family", "setting": "Method", "size": "Size $N$"}[k] for k in shown]
    header += ["Donor", "Receiver", "$S$", "Pairs"]
    has_ci = "lo" in frame
    rows = []
    for _, r in frame.iterrows():
        cells = [escape(si_params(r["n_params"]) if k == "size" else r[k]) for k in shown]
        cells += [escape(r["donor"]), escape(r["receiver"]),
                  _with_interval(r["synergy"], r.get("lo") if has_ci else np.nan, r.get("hi") if has_ci else np.nan, 3),
                  number(r.get("n_pairs"), 6)]
        rows.append(cells)
    context = _context(frame, ("family", "setting", "size"))
    caption = (r"Synergy $S$: mean drop of the cross-entropy (nats/token) on the receiver's domain when the donor "
               r"expert joins a merge, over the pairs of merges that differ by it" +
               (f" ({context})" if context else "") + "." +
               (r" Brackets: 95\% intervals resampling the co-experts." if has_ci else "") + " --: no pair.")
    return _tabular(header, rows, "l" * (len(shown) + 2) + "rr", caption, "tab:mergelab-synergy", breaks)


def _results(frame: pd.DataFrame, provenance: dict) -> str:
    shown, breaks = _groups(frame, ["family", "size", "method", "hparams"])
    names = {"family": "Family", "size": "Size $N$", "method": "Method", "hparams": "Hyperparameters"}
    header = [names[k] for k in shown] + ["$k$", "Experts", "Domain", "CE"]
    rows = []
    for _, r in frame.iterrows():
        cells = [escape(si_params(r["n_params"]) if k == "size" else
                        (_hparams_text(r[k]) if k == "hparams" else r[k])) for k in shown]
        cells += [number(r["k"], 6), escape(str(r["experts_key"]).replace("+", ", ") or "(base)"),
                  escape(r["domain"]), number(r["loss"], 4)]
        rows.append(cells)
    caption = ("Measured merges" + (f" of {_context(frame, ('family',))}" if _context(frame, ("family",)) else "") +
               r": cross-entropy (CE) in nats/token on each domain's evaluation set; $N$: parameter count.")
    return _tabular(header, rows, "l" * len(shown) + "rllr", caption, "tab:mergelab-results", breaks)


def _hparams_text(value) -> str:
    try:
        params = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        return str(value)
    if isinstance(params, dict):
        return ", ".join(f"{k}={_plain(v)}" for k, v in params.items()) or "defaults"
    return _plain(params)


def _plain(value) -> str:
    """A cell value as plain words: lists joined by ', ', numbers with 4 significant digits; never JSON."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, dict):
        return ", ".join(f"{k}={_plain(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_plain(v) for v in value)
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value).lower()
    if isinstance(value, (int, np.integer)):
        return str(value)
    if isinstance(value, (float, np.floating)):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _generic(frame: pd.DataFrame, provenance: dict) -> str:
    """Any other frame: every column, names escaped, numbers in math mode, lists as words."""
    header = [escape(c) for c in frame.columns]
    rows = []
    for _, r in frame.iterrows():
        cells = []
        for value in r:
            if isinstance(value, (float, np.floating, int, np.integer)) and not isinstance(value, bool):
                cells.append(number(value, 4))
            else:
                cells.append(escape(_plain(value)))
        rows.append(cells)
    return _tabular(header, rows, "l" * max(len(header), 1), "Exported by mergelab; losses in nats/token.",
                    "tab:mergelab")


VIEWS = {"paper": _paper, "fits": _paper, "joint": _joint, "plan": _plan, "synergy": _synergy, "results": _results}


def latex(what: str, frame: pd.DataFrame, provenance: dict) -> str:
    """The table `what` ("paper", "fits", "joint", "plan", "synergy", "results"; anything else gets every
    column) as a LaTeX `table` with a booktabs `tabular`, preceded by comment lines carrying the provenance
    (read back by mergelab.export.read_provenance) and the packages it needs. Pass the `paper_table` for
    "paper"/"fits" to get the held-out column. Only ASCII comes out."""
    prov = json.dumps(provenance, sort_keys=True, default=str)  # ensure_ascii: the comment is ASCII too
    body = VIEWS.get(what, _generic)(frame, provenance) if len(frame.columns) else _generic(frame, provenance)
    return f"% provenance: {prov}\n% needs \\usepackage{{booktabs}}\n" + body
