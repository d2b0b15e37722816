"""The demo family: layout, HF loadability, bitwise determinism, and a 1/k curve from a real sweep."""

import hashlib
import tomllib

import pytest

from mergelab.demo.build import build_family
from mergelab.demo.domains import DOMAINS
from mergelab.family import load_family
from mergelab.store import ResultStore
from mergelab.sweep import SweepSpec, per_k_summary, run_sweep

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


def test_average_sweep_over_all_subsets_falls_with_k(micro_family, tmp_path):
    family = load_family(micro_family)
    store = ResultStore(tmp_path / "r.duckdb")
    report = run_sweep(SweepSpec(family, ["s"], {"average": {}}, list(range(1, 10))), store, progress=False)
    assert report.merged == 1 + 9 + 511
    macro = store.macro(family=family.name, method="average")
    assert macro.groupby("k").size().tolist() == [9, 36, 84, 126, 126, 84, 36, 9, 1]
    curve = per_k_summary(store, family.name, report.eval_hashes)[("s", "average")].dropna()
    assert list(curve.index) == list(range(1, 10))
    assert all(a > b for a, b in zip(curve, curve.iloc[1:])), curve.tolist()
