"""The demo family: layout, HF loadability, bitwise determinism, and a 1/k curve from a real sweep."""

import hashlib
import shutil
import tomllib

import pandas as pd
import pytest

from mergelab.demo.build import build_family
from mergelab.demo.domains import DOMAINS
from mergelab.demo.up import prepare_demo, shipped_results_path
from mergelab.io.family import load_family
from mergelab.store import ResultStore

pytestmark = pytest.mark.slow


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_layout_manifest_and_hf_loading(micro_family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = micro_family.parent
    raw = tomllib.loads(micro_family.read_text())
    assert raw["name"] == "demo-micro" and tuple(raw["domains"]) == DOMAINS
    family = load_family(micro_family)
    assert family.size_names == ("xs", "s")
    assert family.sizes[1].n_params > 4 * family.sizes[0].n_params
    for size in family.sizes:
        assert size.base == root / size.name / "base"
        assert set(size.experts) == set(DOMAINS)
        for ckpt in [size.base, *size.experts.values()]:
            assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in ckpt.iterdir()}
        model = AutoModelForCausalLM.from_pretrained(str(size.base))
        assert sum(p.numel() for p in model.parameters()) == size.n_params
        assert model.config.tie_word_embeddings
    tokenizer = AutoTokenizer.from_pretrained(str(family.sizes[0].base))
    assert tokenizer.decode(tokenizer("C(5,2) = 10")["input_ids"]) == "C(5,2) = 10"
    for domain in DOMAINS:
        lines = (root / "eval" / f"{domain}.jsonl").read_text().splitlines()
        assert len(lines) == 80 and '"prompt"' in lines[0] and '"response"' in lines[0]


def test_same_seed_gives_bitwise_identical_checkpoints(micro_family, tmp_path):
    again = build_family("micro", tmp_path / "again", sizes=["xs"], progress=False)
    other = build_family("micro", tmp_path / "other", seed=1, sizes=["xs"], progress=False)
    for rel in ["xs/base/model.safetensors", "xs/experts/code/model.safetensors", "eval/biology.jsonl"]:
        assert digest(again.parent / rel) == digest(micro_family.parent / rel), rel
        assert digest(other.parent / rel) != digest(micro_family.parent / rel), rel


def test_sizes_built_in_parallel_processes_are_bitwise_the_same(micro_family, tmp_path):
    parallel = build_family("micro", tmp_path / "parallel", progress=False, jobs=2)
    files = sorted(p.relative_to(micro_family.parent) for p in micro_family.parent.rglob("*.safetensors"))
    assert len(files) == 2 * 10
    for rel in files:
        assert digest(parallel.parent / rel) == digest(micro_family.parent / rel), rel
    assert parallel.read_text() == micro_family.read_text()


def test_main_job_prepares_family_cache_and_a_falling_curve(micro_family, tmp_path, monkeypatch):
    """`mergelab demo up` without the UI: family found, shipped rows loaded, default sweep run once."""
    home = tmp_path / "home"
    shutil.copytree(micro_family.parent, home / "demo-micro")  # as if built by an earlier run
    monkeypatch.setenv("MERGELAB_HOME", str(home))
    db = tmp_path / "r.duckdb"
    manifest = prepare_demo("micro", db, progress=False)
    assert manifest == home / "demo-micro" / "family.toml"
    store = ResultStore(db)
    shipped = len(pd.read_parquet(shipped_results_path()))
    micro = store.macro(family="demo-micro", method="average")
    assert store.count() == shipped + 2 * (1 + 9 + 511) * 9
    assert micro.groupby(["size", "k"]).size().loc["s"].tolist() == [9, 36, 84, 126, 126, 84, 36, 9, 1]
    for size in ("xs", "s"):
        curve = micro[micro["size"] == size].groupby("k")["loss"].mean()
        assert list(curve.index) == list(range(1, 10))
        assert all(a > b for a, b in zip(curve, curve.iloc[1:])), (size, curve.tolist())
    prepare_demo("micro", db, progress=False)  # second run: nothing rebuilt, nothing recomputed
    assert store.count() == shipped + 2 * 521 * 9
