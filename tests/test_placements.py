"""Memory placements (issue 16): the same rows whichever placement holds the weights.

A family is swept under each placement, forced with MERGELAB_PLACEMENT: everything in memory
(`device`), experts in host memory (`host`, the same memory on a CPU), experts read from their
safetensors files chunk by chunk (`disk`), and the resident model sharded over several "cpu" devices
(`sharded:G`, experts in memory or on disk). Rows must agree within 1e-6 nats (fp32 checkpoints:
bitwise). Reading lazily keeps the eager checks: a NaN tensor is named with its file."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergelab.engine.memory import (PLACEMENT_ENV, parse_placement, placement_bytes, placement_markdown,
                                    placement_table, plan_memory)
from mergelab.engine.session import ExpertPool, MergeSession, ResidentModel, pack_bits, unpack_bits, unpack_float
from mergelab.errors import CheckpointError, MergelabError
from mergelab.io.family import load_family
from mergelab.store import ResultStore
from mergelab.sweep.plan import SweepSpec
from mergelab.sweep.runner import run_sweep
from tests.test_sweep import cli
from tests.realarch import VOCAB_ROWS, build_family

PLACEMENTS = ["device", "host", "disk", "sharded:3", "sharded:2:disk"]
METHODS = {"average": {}, "task_arithmetic": {}, "ties": {}, "dare": {}}
KEY = ["size", "method", "hparams", "experts_key", "domain"]


def sweep_rows(family, tmp_path, placement, monkeypatch):
    monkeypatch.setenv(PLACEMENT_ENV, placement)
    store = ResultStore(tmp_path / f"{placement.replace(':', '_')}.duckdb")
    size = family.sizes[0]
    report = run_sweep(SweepSpec(family, [size.name], METHODS, list(range(1, len(size.experts) + 1))), store,
                       device="cpu", progress=False)
    assert report.merged > 0 and not report.not_cached
    assert "forced by MERGELAB_PLACEMENT" in report.memory_plans[size.name]
    return store.results().sort_values(KEY).reset_index(drop=True)


@pytest.fixture(scope="module")
def vocab_family(tmp_path_factory):
    """bf16 checkpoints in shards, an untied lm_head, experts with 261 and 288 vocabulary rows (base_rows)."""
    return build_family(tmp_path_factory.mktemp("bf16"), "llama", expert_rows={"alpha": VOCAB_ROWS, "beta": 261,
                                                                                "gamma": 288},
                        vocab_policy="base_rows")


def test_every_placement_gives_the_same_rows_fp32(tiny_family, tmp_path, monkeypatch):
    family = load_family(tiny_family)
    rows = {p: sweep_rows(family, tmp_path, p, monkeypatch) for p in PLACEMENTS}
    reference = rows["device"]
    assert len(reference) == 3 * (1 + 3 + 4 * 7)  # domains × (base, experts, 4 methods × 7 subsets)
    for placement, frame in rows.items():
        assert frame[KEY].equals(reference[KEY]), placement
        assert (frame["loss"] - reference["loss"]).abs().max() == 0.0, placement  # fp32 experts: bitwise


def test_every_placement_gives_the_same_rows_bf16_shards_and_vocab_rows(vocab_family, tmp_path, monkeypatch):
    family = load_family(vocab_family)
    rows = {p: sweep_rows(family, tmp_path, p, monkeypatch) for p in PLACEMENTS}
    reference = rows["device"]
    for placement, frame in rows.items():
        assert frame[KEY].equals(reference[KEY]), placement
        assert (frame["loss"] - reference["loss"]).abs().max() < 1e-6, placement


def test_bf16_experts_are_kept_as_stored_and_merge_like_the_fp32_task_vectors(vocab_family):
    """The pool holds bf16 experts (2 bytes per parameter each) and masks as bits; every merge equals
    the method's formula on fp32 task vectors formed from the same checkpoints."""
    from mergelab.engine.methods import METHODS as ALL

    size = load_family(vocab_family).sizes[0]
    pool = ExpertPool.load(size)
    assert set(pool.experts.buffers) == {"bfloat16"} and pool.base_flat.dtype == torch.bfloat16
    resident, direct = ResidentModel(pool.base_checkpoint, "cpu"), ResidentModel(pool.base_checkpoint, "cpu")
    session, formula = MergeSession(pool, resident), MergeSession(ExpertPool.load(size), direct)
    for name in ("ties", "dare", "average"):
        method = ALL[name]
        session.merge(method, method.resolve({}), ("alpha", "beta"))
        if name == "ties":
            m = len(pool.expert_names)
            assert pool.masks.dtype == torch.uint8 and pool.masks.numel() == m * pool.layout.numel // 8
            assert pool.nbytes == pool.layout.numel * (2 + 2 * m) + pool.masks.numel()
        formula.merge_formula(method, method.resolve({}), ("alpha", "beta"))
        assert torch.equal(resident.flat, direct.flat), name


def test_disk_placement_names_the_file_and_tensor_of_a_nan(tiny_family, tmp_path, monkeypatch):
    """A NaN in an expert is refused before any row, with the same message whether the expert is read
    eagerly into memory or lazily from disk."""
    family = load_family(tiny_family)
    size = family.sizes[0]
    path = size.experts["beta"] / "model.safetensors"
    tensors = load_file(path)
    name = next(n for n in tensors if n.endswith("mlp.up_proj.weight"))
    tensors[name][1, 3] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    messages = {}
    for placement in ("device", "disk", "sharded:2:disk"):
        monkeypatch.setenv(PLACEMENT_ENV, placement)
        store = ResultStore(tmp_path / f"{placement.replace(':', '_')}.duckdb")
        with pytest.raises(CheckpointError) as err:
            run_sweep(SweepSpec(family, ["s"], {"average": {}}, [1, 2]), store, device="cpu", progress=False)
        messages[placement] = str(err.value)
        assert store.count() == 0
    assert messages["disk"] == messages["device"] == messages["sharded:2:disk"] == \
        f"{path}: tensor {name!r} has 1 NaN/Inf values"


def test_a_family_too_large_for_memory_is_swept_from_disk_under_the_limit(tiny_family, tmp_path, capsys, monkeypatch):
    """No placement forced: under a limit that the all-in-memory plan exceeds 2×, the plan streams the
    experts from disk, says so before the sweep, and the rows are those of the in-memory sweep."""
    family = load_family(tiny_family)
    n = family.sizes[0].n_params
    monkeypatch.delenv(PLACEMENT_ENV, raising=False)
    in_memory = placement_bytes(n, 3, "cpu", masks=False)[0]
    disk = placement_bytes(n, 3, "cpu", "disk", masks=False)[0]
    assert disk * 2 < in_memory
    monkeypatch.setenv("MERGELAB_MEMORY_LIMIT_GB", str(in_memory / 2 / 2**30))
    db = tmp_path / "limited.duckdb"
    code, _, err = cli(capsys, "sweep", "--family", tiny_family, "--db", db, "--methods", "average,ties", "--device", "cpu")
    assert code == 0, err
    assert "memory plan: size s on cpu: needs ~" in err and "base and experts streamed from their safetensors files [placement disk]" in err
    monkeypatch.delenv("MERGELAB_MEMORY_LIMIT_GB")
    code, _, err = cli(capsys, "sweep", "--family", tiny_family, "--db", tmp_path / "free.duckdb",
                       "--methods", "average,ties", "--device", "cpu")
    assert code == 0 and "[placement" not in err, err
    limited = ResultStore(db).results().sort_values(KEY).reset_index(drop=True)
    free = ResultStore(tmp_path / "free.duckdb").results().sort_values(KEY).reset_index(drop=True)
    assert limited[KEY].equals(free[KEY]) and (limited["loss"] - free["loss"]).abs().max() == 0.0


def test_sharded_resident_model_keeps_modules_whole(tiny_family):
    size = load_family(tiny_family).sizes[0]
    pool = ExpertPool.load(size, "cpu", shards=["cpu"] * 3)
    resident = ResidentModel(pool.base_checkpoint, "cpu", pool.shards)
    assert resident.flat is None and len(resident.parts) == 3
    assert [lo for _, lo, _ in pool.shards] == [0] + [hi for _, _, hi in pool.shards[:-1]]  # contiguous ranges
    held = [set(part.shapes) for part, _ in resident.parts]
    assert all(held) and sum(map(len, held)) == len(pool.names)  # every tensor once, every device some
    hooked = {n for n, m in resident.model.named_modules() if m._forward_pre_hooks}
    assert {"model.layers.0", "model.embed_tokens", "model.norm", "lm_head"} <= hooked  # inputs moved per module
    for names in held:  # a decoder layer's tensors on one device
        layers = {n.split(".")[2] for n in names if n.startswith("model.layers.")}
        assert all(not (other & layers) for other in ({n.split(".")[2] for n in h if n.startswith("model.layers.")}
                                                        for h in held if h is not names))


@pytest.mark.parametrize("length, skip", [(1, 0), (7, 0), (8, 0), (9, 3), (1000, 5), (16, 8)])
def test_keep_bits_round_trip(length, skip):
    mask = torch.rand(length + skip, generator=torch.Generator().manual_seed(length)) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-(length + skip) // 8)
    assert torch.equal(unpack_bits(packed, skip, length), mask[skip:])
    assert torch.equal(unpack_float(packed, skip, length), mask[skip:].float())


def test_placement_names_are_checked(tiny_family, tmp_path, capsys, monkeypatch):
    assert parse_placement("sharded:4:disk") == ("disk", 4) and parse_placement("Host") == ("host", 1)
    for bad in ("ram", "sharded", "sharded:0", "sharded:x", "sharded:2:ram", "disk:2"):
        with pytest.raises(MergelabError, match="expected device, host, disk, sharded:G or sharded:G:disk"):
            parse_placement(bad)
    monkeypatch.setenv(PLACEMENT_ENV, "ram")
    code, _, err = cli(capsys, "sweep", "--family", tiny_family, "--db", tmp_path / "r.duckdb", "--methods", "average")
    assert code == 2 and err.strip().splitlines()[-1] == \
        "error: MERGELAB_PLACEMENT='ram': expected device, host, disk, sharded:G or sharded:G:disk"


def test_paper_sizes_fit_the_machines_of_the_scale_out_doc():
    """7B fits one 80 GB GPU with 128 GiB of host memory; 72B fits one 8×80 GB node with 1 TiB; the doc's
    table is the one `placement_markdown` generates."""
    table = {(r["size"], r["machine"][:3]): r for r in placement_table()}
    assert table["7B", "(a)"]["fits"] and table["7B", "(a)"]["placement"] == "disk"
    assert table["72B", "(b)"]["fits"] and table["72B", "(b)"]["placement"].startswith("sharded:")
    assert table["72B", "(b)"]["gpu_bytes"] <= 80 * 10**9 and table["72B", "(b)"]["host_bytes"] <= 2**40
    assert table["0.5B", "(a)"]["placement"] == "device" and not table["72B", "(a)"]["fits"]
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "scale-out.md").read_text()
    assert placement_markdown() in doc


def test_plan_prefers_fewest_gpus_and_refuses_with_every_placements_numbers():
    n, m = 10**9, 9
    plan = plan_memory(n, m, "s", "cuda:0", expert_itemsize=2, base_itemsize=2, gpus=8,
                       available=4 * 10**9, host_available=10**12, placement="")
    assert plan.fits and plan.label == "sharded:2" and plan.devices == ["cuda:0", "cuda:1"]
    plan = plan_memory(n, m, "s", "cuda:0", expert_itemsize=2, base_itemsize=2, gpus=2,
                       available=10**9, host_available=10**12, placement="")
    assert not plan.fits and len(plan.tried) == 5  # device, host, disk, sharded:2, sharded:2:disk
    dense = plan_memory(n, m, "s", "cpu", dense=True, available=10**12, placement="")
    assert "dense fp32 prepared task vectors" in dense.describe()


def test_sharded_and_disk_sessions_match_one_device_with_the_cuda_layout(tiny_family, monkeypatch):
    """The GPU layout (bf16 resident model fed from an fp32 accumulator per shard), run on CPU: split over
    three devices, with the experts in memory or on disk, every merge writes the same weights as one device."""
    import itertools

    from mergelab.engine import session as engine
    from mergelab.engine.methods import METHODS as ALL
    from mergelab.engine.session import merge_rank

    size = load_family(tiny_family).sizes[0]
    monkeypatch.setattr(engine, "STREAM_CHUNK", 1000)  # pieces across tensor and shard boundaries
    monkeypatch.setattr(engine, "weight_dtype", lambda device: torch.bfloat16)
    sessions = []
    for store, shards in (("cpu", None), ("cpu", ["cpu"] * 3), ("disk", ["cpu"] * 3), ("disk", None)):
        pool = ExpertPool.load(size, "cpu", store=store, shards=shards)
        sessions.append(MergeSession(pool, ResidentModel(pool.base_checkpoint, "cpu", pool.shards), refresh=3))
    experts = sessions[0].pool.expert_names
    subsets = sorted((s for k in (1, 2, 3) for s in itertools.combinations(experts, k)), key=lambda s: merge_rank(s, experts))
    for name in ("average", "ties", "dare", "task_arithmetic"):
        method = ALL[name]
        for subset in subsets:
            for session in sessions:
                session.merge(method, method.resolve({}), subset)
            reference = sessions[0].resident.params
            for session in sessions[1:]:
                for p_name, p in session.resident.params.items():
                    assert p.dtype == torch.bfloat16 and torch.equal(p, reference[p_name]), (name, subset, p_name)
    assert sessions[1].merged is not None and len(sessions[1].merged) == 3  # an fp32 accumulator per shard


# ---- merged with issue 17: weights, filters, whole-tensor and dense-prepare methods, adapters, layouts ---------

OPTION_METHODS = {
    "task_arithmetic": {"weights": "alpha:0.5,gamma:2"},  # linear path: w_i in the incremental update
    "ties": {"weights": "alpha:0.5,gamma:2", "exclude": "*embed*"},  # keep bits × w_i, a tensor left at the base
    "model_stock": {},  # whole-tensor combine (angles between task vectors)
    "della": {"weights": "beta:1.5"},  # prepare without a keep mask: dense prepared vectors × w_i
}


def option_rows(manifest, tmp_path, placement, monkeypatch, methods=OPTION_METHODS, ks=None):
    monkeypatch.setenv(PLACEMENT_ENV, placement)
    family = load_family(manifest)
    size = family.sizes[0]
    store = ResultStore(tmp_path / f"opt_{placement.replace(':', '_')}.duckdb")
    report = run_sweep(SweepSpec(family, [size.name], methods, ks or list(range(1, len(size.experts) + 1))), store,
                       device="cpu", progress=False)
    assert report.merged > 0 and not report.not_cached
    assert "forced by MERGELAB_PLACEMENT" in report.memory_plans[size.name]
    return store.results().sort_values(KEY).reset_index(drop=True)


def test_weighted_whole_tensor_and_dense_prepare_methods_give_the_same_rows_on_disk(tiny_family, tmp_path, monkeypatch):
    """Per-expert weights (linear and keep-bit paths), a tensor filter, model_stock's whole-tensor combine
    and della's dense prepared vectors: the same rows read from the files (and sharded) as in memory."""
    rows = {p: option_rows(tiny_family, tmp_path, p, monkeypatch) for p in ("device", "disk", "sharded:2:disk")}
    reference = rows["device"]
    assert set(reference["method"]) >= set(OPTION_METHODS)
    weighted = reference[reference["method"] == "task_arithmetic"]["hparams"].iloc[0]
    assert "alpha:0.5" in weighted  # the weights reached the cache key: the rows are the weighted merges
    for placement, frame in rows.items():
        assert frame[KEY].equals(reference[KEY]), placement
        assert (frame["loss"] - reference["loss"]).abs().max() < 1e-6, placement


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_adapter_experts_and_converted_layouts_merge_from_disk(tmp_path, monkeypatch):
    """Tensors formed on read (a LoRA adapter's base + B·A, MoE experts packed into one tensor) cannot be read
    in place from a file: the disk placement holds those in memory and reads the rest (renamed tensors of
    Gemma 3's text model by their stored keys) from the files; rows equal the in-memory placement's."""
    import shutil

    from tests.helpers import build_tiny_family
    from tests.test_adapters import make_adapter
    from tests.test_layouts import layout_family

    manifest = build_tiny_family(tmp_path / "adapter")
    beta = manifest.parent / "s" / "experts" / "beta"
    tokenizer_files = {p.name: p.read_bytes() for p in beta.iterdir() if "token" in p.name}
    shutil.rmtree(beta)
    make_adapter(manifest.parent / "s" / "base", beta, seed=3)
    for name, data in tokenizer_files.items():
        (beta / name).write_bytes(data)
    families = {"adapter": manifest, "qwen3_moe": layout_family(tmp_path / "moe", "qwen3_moe"),
                "gemma3": layout_family(tmp_path / "gemma3", "gemma3")}
    methods = {"average": {}, "ties": {"density": 0.5}, "model_stock": {}}
    for kind, path in families.items():
        rows = {p: option_rows(path, tmp_path / kind, p, monkeypatch, methods, ks=[2]) for p in ("device", "disk")}
        assert rows["disk"][KEY].equals(rows["device"][KEY]), kind
        assert (rows["disk"]["loss"] - rows["device"]["loss"]).abs().max() < 1e-6, kind
    pool = ExpertPool.load(load_family(manifest).size("s"), store="disk")
    held = pool.experts.held[pool.expert_names.index("beta")]
    assert held and all(name in pool.names for name in held)  # only the adapted tensors are held in memory
    assert not pool.experts.held[pool.expert_names.index("alpha")]
    pool.close()
