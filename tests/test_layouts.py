"""Stored layouts transformers converts on load (issue 17 item 2): Mixtral and Qwen3-MoE files hold one
tensor per expert, packed by transformers 5 into mlp.experts.gate_up_proj / down_proj; a Gemma 3 multimodal
file holds language_model.model.* beside a vision tower. Tiny random models of each, saved by save_pretrained."""

import math
from pathlib import Path

import pytest
import torch

from mergelab.io.checkpoints import Checkpoint, check_compatible
from mergelab.io.family import load_family, write_manifest
from tests.helpers import DOMAINS, reference_ce, write_eval

COMMON = dict(vocab_size=272, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def layout_model(arch: str):
    """A tiny random model of `arch`, as transformers 5.23 builds it (packed experts, a wrapper)."""
    from transformers import AutoModelForCausalLM, Gemma3Config, Gemma3ForConditionalGeneration, MixtralConfig, Qwen3MoeConfig

    torch.manual_seed(0)
    if arch == "qwen3_moe":
        return AutoModelForCausalLM.from_config(Qwen3MoeConfig(**COMMON, moe_intermediate_size=16, num_experts=4,
                                                               num_experts_per_tok=2, head_dim=8), dtype=torch.float32)
    if arch == "mixtral":
        return AutoModelForCausalLM.from_config(MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
                                                dtype=torch.float32)
    config = Gemma3Config(text_config=dict(**COMMON, head_dim=8, sliding_window=8),
                          vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14), mm_tokens_per_image=4)
    return Gemma3ForConditionalGeneration(config).float()


def save(model, path: Path, noise: float = 0.0, seed: int = 0):
    """save_pretrained `model` (plus `noise` on every parameter) with the demo tokenizer."""
    from mergelab.demo.tokenizer import build_tokenizer

    if noise:
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
    model.save_pretrained(str(path))
    build_tokenizer().save_pretrained(str(path))
    return path


ARCHS = ("qwen3_moe", "mixtral", "gemma3")
STORED = {  # what save_pretrained of transformers 5.23 writes: the stored (unconverted) layout
    "qwen3_moe": "model.layers.0.mlp.experts.3.gate_proj.weight",
    "mixtral": "model.layers.0.block_sparse_moe.experts.3.w1.weight",
    "gemma3": "language_model.model.layers.0.mlp.gate_proj.weight",
}


def loaded_state(path: Path, arch: str) -> dict:
    """What from_pretrained loads, named as the model mergelab builds names it (Gemma 3: its text model)."""
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).state_dict()
    if arch == "gemma3":
        state = {("model." + k.removeprefix("model.language_model.")): v for k, v in state.items()
                 if k.startswith("model.language_model.") or k == "lm_head.weight"}
    return state


@pytest.mark.parametrize("arch", ARCHS)
def test_stored_layout_reads_what_from_pretrained_loads(tmp_path, arch):
    from safetensors import safe_open

    path = save(layout_model(arch), tmp_path / arch)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert STORED[arch] in f.keys()  # 5.23 saves the stored layout, not its own packed names
    ckpt = Checkpoint(path)
    state = loaded_state(path, arch)
    assert ckpt.layout is not None and STORED[arch] not in ckpt.names
    for name in ckpt.names:
        assert torch.equal(ckpt.tensor(name), state[name]), name
    built = {n for n, _ in __import__("transformers").AutoModelForCausalLM.from_config(ckpt.model_config()).named_parameters()}
    assert built == set(ckpt.names)  # every parameter of the built model, nothing else
    if arch == "gemma3":
        assert ckpt.model_config().model_type == "gemma3_text" and ckpt.tied_embeddings
        assert ckpt.layout.left_out and all(k.startswith(("vision_tower.", "multi_modal_projector.")) for k in ckpt.layout.left_out)
        assert "vision tower and multimodal projector" in ckpt.layout.note() and "stay the base's" in ckpt.layout.note()
    else:
        packed = [n for n in ckpt.names if n.endswith("experts.gate_up_proj")]
        assert len(packed) == 2 and ckpt.shapes[packed[0]] == (4, 2 * ckpt.model_config().to_dict().get(
            "moe_intermediate_size", 64), 32)
        assert "packed" in ckpt.layout.note()
    check_compatible(ckpt, Checkpoint(path))


def test_gemma3_text_model_computes_what_the_multimodal_wrapper_does_on_text(tmp_path):
    """Merging and evaluating Gemma 3's text model alone is sound: on text its logits are the wrapper's."""
    from transformers import AutoModelForCausalLM

    path = save(layout_model("gemma3"), tmp_path / "g")
    wrapper = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ckpt = Checkpoint(path)
    text = AutoModelForCausalLM.from_config(ckpt.model_config(), dtype=torch.float32).eval()
    text.load_state_dict({n: ckpt.tensor(n) for n in ckpt.names}, strict=False)
    text.tie_weights()
    ids = torch.tensor([[1, 40, 41, 42, 100, 7, 9, 200, 3, 5, 17, 18]])
    with torch.no_grad():
        torch.testing.assert_close(text(input_ids=ids).logits, wrapper(input_ids=ids).logits, rtol=0, atol=1e-5)


def layout_family(root: Path, arch: str) -> Path:
    base = layout_model(arch)
    save(base, root / "s" / "base")
    experts = {}
    for i, domain in enumerate(DOMAINS):
        expert = layout_model(arch)
        expert.load_state_dict(base.state_dict())
        save(expert, root / "s" / "experts" / domain, noise=0.05, seed=10 + i)
        experts[domain] = f"s/experts/{domain}"
    evals = {}
    for i, domain in enumerate(DOMAINS):
        write_eval(root / "eval" / f"{domain}.jsonl",
                   [{"prompt": f"{domain} {j} + {i} =", "response": f" {j + i}"} for j in range(8)])
        evals[domain] = f"eval/{domain}.jsonl"
    return write_manifest(root / "family.toml", f"tiny-{arch}", DOMAINS, evals,
                          [{"name": "s", "n_params": None, "base": "s/base", "experts": experts}], token_budget=40)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_converted_layout_family_sweeps_end_to_end(tmp_path, arch):
    """A tiny sweep of each layout: the k = 1 expert rows are the expert's CE as transformers loads and runs
    it (the full wrapper for Gemma 3), and the merges are written."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergelab.store import ResultStore
    from mergelab.sweep.plan import SweepSpec
    from mergelab.sweep.runner import run_sweep

    family = load_family(layout_family(tmp_path / "fam", arch))
    store = ResultStore(tmp_path / "r.duckdb")
    report = run_sweep(SweepSpec(family, ["s"], {"average": {}, "ties": {"density": 0.5}}, [1, 2]), store,
                       progress=False)
    assert report.merged == report.planned > 0 and store.count() == report.rows_written
    frame = store.results()
    expert = frame[(frame.method == "expert") & (frame.experts_key == "beta")].set_index("domain")["loss"]
    path = family.size("s").experts["beta"]
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    for domain in family.domains:
        ce, _ = reference_ce(model, tokenizer, family.eval_sets[domain], budget=family.token_budget)
        assert expert[domain] == pytest.approx(ce, abs=2e-4), (domain, expert[domain], ce)
    merged = frame[(frame.method == "average") & (frame.k == 2)]
    assert len(merged) == 3 * len(family.domains) and merged["loss"].notna().all()


def test_ties_trims_a_packed_moe_tensor_as_one_tensor(tmp_path):
    """Pinned: 'per tensor' is per tensor of the model transformers builds. A packed mlp.experts.gate_up_proj
    [experts, 2·I, H] keeps its top ceil(density·n) entries over all its experts and both projections,
    not ceil(density·n_slice) in each expert's slice (as mergekit, reading the stored per-expert tensors, would)."""
    from mergelab.engine.methods import get_method
    from mergelab.engine.session import ExpertPool

    family = load_family(layout_family(tmp_path / "fam", "qwen3_moe"))
    pool = ExpertPool.load(family.size("s"))
    name = "model.layers.0.mlp.experts.gate_up_proj"
    with torch.no_grad():  # make one MoE expert's slice carry most of the large entries (θ ← θ0 + 10·v)
        stored, base = pool.experts.views[0][name][1], pool.base[name][1]
        stored.copy_(base + 10.0 * (stored.float() - base.float()))
    ties = get_method("ties")
    pool.ready_for(ties, ties.resolve({"density": 0.25}))
    kept = pool.tensor_vectors([0], name)[0] != 0
    assert int(kept.sum()) == math.ceil(0.25 * kept.numel())  # one top-k over the whole packed tensor
    per_slice = [int(kept[e].sum()) for e in range(kept.shape[0])]
    assert per_slice[1] > math.ceil(0.25 * kept[1].numel()) and min(per_slice) < math.ceil(0.25 * kept[0].numel())


def test_the_sweep_says_what_a_converted_layout_leaves_out(tmp_path, capsys):
    from tests.test_sweep import cli

    manifest = layout_family(tmp_path / "fam", "gemma3")
    code, out, err = cli(capsys, "sweep", "--family", manifest, "--methods", "average", "--k", "2", "--db",
                         tmp_path / "r.duckdb", "--device", "cpu")
    assert code == 0, err
    note = next(line for line in out.splitlines() if line.startswith("note: size s:"))
    assert "vision tower and multimodal projector" in note and "stay the base's" in note and "left out" in note


def test_an_exported_gemma3_merge_keeps_the_base_vision_tower(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from mergelab.store import ResultStore
    from mergelab.sweep.plan import SweepSpec
    from mergelab.sweep.runner import run_sweep
    from tests.test_sweep import cli

    manifest = layout_family(tmp_path / "fam", "gemma3")
    out = tmp_path / "merged"
    code, _, err = cli(capsys, "export-model", "--family", manifest, "--size", "s", "--method", "average",
                       "--experts", "alpha,gamma", "--out", out)
    assert code == 0, err
    family = load_family(manifest)
    exported = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(family.size("s").base), dtype=torch.float32)
    alpha, gamma = (AutoModelForCausalLM.from_pretrained(str(family.size("s").experts[e]), dtype=torch.float32)
                    for e in ("alpha", "gamma"))
    assert type(exported).__name__ == "Gemma3ForConditionalGeneration"
    got, want = exported.state_dict(), base.state_dict()
    a, g = alpha.state_dict(), gamma.state_dict()
    vision = [n for n in got if "vision_tower" in n or "multi_modal_projector" in n]
    assert vision and all(torch.equal(got[n], want[n]) for n in vision)  # the base's, not merged
    assert not torch.equal(a[vision[0]], want[vision[0]])  # though the experts' differ
    text = [n for n in got if "language_model" in n]
    for n in text:
        torch.testing.assert_close(got[n], (a[n] + g[n]) / 2, rtol=0, atol=1e-6)


def test_reading_headers_needs_no_transformers_and_the_text_check_misses_no_mapping(tmp_path):
    """Checkpoint.n_params of a plain checkpoint reads headers only: transformers (and torch) stay unloaded,
    because whether an architecture is converted is first read from transformers' conversion_mapping.py as
    text. That check may say yes too often (then transformers is asked), never no where a mapping exists."""
    import subprocess
    import sys

    from transformers import CONFIG_MAPPING
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    from mergelab.io.checkpoints import _named_in_conversion_source
    from tests.helpers import save_checkpoint, tiny_config

    missed = [t for t in CONFIG_MAPPING if get_checkpoint_conversion_mapping(t) is not None
              and not _named_in_conversion_source(t)]
    assert not missed and _named_in_conversion_source("qwen3_moe") and not _named_in_conversion_source("qwen2")
    save_checkpoint(tmp_path / "c", tiny_config(), seed=0)
    code = ("import sys\nfrom mergelab.io.checkpoints import Checkpoint\n"
            f"print(Checkpoint({str(tmp_path / 'c')!r}).n_params, 'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent.parent).stdout
    assert out.split() == ["6608", "False", "False"], out
