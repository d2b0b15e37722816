"""The public entry points state their contract: a docstring with argument shapes and units (CE in nats
per token, N in billions of parameters), what they raise, and where a formula comes from; every merge
method names its paper and its mergekit equivalent."""

import inspect

import pytest

from mergelab.analysis.fit import fit_curve, fit_curves, fit_joint
from mergelab.analysis.heldout import forecast_errors, leave_one_size_out, three_point_forecast
from mergelab.analysis.intervals import expert_bootstrap, expert_bootstrap_joint
from mergelab.analysis.planning import k_at_fraction, k_epsilon, k_for_target, minimum_size, stop_rule
from mergelab.analysis.synergy import synergy_intervals, synergy_matrix
from mergelab.engine.evaluate import evaluate
from mergelab.engine.methods import METHODS, MergeMethod
from mergelab.engine.session import MergeSession
from mergelab.io.family import Family, load_family
from mergelab.store import ResultStore
from mergelab.sweep.runner import plan_sweep, run_sweep

UNITS = {fit_curve: "nats", fit_joint: "billions", expert_bootstrap: "nats", expert_bootstrap_joint: "billions",
         minimum_size: "billions", synergy_matrix: "nats", evaluate: "nats", run_sweep: "nats",
         three_point_forecast: "nats", leave_one_size_out: "billions", ResultStore: "nats", k_epsilon: "nats"}
RAISES = [fit_curve, fit_curves, fit_joint, expert_bootstrap, load_family, run_sweep, ResultStore, MergeMethod,
          three_point_forecast, leave_one_size_out]
SOURCES = {fit_curve: "2509.24244", fit_joint: "2509.24244", three_point_forecast: "DESIGN", synergy_matrix: "2509.24244",
           k_for_target: "DESIGN", expert_bootstrap: "§3"}
ENTRY_POINTS = [fit_curve, fit_curves, fit_joint, expert_bootstrap, expert_bootstrap_joint, k_for_target, k_epsilon,
                stop_rule, k_at_fraction, minimum_size, synergy_matrix, synergy_intervals, run_sweep, plan_sweep,
                ResultStore, MergeMethod, MergeSession, Family, load_family, three_point_forecast, forecast_errors,
                leave_one_size_out, evaluate]


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda e: e.__name__)
def test_entry_points_document_their_contract(entry):
    doc = inspect.getdoc(entry) or ""
    module_doc = inspect.getdoc(inspect.getmodule(entry)) or ""
    assert len(doc) > 80, f"{entry.__name__}: no real docstring"
    if entry in UNITS:
        assert UNITS[entry] in doc, f"{entry.__name__}: units ({UNITS[entry]}) not stated"
    if entry in RAISES:
        assert "raise" in doc.lower(), f"{entry.__name__}: what it raises is not stated"
    if entry in SOURCES:
        assert SOURCES[entry] in doc + module_doc, f"{entry.__name__}: formula source not named"


def test_every_merge_method_names_its_paper_and_mergekit_equivalent():
    for method in METHODS.values():
        assert "arXiv" in method.paper, method.name
        # a mergekit config, or a plain statement that there is none (TSV-M; --mergekit-yaml then refuses it)
        assert "merge_method:" in method.mergekit or "no mergekit 0.1.5 equivalent" in method.mergekit, method.name
