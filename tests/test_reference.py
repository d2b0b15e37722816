"""The shipped paper tables (arXiv 2509.24244) load, and the published joint law evaluates correctly."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from mergelab.analysis import reference as ref

EXPECTED_COLUMNS = {
    "joint_fits": ["method", "domain", "L_star", "B", "beta", "A0", "gamma", "b0", "r2"],
    "variance_fits": ["method", "domain", "V_star", "B_var", "beta_var", "A0_var", "gamma_var", "b0_var", "r2"],
    "average_alt_fit": ["domain", "b", "A0", "gamma", "r2_A", "L_star", "B", "beta", "r2_L"],
    "merge_wall_time": ["method", "size_b", "seconds"],
    "downstream_accuracy": ["backbone_method", "k1", "k2", "k3", "k4", "k5"],
    "dare_order_dispersion": ["size_b", "k", "mean_ce", "std", "range", "cv"],
    "dare_order_std_fit": ["size_b", "b", "c0", "c1", "r2"],
    "llama_macro_fits": ["backbone", "r2", "b", "L_inf", "A", "L_k1", "L_k9"],
    "synergy_32b_dare": ["kind", "donor", "receiver", "size_b", "value"],
}
NINE = ["algebra", "analysis", "biology", "chemistry", "code", "discrete", "geometry", "number_theory", "physics"]


@pytest.fixture(autouse=True)
def _fresh_cache():
    ref.table.cache_clear()
    yield
    ref.table.cache_clear()


def test_every_table_loads_with_expected_columns():
    assert set(ref.TABLES) == set(EXPECTED_COLUMNS)
    for name, cols in EXPECTED_COLUMNS.items():
        df = ref.table(name)
        assert list(df.columns) == cols, name
        assert len(df) > 0, name
    assert len(ref.table("joint_fits")) == 27 and len(ref.table("variance_fits")) == 27


def test_table_returns_a_copy():
    df = ref.table("joint_fits")
    df.loc[0, "L_star"] = -1.0
    assert ref.table("joint_fits").loc[0, "L_star"] > 0


def test_methods_and_domains():
    assert ref.methods() == ["average", "task_arithmetic", "ties"]
    assert sorted(ref.domains()) == NINE


def test_joint_law_row():
    p = ref.joint_law("average", "algebra")
    assert set(p) == {"L_star", "B", "beta", "A0", "gamma", "b0", "r2"}
    assert p["L_star"] == pytest.approx(0.18092) and p["beta"] == pytest.approx(0.42335) and p["r2"] == 0.984


def test_macro_law_matches_paper_headline():
    assert ref.law_loss("average", "macro", 0.5, 9) == pytest.approx(0.7365, abs=4e-4)
    assert ref.law_loss("average", "macro", 32, 9) == pytest.approx(0.4298, abs=4e-4)
    both = ref.law_loss("average", "macro", np.array([0.5, 32]), 9)
    assert np.allclose(both, [0.7365, 0.4298], atol=4e-4)


def test_single_domain_law_by_hand():
    p = ref.joint_law("ties", "code")
    want = p["L_star"] + p["B"] * 7 ** -p["beta"] + p["A0"] * 7 ** -p["gamma"] / (3 + p["b0"])
    got = ref.law_loss("ties", "code", 7, 3)
    assert isinstance(got, float) and got == pytest.approx(want, rel=1e-12)


def test_broadcasting_and_monotone_in_k():
    ks = np.arange(1, 10)
    grid = ref.law_loss("average", "algebra", np.array([[0.5], [32.0]]), ks)
    assert grid.shape == (2, 9)
    assert np.all(grid[1] < grid[0])  # larger base, lower loss
    for method in ref.methods():
        for domain in ref.domains() + ["macro"]:
            if domain != "macro" and ref.joint_law(method, domain)["A0"] <= 0:
                continue
            loss = ref.law_loss(method, domain, 3.0, ks)
            assert loss.shape == ks.shape
            assert np.all(np.diff(loss) < 0), (method, domain)


def test_law_curve_frame():
    df = ref.law_curve("task_arithmetic", "physics", 14, [1, 2, 4, 8])
    assert list(df.columns) == ["k", "loss", "method", "domain", "N_b"]
    assert df["k"].tolist() == [1, 2, 4, 8] and (df["N_b"] == 14).all()
    assert df["loss"].is_monotonic_decreasing
    assert df["loss"].iloc[2] == pytest.approx(ref.law_loss("task_arithmetic", "physics", 14, 4))


@pytest.mark.parametrize("call, bad", [
    (lambda: ref.table("nope_table"), "nope_table"),
    (lambda: ref.joint_law("badmethod", "algebra"), "badmethod"),
    (lambda: ref.joint_law("average", "baddomain"), "baddomain"),
    (lambda: ref.joint_law("average", "macro"), "macro"),
    (lambda: ref.law_loss("dare", "algebra", 1.0, 2), "dare"),
    (lambda: ref.law_curve("average", "poetry", 1.0, [1, 2]), "poetry"),
])
def test_unknown_names_raise(call, bad):
    with pytest.raises(ValueError, match=bad):
        call()


def test_unknown_table_lists_valid_names():
    with pytest.raises(ValueError) as err:
        ref.table("x")
    assert all(name in str(err.value) for name in ref.TABLES)


def test_env_override(tmp_path, monkeypatch):
    df = ref.table("merge_wall_time")
    df.loc[df["method"] == "ta", "seconds"] = 1
    df.to_csv(tmp_path / ref.TABLES["merge_wall_time"], index=False)
    shutil.copy(ref.paper_dir() / ref.TABLES["llama_macro_fits"], tmp_path)
    monkeypatch.setenv("MERGELAB_PAPER_DIR", str(tmp_path))
    ref.table.cache_clear()
    assert ref.paper_dir() == tmp_path
    assert (ref.table("merge_wall_time").query("method == 'ta'")["seconds"] == 1).all()
    assert len(ref.table("llama_macro_fits")) == 2
    with pytest.raises(FileNotFoundError):
        ref.table("joint_fits")  # not copied into the override dir
