"""Experts whose vocabulary rows differ from the base's: refused by default with the file, tensor, rows
and the option to use; merged over the base's rows (`base_rows`) or the rows all share (`common_rows`).

The base pads its vocabulary to 272 rows for a 261-token tokenizer (as Qwen2.5 pads 151665 tokens to
151936 rows); expert beta was resized to the tokenizer (261 rows), expert gamma grew to 288 rows."""

import itertools
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from mergelab.engine.session import ExpertPool, MergeSession, ResidentModel
from mergelab.errors import CheckpointError, ManifestError
from mergelab.io.family import load_family
from mergelab.engine.methods import METHODS
from mergelab.store import ResultStore
from mergelab.sweep.plan import SweepSpec
from mergelab.sweep.runner import run_sweep
from tests.helpers import reference_ce
from tests.realarch import VOCAB_ROWS, build_family

ROWS = {"alpha": VOCAB_ROWS, "beta": 261, "gamma": 288}


@pytest.fixture(scope="module", params=["qwen2", "llama"])  # tied embedding only; embedding and untied lm_head
def manifest(request, tmp_path_factory):
    return build_family(tmp_path_factory.mktemp(request.param), request.param, expert_rows=ROWS)


def with_policy(manifest, policy):
    """The same family under another vocab_policy (a sibling manifest, so relative paths still resolve)."""
    text = manifest.read_text().replace("token_budget =", f"vocab_policy = {json.dumps(policy)}\ntoken_budget =", 1)
    path = manifest.with_name(f"family-{policy}.toml")
    path.write_text(text)
    return load_family(path)


def read_dir(path) -> dict:
    shards = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values()
    return {k: v.float() for shard in sorted(set(shards)) for k, v in load_file(path / shard).items()}


def aligned(base: torch.Tensor, expert: torch.Tensor, rows: int) -> torch.Tensor:
    """The expert's tensor on the base's shape: its first `rows` rows, the base's beyond them."""
    out = base.clone()
    r = min(rows, expert.shape[0])
    out[:r] = expert[:r]
    return out


def test_refused_by_default_with_file_tensor_rows_and_option(manifest, tmp_path):
    from mergelab.engine.materialise import export_model

    family = load_family(manifest)
    size = family.sizes[0]
    assert family.vocab_policy == size.vocab_policy == "refuse"
    store = ResultStore(tmp_path / "r.duckdb")
    with pytest.raises(CheckpointError) as err:
        run_sweep(SweepSpec(family, [size.name], {"average": {}}, [1, 2]), store, progress=False)
    index = json.loads((size.experts["beta"] / "model.safetensors.index.json").read_text())["weight_map"]
    found = re.match(r"(\S+): tensor '(\S+)' has 261 vocabulary rows, the base has 272 \(shape \[261, 32\] vs "
                     r'\[272, 32\]\); to merge anyway set vocab_policy = "base_rows"', str(err.value))
    assert found and found[2] in ("model.embed_tokens.weight", "lm_head.weight"), err.value
    assert found[1] == str(size.experts["beta"] / index[found[2]])  # the shard that holds the tensor
    assert store.count() == 0
    with pytest.raises(CheckpointError, match="has 261 vocabulary rows"):
        export_model(size, "average", {}, ["alpha", "beta"], tmp_path / "out")


@pytest.mark.parametrize("policy, limit", [("base_rows", VOCAB_ROWS), ("common_rows", min(ROWS.values()))])
def test_merges_align_every_expert_on_the_base_rows(manifest, policy, limit):
    """base_rows: rows beyond an expert's own count have task vector 0, extra rows are cut; common_rows:
    only the rows every expert has are merged, the rest keep the base's values."""
    size = with_policy(manifest, policy).sizes[0]
    base, experts = read_dir(size.base), {e: read_dir(p) for e, p in size.experts.items()}
    vocab = [n for n, t in base.items() if t.shape[0] == VOCAB_ROWS]
    assert len(vocab) == (1 if size.name == "qwen2" else 2)
    assert all(experts[e][n].shape[0] == ROWS[e] for e in experts for n in vocab)
    pool = ExpertPool.load(size)
    assert pool.merge_rows == {n: limit for n in vocab}
    resident = ResidentModel(pool.base_checkpoint, "cpu")
    session = MergeSession(pool, resident)

    def expected(name, subset, formula):
        theta0 = base[name]
        rows = limit if name in vocab else theta0.shape[0]
        return formula(theta0, torch.stack([aligned(theta0, experts[e][name], rows) - theta0 for e in subset]))

    from tests.test_realarch import ties_reference

    for method, formula in [("average", lambda b, d: b + d.mean(0)), ("ties", ties_reference)]:
        for subset in itertools.combinations(size.expert_names, 2):
            session.merge(METHODS[method], METHODS[method].resolve({}), subset)
            for name in base:
                torch.testing.assert_close(resident.params[name].detach(), expected(name, subset, formula),
                                           atol=1e-6, rtol=0, msg=f"{method} {subset} {name}")
    for name in vocab:
        assert resident.params[name].shape[0] == VOCAB_ROWS
        if policy == "common_rows":  # beyond the shared rows nothing moves
            assert torch.equal(resident.params[name].detach()[limit:], base[name][limit:])
    session.load_expert("beta")  # the single-expert reference row: the expert as the merge sees it
    for name in vocab:
        assert torch.equal(resident.params[name].detach(), aligned(base[name], experts["beta"][name], limit))


def test_sweep_and_export_under_a_policy(manifest, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergelab.engine.materialise import export_model

    family = with_policy(manifest, "base_rows")
    size = family.sizes[0]
    store = ResultStore(tmp_path / "r.duckdb")
    report = run_sweep(SweepSpec(family, [size.name], {"average": {}}, [1, 2, 3]), store, progress=False)
    assert report.merged == 1 + 3 + 7 and store.count() == 11 * len(family.domains)
    out = export_model(size, "average", {}, ["beta", "gamma"], tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert model.get_input_embeddings().weight.shape[0] == VOCAB_ROWS == model.config.vocab_size
    swept = store.results(method="average", experts_key="beta+gamma").set_index("domain")["loss"]
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    for domain, path in family.eval_sets.items():
        assert swept[domain] == pytest.approx(reference_ce(model, tokenizer, path, family.token_budget)[0], abs=2e-5)


def test_policy_is_checked_in_the_manifest_and_may_differ_per_size(manifest):
    with pytest.raises(ManifestError, match="field 'vocab_policy' must be one of refuse, base_rows, common_rows, got 'pad'"):
        with_policy(manifest, "pad")
    text = manifest.read_text().replace('n_params =', 'vocab_policy = "common_rows"\nn_params =', 1)
    per_size = manifest.with_name("family-per-size.toml")
    per_size.write_text(text)
    family = load_family(per_size)
    assert family.vocab_policy == "refuse" and family.sizes[0].vocab_policy == "common_rows"
    bad = per_size.with_name("family-bad.toml")
    bad.write_text(text.replace('vocab_policy = "common_rows"', "vocab_policy = 1"))
    with pytest.raises(ManifestError, match=r"field sizes\.\w+\.'vocab_policy' must be one of"):
        load_family(bad)
