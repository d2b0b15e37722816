"""`mergelab fit` and `mergelab export` on a real cache holding synthetic merges with a known law."""

import itertools
import json

import numpy as np
import pandas as pd
import pytest

from mergelab.export import read_provenance
from mergelab.store import ResultStore
from tests.test_sweep import cli

EXPERTS = ["e1", "e2", "e3", "e4", "e5", "e6"]
SIZES = {"a": 1_000_000, "b": 4_000_000, "c": 16_000_000}


@pytest.fixture
def db(tmp_path):
    """Three sizes, two domains, all 63 subsets, loss from the joint law plus small noise."""
    rng = np.random.default_rng(0)
    rows = []
    for size, n in SIZES.items():
        N = n / 1e9
        for k in range(0, 7):
            for subset in itertools.combinations(EXPERTS, k):
                for domain, shift in (("x", 0.0), ("y", 0.1)):
                    loss = 0.3 + shift + 0.01 * N ** -0.3 + (0.2 / (k + 0.4) if k else 0.5) + rng.normal(0, 0.002)
                    rows.append({"family": "syn", "size": size, "n_params": n, "method": "average" if k else "base",
                                 "hparams": "{}", "experts_key": "+".join(subset), "domain": domain, "loss": loss,
                                 "n_tokens": 100, "eval_hash": f"h{domain}", "metric_version": 1, "device": "cpu"})
    path = tmp_path / "syn.duckdb"
    ResultStore(path).upsert(pd.DataFrame(rows))
    return path


def test_fit_json_has_parameters_and_provenance(db, capsys):
    code, out, err = cli(capsys, "fit", "--db", db, "--domain", "macro", "--format", "json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["provenance"]["families"] == ["syn"] and doc["provenance"]["k_range"] == [1, 6]
    assert doc["provenance"]["n_merges"] == 3 * 63 and doc["provenance"]["options"]["weights"] == "k"
    rows = {r["size"]: r for r in doc["rows"]}
    assert set(rows) == set(SIZES)
    k = np.arange(1, 7)
    for size, r in rows.items():
        truth = 0.35 + 0.01 * (SIZES[size] / 1e9) ** -0.3 + 0.2 / (k + 0.4)
        assert np.abs(r["L_inf"] + r["A"] / (k + r["b"]) - truth).max() < 0.003 and r["r2"] > 0.99


def test_fit_table_with_bootstrap_and_joint_csv(db, capsys):
    code, out, _ = cli(capsys, "fit", "--db", db, "--size", "b", "--bootstrap", "50")
    assert code == 0 and "ci_L_inf" in out and "macro" in out and out.count("\n") == 4  # header + macro, x, y
    code, out, _ = cli(capsys, "fit", "--db", db, "--joint", "--domain", "x", "--format", "csv")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("# provenance: ")
    joint = pd.read_csv(pd.io.common.StringIO(out), comment="#")
    assert joint.loc[0, "gamma"] == pytest.approx(0.0, abs=0.05) and joint.loc[0, "r2"] > 0.99
    assert joint.loc[0, "r2_unweighted"] > 0.98
    # three sizes fix the floor's L*, B, β exactly: flagged, no numbers printed for them
    assert not joint.loc[0, "identified"] and "3 sizes" in joint.loc[0, "reason"]
    assert joint.loc[0, ["L_star", "B", "beta"]].isna().all() and joint.loc[0, ["A0", "gamma", "b"]].notna().all()
    code, out, _ = cli(capsys, "fit", "--db", db, "--joint", "--domain", "x")
    row = out.splitlines()[1]
    assert code == 0 and row.split()[3:6] == ["–", "–", "–"] and "False" in row and "3 sizes" in row


@pytest.mark.parametrize("what, fmt", [("fits", "parquet"), ("joint", "json"), ("synergy", "latex"),
                                       ("plan", "csv"), ("results", "parquet")])
def test_export_every_kind_with_provenance(db, tmp_path, capsys, what, fmt):
    out_file = tmp_path / f"{what}.{fmt}"
    code, out, err = cli(capsys, "export", "--what", what, "--format", fmt, "--out", out_file, "--db", db)
    assert code == 0, err
    assert f"of {what} to" in out
    prov = read_provenance(out_file)
    assert prov["options"]["what"] == what and prov["sizes"] == SIZES
    if fmt == "parquet":
        frame = pd.read_parquet(out_file)
        assert len(frame) > 0
    if what == "synergy":
        assert "\\begin{tabular}" in out_file.read_text()
    if what == "plan":
        plan = pd.read_csv(out_file, comment="#")
        k90 = plan[(plan["quantity"] == "k90")]["value"]
        assert len(k90) == 3 and k90.between(1, 6).all()


def test_export_and_fit_errors(db, tmp_path, capsys):
    code, _, err = cli(capsys, "export", "--what", "everything", "--out", tmp_path / "x", "--db", db)
    assert code == 2 and "--what 'everything'" in err
    code, _, err = cli(capsys, "fit", "--db", db, "--family", "nope")
    assert code == 2 and "--family 'nope': no cached results (cached: syn)" in err
    code, _, err = cli(capsys, "fit", "--db", db, "--format", "yaml")
    assert code == 2 and "--format 'yaml'" in err
