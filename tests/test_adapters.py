"""LoRA adapters as experts (issue 17 item 1): read as base + scale·B·A, checked against PEFT itself."""

import json
import shutil
from pathlib import Path

import peft  # noqa: F401  a test requirement (requirements-dev.txt): never skipped
import pytest
import torch

from mergelab.errors import CheckpointError
from mergelab.io.adapters import AdapterCheckpoint, AdapterPath
from mergelab.io.checkpoints import Checkpoint, check_compatible
from mergelab.io.family import load_family
from mergelab.io.fingerprint import checkpoint_fingerprint, size_fingerprints
from tests.helpers import build_tiny_family, save_checkpoint, tiny_config



def make_adapter(base_dir: Path, out: Path, seed: int = 1, **lora):
    """A real PEFT LoRA adapter of the checkpoint in `base_dir` (random A and B, so the update is not 0), saved
    by PEFT's save_pretrained to `out`; returns PEFT's merge_and_unload() state dict of the same adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    args = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    args.update(lora)
    peft_model = get_peft_model(model, LoraConfig(**args))
    with torch.no_grad():  # B·A of PEFT's random init is tiny; a visible update makes the comparison bite
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(3.0)
    peft_model.save_pretrained(str(out))
    return {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}


def gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=264, n_positions=64, n_embd=16, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=2)


CASES = {  # name: (config builder, LoRA arguments)
    "rank and alpha patterns, an embedding": (tiny_config, dict(
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj", "embed_tokens"], rank_pattern={"up_proj": 2},
        alpha_pattern={r"layers\.0\.self_attn\.v_proj": 3, "down_proj": 5})),
    "rsLoRA": (tiny_config, dict(use_rslora=True, lora_alpha=6)),
    "fan_in_fan_out (GPT-2 Conv1D)": (gpt2_config, dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_adapter_expert_equals_peft_merge_and_unload(tmp_path, case):
    config, lora = CASES[case]
    save_checkpoint(tmp_path / "base", config(), seed=0)
    merged = make_adapter(tmp_path / "base", tmp_path / "lora", **lora)
    ckpt = Checkpoint(AdapterPath(tmp_path / "lora", tmp_path / "base"))
    base = Checkpoint(tmp_path / "base")
    assert isinstance(ckpt, AdapterCheckpoint) and ckpt.names == base.names and ckpt.modules
    check_compatible(base, ckpt)
    assert ckpt.model_config().to_dict() == base.model_config().to_dict() and ckpt.n_params == base.n_params
    for name in ckpt.names:  # every tensor, adapted or not, as PEFT writes it (fp32 rounding at most)
        torch.testing.assert_close(ckpt.tensor(name), merged[name], rtol=0, atol=1e-6)
        out = torch.empty(base.shapes[name], dtype=torch.bfloat16)
        ckpt.read_into(name, out)  # into a bf16 resident: rounded once
        assert torch.equal(out, merged[name].to(torch.bfloat16))
    for name in ckpt.modules:  # the task vector is scale·B·A, nonzero, and nothing else moves
        delta = ckpt.tensor(name) - base.tensor(name, torch.float32)
        ulp = torch.finfo(torch.float32).eps * float(ckpt.tensor(name).abs().max())  # (θ0 + d) − θ0 rounds
        torch.testing.assert_close(delta, ckpt.delta(name), rtol=0, atol=2 * ulp)
        assert delta.abs().max() > 1e-3
    for name in set(ckpt.names) - set(ckpt.modules):
        assert torch.equal(ckpt.tensor(name), base.tensor(name))
    if case.startswith("rank"):
        cfg = ckpt.adapter_config
        scales = {n.split(".")[-2]: s for n, (_, _, s, _) in ckpt.modules.items() if "layers" in n}
        assert scales == {"q_proj": 8 / 4, "v_proj": 3 / 4, "up_proj": 8 / 2, "down_proj": 5 / 4}, (scales, cfg)
    if case == "rsLoRA":
        assert {s for _, _, s, _ in ckpt.modules.values()} == {6 / 2.0}  # lora_alpha / √r with r = 4


@pytest.fixture
def adapter(tmp_path):
    save_checkpoint(tmp_path / "base", tiny_config(), seed=0)
    make_adapter(tmp_path / "base", tmp_path / "lora")
    return tmp_path / "lora"


def _edit(path: Path, **changes):
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


REFUSALS = {  # adapter_config.json edit: fragments of the one-line refusal
    "DoRA": (dict(use_dora=True), ["use_dora = True", "DoRA"]),
    "modules_to_save": (dict(modules_to_save=["lm_head"]), ["modules_to_save = ['lm_head']"]),
    "another PEFT type": (dict(peft_type="IA3"), ["peft_type = 'IA3'", "plain LoRA"]),
    "trained biases": (dict(bias="all"), ["bias = 'all'"]),
    "lora_bias": (dict(lora_bias=True), ["lora_bias = True"]),
    "trainable tokens": (dict(trainable_token_indices=[3, 4]), ["trainable_token_indices"]),
    "activated LoRA": (dict(alora_invocation_tokens=[5]), ["alora_invocation_tokens"]),
    "rank that is not the tensors'": (dict(r=8), ["r = 8 but", "has rank 4"]),
    "another hub base": (dict(base_model_name_or_path="org/other-model"), ["base_model_name_or_path = 'org/other-model'",
                                                                          "'org/base-model'"]),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(REFUSALS))
def test_what_is_not_a_plain_lora_is_refused_naming_the_field(adapter, case):
    edit, fragments = REFUSALS[case]
    _edit(adapter / "adapter_config.json", **edit)
    _edit(adapter.parent / "base" / "config.json", _name_or_path="org/base-model")
    with pytest.raises(CheckpointError) as err:
        Checkpoint(AdapterPath(adapter, adapter.parent / "base"))
    msg = str(err.value)
    assert "adapter_config.json" in msg and "\n" not in msg and all(f in msg for f in fragments), msg


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_an_adapter_of_another_base_is_refused_by_shape(adapter, tmp_path):
    save_checkpoint(tmp_path / "wide", tiny_config(hidden_size=32, intermediate_size=64), seed=0)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tmp_path / "base")
    with pytest.raises(CheckpointError, match=r"base_model_name_or_path = .*/base', a checkpoint with other weights"):
        Checkpoint(AdapterPath(adapter, tmp_path / "wide"))  # PEFT recorded the local base it was trained on
    _edit(adapter / "adapter_config.json", base_model_name_or_path=None)
    with pytest.raises(CheckpointError, match=r"adapter_model.safetensors: .*lora_A.weight.*do not make an update of "
                                              r"the base's .*trained on another base"):
        Checkpoint(AdapterPath(adapter, tmp_path / "wide"))
    (tmp_path / "local_base").symlink_to(tmp_path / "wide")  # base_model_name_or_path a local copy of other weights
    _edit(adapter / "adapter_config.json", base_model_name_or_path=str(tmp_path / "local_base"))
    with pytest.raises(CheckpointError, match="a checkpoint with other weights than the family's base"):
        Checkpoint(AdapterPath(adapter, tmp_path / "base"))
    shutil.copytree(tmp_path / "base", tmp_path / "same_copy")  # the same weights elsewhere: fine
    _edit(adapter / "adapter_config.json", base_model_name_or_path=str(tmp_path / "same_copy"))
    assert Checkpoint(AdapterPath(adapter, tmp_path / "base")).modules


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_an_adapter_without_its_base_says_it_is_an_adapter(adapter, tmp_path, capsys):
    """Before, an adapter dir was refused as 'no model.safetensors or model.safetensors.index.json'."""
    with pytest.raises(CheckpointError, match=r"lora: a LoRA adapter \(adapter_config.json\), not a full checkpoint.*"
                                              r"name the adapter as an expert"):
        Checkpoint(adapter)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="without adapter_model.safetensors.*adapter_model.bin: pickle"):
        Checkpoint(AdapterPath(adapter, adapter.parent / "base"))


@pytest.fixture
def adapter_family(tmp_path):
    """The tiny family with expert beta replaced by a LoRA adapter of the base, and a twin family whose beta
    is that adapter merged by PEFT (merge_and_unload) and saved as a full checkpoint."""
    import warnings

    from transformers import AutoModelForCausalLM

    twins = {}
    for kind in ("adapter", "merged"):
        manifest = build_tiny_family(tmp_path / kind)
        beta = manifest.parent / "s" / "experts" / "beta"
        tokenizer_files = {p.name: p.read_bytes() for p in beta.iterdir() if "token" in p.name}
        shutil.rmtree(beta)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged = make_adapter(manifest.parent / "s" / "base", beta, seed=3)
        if kind == "merged":
            shutil.rmtree(beta)
            model = AutoModelForCausalLM.from_pretrained(str(manifest.parent / "s" / "base"), dtype=torch.float32)
            model.load_state_dict(merged)
            model.save_pretrained(str(beta))
            for name, data in tokenizer_files.items():
                (beta / name).write_bytes(data)
        twins[kind] = manifest
    return twins


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_family_sweeps_an_adapter_expert_as_its_peft_merge(adapter_family, tmp_path):
    from mergelab.store import ResultStore
    from mergelab.sweep.plan import SweepSpec
    from mergelab.sweep.runner import run_sweep

    losses = {}
    for kind, manifest in adapter_family.items():
        family = load_family(manifest)
        beta = family.size("s").experts["beta"]
        assert isinstance(beta, AdapterPath) == (kind == "adapter")
        store = ResultStore(tmp_path / f"{kind}.duckdb")
        report = run_sweep(SweepSpec(family, ["s"], {"average": {}, "ties": {"density": 0.5}}, [1, 2, 3]), store,
                           progress=False)
        assert report.rows_written == store.count() > 0
        frame = store.results()
        losses[kind] = frame.set_index(["method", "experts_key", "domain"])["loss"].sort_index()
    assert losses["adapter"].index.equals(losses["merged"].index)
    assert any("beta" in key for key in losses["adapter"].index.get_level_values(1))
    assert losses["adapter"].tolist() == pytest.approx(losses["merged"].tolist(), abs=2e-5)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_adapter_fingerprint_follows_the_adapter_and_its_base(adapter_family):
    family = load_family(adapter_family["adapter"])
    size = family.size("s")
    beta = size.experts["beta"]
    _, experts = size_fingerprints(size)
    before = experts["beta"]
    assert len(before) == 16 and before != checkpoint_fingerprint(size.base)
    config = beta / "adapter_config.json"
    _edit(config, lora_alpha=9)  # another scale: another expert
    assert checkpoint_fingerprint(beta) != before
    _edit(config, lora_alpha=8)
    assert checkpoint_fingerprint(beta) == before


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_an_adapter_named_as_the_base_is_refused_as_an_adapter(adapter_family, tmp_path, capsys):
    from tests.test_sweep import cli

    manifest = adapter_family["adapter"]
    text = manifest.read_text().replace('base = "s/base"', 'base = "s/experts/beta"')
    manifest.write_text(text)
    code, _, err = cli(capsys, "sweep", "--family", manifest, "--methods", "average", "--db", tmp_path / "r.duckdb",
                       "--device", "cpu")
    assert code == 2 and "a LoRA adapter (adapter_config.json), not a full checkpoint" in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_sweep_says_which_experts_are_adapters(adapter_family, tmp_path, capsys):
    from tests.test_sweep import cli

    code, out, err = cli(capsys, "sweep", "--family", adapter_family["adapter"], "--methods", "average", "--k", "2",
                         "--db", tmp_path / "r.duckdb", "--device", "cpu")
    assert code == 0, err
    assert "note: size s: expert beta is a LoRA adapter of the base, read as base + scale·B·A" in out, out
    code, out, err = cli(capsys, "sweep", "--family", adapter_family["merged"], "--methods", "average", "--k", "2",
                         "--db", tmp_path / "m.duckdb", "--device", "cpu")
    assert code == 0 and "note: size s" not in out, out


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_an_adapter_of_the_gemma3_wrapper_applies_to_its_text_model(tmp_path):
    """A LoRA trained on Gemma3ForConditionalGeneration names modules model.language_model.*; the base is read
    as its text model (model.*): the adapter's updates land on the same weights as PEFT's merge_and_unload."""
    from tests.test_layouts import layout_model, save

    base = save(layout_model("gemma3"), tmp_path / "base")
    merged = make_adapter(base, tmp_path / "lora", target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)")
    ckpt = Checkpoint(AdapterPath(tmp_path / "lora", base))
    assert len(ckpt.modules) == 6 and all(n.startswith("model.layers.") for n in ckpt.modules)
    text = {"model." + k.removeprefix("model.language_model."): v for k, v in merged.items()
            if k.startswith("model.language_model.")}
    for name in ckpt.names:
        torch.testing.assert_close(ckpt.tensor(name), text[name], rtol=0, atol=1e-6)
    assert any(not torch.equal(ckpt.tensor(n), Checkpoint(base).tensor(n)) for n in ckpt.modules)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_sweep_page_estimate_says_which_experts_are_adapters(adapter_family, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    manifest = adapter_family["adapter"]
    monkeypatch.setenv("MERGELAB_DB", str(tmp_path / "r.duckdb"))
    monkeypatch.setenv("MERGELAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MERGELAB_ROOTS", str(manifest.parent))
    monkeypatch.setenv("MERGELAB_JOBS", str(tmp_path / "jobs.sqlite"))
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "pages/2_Sweep.py"), default_timeout=120).run()
    at.selectbox(key="sweep-family").set_value("other path…").run()
    at.text_input[0].input(str(manifest)).run()
    at.button[0].click().run()  # Estimate
    assert not at.exception, [e.value for e in at.exception]
    assert any("expert beta is a LoRA adapter of the base" in c.value for c in at.caption), [c.value for c in at.caption]
