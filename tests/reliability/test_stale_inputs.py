"""A cached row describes the checkpoints and eval sets a user would load now: fingerprints in the key,
stale rows recomputed by the sweep and shown nowhere, one eval version per curve, migration of older caches."""

import json
import shutil
from pathlib import Path

import pytest

from mergelab.analysis.tables import merge_losses
from mergelab.io.family import load_family
from mergelab.io.fingerprint import checkpoint_fingerprint
from mergelab.store import SCHEMA_VERSION, ResultStore
from mergelab.sweep.plan import SweepSpec
from mergelab.sweep.runner import run_sweep
from tests.helpers import reference_ce, save_checkpoint, tiny_config
from tests.reliability.faults import unpack_cache
from tests.test_sweep import cli


def sweep(family: Path, db: Path, methods=None, ks=(1, 2, 3)):
    spec = SweepSpec(load_family(family), ["s"], methods or {"average": {}}, list(ks))
    return run_sweep(spec, ResultStore(db), progress=False)


def replace_expert(family: Path, name: str, seed: int, noise: float):
    """Retrain-like replacement: new weights under the same path and family name."""
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(family.parent / "s" / "base"), dtype=torch.float32)
    path = family.parent / "s" / "experts" / name
    shutil.rmtree(path)
    return save_checkpoint(path, tiny_config(), seed=seed, noise=noise, base_state=base.state_dict())


def test_replaced_expert_weights_are_recomputed_and_the_old_rows_shown_nowhere(tiny_family, tmp_path, tally):
    from transformers import AutoTokenizer

    db = tmp_path / "r.duckdb"
    first = sweep(tiny_family, db)
    assert first.merged == 1 + 3 + 7 and first.skipped == 0
    old = ResultStore(db).results(method="expert", experts_key="alpha", domain="alpha")["loss"].item()
    model = replace_expert(tiny_family, "alpha", seed=99, noise=0.5)
    second = sweep(tiny_family, db)
    # alpha's single-expert row and the 4 merges holding alpha (k=1: 1, k=2: 2, k=3: 1); the rest is cached
    assert (second.merged, second.skipped) == (1 + 4, 1 + 3 + 7 - 5)
    store = ResultStore(db)
    new = store.results(method="expert", experts_key="alpha", domain="alpha")["loss"].item()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_family.parent / "s" / "experts" / "alpha"))
    truth, _ = reference_ce(model, tokenizer, tiny_family.parent / "eval" / "alpha.jsonl", budget=40)
    assert new == pytest.approx(truth, abs=1e-4) and abs(new - old) > 0.05  # what the new weights give
    everything = store.results(include_stale=True)
    stale = everything[everything["stale"] != ""]
    assert set(stale["stale"]) == {"expert checkpoint changed"}
    assert all("alpha" in key.split("+") for key in stale["experts_key"]) and len(stale) == 5 * 3
    assert not store.results().duplicated(["method", "experts_key", "domain"]).any()  # never mixed
    assert sweep(tiny_family, db).merged == 0  # and now everything is cached again
    tally["changed inputs caught: checkpoints replaced"] += 1
    tally["stale rows never shown"] += len(stale)


def test_fingerprints_see_weights_config_and_tokenizer_but_not_bookkeeping(tiny_family, tmp_path, tally):
    expert = tiny_family.parent / "s" / "experts" / "beta"
    before = checkpoint_fingerprint(expert)
    copy = tmp_path / "copy"
    shutil.copytree(expert, copy)
    assert checkpoint_fingerprint(copy) == before  # content, not path or mtime
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(dict(config, transformers_version="0.0.1")))
    assert checkpoint_fingerprint(copy) == before
    (copy / "config.json").write_text(json.dumps(dict(config, rope_theta=1234.0)))
    assert checkpoint_fingerprint(copy) != before
    (copy / "config.json").write_text(json.dumps(config))
    special = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps(dict(special, eos_token="<changed>")))
    assert checkpoint_fingerprint(copy) != before
    shutil.copy(expert / "tokenizer_config.json", copy / "tokenizer_config.json")
    weights = bytearray((copy / "model.safetensors").read_bytes())
    weights[-10] ^= 0xFF  # one byte of the last tensor
    (copy / "model.safetensors").write_bytes(bytes(weights))
    assert checkpoint_fingerprint(copy) != before
    tally["changed inputs caught: config, tokenizer, one weight byte"] += 3


def test_a_changed_eval_set_gives_one_eval_version_per_curve(tiny_family, tmp_path, capsys, tally):
    db = tmp_path / "r.duckdb"
    sweep(tiny_family, db)
    eval_alpha = tiny_family.parent / "eval" / "alpha.jsonl"
    eval_alpha.write_text(eval_alpha.read_text().replace("alpha 1 ", "alpha one "))
    again = sweep(tiny_family, db)
    assert again.merged == 11  # every merge lacks the new alpha rows
    store = ResultStore(db)
    rows = store.results()
    assert rows.groupby("domain")["eval_hash"].nunique().max() == 1  # never old and new of one domain
    assert len(merge_losses(rows)) == 3 + 3 + 1  # the macro curve keeps every merge
    everything = store.results(include_stale=True)
    assert set(everything.loc[everything["stale"] != "", "stale"]) == {"eval set changed"}
    code, out, err = cli(capsys, "fit", "--db", db, "--domain", "macro", "--format", "json")
    assert code == 0, err
    assert json.loads(out)["rows"][0]["n_subsets"] == 7

    # drop a domain (and its expert) from the manifest: nothing to recompute, but its rows leave every curve
    manifest = tiny_family.read_text().replace('domains = ["alpha", "beta", "gamma"]', 'domains = ["alpha", "beta"]')
    tiny_family.write_text(manifest.replace('gamma = "eval/gamma.jsonl"\n', "").replace('gamma = "s/experts/gamma"\n', ""))
    assert sweep(tiny_family, db, ks=(1, 2)).merged == 0
    rows = ResultStore(db).results()
    assert set(rows["domain"]) == {"alpha", "beta"} and len(merge_losses(rows)) == 3  # alpha, beta, alpha+beta
    everything = ResultStore(db).results(include_stale=True)
    assert set(everything["stale"]) == {"", "eval set changed", "domain no longer evaluated", "expert no longer in the family"}
    tally["changed inputs caught: eval sets and domain lists"] += 2


def test_an_older_inputs_version_can_be_chosen_explicitly(tiny_family, tmp_path, capsys):
    db = tmp_path / "r.duckdb"
    sweep(tiny_family, db)
    eval_beta = tiny_family.parent / "eval" / "beta.jsonl"
    eval_beta.write_text(eval_beta.read_text().replace("beta 2 ", "beta two "))
    sweep(tiny_family, db)
    store = ResultStore(db)
    versions = store.inputs_versions("tiny")
    assert len(versions) == 2
    old, new = versions["version"].iloc[1], versions["version"].iloc[0]
    older = store.results(versions={("tiny", "s"): old}, domain="beta")
    newer = store.results(domain="beta")
    assert set(older["eval_hash"]) == {json.loads(versions["eval_hashes"].iloc[1])["beta"]}
    assert set(newer["eval_hash"]) == {json.loads(versions["eval_hashes"].iloc[0])["beta"]} != set(older["eval_hash"])
    code, out, err = cli(capsys, "versions", "--db", db)
    assert code == 0 and old in out and new in out, err
    code, out, err = cli(capsys, "fit", "--db", db, "--domain", "beta", "--format", "json", "--inputs-version", old)
    assert code == 0, err
    code, out, err = cli(capsys, "fit", "--db", db, "--inputs-version", "nosuch")
    assert code == 2 and "nosuch" in err and "mergelab versions" in err


def test_a_changed_vocab_policy_makes_rows_stale_only_where_it_applies(tiny_family, tmp_path, tally):
    from tests.realarch import build_family

    db = tmp_path / "r.duckdb"
    sweep(tiny_family, db, ks=(1, 2))
    text = tiny_family.read_text()
    tiny_family.write_text(text.replace("token_budget = 40", 'token_budget = 40\nvocab_policy = "base_rows"'))
    assert sweep(tiny_family, db, ks=(1, 2)).merged == 0  # every vocabulary matches: the policy changes nothing

    # experts with 261 and 288 vocabulary rows beside the base's 272: the policy decides what is merged
    manifest = build_family(tmp_path / "padded", "qwen2", expert_rows={"beta": 261, "gamma": 288}, vocab_policy="base_rows")
    spec = lambda: SweepSpec(load_family(manifest), ["qwen2"], {"average": {}}, [2])
    first = run_sweep(spec(), ResultStore(db), progress=False)
    assert first.merged == 1 + 3 + 3
    manifest.write_text(manifest.read_text().replace('vocab_policy = "base_rows"', 'vocab_policy = "common_rows"'))
    again = run_sweep(spec(), ResultStore(db), progress=False)
    assert again.merged == first.merged  # every row again, under the new policy
    rows = ResultStore(db).results(include_stale=True, family="real-qwen2")
    assert (rows["stale"] == "base checkpoint or vocab policy changed").sum() == len(rows) / 2
    tally["changed inputs caught: vocab policies"] += 1


def v2_cache(tmp_path: Path) -> Path:
    """A cache written by mergelab 0.2 (schema 2, before fingerprints): a real sweep of a tiny family."""
    return unpack_cache("cache_v2.duckdb.gz", tmp_path)


def test_a_schema_2_cache_is_read_then_migrated_and_its_rows_kept_as_unrecorded(tmp_path, tally):
    import duckdb

    db = v2_cache(tmp_path)
    old = ResultStore(db).results()  # read-only: no writer migrated it yet
    assert len(old) == 11 * 3 and set(old["base_fp"]) == {""} and set(old["experts_fp"]) == {""}
    ResultStore(db).record_inputs("other", "s", "fp", {}, {"x": "h"}, 1)  # any write migrates
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    migrated = ResultStore(db).results()
    assert migrated.drop(columns="created_at").equals(old.drop(columns="created_at"))
    assert (migrated["created_at"] == old["created_at"]).all()
    tally["schema migrations exercised"] += 1


def test_pages_say_which_rows_are_stale_and_draw_only_current_ones(tiny_family, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from tests.test_app import ROOT

    db = tmp_path / "r.duckdb"
    sweep(tiny_family, db)
    replace_expert(tiny_family, "beta", seed=7, noise=0.5)
    sweep(tiny_family, db, ks=(1,))  # beta's k = 1 merge again; its k = 2, 3 merges stay stale
    for name, value in {"MERGELAB_DB": db, "MERGELAB_HOME": tmp_path / "home", "MERGELAB_JOBS": tmp_path / "j.sqlite"}.items():
        monkeypatch.setenv(name, str(value))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()
    assert not at.exception, [e.value for e in at.exception]
    assert "stale" in at.warning[0].value and "changed" in at.warning[0].value
    table = at.dataframe[0].value
    # beta's single-expert row and its merges at k = 1, 2, 3 (2 + 1): 5 merges on 3 domains
    assert table["rows"].sum() == 5 * 3 and set(table["why stale"]) == {"expert checkpoint changed"}
    curves = AppTest.from_file(str(ROOT / "pages/1_Curves.py"), default_timeout=120)
    curves.query_params["family"] = "tiny"
    curves.run()
    assert not curves.exception
    spec = json.loads(curves.get("plotly_chart")[0].proto.spec)
    points = [t for t in spec["data"] if t.get("name", "").endswith("subsets")]
    # every subset of k = 1..3 except beta's stale k = 2, 3 merges (2 + 1)
    assert sorted(points[0]["hovertext"]) == ["alpha", "alpha+gamma", "beta", "gamma"]


def test_a_filter_never_changes_which_rows_are_current(tmp_path):
    """Rows no sweep recorded: the newest decide what is current, whatever a read filters on."""
    import time

    store = ResultStore(tmp_path / "r.duckdb")
    row = dict(family="f", size="s", n_params=10, method="average", hparams="{}", eval_hash="h", metric_version=1,
               n_tokens=5, device="cpu", loss=1.0)
    store.upsert([dict(row, experts_key=k, domain=d) for k in ("a", "a+b") for d in ("x", "y")])
    time.sleep(0.01)
    store.upsert([dict(row, experts_key="a", domain="x", base_fp="new", experts_fp="fa")])
    current = store.results()
    assert len(current) == 1 and current["base_fp"].tolist() == ["new"]
    assert store.results(experts_key="a+b").empty and store.results(domain="y").empty
    assert len(store.results(include_stale=True, experts_key="a+b")) == 2
    assert len(store.macro(k=2)) == 0


def test_rows_cached_before_fingerprints_are_adopted_on_request(tiny_family, tmp_path, capsys, tally):
    db = v2_cache(tmp_path)  # a real sweep of the tiny family, by mergelab 0.2: 11 merges, no fingerprints
    family_dir = tmp_path / "fam"
    manifest = build_tiny_family_like_the_fixture(family_dir)
    sweep(manifest, db, ks=(1,))  # today's sweep of k = 1 only: everything else is stale, not mixed
    everything = ResultStore(db).results(include_stale=True)
    assert (everything["stale"].str.startswith("cached before fingerprints")).sum() > 0
    code, out, err = cli(capsys, "adopt", "--family", manifest, "--db", db)
    assert code == 0, err
    current = ResultStore(db).results()
    assert len(current) == 11 * 3 and set(current["base_fp"]) != {""}
    assert sweep(manifest, db).merged == 0  # adopted rows count as cached
    code, out, err = cli(capsys, "adopt", "--family", manifest, "--db", db, "--sizes", "nosuch")
    assert code == 2 and "nosuch" in err
    tally["rows cached before fingerprints adopted on request"] += 1


def build_tiny_family_like_the_fixture(root: Path) -> Path:
    """The tiny family the schema-2 fixture was swept on (same seeds: the same weights and eval sets)."""
    from tests.helpers import build_tiny_family

    return build_tiny_family(root)


def test_a_schema_3_cache_is_migrated_with_every_row_ce_and_the_metric_in_the_key(tmp_path, tally):
    """cache_v3.duckdb.gz: a real sweep (average, k = 1..3) written by mergelab at schema 3, before metrics."""
    import duckdb

    db = unpack_cache("cache_v3.duckdb.gz", tmp_path)
    old = ResultStore(db).results()  # read-only: not migrated yet, every row reads as CE
    assert len(old) == 33 and set(old["metric"]) == {"ce"} and set(old["unit"]) == {"nats/token"}
    assert not old["higher_better"].any() and (old["base_fp"] != "").all()  # current under its recorded inputs
    ResultStore(db).record_inputs("other", "s", "fp", {}, {"x": "h"}, 1)  # any write migrates
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "4"
        key = con.execute("SELECT constraint_text FROM duckdb_constraints() WHERE constraint_type = 'PRIMARY KEY'"
                          " AND table_name = 'results'").fetchone()[0]
    assert "metric" in key
    migrated = ResultStore(db).results()
    assert migrated.drop(columns="created_at").equals(old.drop(columns="created_at"))
    # the same merge and domain under another metric is another row, beside the CE one
    row = migrated.iloc[[0]].drop(columns=["experts", "k", "created_at"]).assign(
        metric="accuracy", higher_better=True, unit="fraction", loss=0.5)
    assert ResultStore(db).upsert(row) == 1
    both = ResultStore(db).results(experts_key=row["experts_key"].iat[0], domain=row["domain"].iat[0],
                                   method=row["method"].iat[0])
    assert sorted(both["metric"]) == ["accuracy", "ce"]
    tally["schema migrations exercised"] += 1
