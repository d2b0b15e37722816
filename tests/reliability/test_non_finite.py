"""A merge whose weights or loss are not finite is reported and never costs another row: not in its
write batch, not the next merge built on its weights, not a rerun. The cache refuses rows without a
required value (every NOT NULL column) or with a non-finite loss, merge by merge, keeping the rest."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from safetensors.torch import load_file, save_file

from mergelab.errors import CacheError
from mergelab.io.family import load_family
from mergelab.store import KEY_COLUMNS, ResultStore
from mergelab.sweep.plan import SweepSpec
from mergelab.sweep.runner import run_sweep
from tests.helpers import build_tiny_family
from tests.test_store import rows
from tests.test_sweep import cli

HEALTHY = 4 + 7 + 7  # base and 3 experts, then average and task_arithmetic over the 7 subsets of 3 experts


def table(store: ResultStore) -> pd.DataFrame:
    return store.results().drop(columns=["created_at", "experts"]).set_index(KEY_COLUMNS).sort_index()


def test_ties_lambda_1e30_loses_no_healthy_row_and_a_rerun_succeeds(tiny_family, tmp_path, capsys, tally):
    """The issue's example: the NaN losses of ties λ = 1e30 used to reject the whole write batch (0 of
    the healthy merges kept), and every rerun failed the same way."""
    db, clean = tmp_path / "r.duckdb", tmp_path / "clean.duckdb"
    args = ["sweep", "--family", tiny_family, "--device", "cpu"]
    code, out, err = cli(capsys, *args, "--db", db, "--methods", "average,task_arithmetic,ties", "--hp", "ties.lambda=1e30")
    assert code == 0, err
    assert f"{HEALTHY + 7} merges evaluated, 0 already cached, {HEALTHY * 3} rows written" in out
    warning = err.splitlines()[-1]  # after the progress bars
    assert warning.startswith("warning: 7 merge(s) not cached, the rest kept (a rerun tries them again): "
                          "ties density=0.2 lambda=1e+30 {alpha} (size s): loss is NaN on domains 'alpha', 'beta', 'gamma'; ")
    assert warning.endswith("; and 4 more") and sum("warning" in line for line in err.splitlines()) == 1
    store = ResultStore(db)
    assert store.count() == HEALTHY * 3 and "ties" not in set(store.results()["method"])
    # the healthy rows are those of a sweep that never met the diverging merge
    assert cli(capsys, *args, "--db", clean, "--methods", "average,task_arithmetic")[0] == 0
    got, want = table(store), table(ResultStore(clean))
    assert got.index.equals(want.index) and (got["loss"] - want["loss"]).abs().max() < 1e-6

    code, out, err = cli(capsys, *args, "--db", db, "--methods", "average,task_arithmetic,ties", "--hp", "ties.lambda=1e30")
    assert code == 0 and f"7 merges evaluated, {HEALTHY} already cached, 0 rows written" in out
    assert "7 merge(s) not cached" in err and store.count() == HEALTHY * 3
    tally["non-finite merges: diverging hyperparameters swept"] += 1


def test_one_batch_holds_the_diverging_merges_and_keeps_every_healthy_one(tiny_family, tmp_path, tally):
    """All merges in one write batch (no flush until the end): the NaN merges cost none of the others."""
    family = load_family(tiny_family)
    spec = SweepSpec(family, ["s"], {"average": {}, "ties": {"lambda": 1e30}, "dare": {}}, [1, 2, 3])
    store = ResultStore(tmp_path / "r.duckdb")
    report = run_sweep(spec, store, progress=False, flush_seconds=3600)
    assert report.merged == 4 + 3 * 7 and report.rows_written == (4 + 2 * 7) * 3 == store.count()
    assert len(report.not_cached) == 7 and all("ties" in r and "loss is NaN" in r for r in report.not_cached)
    assert {"{" + ",".join(s) + "}" for s in (("alpha",), ("alpha", "beta"), ("alpha", "beta", "gamma"))} <= {
        r.split(" (size")[0].rsplit(" ", 1)[1] for r in report.not_cached}
    tally["non-finite merges: diverging hyperparameters swept"] += 1


def test_a_merge_built_on_non_finite_weights_is_rebuilt_not_lost(tmp_path, tally):
    """Linear merges update the previous merge by swaps (one expert out, one in). After a merge whose
    weights overflowed to inf, that update gives inf − inf = NaN for a subset that is finite: here
    {b, c, d}, whose experts equal the base, follows {a, c, d} and must get the base's loss."""
    manifest = build_tiny_family(tmp_path, domains=("a", "b", "c", "d"))
    base = manifest.parent / "s" / "base" / "model.safetensors"
    for expert in "bcd":
        shutil.copy(base, manifest.parent / "s" / "experts" / expert / "model.safetensors")
    path = manifest.parent / "s" / "experts" / "a" / "model.safetensors"
    tensors = load_file(path)
    tensors["model.norm.weight"][0] += 10  # × c = 1e38 overflows fp32
    save_file(tensors, path, metadata={"format": "pt"})
    family = load_family(manifest)
    spec = SweepSpec(family, ["s"], {"task_arithmetic": {"c": 1e38, "normalize": False}}, [3])
    store = ResultStore(tmp_path / "r.duckdb")
    report = run_sweep(spec, store, progress=False)
    assert [r.split(": ", 1)[1] for r in report.not_cached] == [
        "merged weights hold 1 non-finite values (first in tensor 'model.norm.weight')"] * 3
    assert [r.split(" (size")[0].rsplit(" ", 1)[1] for r in report.not_cached] == ["{a,b,c}", "{a,c,d}", "{a,b,d}"]
    rows_ = store.results().set_index(["method", "experts_key", "domain"])["loss"]
    merged, base_loss = rows_.loc["task_arithmetic", "b+c+d"], rows_.loc["base", ""]
    assert (merged - base_loss).abs().max() < 1e-6, (merged, base_loss)
    tally["non-finite merges: diverging hyperparameters swept"] += 1


def test_a_diverged_merge_does_not_switch_off_the_fast_lm_head(tiny_family):
    """The check that the decoder + LM head reproduce the model's forward is made once per model; made on
    NaN logits it would have failed and sent every later merge through the slower full forward."""
    from mergelab.engine.evaluate import _FAST_HEAD, _PACKING, evaluate
    from mergelab.engine.methods import get_method
    from mergelab.sweep.evaluator import SizeEvaluator
    from mergelab.sweep.runner import _prepare_size_eval

    family = load_family(tiny_family)
    size = family.size("s")
    evaluator = SizeEvaluator(family.name, size, _prepare_size_eval(family, size), "cpu")
    model = evaluator.resident.model
    evaluator.session.merge(get_method("ties"), get_method("ties").resolve({"lambda": 1e30}), ("alpha", "beta"))
    assert all(v != v for v in evaluate(model, evaluator.data).values())  # NaN everywhere
    assert model not in _FAST_HEAD and model not in _PACKING  # nor the packed rows (the same kind of check)
    evaluator.session.load_base()
    assert all(v == v for v in evaluate(model, evaluator.data).values())
    assert _FAST_HEAD[model] is True and _PACKING[model] is True


REQUIRED = ["family", "size", "n_params", "method", "hparams", "experts_key", "domain", "loss", "n_tokens",
            "eval_hash", "metric_version"]


@pytest.mark.parametrize("column, value", [(c, None) for c in REQUIRED]
                         + [("loss", float("nan")), ("loss", float("inf")), ("loss", float("-inf")),
                            ("n_tokens", float("nan")), ("loss", "high")])
def test_a_row_without_a_required_value_costs_only_its_own_merge(tmp_path, column, value, tally):
    store = ResultStore(tmp_path / "r.duckdb")
    batch = rows(keys=("a", "b", "a+b"), domains=("x", "y"))
    batch[3][column] = value  # merge b, domain y
    rejected = []
    names_no_merge = column in KEY_COLUMNS and column != "domain"  # that row alone is left out
    kept = 5 if names_no_merge else 4
    assert store.upsert(batch, rejected=rejected) == kept
    cached = store.results().groupby("experts_key").size().to_dict()
    assert cached == ({"a": 2, "a+b": 2, "b": 1} if names_no_merge else {"a": 2, "a+b": 2})  # else merge b left out whole
    assert len(rejected) == 1 and f": {column} is " in rejected[0], rejected
    assert rejected[0].startswith("s average {} {b}: ") or names_no_merge and "?" in rejected[0].split(": ")[0]
    assert column == "domain" or rejected[0].endswith(" on domain 'y'")
    numeric = column in ("n_params", "loss", "n_tokens", "metric_version")  # pandas holds their None as NaN
    shown = {None: "NaN" if numeric else "missing", "high": "'high'"}.get(value, str(value).replace("nan", "NaN"))
    assert f"{column} is {shown}" in rejected[0], rejected
    # without a list to report into, the same rows are kept and the caller gets one clear error
    other = ResultStore(tmp_path / "o.duckdb")
    with pytest.raises(CacheError, match=r"o.duckdb: 1 merge\(s\) not cached, their other rows kept: "):
        other.upsert(batch)
    assert other.count() == kept
    tally["bad rows offered to the cache: missing or non-finite values"] += 1


def test_import_refuses_a_parquet_file_with_a_nan_loss(tmp_path):
    source = ResultStore(tmp_path / "a.duckdb")
    source.upsert(rows())
    source.export_parquet(tmp_path / "rows.parquet")
    frame = pd.read_parquet(tmp_path / "rows.parquet")
    frame.loc[2, "loss"] = float("nan")  # parquet keeps NaN as a value, not as NULL
    frame.to_parquet(tmp_path / "bad.parquet")
    target = ResultStore(tmp_path / "b.duckdb")
    with pytest.raises(CacheError, match="bad.parquet: 1 rows lack a required value .* nothing imported"):
        target.import_parquet(tmp_path / "bad.parquet")
    assert target.count() == 0
