"""The published tables of arXiv 2509.24244 ("Model Merging Scaling Laws in LLMs"), shipped under data/paper/.

Units follow the paper: N in billions of parameters, loss in nats (token-level CE on response tokens).
The joint law per domain is L(N, k) = L* + B·N^-beta + A0·N^-gamma / (k + b0).
See data/paper/README.md for provenance and the known problems of the published numbers.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pandas as pd

from mergelab.names import MACRO
from mergelab.paths import repo_data_dir

PAPER = "arXiv 2509.24244 v4 (ICML 2026)"

TABLES: dict[str, str] = {
    "joint_fits": "joint_fits_tables_3_4_5.csv",
    "variance_fits": "variance_fits_tables_6_8_10.csv",
    "average_alt_fit": "table12_average_alt_fit.csv",
    "merge_wall_time": "table13_merge_wall_time_9_domains.csv",
    "downstream_accuracy": "table15_downstream_mean_accuracy.csv",
    "dare_order_dispersion": "table21_dare_order_dispersion.csv",
    "dare_order_std_fit": "table22_dare_order_std_fit.csv",
    "llama_macro_fits": "table23_llama_macro_fits.csv",
    "synergy_32b_dare": "synergy_32b_dare.csv",
}

LAW_PARAMS = ("L_star", "B", "beta", "A0", "gamma", "b0", "r2")


def paper_dir() -> Path:
    """Directory holding the CSVs: $MERGELAB_PAPER_DIR if set, else <repo>/data/paper."""
    env = os.environ.get("MERGELAB_PAPER_DIR")
    return Path(env) if env else repo_data_dir() / "paper"


@functools.lru_cache(maxsize=None)
def _read(path: str) -> pd.DataFrame:
    return pd.read_csv(path)


def table(name: str) -> pd.DataFrame:
    """Read one published table by short name (see TABLES); returns a fresh copy."""
    if name not in TABLES:
        raise ValueError(f"unknown table {name!r}; valid names: {', '.join(TABLES)}")
    return _read(str(paper_dir() / TABLES[name])).copy()


table.cache_clear = _read.cache_clear  # type: ignore[attr-defined]  # lru_cache-style reset


def methods() -> list[str]:
    """Methods with a published joint law, in table order."""
    return list(dict.fromkeys(table("joint_fits")["method"]))


def domains() -> list[str]:
    """The nine domains with a published joint law, in table order."""
    return list(dict.fromkeys(table("joint_fits")["domain"]))


def _check(method: str, domain: str, allow_macro: bool = False) -> None:
    if method not in (ms := methods()):
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(ms)}")
    valid = domains() + ([MACRO] if allow_macro else [])
    if domain not in valid:
        raise ValueError(f"unknown domain {domain!r}; valid domains: {', '.join(valid)}")


def joint_law(method: str, domain: str) -> dict[str, float]:
    """Fitted joint-law parameters (L_star, B, beta, A0, gamma, b0, r2) for one method and domain."""
    _check(method, domain)
    df = table("joint_fits")
    row = df[(df["method"] == method) & (df["domain"] == domain)].iloc[0]
    return {p: float(row[p]) for p in LAW_PARAMS}


def _loss(p: dict[str, float], N, k):
    return p["L_star"] + p["B"] * N ** -p["beta"] + p["A0"] * N ** -p["gamma"] / (k + p["b0"])


def law_loss(method: str, domain: str, N, k) -> np.ndarray | float:
    """Published law L(N, k) (N in billions); broadcasts arrays. domain="macro" averages the nine domain laws."""
    _check(method, domain, allow_macro=True)
    N, k = np.asarray(N, dtype=float), np.asarray(k, dtype=float)
    names = domains() if domain == MACRO else [domain]
    out = sum(_loss(joint_law(method, d), N, k) for d in names) / len(names)
    return float(out) if np.ndim(out) == 0 else out


def law_curve(method: str, domain: str, N: float, ks) -> pd.DataFrame:
    """The law along k at fixed N: columns k, loss, method, domain, N_b."""
    ks = np.atleast_1d(np.asarray(ks, dtype=float))
    loss = np.broadcast_to(law_loss(method, domain, N, ks), ks.shape)
    return pd.DataFrame({"k": ks, "loss": loss, "method": method, "domain": domain, "N_b": float(N)})
