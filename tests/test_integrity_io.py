"""Inputs that would make rows silently wrong, or end in a traceback, refused (or read as transformers
reads them): reserved names, a manifest's n_params, experts whose config or tokenizer changes what is
computed, weight files transformers resolves differently, shard indexes that disagree with their shards,
symlink loops and a byte-order mark. Built from tiny real checkpoints saved by save_pretrained."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch

from mergelab.errors import CheckpointError, ManifestError, MergelabError
from mergelab.io.checkpoints import Checkpoint, check_compatible, tokenizer_mismatch
from mergelab.io.family import load_family
from mergelab.names import experts_key, key_experts
from tests.helpers import save_checkpoint, tiny_config
from tests.realarch import real_config
from tests.test_sweep import cli



def edit(manifest, old, new):
    text = manifest.read_text()
    assert re.search(old, text, flags=re.M), old
    manifest.write_text(re.sub(old, new, text, count=1, flags=re.M))
    return manifest


def run_cli(capsys, *args):
    capsys.readouterr()  # what the test printed while building its inputs
    code, out, err = cli(capsys, *args)
    assert code == 2 and "Traceback" not in out + err, (code, out, err)
    assert len(err.strip().splitlines()) == 1, err  # one line
    return err


# -- names that collide with the key or the UI ---------------------------------------------------------------

def test_the_issue_examples_would_break_the_key_and_the_macro_row():
    assert key_experts(experts_key(["c++"])) == ("c", "", "")  # stored as k = 3 if it were allowed


@pytest.mark.parametrize("old, new, fragment", [
    (r"^domains = .*", 'domains = ["alpha", "beta", "c++"]', "domain 'c++' contains '+'"),
    (r"^domains = .*", 'domains = ["alpha", "beta", "macro"]', "domain 'macro' is a reserved word"),
    (r"^domains = .*", 'domains = ["alpha", "beta", "base"]', "domain 'base' is a reserved word"),
    (r"^domains = .*", 'domains = ["alpha", "beta", "a,b"]', "domain 'a,b' contains ','"),
    (r"^domains = .*", 'domains = ["alpha", "beta", "math:algebra"]', "domain 'math:algebra' contains ':'"),
    (r"^domains = .*", 'domains = ["alpha", "beta", "x · y"]', "contains '·'"),
    (r"^domains = .*", 'domains = ["alpha", "beta", " gamma"]', "starts or ends with whitespace"),
    (r"^domains = .*", 'domains = ["alpha", "beta", "ga\\tmma"]', "contains a control character"),
    (r"^domains = .*", 'domains = ["alpha", "beta", "   "]', "is empty"),
    (r"^\[sizes\.s\]", '[sizes."s,m"]', "size 's,m' contains ','"),
    (r"^\[sizes\.s\]", '[sizes."s · 1"]', "size 's · 1' contains '·'"),
    (r'^name = "tiny"', 'name = "a · b"', "field 'name': 'a · b' contains '·'"),
    (r'^name = "tiny"', 'name = ""', "field 'name': '' is empty"),
])
def test_reserved_names_are_refused_naming_field_and_character(tiny_family, old, new, fragment):
    edit(tiny_family, old, new)
    with pytest.raises(ManifestError) as err:
        load_family(tiny_family)
    assert str(tiny_family) in str(err.value) and fragment in str(err.value) and "rename it" in str(err.value)


def test_names_the_key_allows_elsewhere_still_load(tiny_family):
    """'+' and ':' are reserved only where mergelab joins with them (domains); sizes and the family may use them."""
    edit(tiny_family, r'^name = "tiny"', 'name = "org:tiny+chat"')
    edit(tiny_family, r"^\[sizes\.s\]", '[sizes."0.5b+it"]')
    edit(tiny_family, r"^\[sizes\.s\.experts\]", '[sizes."0.5b+it".experts]')
    family = load_family(tiny_family)
    assert family.name == "org:tiny+chat" and family.size_names == ("0.5b+it",)


def test_cli_refuses_c_plus_plus_in_one_line(tiny_family, tmp_path, capsys):
    edit(tiny_family, r"^domains = .*", 'domains = ["alpha", "beta", "c++"]')
    err = run_cli(capsys, "sweep", "--family", tiny_family, "--db", tmp_path / "r.duckdb", "--device", "cpu")
    assert "'c++' contains '+'" in err and not (tmp_path / "r.duckdb").exists()


# -- byte-order mark and symlink loops ---------------------------------------------------------------------

def test_manifest_with_a_utf8_bom_loads(tiny_family):
    plain = load_family(tiny_family)
    tiny_family.write_bytes(b"\xef\xbb\xbf" + tiny_family.read_bytes())
    assert load_family(tiny_family) == plain


def loop(path):
    """Make `path` one end of a two-link symlink loop."""
    other = path.with_name(path.name + ".loop")
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    os.symlink(other, path)
    os.symlink(path, other)


@pytest.mark.parametrize("target, field", [("s/experts/beta", "sizes.s.experts.beta"), ("s/base", "sizes.s.base"),
                                           ("eval/alpha.jsonl", "eval.alpha")])
def test_symlink_loops_in_the_manifest_paths_are_refused(tiny_family, tmp_path, capsys, target, field):
    loop(tiny_family.parent / target)
    with pytest.raises(ManifestError, match=rf"{re.escape(field)} = .*symlink loop"):
        load_family(tiny_family)
    err = run_cli(capsys, "sweep", "--family", tiny_family, "--db", tmp_path / "r.duckdb", "--device", "cpu")
    assert field in err and "symlink loop" in err


def test_a_looping_manifest_path_is_refused(tmp_path, capsys):
    loop(tmp_path / "family.toml")
    with pytest.raises(ManifestError, match="cannot read the family manifest .*symbolic links"):
        load_family(tmp_path / "family.toml")
    assert "family.toml" in run_cli(capsys, "sweep", "--family", tmp_path / "family.toml", "--db", tmp_path / "r.duckdb")


def test_loops_inside_a_checkpoint_are_named(tmp_path):
    save_checkpoint(tmp_path / "base", tiny_config(), seed=0)
    loop(tmp_path / "dir")
    with pytest.raises(CheckpointError, match="dir: checkpoint directory cannot be resolved .*symlink loop"):
        Checkpoint(tmp_path / "dir")
    loop(tmp_path / "base" / "config.json")
    with pytest.raises(CheckpointError, match="config.json: cannot read config.json"):
        Checkpoint(tmp_path / "base").config


# -- n_params is counted, never trusted ----------------------------------------------------------------------

def test_parameters_are_counted_from_the_headers(tmp_path):
    tied = save_checkpoint(tmp_path / "qwen", tiny_config(vocab_size=312), seed=0)
    # the issue's 7,376-parameter model: the tied 312×16 embedding counted once
    assert Checkpoint(tmp_path / "qwen").n_params == sum(p.numel() for p in tied.parameters()) == 7376
    untied = save_checkpoint(tmp_path / "llama", real_config("llama"), seed=0, max_shard_size="20KB")
    assert Checkpoint(tmp_path / "llama").n_params == sum(p.numel() for p in untied.parameters())
    # a tied lm_head stored anyway is counted once
    from safetensors.torch import load_file, save_file
    state = load_file(tmp_path / "qwen" / "model.safetensors")
    save_file({**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()},
              tmp_path / "qwen" / "model.safetensors", metadata={"format": "pt"})
    assert Checkpoint(tmp_path / "qwen").n_params == 7376


def tiny_count(family_manifest) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(family_manifest.parent / "s" / "base"))
    return sum(p.numel() for p in model.parameters())


def test_a_wrong_n_params_is_refused_with_both_numbers(tiny_family, tmp_path, capsys):
    count = tiny_count(tiny_family)
    edit(tiny_family, r"^n_params = \d+", "n_params = 100")
    size = load_family(tiny_family).size("s")  # loading stays cheap: no checkpoint is read yet
    assert size.declared_n_params == 100
    with pytest.raises(ManifestError) as err:
        size.n_params
    assert str(err.value) == (f"{tiny_family}: sizes.s.n_params = 100 but the base checkpoint {size.base} holds "
                              f"{count:,} parameters (counted from its safetensors headers, a tied lm_head once); write "
                              f"n_params = {count} or leave n_params out")
    err = run_cli(capsys, "sweep", "--family", tiny_family, "--db", tmp_path / "r.duckdb", "--device", "cpu")
    assert "n_params = 100" in err and f"{count:,}" in err and not (tmp_path / "r.duckdb").exists()


def test_the_memory_guard_uses_the_count(tiny_family, tmp_path, monkeypatch):
    """With n_params = 100 the guard would pass a plan it must refuse; the count makes it refuse, and an
    omitted n_params is the count everywhere (rows too)."""
    from mergelab.engine.memory import needed_bytes, plan_memory
    from mergelab.store import ResultStore
    from mergelab.sweep.plan import SweepSpec
    from mergelab.sweep.runner import run_sweep

    count = tiny_count(tiny_family)
    limit = needed_bytes(1000, 3, "cpu") / 2**30  # between what 100 and what the real count need
    monkeypatch.setenv("MERGELAB_MEMORY_LIMIT_GB", str(limit))
    assert plan_memory(100, 3, "s", "cpu").fits and not plan_memory(count, 3, "s", "cpu").fits
    edit(tiny_family, r"^n_params = \d+\n", "")
    family = load_family(tiny_family)
    assert family.size("s").declared_n_params is None and family.size("s").n_params == count
    store = ResultStore(tmp_path / "r.duckdb")
    spec = SweepSpec(family, ["s"], {"average": {}}, [1], reference_rows=False)
    with pytest.raises(MergelabError, match=r"not starting: size s on cpu: needs"):
        run_sweep(spec, store, progress=False, device="cpu")
    monkeypatch.delenv("MERGELAB_MEMORY_LIMIT_GB")
    run_sweep(spec, store, progress=False, device="cpu")
    assert set(store.results()["n_params"]) == {count}


# -- weight files as transformers resolves them; shard indexes that disagree ---------------------------------

def sharded(tmp_path, name="sharded", config=None):
    save_checkpoint(tmp_path / name, config or tiny_config(), seed=0, max_shard_size="10KB")
    return tmp_path / name


def test_a_stray_single_file_beside_an_index_wins_as_in_transformers(tmp_path):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    path = sharded(tmp_path)
    index_files = Checkpoint(path).files
    stray = {n: Checkpoint(path).tensor(n) * 2 for n in Checkpoint(path).names}
    save_file(stray, path / "model.safetensors", metadata={"format": "pt"})
    ckpt = Checkpoint(path)
    assert set(ckpt.files.values()) == {path / "model.safetensors"} and len(set(index_files.values())) > 1
    loaded = AutoModelForCausalLM.from_pretrained(str(path)).state_dict()
    for name in ckpt.names:
        assert torch.equal(ckpt.tensor(name), loaded[name]) and torch.equal(ckpt.tensor(name), stray[name])
    # config.json's transformers_weights overrides both, for transformers and mergelab alike
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "transformers_weights": "model.safetensors.index.json"}))
    ckpt = Checkpoint(path)
    assert ckpt.files == index_files
    loaded = AutoModelForCausalLM.from_pretrained(str(path)).state_dict()
    assert all(torch.equal(ckpt.tensor(n), loaded[n]) for n in ckpt.names)


def test_index_mapping_a_tensor_to_a_shard_without_it_is_refused(tmp_path):
    path = sharded(tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, s in index["weight_map"].items() if s == shards[0])
    index["weight_map"][name] = shards[1]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"index.json: maps tensor '{re.escape(name)}' to {shards[1]}, which "
                                              r"does not hold it \(1 such tensors\)"):
        Checkpoint(path)
    index["weight_map"][name] = shards[0]
    shared = next(s for s in shards if sum(v == s for v in index["weight_map"].values()) > 1)
    name = next(n for n, s in index["weight_map"].items() if s == shared)
    del index["weight_map"][name]  # the shard still holds it, and transformers loads every tensor of a listed shard
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{shared}: holds tensor '{re.escape(name)}', which "
                                              r"model.safetensors.index.json does not map to this shard"):
        Checkpoint(path)


@pytest.mark.parametrize("which", ["base", "experts/beta"])
def test_cli_names_a_bad_index_in_base_or_expert(tiny_family, tmp_path, capsys, which):
    from transformers import AutoModelForCausalLM

    path = tiny_family.parent / "s" / which
    AutoModelForCausalLM.from_pretrained(str(path)).save_pretrained(str(path), max_shard_size="10KB")
    (path / "model.safetensors").unlink(missing_ok=True)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, s in index["weight_map"].items() if s == shards[0])
    index["weight_map"][name] = shards[1]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    err = run_cli(capsys, "sweep", "--family", tiny_family, "--db", tmp_path / "r.duckdb", "--device", "cpu")
    assert str(path) in err and name in err and "does not hold it" in err


# -- config fields that change the forward pass ---------------------------------------------------------------

def llama_pair(tmp_path, **expert_overrides):
    config = real_config("llama")
    base = save_checkpoint(tmp_path / "base", config, seed=0)
    expert_config = real_config("llama")
    for key, value in expert_overrides.items():
        setattr(expert_config, key, value)
    save_checkpoint(tmp_path / "expert", expert_config, seed=1, noise=0.01, base_state=base.state_dict())
    return Checkpoint(tmp_path / "base"), Checkpoint(tmp_path / "expert")


def test_rope_theta_differing_is_refused_with_both_values(tmp_path, capsys):
    """The issue's example: same shapes, rope_theta 1e6 vs 1e4; the expert's own loss would differ."""
    base, expert = llama_pair(tmp_path, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    assert base.config["rope_parameters"]["rope_theta"] == 10000.0 and base.shapes == expert.shapes
    with pytest.raises(CheckpointError) as err:
        check_compatible(base, expert)
    assert str(err.value).startswith(f"{expert.path / 'config.json'}: rope_parameters.rope_theta = 1000000.0 but the "
                                     "base has 10000.0; this field changes what the model computes")
    # the same expert written by an older transformers (top-level rope_theta) is read as transformers reads it
    config = json.loads((expert.path / "config.json").read_text())
    config.pop("rope_parameters")
    (expert.path / "config.json").write_text(json.dumps({**config, "rope_theta": 1e6}))
    with pytest.raises(CheckpointError, match=r"rope_parameters.rope_theta = 1000000.0 but the base has 10000.0"):
        check_compatible(base, Checkpoint(expert.path))


def test_the_row_would_have_been_wrong(tmp_path):
    """Why it is refused: the expert's weights under the base's config give another loss than transformers
    gives for the expert as saved."""
    from transformers import AutoModelForCausalLM

    _, expert = llama_pair(tmp_path, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    ids = torch.arange(3, 100).unsqueeze(0)
    own = AutoModelForCausalLM.from_pretrained(str(expert.path)).eval()
    as_base = AutoModelForCausalLM.from_pretrained(str(expert.path), rope_parameters={"rope_type": "default", "rope_theta": 1e4}).eval()
    with torch.no_grad():  # random tiny weights: logits differ visibly, the loss only slightly
        assert (own(ids).logits - as_base(ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("field, value, shown", [
    ("rms_norm_eps", 1e-5, "rms_norm_eps = 1e-05 but the base has 1e-06"),
    ("hidden_act", "gelu", "hidden_act = 'gelu' but the base has 'silu'"),
    ("max_position_embeddings", 512, "max_position_embeddings = 512 but the base has 256"),
    ("rope_parameters", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
     "rope_parameters.rope_type = 'linear' but the base has 'default'"),
])
def test_other_forward_fields_are_refused(tmp_path, field, value, shown):
    base, expert = llama_pair(tmp_path, **{field: value})
    with pytest.raises(CheckpointError, match=re.escape(shown)):
        check_compatible(base, expert)


def test_a_field_left_out_means_the_class_default(tmp_path):
    base, expert = llama_pair(tmp_path, rms_norm_eps=1e-5)
    config = json.loads((expert.path / "config.json").read_text())
    config.pop("rms_norm_eps")  # LlamaConfig's default is 1e-6, the base's value
    (expert.path / "config.json").write_text(json.dumps(config))
    check_compatible(base, Checkpoint(expert.path))
    config = json.loads((base.path / "config.json").read_text())
    (base.path / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    with pytest.raises(CheckpointError, match=r"rms_norm_eps = \(unset\)|rms_norm_eps = 1e-06 but the base has 1e-05"):
        check_compatible(Checkpoint(base.path), Checkpoint(expert.path))


def test_bookkeeping_fields_may_differ(tmp_path):
    base, expert = llama_pair(tmp_path)
    config = json.loads((expert.path / "config.json").read_text())
    config.update(dtype="bfloat16", transformers_version="4.44.0", _name_or_path="someone/llama-ft",
                  architectures=["LlamaForCausalLM"], use_cache=False, attention_dropout=0.1, initializer_range=0.5,
                  bos_token_id=5, output_hidden_states=True, unsloth_version="2024.9", torch_dtype="float16")
    (expert.path / "config.json").write_text(json.dumps(config))
    check_compatible(base, Checkpoint(expert.path))


def test_vocab_size_still_goes_to_the_vocab_policy(tmp_path):
    base = save_checkpoint(tmp_path / "base", real_config("llama"), seed=0)
    from tests.realarch import VOCAB_ROWS, resized
    save_checkpoint(tmp_path / "expert", real_config("llama", 280), seed=1,
                    base_state=resized(base.state_dict(), 280, VOCAB_ROWS, seed=0))
    with pytest.raises(CheckpointError, match="has 280 vocabulary rows, the base has 272"):
        check_compatible(Checkpoint(tmp_path / "base"), Checkpoint(tmp_path / "expert"))
    check_compatible(Checkpoint(tmp_path / "base"), Checkpoint(tmp_path / "expert"), "base_rows")


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma2", "gemma3", "granite"])
def test_identical_configs_of_real_architectures_pass(tmp_path, arch):
    base = save_checkpoint(tmp_path / "base", real_config(arch), seed=0)
    save_checkpoint(tmp_path / "expert", real_config(arch), seed=1, noise=0.01, base_state=base.state_dict())
    check_compatible(Checkpoint(tmp_path / "base"), Checkpoint(tmp_path / "expert"))


# -- tokenizers ---------------------------------------------------------------------------------------------

@pytest.fixture
def pair(tmp_path):
    base = save_checkpoint(tmp_path / "base", tiny_config(), seed=0)
    save_checkpoint(tmp_path / "expert", tiny_config(), seed=1, noise=0.01, base_state=base.state_dict())
    return Checkpoint(tmp_path / "base"), Checkpoint(tmp_path / "expert")


def rewrite_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_an_expert_tokenizer_with_other_ids_is_refused(pair):
    from tokenizers import Tokenizer

    base, expert = pair
    check_compatible(base, expert)  # identical files pass

    def swap(data):
        vocab = data["model"]["vocab"]
        vocab["a"], vocab["b"] = vocab["b"], vocab["a"]

    rewrite_json(expert.path / "tokenizer.json", swap)
    a, b = (Tokenizer.from_file(str(p / "tokenizer.json")).encode("ab").ids for p in (base.path, expert.path))
    assert a != b and len(a) == len(b)  # same vocabulary size, other ids
    with pytest.raises(CheckpointError) as err:
        check_compatible(base, expert)
    assert str(err.value) == (f"{expert.path}: its tokenizer maps text to other ids than the base's: token 'a' has id 101 "
                              "in the expert's vocabulary, id 100 in the base's (tokenizer.json); give the expert the "
                              "base's tokenizer files, or none (it then uses the base's)")


def test_an_expert_without_tokenizer_files_uses_the_base(pair):
    base, expert = pair
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (expert.path / name).unlink()
    check_compatible(base, expert)


@pytest.mark.parametrize("file, change, fragment", [
    ("tokenizer_config.json", lambda d: d.update(eos_token="<pad>"),
     "eos_token is '<pad>' (id 0) in the expert, '<eos>' (id 2) in the base"),
    ("tokenizer_config.json", lambda d: d.update(add_bos_token=True), "add_bos_token is True in the expert, (unset)"),
    ("tokenizer_config.json", lambda d: d.update(chat_template="{{ messages }}"), "the chat template differs"),
    ("tokenizer.json", lambda d: d["added_tokens"][2].update(id=7), "added token '<eos>' is id 7 special in the expert, id 2 special"),
    ("tokenizer.json", lambda d: d["model"].update(merges=[["a", "b"]]), "merge 0 is 'a b' in the expert, (unset) in the base"),
    ("tokenizer.json", lambda d: d.update(normalizer={"type": "Lowercase"}), "normalizer is {'type': 'Lowercase'} in the expert, None"),
    ("tokenizer.json", lambda d: d["pre_tokenizer"].update(add_prefix_space=True), "pre_tokenizer is"),
])
def test_special_tokens_merges_and_settings_are_compared(pair, file, change, fragment):
    base, expert = pair
    rewrite_json(expert.path / file, change)
    with pytest.raises(CheckpointError, match=re.escape(fragment)):
        check_compatible(base, expert)


def test_tokenizer_bookkeeping_may_differ(pair):
    base, expert = pair
    rewrite_json(expert.path / "tokenizer_config.json", lambda d: d.update(model_max_length=4096, padding_side="left",
                                                                           clean_up_tokenization_spaces=True))
    rewrite_json(expert.path / "tokenizer.json", lambda d: d.update(truncation={"max_length": 8}, decoder=None))
    assert tokenizer_mismatch(base.path, expert.path) is None


def test_what_fine_tuning_tools_write_beside_the_same_ids_is_accepted(pair):
    """A pad token set for training, empty extra-token lists, the fast class name: the ids are the base's."""
    base, expert = pair
    cls = json.loads((base.path / "tokenizer_config.json").read_text()).get("tokenizer_class") or "Qwen2Tokenizer"
    rewrite_json(expert.path / "tokenizer_config.json", lambda d: d.update(
        pad_token="<|endoftext|>", additional_special_tokens=[], extra_special_tokens={},
        tokenizer_class=cls.removesuffix("Fast") + "Fast"))
    assert tokenizer_mismatch(base.path, expert.path) is None
    rewrite_json(expert.path / "tokenizer_config.json", lambda d: d.update(eos_token="<other>"))
    assert "eos_token" in tokenizer_mismatch(base.path, expert.path)  # a scored special token still counts


def test_the_sweep_refuses_a_computation_changing_expert_in_one_line(tiny_family, tmp_path, capsys):
    expert = tiny_family.parent / "s" / "experts" / "gamma"
    rewrite_json(expert / "config.json", lambda c: c["rope_parameters"].update(rope_theta=1e6))
    err = run_cli(capsys, "sweep", "--family", tiny_family, "--db", tmp_path / "r.duckdb", "--device", "cpu")
    assert str(expert) in err and "rope_theta = 1000000.0 but the base has 10000.0" in err


def test_eval_sets_with_a_bom_load_and_loops_are_named(tmp_path):
    from mergelab.engine.evaluate import load_eval_set
    from mergelab.errors import EvalSetError

    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"prompt": "1 +", "response": " 1"}\n')
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert load_eval_set(bom) == load_eval_set(plain)
    loop(tmp_path / "loop.jsonl")
    with pytest.raises(EvalSetError, match="loop.jsonl: cannot read the eval set .*symbolic links"):
        load_eval_set(tmp_path / "loop.jsonl")
