"""The engine on real HF architectures: sharded bf16/fp16 checkpoints of Qwen2 (tied, chat eval), Llama
(untied lm_head), Gemma 2 (scaled tied embeddings, logit soft-capping) and Gemma 3. Merged weights are
checked against the method formulas computed with torch from the files (read by the safetensors
library, not our reader) and the swept CE against transformers' own loss of the exported model."""

import itertools
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from mergelab.io.checkpoints import Checkpoint
from mergelab.engine.session import ExpertPool, MergeSession, ResidentModel
from mergelab.errors import CheckpointError
from mergelab.io.family import load_family
from mergelab.engine.methods import METHODS
from mergelab.store import ResultStore
from mergelab.sweep.plan import SweepSpec
from mergelab.sweep.runner import run_sweep
from tests.helpers import DOMAINS, reference_ce
from tests.realarch import build_family

CASES = {"qwen2": ("bfloat16", True), "llama": ("float16", False), "gemma2": ("bfloat16", False),
         "gemma3": ("bfloat16", False)}  # arch -> (storage dtype, eval rows are chat conversations)


@pytest.fixture(scope="module", params=list(CASES))
def family(request, tmp_path_factory):
    dtype, chat = CASES[request.param]
    return load_family(build_family(tmp_path_factory.mktemp(request.param), request.param, dtype=dtype, chat=chat))


def read_dir(path) -> dict:
    """Every tensor of a checkpoint dir as fp32, through the safetensors library."""
    shards = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values()
    return {k: v.float() for shard in sorted(set(shards)) for k, v in load_file(path / shard).items()}


def ties_reference(base, deltas, density=0.2, lam=1.0):
    """TIES from its definition with a full sort (the engine uses kthvalue): trim, elect, disjoint mean."""
    flat = deltas.reshape(len(deltas), -1)
    keep = min(flat.shape[1], max(1, math.ceil(density * flat.shape[1])))
    threshold = flat.abs().sort(dim=1, descending=True).values[:, keep - 1:keep]
    trimmed = flat * (flat.abs() >= threshold)
    sign = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    tau = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    return base + lam * tau.reshape(base.shape)


def test_checkpoints_are_sharded_in_their_dtype_with_the_real_layout(family):
    size = family.sizes[0]
    dtype, _ = CASES[size.name]
    base = Checkpoint(size.base)
    assert (size.base / "model.safetensors.index.json").is_file() and len(set(base.files.values())) >= 3
    header_dtypes = {base._open(n).entries[n][0] for n in base.names}
    assert header_dtypes == {dtype}
    assert ("lm_head.weight" in base.files) == (size.name == "llama") == (not base.tied_embeddings)
    reference = load_file(base.files["model.embed_tokens.weight"])["model.embed_tokens.weight"]
    assert reference.dtype == getattr(torch, dtype)
    assert torch.equal(base.tensor("model.embed_tokens.weight"), reference)  # bitwise, in the storage dtype


def test_sweep_over_every_subset_lands_every_row(family, tmp_path):
    store = ResultStore(tmp_path / "r.duckdb")
    spec = SweepSpec(family, [family.sizes[0].name], {m: {} for m in METHODS}, [1, 2, 3])
    report = run_sweep(spec, store, progress=False)
    merges = 1 + 3 + len(METHODS) * 7
    assert report.merged == report.planned == merges and store.count() == merges * len(DOMAINS)
    frame = store.results()
    assert frame["loss"].between(0.5, 10).all() and (frame["n_tokens"] >= family.token_budget).all()
    assert frame.groupby(["method", "experts_key"]).size().eq(len(DOMAINS)).all()
    assert frame.groupby(["method", "hparams"])["experts_key"].nunique().to_dict() == {
        **{(m, json.dumps(METHODS[m].resolve({}), sort_keys=True, separators=(",", ":"))): 7 for m in METHODS},
        ("base", "{}"): 1, ("expert", "{}"): 3}
    assert run_sweep(spec, store, progress=False).merged == 0


def test_merged_weights_equal_the_formula_computed_from_the_files(family):
    size = family.sizes[0]
    base, experts = read_dir(size.base), {e: read_dir(p) for e, p in size.experts.items()}
    pool = ExpertPool.load(size)
    resident = ResidentModel(pool.base_checkpoint, "cpu")
    session = MergeSession(pool, resident)
    assert sorted(pool.names) == sorted(base)  # a tied lm_head is not in the files, an untied one is
    subsets = [s for k in (1, 2, 3) for s in itertools.combinations(size.expert_names, k)]
    for method, formula in [("average", lambda b, d: b + d.mean(0)), ("ties", ties_reference)]:
        for subset in subsets:
            session.merge(METHODS[method], METHODS[method].resolve({}), subset)
            for name, theta0 in base.items():
                deltas = torch.stack([experts[e][name] - theta0 for e in subset])
                torch.testing.assert_close(resident.params[name].detach(), formula(theta0, deltas),
                                           atol=1e-6, rtol=0, msg=f"{method} {subset} {name}")
    if pool.base_checkpoint.tied_embeddings:
        assert resident.model.get_output_embeddings().weight is resident.model.get_input_embeddings().weight


def test_swept_ce_equals_transformers_loss_of_the_exported_model(family, tmp_path):
    """Sweep rows (batched, padded, LM head on scored positions only) against `model(ids, labels=…)`
    one example at a time on the `export-model` output loaded by AutoModelForCausalLM."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergelab.engine.materialise import export_model

    size, hp = family.sizes[0], {"density": 0.5}
    out = export_model(size, "ties", hp, ("alpha", "gamma"), tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    store = ResultStore(tmp_path / "r.duckdb")
    run_sweep(SweepSpec(family, [size.name], {"ties": hp}, [2], reference_rows=False), store, progress=False)
    swept = store.results(method="ties", experts_key="alpha+gamma").set_index("domain")
    for domain, path in family.eval_sets.items():
        expected, count = reference_ce(model, tokenizer, path, budget=family.token_budget)
        assert swept.loss[domain] == pytest.approx(expected, abs=2e-5) and swept.n_tokens[domain] == count


def test_an_unknown_logit_transform_is_evaluated_through_the_full_forward(tmp_path):
    """Granite divides its logits by logits_scaling inside forward: the fast LM-head path does not
    reproduce that, notices, and evaluation goes through the model's own forward instead."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergelab.engine.evaluate import _head_matches_forward, evaluate, prepare_eval

    family = load_family(build_family(tmp_path, "granite", dtype="float32"))
    model = AutoModelForCausalLM.from_pretrained(str(family.sizes[0].base), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(family.sizes[0].base))
    data = prepare_eval(family.eval_sets, tokenizer, 10**6, batch_tokens=128)
    ours = evaluate(model, data)
    assert not _head_matches_forward(model, data.batches[0])
    for domain, path in family.eval_sets.items():
        assert ours[domain] == pytest.approx(reference_ce(model, tokenizer, path)[0], abs=1e-5)


def test_soft_capping_is_applied_on_the_fast_path(family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergelab.engine.evaluate import _head_matches_forward, prepare_eval

    base = family.sizes[0].base
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    data = prepare_eval(family.eval_sets, AutoTokenizer.from_pretrained(str(base)), 64)
    assert _head_matches_forward(model, data.batches[0])  # every architecture here takes the fast path


def test_tensor_names_the_architecture_does_not_have_are_named(tmp_path):
    from safetensors.torch import save_file

    family = load_family(build_family(tmp_path, "llama", dtype="float32"))
    base = family.sizes[0].base
    index = json.loads((base / "model.safetensors.index.json").read_text())
    shard = base / index["weight_map"]["model.norm.weight"]
    tensors = load_file(shard)
    tensors["transformer.ln_f.weight"] = tensors.pop("model.norm.weight")  # GPT-2 style name
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"]["transformer.ln_f.weight"] = index["weight_map"].pop("model.norm.weight")
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as err:
        ResidentModel(Checkpoint(base), "cpu")
    assert f"{shard}: tensor 'transformer.ln_f.weight' is not a parameter of LlamaForCausalLM" in str(err.value)


def test_packed_sequences_stay_apart_in_every_architecture(family, tmp_path):
    """Packed rows (several sequences end to end, each at its own positions) in each architecture here,
    sliding-window layers (Gemma 2/3, window 8) included: the check passes and the CE of the packed rows
    is transformers' own loss, one example at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergelab.engine.evaluate import _packing_honoured, evaluate, prepare_eval

    base = family.sizes[0].base
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    data = prepare_eval(family.eval_sets, tokenizer, 10**6)
    assert int((data.packed[0].position_ids == 0).sum(1).max()) >= 2
    assert _packing_honoured(model, data.packed)
    ours = evaluate(model, data, packed=True)
    for domain, path in family.eval_sets.items():
        assert ours[domain] == pytest.approx(reference_ce(model, tokenizer, path)[0], abs=1e-5)
