"""Planning formulas against hand values; synergy recovered from a known additive structure."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from mergelab.analysis import planning
from mergelab.analysis.fit import FitError, JointFit, fit_curve
from mergelab.analysis.intervals import expert_bootstrap
from mergelab.analysis.synergy import block_means, donor_strength, receiver_susceptibility, synergy_matrix, top_pairs

K = np.arange(1, 10, dtype=float)


@pytest.fixture
def exact():
    return fit_curve(K, 0.7 + 0.3 / (K + 0.5))


def test_planning_formulas(exact):
    assert planning.k_for_target(exact, 0.75).value == pytest.approx(0.3 / 0.05 - 0.5, rel=1e-5)
    unreachable = planning.k_for_target(exact, 0.69)
    assert unreachable.value == math.inf and "unreachable" in unreachable.note
    assert planning.k_epsilon(exact, 0.01).value == pytest.approx(29.5, rel=1e-5)
    assert planning.marginal_gain(exact, 1).value == pytest.approx(0.3 / (1.5 * 2.5), rel=1e-5)
    assert planning.fractional_return(exact, 9, 9).value == pytest.approx(1.0)
    assert planning.fractional_return(exact, 1, 9).value == pytest.approx(0.0, abs=1e-12)
    # stop rule: first k with A/((k+b)(k+1+b)) < tol
    tol = 0.01
    expected = next(k for k in range(1, 100) if 0.3 / ((k + 0.5) * (k + 1.5)) < tol)
    assert planning.stop_rule(exact, tol).value == expected
    with pytest.raises(FitError, match="epsilon must be > 0"):
        planning.k_epsilon(exact, 0)


def test_fractional_return_with_b_zero_is_fixed_by_the_form():
    fit = fit_curve(K, 0.5 + 0.2 / K)
    M = 9
    for k in (2, 5, 7):
        assert planning.fractional_return(fit, k, M).value == pytest.approx(M / (M - 1) * (1 - 1 / k), rel=1e-5)
    assert planning.k_at_fraction(fit, 0.9, M).value == pytest.approx(M / (M - 0.9 * (M - 1)), rel=1e-4) == 5.0


def test_minimum_size():
    joint = JointFit({"L_star": 0.2, "B": 0.1, "beta": 0.5, "A0": 0.05, "gamma": 0.1, "b": 0.3}, 1.0, 0.0, 9, {})
    assert planning.minimum_size(joint, 0.25).value == pytest.approx((0.1 / 0.05) ** 2)
    assert planning.minimum_size(joint, 0.2).value == math.inf


def test_estimates_carry_expert_bootstrap_intervals():
    rng = np.random.default_rng(0)
    experts = [f"e{i}" for i in range(9)]
    keys = ["+".join(s) for k in range(1, 10) for s in itertools.combinations(experts, k)]
    ks = np.array([key.count("+") + 1 for key in keys], dtype=float)
    effects = dict(zip(experts, rng.normal(0, 0.01, 9)))
    losses = 0.7 + 0.3 / (ks + 0.5) + np.array([np.mean([effects[e] for e in key.split("+")]) for key in keys])
    fit = expert_bootstrap(keys, losses, n_boot=300)
    est = planning.k_for_target(fit, 0.76)
    assert est.lo <= est.value <= est.hi and est.hi > est.lo
    plain = planning.k_for_target(fit_curve(K, 0.7 + 0.3 / (K + 0.5)), 0.76)
    assert math.isnan(plain.lo) and math.isnan(plain.hi)


def additive_results(G, base, keys):
    """Rows whose loss on receiver e is base[e] − Σ_{d∈S} G[d, e]: synergy is exactly G."""
    rows = []
    for key in keys:
        members = key.split("+") if key else []
        for e in base:
            rows.append({"experts_key": key, "domain": e, "loss": base[e] - sum(G.loc[d, e] for d in members)})
    return pd.DataFrame(rows)


@pytest.fixture
def structure():
    names = ["algebra", "geometry", "physics", "code"]
    rng = np.random.default_rng(1)
    G = pd.DataFrame(rng.normal(0, 0.05, (4, 4)), index=names, columns=names)
    return G, {e: 2.0 for e in names}, names


def test_synergy_from_exhaustive_subsets_is_exact(structure):
    G, base, names = structure
    keys = ["+".join(sorted(s)) for k in range(1, 5) for s in itertools.combinations(names, k)]
    S = synergy_matrix(additive_results(G, base, keys))
    assert np.allclose(S.loc[names, names].to_numpy(), G.to_numpy(), atol=1e-12)
    assert S.attrs["n_pairs"]["algebra"] == 7  # subsets of the other three, non-empty
    strength, susceptibility = donor_strength(S), receiver_susceptibility(S)
    off = G.to_numpy().copy()
    np.fill_diagonal(off, np.nan)
    assert strength["physics"] == pytest.approx(np.nanmean(off[2]))
    assert susceptibility["code"] == pytest.approx(np.nanmean(off[:, 3]))
    blocks = block_means(S, {"math": ("algebra", "geometry"), "rest": ("physics", "code")})
    assert blocks.loc["math", "math"] == pytest.approx((G.loc["algebra", "geometry"] + G.loc["geometry", "algebra"]) / 2)
    pairs = top_pairs(S, n=2)
    assert pairs["synergy"].iloc[0] == pytest.approx(np.nanmax(off))


def test_synergy_from_orderings_uses_prefix_pairs(structure):
    G, base, names = structure
    keys = []
    for order in (["algebra", "geometry", "physics", "code"], ["code", "physics", "geometry", "algebra"]):
        keys += ["+".join(sorted(order[:i])) for i in range(1, 5)]
    S = synergy_matrix(additive_results(G, base, sorted(set(keys))))
    assert np.allclose(S.loc["geometry", names].to_numpy(), G.loc["geometry", names].to_numpy(), atol=1e-12)
    assert S.attrs["n_pairs"]["geometry"] == 2


def test_minimum_size_names_the_swept_sizes_as_parameter_counts():
    """N_min = 4B from demo sizes of 19,224 and 822,400 parameters: the note reads 19.2K–822K, not 1.92e-05–0.000822 B."""
    joint = JointFit({"L_star": 0.2, "B": 0.1, "beta": 0.5, "A0": 0.05, "gamma": 0.1, "b": 0.3}, 1.0, 0.0, 9, {})
    est = planning.minimum_size(joint, 0.25, sizes=[19_224e-9, 822_400e-9])
    assert est.extrapolated and "outside the swept sizes 19.2K–822K parameters" in est.note


def test_synergy_interval_notes_say_each_reason_once(structure):
    """Two orderings of 4 experts leave too few residual degrees of freedom for any receiver: one note
    for every receiver, not the same sentence once per domain (the walkthrough showed it 9 times)."""
    from mergelab.analysis.synergy import synergy_intervals

    G, base, names = structure
    keys = []
    for order in (["algebra", "geometry", "physics", "code"], ["code", "physics", "geometry", "algebra"]):
        keys += ["+".join(sorted(order[:i])) for i in range(1, 5)]
    lo, hi = synergy_intervals(additive_results(G, base, sorted(set(keys))), n_boot=20)
    notes = lo.attrs["notes"]
    assert len(notes) == 1 and notes[0].startswith("for every receiver, ") and "degrees of freedom" in notes[0], notes
    assert lo.isna().all().all()


def test_donors_without_pairs_are_named(structure):
    from mergelab.analysis.synergy import unmeasured_donors

    G, base, _ = structure
    S = synergy_matrix(additive_results(G, base, ["algebra", "geometry", "algebra+geometry",
                                                  "algebra+geometry+physics", "code+physics"]))
    assert S.attrs["n_pairs"]["code"] == 0 and S.loc["code"].isna().all()
    assert unmeasured_donors(S) == ["code"]  # code+physics without code ('physics') is not cached


def test_heatmap_cell_text_fits_many_receivers():
    from mergelab.ui.figures import TEXT_MAX_COLUMNS, synergy_heatmap

    def cells(n, with_intervals):
        names = [f"d{i}" for i in range(n)]
        m = pd.DataFrame(np.full((n, n), -0.212), index=names, columns=names)
        nan = m * np.nan
        return synergy_heatmap(m, lo=nan.copy(), hi=nan.copy()) if not with_intervals else synergy_heatmap(
            m, lo=m - 0.1, hi=m + 0.05).update_traces()

    few = cells(4, False).data[0]
    assert few.texttemplate == "%{text}" and few.textfont.size == 10
    assert "?" not in "".join(np.ravel(few.text))  # no cell has an interval: no '?' on each (the caption says so)
    nine = cells(9, True).data[0]
    assert nine.texttemplate == "%{text}" and nine.textfont.size == 8 and np.ravel(nine.text)[0] == "-0.212"
    many = cells(TEXT_MAX_COLUMNS + 1, False).data[0]
    assert many.texttemplate == "" and "donor %{y}" in many.hovertemplate  # values stay on hover
