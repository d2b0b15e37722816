"""Engine, sweep and CLI end to end on a tiny real family; bad input leaves the cache untouched."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergelab.engine.session import ExpertPool, MergeSession, ResidentModel
from mergelab.io.family import load_family
from mergelab.engine.methods import get_method
from mergelab.store import ResultStore
from mergelab.sweep.plan import SweepSpec, parse_ks, plan_subsets
from mergelab.sweep.runner import run_sweep
from tests.helpers import build_tiny_family
from tests.test_store import rows


def cli(capsys, *args):
    """Run the real `mergelab` entry point in-process; returns (exit code, stdout, stderr)."""
    from mergelab.cli import main

    old = sys.argv
    sys.argv = ["mergelab", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


def test_merge_writes_mean_of_experts_into_resident_model_with_tied_head(tiny_family):
    size = load_family(tiny_family).sizes[0]
    pool = ExpertPool.load(size)
    resident = ResidentModel(pool.base_checkpoint, "cpu")
    MergeSession(pool, resident).merge_formula(get_method("average"), {}, ("alpha", "gamma"))
    experts = [load_file(size.experts[e] / "model.safetensors") for e in ("alpha", "gamma")]
    state = resident.model.state_dict()
    for name in pool.names:
        assert torch.allclose(state[name], (experts[0][name] + experts[1][name]) / 2, atol=1e-6), name
    assert resident.model.lm_head.weight.data_ptr() == resident.model.model.embed_tokens.weight.data_ptr()


def test_plan_subsets_all_and_sampled():
    experts = list("abcdefghi")
    assert len(plan_subsets(experts, range(1, 10))) == 511
    sampled = plan_subsets(experts, [1, 2, 5], subsets=4, seed=3)
    assert [len(s) for s in sampled] == [1] * 4 + [2] * 4 + [5] * 4
    assert len(set(sampled)) == 12 and sampled == plan_subsets(experts, [1, 2, 5], subsets=4, seed=3)
    assert sampled != plan_subsets(experts, [1, 2, 5], subsets=4, seed=4)
    assert parse_ks("all", 3) == [1, 2, 3] and parse_ks("1,3-4", 9) == [1, 3, 4]


def test_diverse_orderings_are_spread_and_their_prefixes_planned():
    from mergelab.sweep.plan import diverse_orderings

    experts = list("abcdefghi")
    orders = diverse_orderings(experts, 15, seed=0)
    assert len(orders) == 15 and all(sorted(o) == experts for o in orders)
    distances = [sum(x != y for x, y in zip(a, b)) for i, a in enumerate(orders) for b in orders[i + 1:]]
    assert min(distances) >= 6  # far apart: random pairs of 9-permutations share ~1 position
    plan = plan_subsets(experts, range(1, 10), "orderings:15", seed=0)
    assert len(plan) == len(set(plan)) and sum(len(s) == 9 for s in plan) == 1 and sum(len(s) == 1 for s in plan) <= 9
    assert tuple(sorted(orders[3][:4], key=experts.index)) in plan


def test_sweep_records_reference_rows_and_skips_cached(tiny_family, tmp_path):
    family = load_family(tiny_family)
    store = ResultStore(tmp_path / "r.duckdb")
    spec = SweepSpec(family, ["s"], {"average": {}, "ties": {"density": 0.5}}, [1, 2, 3])
    report = run_sweep(spec, store, progress=False)
    assert report.merged == report.planned == 1 + 3 + 2 * 7
    assert report.rows_written == 18 * 3 == store.count()
    frame = store.results()
    assert set(frame.groupby("method")["k"].unique().map(tuple)) == {(0,), (1,), (1, 2, 3)}
    # average of one expert is that expert: identical losses
    expert = frame[frame.method == "expert"].set_index(["experts_key", "domain"])["loss"]
    single = frame[(frame.method == "average") & (frame.k == 1)].set_index(["experts_key", "domain"])["loss"]
    assert single.sort_index().tolist() == pytest.approx(expert.sort_index().tolist(), abs=1e-6)
    assert set(frame[frame.method == "ties"]["hparams"]) == {'{"density":0.5,"lambda":1.0}'}
    again = run_sweep(spec, store, progress=False)
    assert again.merged == 0 and again.skipped == again.planned and store.count() == 54


def test_cli_sweep_summary_and_results_export(tiny_family, tmp_path, capsys):
    db = tmp_path / "cli.duckdb"
    code, out, err = cli(capsys, "sweep", "--family", tiny_family, "--methods", "average", "--db", db)
    assert code == 0, err
    assert "11 merges evaluated, 0 already cached, 33 rows written" in out
    assert "mean cross-domain CE (nats) per k" in out
    code, out, _ = cli(capsys, "sweep", "--family", tiny_family, "--methods", "average", "--db", db)
    assert "0 merges evaluated, 11 already cached" in out
    code, out, _ = cli(capsys, "results", "--db", db, "--format", "json")
    records = json.loads(out)
    assert code == 0 and len(records) == 33 and {"experts", "loss", "eval_hash"} <= set(records[0])
    code, out, _ = cli(capsys, "results", "--db", db, "--format", "csv", "--family", "tiny")
    assert out.count("\n") == 34 and out.startswith("family,size,n_params,method")


def poison_expert(manifest, value=float("nan")):
    path = manifest.parent / "s" / "experts" / "beta" / "model.safetensors"
    tensors = load_file(path)
    tensors["model.norm.weight"][3] = value
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("args, fragment", [
    (["--methods", "slerp"], "unknown merge method 'slerp'"),
    (["--methods", "ties", "--hp", "ties.density=0"], "ties.density=0.0 is out of range (0.0, 1.0]"),
    (["--methods", "dare", "--hp", "dare.p=1"], "dare.p=1.0 is out of range [0.0, 1.0)"),
    (["--methods", "dare", "--hp", "dare.p=NaN"], "dare.p must be finite"),
    (["--methods", "ties", "--hp", "ties.density=high"], "ties.density must be a number, got 'high'"),
    (["--methods", "ties", "--hp", "dare.p=0.1"], "method 'dare' is not among --methods"),
    (["--k", "0-2"], "k must lie in 1..3"),
    (["--k", "two"], "expected a range like 1-9"),
    (["--subsets", "-3"], "expected 'all', a positive number of subsets per k, or orderings:N"),
    (["--subsets", "orderings:0"], "or orderings:N"),
    (["--sizes", "xl"], "no size 'xl'"),
])
def test_bad_sweep_arguments_fail_cleanly(tiny_family, tmp_path, capsys, args, fragment):
    db = tmp_path / "r.duckdb"
    code, out, err = cli(capsys, "sweep", "--family", tiny_family, "--db", db, *args)
    assert code == 2 and fragment in err and err.startswith("error: ") and err.count("\n") == 1
    assert "Traceback" not in err and not db.exists()


def test_nan_checkpoint_fails_before_writing_anything(tiny_family, tmp_path, capsys):
    db = tmp_path / "r.duckdb"
    poison_expert(tiny_family)
    code, _, err = cli(capsys, "sweep", "--family", tiny_family, "--db", db, "--methods", "average")
    assert code == 2 and "beta/model.safetensors: tensor 'model.norm.weight' has 1 NaN/Inf values" in err
    assert ResultStore(db).count() == 0


def test_shape_mismatch_names_expert_file(tiny_family, tmp_path, capsys):
    path = tiny_family.parent / "s" / "experts" / "gamma" / "model.safetensors"
    tensors = load_file(path)
    tensors["model.norm.weight"] = torch.ones(17)
    save_file(tensors, path, metadata={"format": "pt"})
    code, _, err = cli(capsys, "sweep", "--family", tiny_family, "--db", tmp_path / "r.duckdb")
    assert code == 2 and "experts/gamma: tensor 'model.norm.weight' has shape [17], base has [16]" in err


def test_bad_eval_set_and_manifest_fail_cleanly(tiny_family, tmp_path, capsys):
    db = tmp_path / "r.duckdb"
    ResultStore(db).upsert(rows(keys=("x",), domains=("alpha",)))  # an existing cache must stay as it is
    (tiny_family.parent / "eval" / "beta.jsonl").write_text('{"prompt": "x"}\n')
    code, _, err = cli(capsys, "sweep", "--family", tiny_family, "--db", db)
    assert code == 2 and "beta.jsonl:1: field 'response' missing" in err
    code, _, err = cli(capsys, "sweep", "--family", tmp_path / "absent.toml", "--db", db)
    assert code == 2 and "absent.toml: family manifest not found" in err
    assert ResultStore(db).count() == 1


def test_python_dash_m_entry_point_reports_errors_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mergelab", "sweep", "--family", tmp_path / "x.toml"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'x.toml'}: family manifest not found"
    proc = subprocess.run([sys.executable, "-m", "mergelab", "methods"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "density = 0.2" in proc.stdout and "c = 0.8" in proc.stdout


def _session_vs_direct(size, monkeypatch, weight_dtype=None, relative=0.0):
    """Merge every subset of k ≤ 4 through a MergeSession (merge order, then a shuffled order, with
    method switches and base/expert rows in between) and from scratch (fp32); the largest weight
    difference, less `relative`·|direct weight|."""
    import itertools
    import random

    from mergelab.engine import session as engine
    from mergelab.engine.session import MergeSession, merge_rank
    from mergelab.engine.methods import METHODS

    monkeypatch.setattr(engine, "STREAM_CHUNK", 1000)  # many chunks per tensor and across tensor boundaries
    monkeypatch.setattr(engine, "COMBINE_CHUNK", 1000)
    pool, fresh_pool = ExpertPool.load(size, "cpu", store="cpu"), ExpertPool.load(size)
    direct_model = ResidentModel(pool.base_checkpoint, "cpu")
    if weight_dtype is not None:  # the CUDA layout (bf16 resident, fp32 merged copy), on the CPU
        monkeypatch.setattr(engine, "weight_dtype", lambda device: weight_dtype)
    session_model = ResidentModel(pool.base_checkpoint, "cpu")
    session = MergeSession(pool, session_model, refresh=3)
    direct = MergeSession(fresh_pool, direct_model)
    experts = pool.expert_names
    ordered = sorted((s for k in range(1, 5) for s in itertools.combinations(experts, k)),
                     key=lambda s: merge_rank(s, experts))
    shuffled = random.Random(0).sample(ordered, len(ordered))
    worst, incremental = 0.0, 0
    for name, subsets in [("average", ordered), ("ties", ordered), ("task_arithmetic", shuffled), ("dare", ordered),
                          ("average", shuffled)]:
        method = METHODS[name]
        hp = method.resolve({})
        for i, subset in enumerate(subsets):
            if i % 10 == 5:  # a reference row overwrites the resident model mid-run
                session.load_expert(experts[0])
            session.merge(method, hp, subset)
            incremental += session.updates > 0
            direct.merge_formula(method, hp, subset)
            for p_name, p in session_model.params.items():
                expected = direct_model.params[p_name]
                worst = max(worst, ((p.float() - expected).abs() - relative * expected.abs()).max().item())
    assert incremental > 50  # most merges in merge order update the previous one
    return worst


def test_merge_order_is_a_revolving_door_within_each_k():
    import itertools

    from mergelab.engine.session import merge_rank

    experts = tuple("abcdefg")
    subsets = sorted((s for k in range(1, 8) for s in itertools.combinations(experts, k)),
                     key=lambda s: merge_rank(s, experts))
    assert [len(s) for s in subsets] == sorted(len(s) for s in subsets)
    same_k = [(a, b) for a, b in zip(subsets, subsets[1:]) if len(a) == len(b)]
    assert len(same_k) == 2 ** 7 - 1 - 7 and all(len(set(a) - set(b)) == 1 for a, b in same_k)


@pytest.fixture(scope="module")
def six_expert_family(tmp_path_factory):
    return load_family(build_tiny_family(tmp_path_factory.mktemp("six"), ("a1", "a2", "a3", "a4", "a5", "a6")))


def test_merge_session_matches_the_direct_formula_across_methods_and_orders(six_expert_family, monkeypatch):
    """Incremental merged weights, prepared TIES/DARE vectors, method switches and a reference row
    overwriting the resident model give the same weights as merging each subset from scratch, with
    task vectors streamed and combined in chunks smaller than a tensor."""
    assert _session_vs_direct(six_expert_family.sizes[0], monkeypatch) < 1e-6


def test_bf16_resident_gets_the_fp32_merge_rounded_once(six_expert_family, monkeypatch):
    """The CUDA layout (bf16 resident model fed from an fp32 merged copy), run on the CPU: every weight
    is the direct fp32 merge rounded once to bf16 (within half a bf16 step: 2^-8 relative)."""
    import torch

    assert _session_vs_direct(six_expert_family.sizes[0], monkeypatch, torch.bfloat16, 2.0 ** -8) < 1e-6


def test_a_merge_that_fails_midway_leaves_nothing_half_done_for_the_next(six_expert_family, monkeypatch):
    """A prepare or a linear update that raises partway (e.g. out of memory) must not leave
    half-prepared task vectors or half-updated weights that the next merge builds on."""
    import dataclasses

    from mergelab.engine.session import MergeSession
    from mergelab.engine.methods import METHODS

    size = six_expert_family.sizes[0]
    pool, fresh = ExpertPool.load(size), ExpertPool.load(size)
    model, direct = ResidentModel(pool.base_checkpoint, "cpu"), ResidentModel(pool.base_checkpoint, "cpu")
    session, direct_session = MergeSession(pool, model), MergeSession(fresh, direct)
    ties, average = METHODS["ties"], METHODS["average"]
    calls = []

    def failing(form):
        def prepare_or_keep(vector, ctx, hp):
            calls.append(ctx)
            if len(calls) % 5 == 0:
                raise MemoryError("out of memory")
            return getattr(ties, form)(vector, ctx, hp)
        return prepare_or_keep

    # as keep bits (ties gives a keep mask) and as dense prepared vectors (a method with prepare alone)
    for broken in (dataclasses.replace(ties, keep=failing("keep")), dataclasses.replace(ties, keep=None, prepare=failing("prepare"))):
        with pytest.raises(MemoryError):
            session.merge(broken, ties.resolve({}), ("a1", "a2"))
        assert pool.prepared_for is None and pool.masks is None and pool.dense is None
    session.merge(average, {}, ("a1", "a2", "a3"))
    original_add, adds = MergeSession._add, []

    def add_then_fail(self, i, alpha):  # the swap's first add lands, the second fails
        adds.append(i)
        if len(adds) == 2:
            raise MemoryError("out of memory")
        original_add(self, i, alpha)

    monkeypatch.setattr(MergeSession, "_add", add_then_fail)
    with pytest.raises(MemoryError):
        session.merge(average, {}, ("a1", "a2", "a4"))  # one swap from the previous subset
    monkeypatch.setattr(MergeSession, "_add", original_add)
    for method, subset in [(average, ("a1", "a2", "a4")), (ties, ("a1", "a2"))]:
        hp = method.resolve({})
        session.merge(method, hp, subset)
        direct_session.merge_formula(method, hp, subset)
        for name, p in model.params.items():
            assert (p - direct.params[name]).abs().max().item() < 1e-6, (method.name, name)


def test_expert_rows_read_the_expert_even_after_prepared_methods(tiny_family):
    from mergelab.engine.session import MergeSession
    from mergelab.engine.methods import METHODS

    size = load_family(tiny_family).sizes[0]
    pool = ExpertPool.load(size)
    resident = ResidentModel(pool.base_checkpoint, "cpu")
    session = MergeSession(pool, resident)
    session.merge(METHODS["ties"], METHODS["ties"].resolve({}), ("alpha", "beta"))
    session.load_expert("beta")
    expert = load_file(size.experts["beta"] / "model.safetensors")
    for name in pool.names:
        assert torch.equal(resident.params[name].detach(), expert[name])


def test_dashboard_binds_loopback_unless_told_and_warns_then():
    from mergelab.cli import host_warning

    proc = subprocess.run([sys.executable, "-m", "mergelab", "demo", "up", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--host" in proc.stdout and "127.0.0.1" in proc.stdout  # the default
    assert host_warning("127.0.0.1") is None and host_warning("localhost") is None
    assert "anyone who can reach this address" in host_warning("0.0.0.0")
    assert 'address = "127.0.0.1"' in (Path(__file__).resolve().parent.parent / ".streamlit" / "config.toml").read_text()



def test_dashboard_never_watches_source_files_and_leaves_address_to_the_caller():
    """A watching server floods inotify while a sweep writes near the install tree; its warnings once
    stalled the server. `demo up` passes the shipped options; address, port and headless come from it alone."""
    from mergelab.paths import streamlit_options

    options = streamlit_options()
    assert "--server.fileWatcherType=none" in options
    assert not [o for o in options if o.split("=")[0] in ("--server.address", "--server.port", "--server.headless")]
    assert "--browser.gatherUsageStats=false" in options

def test_export_model_writes_a_loadable_merge_with_the_swept_loss(tiny_family, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergelab.engine.evaluate import evaluate, prepare_eval

    out, cfg = tmp_path / "merged", tmp_path / "merge.yml"
    code, stdout, err = cli(capsys, "export-model", "--family", tiny_family, "--size", "s", "--method", "ties",
                            "--experts", "alpha,gamma", "--hp", "ties.density=0.5", "--out", out, "--mergekit-yaml", cfg)
    assert code == 0, err
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    family = load_family(tiny_family)
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    exported = evaluate(model, prepare_eval(family.eval_sets, tokenizer, family.token_budget))
    store = ResultStore(tmp_path / "r.duckdb")
    run_sweep(SweepSpec(family, ["s"], {"ties": {"density": 0.5}}, [2]), store, progress=False)
    swept = store.results(method="ties", experts_key="alpha+gamma").set_index("domain")["loss"]
    assert all(exported[d] == pytest.approx(swept[d], abs=1e-6) for d in family.domains)
    text = cfg.read_text()
    assert "merge_method: ties" in text and "density: 0.5" in text and str(family.size("s").experts["gamma"]) in text
    code, _, err = cli(capsys, "export-model", "--family", tiny_family, "--size", "s", "--experts", "alpha,zeta", "--out",
                       tmp_path / "x")
    assert code == 2 and "zeta not among alpha, beta, gamma" in err
    code, _, err = cli(capsys, "export-model", "--family", tiny_family, "--size", "s", "--experts", "alpha", "--out", out)
    assert code == 2 and "already exists and is not empty" in err


def test_gpu_plan_streams_task_vectors_from_host_memory_when_only_that_fits(monkeypatch):
    """On a GPU that cannot hold the experts, they stay in host memory; when host memory cannot either,
    they are streamed from disk; when not even the resident model fits, the plan refuses. (The limit
    variable stands in for device and host memory alike.)"""
    from mergelab.engine.memory import needed_bytes, plan_memory

    n, m = 10**6, 9
    monkeypatch.delenv("MERGELAB_PLACEMENT", raising=False)
    full, streamed = needed_bytes(n, m, "cuda:0"), needed_bytes(n, m, "cuda:0", streamed=True)
    # fp32 checkpoints: base + M experts + M/8 keep bits + bf16 model + fp32 merged copy; streamed: the last two
    assert streamed == int(1.15 * n * (2 + 4)) < full == int(1.15 * n * ((m + 1) * 4 + m / 8 + 6))
    monkeypatch.setenv("MERGELAB_MEMORY_LIMIT_GB", str(full * 2 / 2**30))
    assert plan_memory(n, m, "s", "cuda:0", gpus=1).store == "cuda:0"
    monkeypatch.setenv("MERGELAB_MEMORY_LIMIT_GB", str(full * 0.9 / 2**30))
    plan = plan_memory(n, m, "s", "cuda:0", gpus=1)
    assert plan.fits and plan.store == "cpu" and plan.host_bytes == int(1.15 * n * ((m + 1) * 4 + m / 8))
    assert "streamed from host memory" in plan.describe()
    half = plan_memory(n, m, "s", "cuda:0", host_share=1 / 2, gpus=1)  # two GPUs share the node's memory
    assert half.fits and half.store == "disk" and "safetensors files" in half.describe()
    monkeypatch.setenv("MERGELAB_MEMORY_LIMIT_GB", str(streamed * 0.9 / 2**30))
    plan = plan_memory(n, m, "s", "cuda:0", gpus=1)
    assert not plan.fits and len(plan.tried) == 3  # device, host, disk: each tried, with its numbers
    monkeypatch.setenv("MERGELAB_MEMORY_LIMIT_GB", str(full * 0.9 / 2**30))
    assert plan_memory(n, m, "s", "cpu").store == "disk"  # on CPU: all in memory does not fit, disk does


def test_sweep_refuses_to_start_when_the_memory_plan_does_not_fit(tiny_family, tmp_path, capsys, monkeypatch):
    from mergelab.engine.memory import placement_bytes

    family = load_family(tiny_family)
    n = family.sizes[0].n_params
    monkeypatch.delenv("MERGELAB_PLACEMENT", raising=False)
    need = placement_bytes(n, 3, "cpu", masks=False)[0]
    assert need == int(1.15 * n * (4 * 4 + 4))  # base + M experts + resident, all fp32 in this family
    disk = placement_bytes(n, 3, "cpu", "disk", masks=False)[0]
    assert disk == int(1.15 * n * 4)  # base and experts stay in their files: the resident model alone
    monkeypatch.setenv("MERGELAB_MEMORY_LIMIT_GB", str(disk / 2 / 2**30))
    db = tmp_path / "r.duckdb"
    code, _, err = cli(capsys, "sweep", "--family", tiny_family, "--db", db, "--methods", "average")
    assert code == 2 and "not starting: size s on cpu: needs ~" in err and "MERGELAB_MEMORY_LIMIT_GB" in err
    assert "also tried: size s on cpu: needs ~" in err  # all in memory, then disk: both numbers given
    assert ResultStore(db).count() == 0
    monkeypatch.setenv("MERGELAB_MEMORY_LIMIT_GB", str(need * 2 / 2**30))
    code, _, err = cli(capsys, "sweep", "--family", tiny_family, "--db", db, "--methods", "average")
    assert code == 0, err
    assert "memory plan: size s on cpu: needs ~" in err and "placement" not in err  # all in memory


def test_the_merge_session_is_the_resident_models_only_writer(tiny_family):
    """The resident model has no writing methods; reference rows go through the session, so the session
    rebuilds its linear merge after one instead of updating weights that no longer hold it."""
    from mergelab.engine.methods import METHODS

    assert not any(hasattr(ResidentModel, name) for name in ("write", "load_base", "load_expert", "owner"))
    size = load_family(tiny_family).sizes[0]
    pool, fresh = ExpertPool.load(size), ExpertPool.load(size)
    resident, direct = ResidentModel(pool.base_checkpoint, "cpu"), ResidentModel(pool.base_checkpoint, "cpu")
    session, formula = MergeSession(pool, resident), MergeSession(fresh, direct)
    average = METHODS["average"]
    session.merge(average, {}, ("alpha", "beta"))
    assert session.holds_merge
    session.load_base()
    assert not session.holds_merge and torch.equal(resident.flat, pool.base_flat)
    session.merge(average, {}, ("alpha", "gamma"))  # one swap away, but the base was loaded in between
    formula.merge_formula(average, {}, ("alpha", "gamma"))
    assert session.updates == 0 and torch.allclose(resident.flat, direct.flat, atol=1e-6)
