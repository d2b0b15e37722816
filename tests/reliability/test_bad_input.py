"""Bad input, tried many ways: every case exits != 0 with a message naming what is wrong and where, shows
no traceback, and writes nothing (the cache file is never created). The number of cases is tallied."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.helpers import build_tiny_family
from tests.test_sweep import cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    return build_tiny_family(tmp_path_factory.mktemp("fuzz"))


def expect_refusal(capsys, db: Path, args, *fragments: str) -> str:
    code, out, err = cli(capsys, *args)
    assert code != 0, (args, out)
    assert "Traceback" not in err + out
    for fragment in fragments:
        assert fragment in err, (args, fragment, err)
    assert not db.exists(), f"{args}: wrote {db} despite the error"
    return err


# -- family manifests ------------------------------------------------------------------------------------

MANIFEST_CASES = [  # (regex on the valid manifest, replacement, expected fragment)
    (r'^name = "tiny"\n', "", "missing field 'name'"),
    (r'^domains = .*\n', "", "missing field 'domains'"),
    (r'^\[eval\](\n\w+ = .*)*', "", "missing field 'eval'"),
    (r'^\[sizes\.s\](\n.*)*', "", "missing field 'sizes'"),
    (r'^name = "tiny"', "name = 3", "field 'name' must be str, got int"),
    (r'^name = "tiny"', "name = true", "field 'name' must be str, got bool"),
    (r'^domains = .*', 'domains = "alpha"', "field 'domains' must be list"),
    (r'^domains = .*', "domains = [1, 2]", "non-empty list of names"),
    (r'^domains = .*', "domains = []", "non-empty list of names"),
    (r'^domains = .*', 'domains = ["alpha", "alpha", "beta", "gamma"]', "lists a domain twice"),
    (r'^domains = .*', 'domains = ["alpha", "beta", "gamma", "delta"]', "missing field eval.'delta'"),
    (r'^\[eval\]', '[eval]\ndelta = "eval/alpha.jsonl"', "eval.delta is not one of the family's domains"),
    (r'^alpha = "eval/alpha.jsonl"', "alpha = 7", "eval.'alpha' must be str"),
    (r'^alpha = "eval/alpha.jsonl"', 'alpha = "eval/nothing.jsonl"', "eval.alpha points at"),
    (r'^alpha = "eval/alpha.jsonl"', 'alpha = "eval"', "eval.alpha points at"),
    (r'^alpha = "eval/alpha.jsonl"', 'alpha = "../../../../etc/passwd"', "escapes the family directory"),
    (r'^token_budget = 40', "token_budget = 0", "'token_budget' must be a positive integer"),
    (r'^token_budget = 40', "token_budget = -5", "'token_budget' must be a positive integer"),
    (r'^token_budget = 40', 'token_budget = "40"', "'token_budget' must be a positive integer"),
    (r'^token_budget = 40', "token_budget = true", "'token_budget' must be a positive integer"),
    (r'^token_budget = 40', "token_budget = 40\nmax_length = 0", "'max_length' must be a positive integer"),
    (r'^token_budget = 40', 'token_budget = 40\nvocab_policy = "guess"', "'vocab_policy' must be one of"),
    (r'^n_params = \d+', 'n_params = "big"', "sizes.s.'n_params' must be int"),
    (r'^n_params = \d+', "n_params = 1.5", "sizes.s.'n_params' must be int"),
    (r'^n_params = \d+', "n_params = 0", "sizes.s.'n_params' must be a positive integer"),
    (r'^n_params = \d+', "n_params = -3", "sizes.s.'n_params' must be a positive integer"),
    (r'^base = "s/base"', 'base = "s/nothing"', "sizes.s.base points at"),
    (r'^base = "s/base"', 'base = "../../../../tmp"', "escapes the family directory"),
    (r'^base = "s/base"', 'base = "eval/alpha.jsonl"', "sizes.s.base points at"),
    (r'^base = "s/base"', "base = []", "sizes.s.'base' must be str"),
    (r'^beta = "s/experts/beta"', 'beta = "s/experts/alpha"', "lists the same checkpoint twice"),
    (r'^beta = "s/experts/beta"', 'beta = "s/experts/./alpha"', "lists the same checkpoint twice"),
    (r'^beta = "s/experts/beta"', 'beta = "/nonexistent/beta"', "sizes.s.experts.beta points at"),
    (r'^\[sizes.s.experts\](\n.*)*', "[sizes.s.experts]\n", "sizes.s.experts is empty"),
    (r'^\[sizes.s.experts\]', '[sizes.s.experts]\ndelta = "s/base"', "sizes.s.experts.delta is not one of the family's domains"),
    (r'^\[sizes\.s\]', "[sizes.s]\nextra = 1", ""),  # unknown keys are tolerated: a valid control, must run
    (r'^name = ', "name = = ", "not valid TOML"),
    (r'^name = "tiny"', 'name = "tiny"\nname = "again"', "not valid TOML"),
    (r'^\[sizes\.s\](\n.*)*', "[sizes]\ns = 3", "[sizes.s] must be a table"),
]


def test_broken_manifests(family, tmp_path, capsys, tally):
    import re

    valid = family.read_text()
    for i, (pattern, replacement, fragment) in enumerate(MANIFEST_CASES):
        assert re.search(pattern, valid, flags=re.M), pattern
        manifest = family.parent / f"case{i}.toml"
        manifest.write_text(re.sub(pattern, replacement, valid, count=1, flags=re.M))
        db = tmp_path / f"m{i}.duckdb"
        args = ["sweep", "--family", manifest, "--methods", "average", "--k", "1", "--db", db, "--device", "cpu"]
        if not fragment:  # the control case
            assert cli(capsys, *args)[0] == 0
            continue
        expect_refusal(capsys, db, args, str(manifest), fragment)
    for name, content in [("empty.toml", b""), ("binary.toml", bytes(range(256))), ("latin1.toml", "name = 'é'".encode("latin-1"))]:
        (family.parent / name).write_bytes(content)
        expect_refusal(capsys, tmp_path / "x.duckdb", ["sweep", "--family", family.parent / name, "--db", tmp_path / "x.duckdb"],
                       str(family.parent / name))
    expect_refusal(capsys, tmp_path / "x.duckdb", ["sweep", "--family", tmp_path, "--db", tmp_path / "x.duckdb"],
                   "family manifest not found")
    tally["bad inputs tried: family manifests"] += len(MANIFEST_CASES) - 1 + 4


NAME_CASES = [  # names that collide with the experts key, CLI/URL lists, cached-row pairs, labels or the macro row
    (r'^domains = .*', 'domains = ["alpha", "beta", "c++"]', "domain 'c++' contains '+'"),
    (r'^domains = .*', 'domains = ["alpha", "beta", "macro"]', "domain 'macro' is a reserved word"),
    (r'^domains = .*', 'domains = ["alpha", "beta", "base"]', "domain 'base' is a reserved word"),
    (r'^domains = .*', 'domains = ["alpha", "beta", "x,y"]', "domain 'x,y' contains ','"),
    (r'^domains = .*', 'domains = ["alpha", "beta", "x:y"]', "domain 'x:y' contains ':'"),
    (r'^domains = .*', 'domains = ["alpha", "beta", "x·y"]', "domain 'x·y' contains '·'"),
    (r'^domains = .*', 'domains = ["alpha", "beta", "gamma "]', "starts or ends with whitespace"),
    (r'^\[sizes\.s\]', '[sizes."s,m"]', "size 's,m' contains ','"),
    (r'^name = "tiny"', 'name = "t · x"', "field 'name': 't · x' contains '·'"),
]


def test_reserved_names_counts_bom_and_loops_in_manifests(family, tmp_path, capsys, tally):
    import os
    import re

    valid = family.read_text()
    for i, (pattern, replacement, fragment) in enumerate(NAME_CASES):
        manifest = family.parent / f"names{i}.toml"
        manifest.write_text(re.sub(pattern, replacement, valid, count=1, flags=re.M))
        db = tmp_path / f"n{i}.duckdb"
        expect_refusal(capsys, db, ["sweep", "--family", manifest, "--methods", "average", "--db", db, "--device", "cpu"],
                       str(manifest), fragment, "rename it")
    tally["bad inputs tried: reserved names"] += len(NAME_CASES)

    wrong = family.parent / "wrong_n_params.toml"
    wrong.write_text(re.sub(r"^n_params = \d+", "n_params = 100", valid, count=1, flags=re.M))
    expect_refusal(capsys, tmp_path / "w.duckdb", ["sweep", "--family", wrong, "--methods", "average", "--db",
                   tmp_path / "w.duckdb", "--device", "cpu"], "sizes.s.n_params = 100 but the base checkpoint", "parameters")
    tally["bad inputs tried: n_params not the checkpoint's"] += 1

    looped = family.parent / "looped.toml"
    os.symlink(family.parent / "looped2.toml", looped)
    os.symlink(looped, family.parent / "looped2.toml")
    loop_eval = family.parent / "eval" / "loop.jsonl"
    os.symlink(family.parent / "eval" / "loop2.jsonl", loop_eval)
    os.symlink(loop_eval, family.parent / "eval" / "loop2.jsonl")
    eval_loop = family.parent / "eval_loop.toml"
    eval_loop.write_text(valid.replace('beta = "eval/beta.jsonl"', 'beta = "eval/loop.jsonl"'))
    for manifest, fragment in [(looped, "symbolic links"), (eval_loop, "eval.beta = ")]:
        expect_refusal(capsys, tmp_path / "l.duckdb", ["sweep", "--family", manifest, "--db", tmp_path / "l.duckdb"],
                       str(manifest), fragment)
    tally["bad inputs tried: symlink loops"] += 2

    bom = family.parent / "bom.toml"  # accepted: a byte-order mark is not an error
    bom.write_bytes(b"\xef\xbb\xbf" + valid.encode())
    assert cli(capsys, "sweep", "--family", bom, "--methods", "average", "--k", "1", "--db", tmp_path / "bom.duckdb",
               "--device", "cpu")[0] == 0
    tally["bad inputs tried: family manifests"] += 1


# -- checkpoints -----------------------------------------------------------------------------------------

def rewrite(expert: Path, change) -> None:
    """Load an expert's tensors, let `change(state, config)` edit them, save back as safetensors."""
    from safetensors.torch import load_file, save_file

    state = load_file(expert / "model.safetensors")
    config = json.loads((expert / "config.json").read_text())
    change(state, config)
    save_file(state, expert / "model.safetensors", metadata={"format": "pt"})
    (expert / "config.json").write_text(json.dumps(config))


def raw_bytes(edit):
    def change_file(expert: Path):
        path = expert / "model.safetensors"
        path.write_bytes(edit(path.read_bytes()))
    return change_file


def tensors(change):
    return lambda expert: rewrite(expert, change)


EMBED = "model.embed_tokens.weight"
LAYER = "model.layers.0.mlp.up_proj.weight"


def set_value(name, value):
    def change(state, config):
        state[name] = state[name].clone()
        state[name].view(-1)[3] = value
    return change


def _pickle_only(expert: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(expert / "model.safetensors"), expert / "pytorch_model.bin")
    (expert / "model.safetensors").unlink()


def _remote_code(expert: Path) -> None:
    _edit_config(expert, model_type="evil", auto_map={"AutoModelForCausalLM": "modeling_evil.EvilModel"})
    (expert / "modeling_evil.py").write_text(f"open({str(expert / 'PWNED')!r}, 'w').write('ran')\n")


def _edit_config(expert: Path, **changes) -> None:
    config = json.loads((expert / "config.json").read_text())
    config.update(changes)
    (expert / "config.json").write_text(json.dumps(config))


def _sharded_missing(expert: Path) -> None:
    (expert / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {EMBED: "model-00001-of-00002.safetensors"}}))
    (expert / "model.safetensors").unlink()


CHECKPOINT_CASES = {  # name: (how to break expert beta, expected fragments)
    "truncated": (raw_bytes(lambda b: b[:-100]), ["model.safetensors", "truncated"]),
    "zero bytes": (raw_bytes(lambda b: b""), ["model.safetensors", "not a readable safetensors file"]),
    "huge header length": (raw_bytes(lambda b: struct.pack("<Q", 2**40) + b[8:]), ["not a readable safetensors file"]),
    "header not JSON": (raw_bytes(lambda b: b[:8] + b"{" * 16 + b[24:]), ["not a readable safetensors file"]),
    "integer weights": (tensors(lambda s, c: s.__setitem__(LAYER, s[LAYER].round().to(__import__("torch").int64))),
                        [LAYER, "int64"]),
    "wrong shape": (tensors(lambda s, c: s.__setitem__(LAYER, s[LAYER][:-1].clone())), [LAYER, "shape"]),
    "bigger vocab": (tensors(lambda s, c: (s.__setitem__(EMBED, __import__("torch").cat([s[EMBED], s[EMBED][:8]])),
                                           c.update(vocab_size=272))), [EMBED, "vocab_policy"]),
    "untied head": (tensors(lambda s, c: (s.__setitem__("lm_head.weight", s[EMBED].clone()),
                                          c.update(tie_word_embeddings=False))), ["tie"]),
    "NaN": (tensors(set_value(LAYER, float("nan"))), [LAYER, "NaN/Inf"]),
    "+Inf": (tensors(set_value(LAYER, float("inf"))), [LAYER, "NaN/Inf"]),
    "-Inf": (tensors(set_value(EMBED, float("-inf"))), [EMBED, "NaN/Inf"]),
    "extra tensor": (tensors(lambda s, c: s.__setitem__("model.extra.weight", s[LAYER].clone())),
                     ["unexpected tensor 'model.extra.weight'"]),
    "missing tensor": (tensors(lambda s, c: s.pop(LAYER)), [f"tensor {LAYER!r} missing"]),
    "missing config": (lambda e: (e / "config.json").unlink(), ["config.json missing"]),
    "config not JSON": (lambda e: (e / "config.json").write_text("{nope"), ["config.json", "not valid JSON"]),
    "pickle only": (_pickle_only, ["pytorch_model.bin"]),
    "no weights": (lambda e: (e / "model.safetensors").unlink(), ["no model.safetensors"]),
    "missing shard": (_sharded_missing, ["model-00001-of-00002.safetensors", "missing"]),
    "remote code": (_remote_code, ["evil", "custom code"]),
    "other architecture": (lambda e: _edit_config(e, model_type="llama"), ["'llama'", "the base"]),
}


def _swap_token_ids(expert: Path) -> None:
    path = expert / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # same vocabulary size, other ids
    path.write_text(json.dumps(data))


def _edit_json(name: str, change):
    def edit(expert: Path) -> None:
        data = json.loads((expert / name).read_text())
        change(data)
        (expert / name).write_text(json.dumps(data))
    return edit


def _index_to_wrong_shard(expert: Path) -> None:
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(expert)).save_pretrained(str(expert), max_shard_size="10KB")
    (expert / "model.safetensors").unlink(missing_ok=True)
    index = json.loads((expert / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"][next(n for n, s in index["weight_map"].items() if s == shards[0])] = shards[1]
    (expert / "model.safetensors.index.json").write_text(json.dumps(index))


def _symlink_loop(name: str):
    def make(expert: Path) -> None:
        import os
        (expert / name).unlink()
        os.symlink(expert / f"{name}.loop", expert / name)
        os.symlink(expert / name, expert / f"{name}.loop")
    return make


# Experts that would compute something else than their rows say, and files that disagree: new kinds, tallied apart.
INTEGRITY_CASES = {  # name: (how to break expert beta, expected fragments, tally key)
    "rope_theta 1e6": (_edit_json("config.json", lambda c: c["rope_parameters"].update(rope_theta=1e6)),
                       ["rope_parameters.rope_theta = 1000000.0 but the base has 10000.0"], "config fields"),
    "rms_norm_eps": (_edit_json("config.json", lambda c: c.update(rms_norm_eps=1e-5)),
                     ["rms_norm_eps = 1e-05 but the base has 1e-06"], "config fields"),
    "hidden_act": (_edit_json("config.json", lambda c: c.update(hidden_act="gelu")), ["hidden_act = 'gelu'"],
                   "config fields"),
    "token ids swapped": (_swap_token_ids, ["token 'a' has id 101", "id 100 in the base's"], "tokenizers"),
    "eos token": (_edit_json("tokenizer_config.json", lambda c: c.update(eos_token="<pad>")),
                  ["eos_token is '<pad>' (id 0) in the expert, '<eos>' (id 2) in the base"], "tokenizers"),
    "added token id": (_edit_json("tokenizer.json", lambda t: t["added_tokens"][2].update(id=9)),
                       ["added token '<eos>' is id 9"], "tokenizers"),
    "chat template": (_edit_json("tokenizer_config.json", lambda c: c.update(chat_template="{{ messages }}")),
                      ["chat template differs"], "tokenizers"),
    "index maps to a shard without the tensor": (_index_to_wrong_shard, ["does not hold it"], "files that disagree"),
    "config.json symlink loop": (_symlink_loop("config.json"), ["config.json", "cannot read"], "symlink loops"),
}


@pytest.mark.parametrize("case", list(INTEGRITY_CASES) + ["index maps to a shard without the tensor in the base"])
def test_experts_that_compute_otherwise(case, tmp_path, capsys, tally):
    family = build_tiny_family(tmp_path / "family")
    in_base = case.endswith("in the base")
    expert = family.parent / "s" / ("base" if in_base else "experts/beta")
    breaker, fragments, kind = INTEGRITY_CASES[case.removesuffix(" in the base")]
    breaker(expert)
    capsys.readouterr()
    db = tmp_path / "r.duckdb"
    err = expect_refusal(capsys, db, ["sweep", "--family", family, "--methods", "average", "--db", db, "--device", "cpu"],
                         *fragments)
    assert str(expert) in err and len(err.strip().splitlines()) == 1, err
    tally[f"bad inputs tried: {kind}"] += 1


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES) + ["remote code in the base"])
def test_broken_checkpoints(case, tmp_path, capsys, tally):
    family = build_tiny_family(tmp_path / "family")
    in_base = case.endswith("in the base")
    expert = family.parent / "s" / ("base" if in_base else "experts/beta")
    case = case.removesuffix(" in the base")
    breaker, fragments = CHECKPOINT_CASES[case]
    breaker(expert)
    db = tmp_path / "r.duckdb"
    err = expect_refusal(capsys, db, ["sweep", "--family", family, "--methods", "average", "--db", db, "--device", "cpu"],
                         *fragments)
    assert str(expert) in err
    assert not (expert / "PWNED").exists(), "remote code ran"
    tally["bad inputs tried: checkpoints"] += 1


QUANTIZED_CASES = {  # name: (torch dtype the expert's LAYER is stored in, the safetensors code named)
    "FP8 E4M3 weights": ("float8_e4m3fn", "F8_E4M3"),
    "FP8 E5M2 weights": ("float8_e5m2", "F8_E5M2"),
}


@pytest.mark.parametrize("case", list(QUANTIZED_CASES))
def test_quantized_storage(case, tmp_path, capsys, tally):
    """FP8 storage is a well-formed safetensors file: the refusal names the tensor and dtype and says to
    dequantize, never 'not a readable safetensors file' (which sends users to re-download)."""
    import torch

    dtype, code = QUANTIZED_CASES[case]
    family = build_tiny_family(tmp_path / "family")
    expert = family.parent / "s" / "experts/beta"
    rewrite(expert, lambda s, c: s.__setitem__(LAYER, s[LAYER].to(getattr(torch, dtype))))
    db = tmp_path / "r.duckdb"
    err = expect_refusal(capsys, db, ["sweep", "--family", family, "--methods", "average", "--db", db, "--device", "cpu"],
                         LAYER, code, "dequantize")
    assert str(expert) in err and "not a readable safetensors file" not in err
    tally["bad inputs tried: quantized storage"] += 1


def _adapter_config(**changes):
    return lambda adapter: _edit_json("adapter_config.json", lambda c: c.update(changes))(adapter)


def _adapter_of_another_base(adapter: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in state if k.endswith("lora_A.weight"))
    state[key] = state[key][:, :-2].clone()  # an in-dimension the base's module does not have
    save_file(state, adapter / "adapter_model.safetensors")


ADAPTER_CASES = {  # name: (how to break expert beta, a LoRA adapter; expected fragments of the one-line refusal)
    "DoRA": (_adapter_config(use_dora=True), ["adapter_config.json", "use_dora = True"]),
    "modules_to_save": (_adapter_config(modules_to_save=["lm_head"]), ["adapter_config.json", "modules_to_save"]),
    "prefix tuning": (_adapter_config(peft_type="PREFIX_TUNING"), ["adapter_config.json", "peft_type = 'PREFIX_TUNING'"]),
    "another base": (_adapter_of_another_base, ["adapter_model.safetensors", "trained on another base"]),
    "pickled adapter": (lambda a: (a / "adapter_model.safetensors").rename(a / "adapter_model.bin"),
                        ["adapter_model.bin: pickle files are never loaded"]),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_broken_lora_adapter_experts(case, tmp_path, capsys, tally):
    import shutil

    from tests.test_adapters import make_adapter

    family = build_tiny_family(tmp_path / "family")
    expert = family.parent / "s" / "experts" / "beta"
    shutil.rmtree(expert)
    make_adapter(family.parent / "s" / "base", expert)
    breaker, fragments = ADAPTER_CASES[case]
    breaker(expert)
    capsys.readouterr()  # what building the family printed
    db = tmp_path / "r.duckdb"
    err = expect_refusal(capsys, db, ["sweep", "--family", family, "--methods", "average", "--db", db, "--device", "cpu"],
                         *fragments)
    assert str(expert) in err and len(err.strip().splitlines()) == 1, err
    tally["bad inputs tried: LoRA adapter experts"] += 1


# -- eval sets -------------------------------------------------------------------------------------------

EVAL_CASES = {
    "empty": (b"", "eval set is empty"),
    "blank lines only": (b"\n\n   \n", "eval set is empty"),
    "not UTF-8": (b'{"prompt": "\xff\xfe", "response": "x"}\n', "not UTF-8"),
    "not JSON": (b'{"prompt": "a", "response": \n', ":1: not valid JSON"),
    "array row": (b'["a", "b"]\n', ":1: expected an object"),
    "missing prompt": (b'{"response": "x"}\n', "field 'prompt' missing"),
    "missing response": (b'{"prompt": "x"}\n', "field 'response' missing"),
    "number response": (b'{"prompt": "x", "response": 3}\n', "field 'response' missing or not a string"),
    "empty response": (b'{"prompt": "x", "response": ""}\n', "empty 'response'"),
    "second line bad": (b'{"prompt": "x", "response": "y"}\n{"prompt": 1}\n', ":2:"),
    "huge line": (json.dumps({"prompt": "x" * (2 << 20), "response": "y"}).encode() + b"\n", ":1: line of"),
    "messages not a list": (b'{"messages": "hi"}\n', "'messages' must be a non-empty list"),
    "messages end with user": (b'{"messages": [{"role": "user", "content": "hi"}]}\n', "last message must be"),
    "message without content": (b'{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}\n',
                                "must have a 'role'"),
}


def test_broken_eval_sets(family, tmp_path, capsys, tally):
    valid = family.read_text()
    for i, (case, (content, fragment)) in enumerate(EVAL_CASES.items()):
        path = family.parent / "eval" / f"bad{i}.jsonl"
        path.write_bytes(content)
        manifest = family.parent / f"eval{i}.toml"
        manifest.write_text(valid.replace('beta = "eval/beta.jsonl"', f'beta = "eval/bad{i}.jsonl"'))
        db = tmp_path / f"e{i}.duckdb"
        expect_refusal(capsys, db, ["sweep", "--family", manifest, "--methods", "average", "--db", db, "--device", "cpu"],
                       str(path), fragment)
    tally["bad inputs tried: eval sets"] += len(EVAL_CASES)


# -- hyperparameters and CLI arguments ---------------------------------------------------------------------

HP_CASES = [
    ("ties", "ties.density=0", "out of range"), ("ties", "ties.density=1.5", "out of range"),
    ("ties", "ties.density=NaN", "must be finite"), ("ties", "ties.density=Infinity", "must be finite"),
    ("ties", "ties.density=abc", "must be a number"), ("ties", "ties.density=true", "must be a number"),
    ("ties", "ties.lambda=NaN", "must be finite"), ("ties", "ties.bogus=1", "no hyperparameter 'bogus'"),
    ("dare", "dare.p=1", "out of range"), ("dare", "dare.p=-0.1", "out of range"), ("dare", "dare.p=NaN", "must be finite"),
    ("dare", "dare.seed=1.5", "must be an integer"), ("dare", "dare.rescale=maybe", "must be true or false"),
    ("task_arithmetic", "task_arithmetic.c=x", "must be a number"),
    ("task_arithmetic", "task_arithmetic.normalize=2", "must be true or false"),
    ("average", "average.weight=1", "no hyperparameter 'weight'"),
    ("ties", "ties.density", "expected METHOD.PARAM=VALUE"), ("ties", "density=0.5", "expected METHOD.PARAM=VALUE"),
    ("ties", "dare.p=0.5", "not among --methods"),
]

OPTION_CASES = [  # issue 17: the new methods' parameters, per-expert weights, tensor filters
    ("della", "della.epsilon=0.5", "out of range [0.0, 0.5)"), ("della", "della.density=0.05", "density ± epsilon"),
    ("breadcrumbs", "breadcrumbs.gamma=1", "out of range [0.0, 1.0)"), ("tsv_m", "tsv_m.alpha=0", "out of range"),
    ("dare_ties", "dare_ties.lambda=NaN", "must be finite"), ("model_stock", "model_stock.t=1", "no hyperparameter 't'"),
    ("ties", "weights=alpha", "expected EXPERT:WEIGHT"), ("ties", "weights=alpha:0", "finite number > 0"),
    ("ties", "weights=alpha:-2", "finite number > 0"), ("ties", "weights=alpha:inf", "finite number > 0"),
    ("ties", "weights=alpha:1,alpha:2", "twice"), ("average", "weights=omega:2", "which is not an expert of size 's'"),
    ("average", "average.weights=3", "comma-separated text"), ("ties", "exclude=re:(", "not a regular expression"),
    ("average", "exclude=lm_hed.weight", "matches no tensor of size 's'"),
    ("average", "include=nothing.*", "matches no tensor of size 's'"),
]

ARG_CASES = [
    (["--k", "0"], "--k"), (["--k", "0-3"], "--k"), (["--k", "3-1"], "--k"), (["--k", "abc"], "--k"),
    (["--k", "1-99"], "--k"), (["--k", ""], "--k"), (["--k", "1,,2"], "--k"),
    (["--sizes", "huge"], "no size 'huge'"), (["--methods", "magic"], "magic"), (["--methods", ","], "method"),
    (["--subsets", "-1"], "--subsets"), (["--subsets", "foo"], "--subsets"), (["--subsets", "orderings:0"], "--subsets"),
    (["--subsets", "orderings:x"], "--subsets"), (["--device", "tpu"], "tpu"), (["--device", "cuda:7"], "cuda"),
    (["--address", "auto"], "--backend ray"), (["--backend", "mpi"], "mpi"), (["--seed", "x"], "--seed"),
]


def test_bad_hyperparameters_and_arguments(family, tmp_path, capsys, tally):
    db = tmp_path / "r.duckdb"
    base = ["sweep", "--family", family, "--db", db, "--device", "cpu"]
    for method, hp, fragment in HP_CASES:
        expect_refusal(capsys, db, [*base, "--methods", method, "--hp", hp], fragment)
    for extra, fragment in ARG_CASES:
        args = [*base, "--methods", "average", *extra]
        if "--device" in extra:
            args = [a for i, a in enumerate(args) if not (a == "--device" and args[i + 1] == "cpu") and not
                    (a == "cpu" and args[i - 1] == "--device")] + []
        expect_refusal(capsys, db, args, fragment)
    tally["bad inputs tried: hyperparameters"] += len(HP_CASES)
    tally["bad inputs tried: CLI arguments"] += len(ARG_CASES)


def test_bad_method_options_weights_and_filters(family, tmp_path, capsys, tally):
    db = tmp_path / "r.duckdb"
    base = ["sweep", "--family", family, "--db", db, "--device", "cpu"]
    for method, hp, fragment in OPTION_CASES:
        expect_refusal(capsys, db, [*base, "--methods", method, "--hp", hp], fragment)
    tally["bad inputs tried: new-method hyperparameters, per-expert weights, tensor filters"] += len(OPTION_CASES)


def test_bad_arguments_to_the_other_commands(family, tmp_path, capsys, tally):
    db = tmp_path / "r.duckdb"
    cases = [
        (["results", "--db", db, "--format", "xml"], "xml"),
        (["fit", "--db", db, "--format", "pdf"], "pdf"),
        (["fit", "--db", db, "--bootstrap", "-5"], "bootstrap"),
        (["export", "--what", "everything", "--out", tmp_path / "x.csv", "--db", db], "everything"),
        (["export", "--what", "results", "--format", "xls", "--out", tmp_path / "x.xls", "--db", db], "xls"),
        (["export-model", "--family", family, "--size", "s", "--method", "average", "--experts", "alpha,zeta",
          "--out", tmp_path / "m"], "zeta"),
        (["export-model", "--family", family, "--size", "s", "--method", "average", "--experts", "",
          "--out", tmp_path / "m"], "experts"),
        (["export-model", "--family", family, "--size", "s", "--method", "average", "--experts", "alpha,alpha",
          "--out", tmp_path / "m"], "alpha"),
        (["export-model", "--family", family, "--size", "q", "--method", "average", "--experts", "alpha",
          "--out", tmp_path / "m"], "no size 'q'"),
        (["demo", "build", "--preset", "giant", "--out", tmp_path / "d"], "giant"),
    ]
    for args, fragment in cases:
        expect_refusal(capsys, db, args, fragment)
    assert not (tmp_path / "m").exists() and not (tmp_path / "d").exists()
    tally["bad inputs tried: CLI arguments"] += len(cases)


# -- every option of every command -------------------------------------------------------------------------
# Each option of each command (read from the CLI itself, so a new option without cases fails the test) gets
# bad values: negative, zero, huge, non-numbers, empty, missing paths, folders for files and files for
# folders, and paths onto the family's inputs or the cache. Every one must be refused with exit code 2 and
# one line on stderr naming the option or value, no traceback, and nothing written anywhere.

def cli_options() -> set[tuple[str, str | None]]:
    """(command, option) for every option of every command; (command, None) for one without options;
    ("", option) for the global options (`mergelab -v …`), given before the command."""
    import typer

    from mergelab.cli import app

    def walk(group, prefix):
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                yield from walk(command, [*prefix, name])
                continue
            options = [p.opts[0] for p in command.params if p.name != "help"]
            yield from ((" ".join([*prefix, name]), o) for o in options or [None])

    root = typer.main.get_command(app)
    return set(walk(root, [])) | {("", p.opts[0]) for p in root.params if p.name != "help"}


def fuzz_cases(p: dict) -> dict[tuple[str, str | None], list[tuple[list, str]]]:
    """{(command, option): [(extra arguments, fragment the one-line error must hold), …]} over the paths `p`."""
    F, D, T, E, C, EMPTY = p["manifest"], p["db"], p["tmp"], p["eval"], p["checkpoint"], p["empty"]
    big = str(2**64)
    good = good_table(T)
    return {
        ("sweep", "--family"): [(["--family", T / "nothing.toml"], "family manifest not found"),
                                (["--family", EMPTY], "family manifest not found"), (["--family", E], "not valid TOML"),
                                (["--family", C / "model.safetensors"], "not valid TOML")],
        ("sweep", "--sizes"): [(["--sizes", "huge"], "no size 'huge'"), (["--sizes", ","], "--sizes ',': names nothing"),
                               (["--sizes", "s,s"], "names 's' twice")],
        ("sweep", "--methods"): [(["--methods", "magic"], "unknown merge method 'magic'"),
                                 (["--methods", ","], "--methods ',': names nothing"),
                                 (["--methods", "average,average"], "names 'average' twice"),
                                 (["--methods", "base"], "unknown merge method 'base'")],
        ("sweep", "--k"): [(["--k", "0"], "k must lie in 1..3"), (["--k", "-1"], "--k '-1'"),
                           (["--k", "4"], "size 's' has 3 experts"), (["--k", "1-99999999999"], "size 's' has 3 experts"),
                           (["--k", "3-1"], "low-high"), (["--k", "abc"], "--k 'abc'"), (["--k", "1.5"], "--k '1.5'"),
                           (["--k", ""], "--k ''")],
        ("sweep", "--subsets"): [(["--subsets", v], f"--subsets '{v}'") for v in
                                 ("0", "-1", "abc", "1.5", "", "orderings:0", "orderings:-1", "orderings:x")]
                                + [(["--subsets", "orderings:200000"], "from 1 to 2,000")],
        ("sweep", "--hp"): [(["--methods", "ties", "--hp", "ties.density=2"], "out of range"),
                            (["--hp", "nonsense"], "expected METHOD.PARAM=VALUE"),
                            (["--hp", "average.x=1"], "no hyperparameter 'x'")],
        ("sweep", "--seed"): [(["--seed", "-1"], "--seed -1"), (["--subsets", "orderings:3", "--seed", "-1"], "--seed -1"),
                              (["--seed", big], f"--seed {big}"), (["--seed", "x"], "Invalid value for '--seed'"),
                              (["--seed", "1.5"], "Invalid value for '--seed'")],
        ("sweep", "--db"): [(["--db", EMPTY], "is a folder"), (["--db", F], "family manifest"),
                            (["--db", E], "would overwrite the eval set of domain 'alpha'"),
                            (["--db", C / "r.duckdb"], "lies inside the base checkpoint of size 's'")],
        ("sweep", "--device"): [(["--device", "tpu"], "'tpu'"), (["--device", "cuda:x"], "cuda:x"),
                                (["--device", ""], "--device ''")],
        ("sweep", "--reference"): [(["--reference=maybe"], "'--reference' does not take a value")],
        ("sweep", "--backend"): [(["--backend", "mpi"], "'mpi'"), (["--backend", ""], "--backend ''")],
        ("sweep", "--address"): [(["--address", "auto"], "--address is for --backend ray")],
        ("sweep", "--adaptive"): [(["--adaptive", "L_inf"], "--adaptive 'L_inf': expected QUANTITY:PRECISION"),
                                  (["--adaptive", ""], "--adaptive '': expected QUANTITY:PRECISION"),
                                  (["--adaptive", "k90:0"], "precision must be a positive"),
                                  (["--adaptive", "k90:-1"], "precision must be a positive"),
                                  (["--adaptive", "L_inf:nan"], "precision must be a positive finite"),
                                  (["--adaptive", "L_inf:abc"], "precision 'abc' is not a number"),
                                  (["--adaptive", "floor:0.1"], "unknown quantity 'floor'"),
                                  (["--adaptive", "k0:0.5"], "unknown quantity 'k0'"),
                                  (["--adaptive", "predict:0.1"], "predict needs the k"),
                                  (["--adaptive", "predict@x:0.1"], "'x' after '@' is not a number"),
                                  (["--adaptive", "min_size@1.2:20%"], "joint-law targets"),
                                  (["--adaptive", "L_star:0.01"], "joint-law targets"),
                                  (["--adaptive", "k90:0.5", "--k", "all", "--subsets", "3"], "--subsets '3' with --adaptive"),
                                  (["--adaptive", "k90:0.5"], "--k '1' with --adaptive"),
                                  (["--adaptive", "k90:0.5", "--k", "all", "--backend", "ray"],
                                   "--backend 'ray' with --adaptive")],
        ("sweep", "--budget"): [(["--budget", "5"], "is for --adaptive sweeps"),
                                (["--adaptive", "k90:0.5", "--k", "all", "--budget", "0"], "--budget 0"),
                                (["--adaptive", "k90:0.5", "--k", "all", "--budget", "-3"], "--budget -3"),
                                (["--budget", "x"], "Invalid value for '--budget'")],

        ("adaptive replay", "--target"): [(["--target", "L_inf"], "expected QUANTITY:PRECISION"),
                                          (["--target", "A:0%"], "precision must be a positive"),
                                          (["--target", "bogus:1"], "unknown quantity 'bogus'"),
                                          (["--target", "L_star:0.01"], "joint-law targets")],
        ("adaptive replay", "--db"): [(["--db", T / "missing.duckdb"], "no results cache there"),
                                      (["--db", EMPTY], "is a folder")],
        ("adaptive replay", "--family"): [(["--family", "nosuch"], "--family 'nosuch': no cached results (cached: syn)")],
        ("adaptive replay", "--method"): [(["--method", "base"], "references, not a merge method"),
                                          (["--method", "magic"], "--method 'magic': no cached merges")],
        ("adaptive replay", "--size"): [(["--size", "nosuch"], "--size 'nosuch': no cached results")],
        ("adaptive replay", "--budget"): [(["--budget", "0"], "--budget 0"), (["--budget", "x"], "Invalid value")],
        ("adaptive replay", "--seed"): [(["--seed", "-1"], "--seed -1"), (["--seed", "x"], "Invalid value")],
        ("adaptive replay", "--format"): [(["--format", "xml"], "--format 'xml'")],

        ("results", "--db"): [(["--db", T / "missing.duckdb"], "no results cache there"), (["--db", EMPTY], "is a folder"),
                              (["--db", F], "cannot open the results cache")],
        ("results", "--family"): [(["--family", "nosuch"], "--family 'nosuch': no cached rows")],
        ("results", "--format"): [(["--format", "xml"], "--format 'xml'"), (["--format", ""], "--format ''")],
        ("results", "--out"): [(["--out", D], "would overwrite the results cache"),
                               (["--out", f"{D}.wal"], "write-ahead log"),
                               (["--out", p["db_link"]], "would overwrite the results cache"),
                               (["--out", p["db_hardlink"]], "would overwrite the results cache"),
                               (["--out", p["other_db"]], "would overwrite a DuckDB database"),
                               (["--out", p["queue"]], "would overwrite a SQLite database"),
                               (["--out", F], "family manifest"),
                               (["--out", E], "would overwrite the eval set 'alpha'"),
                               (["--out", C / "model.safetensors"], "a checkpoint folder"),
                               (["--out", C / "new.csv"], "lies inside a checkpoint folder"),
                               (["--out", T / "no" / "x.csv"], "does not exist; create it first"),
                               (["--out", EMPTY], "is a folder; name a file")],

        ("results", "--stale"): [(["--stale=1"], "'--stale' does not take a value")],
        ("fit", "--inputs-version"): [(["--inputs-version", "nosuch"], "inputs version 'nosuch' is not recorded")],
        ("export", "--inputs-version"): [(["--inputs-version", "x"], "inputs version 'x' is not recorded")],
        ("adopt", "--family"): [(["--family", T / "nothing.toml"], "family manifest not found")],
        ("adopt", "--db"): [(["--db", T / "missing.duckdb"], "no results cache there"), (["--db", EMPTY], "is a folder")],
        ("adopt", "--sizes"): [(["--sizes", "nosuch"], "no size 'nosuch'"), (["--sizes", ","], "names nothing")],
        ("versions", "--db"): [(["--db", T / "missing.duckdb"], "no results cache there"), (["--db", EMPTY], "is a folder")],
        ("versions", "--family"): [(["--family", "nosuch"], "--family 'nosuch': no inputs versions recorded (cached: syn)")],

        ("fit", "--db"): [(["--db", T / "missing.duckdb"], "no results cache there"), (["--db", EMPTY], "is a folder")],
        ("fit", "--family"): [(["--family", "nosuch"], "--family 'nosuch': no cached results (cached: syn)")],
        ("fit", "--method"): [(["--method", "base"], "references, not a merge method"),
                              (["--method", "expert"], "references, not a merge method"),
                              (["--method", "nosuch"], "--method 'nosuch': no cached merges (cached: average)")],
        ("fit", "--size"): [(["--size", "nosuch"], "--size 'nosuch': no cached results (cached: s)")],
        ("fit", "--domain"): [(["--domain", "nosuch"], "--domain 'nosuch': not a domain"), (["--domain", ""], "--domain ''")],
        ("fit", "--joint"): [(["--joint=1"], "'--joint' does not take a value")],
        ("fit", "--bootstrap"): [(["--bootstrap", "-1"], "--bootstrap -1"), (["--bootstrap", "1000000000"], "up to 100,000"),
                                 (["--bootstrap", "x"], "Invalid value for '--bootstrap'")],
        ("fit", "--weights"): [(["--weights", "x"], "--weights 'x'")],
        ("fit", "--format"): [(["--format", "pdf"], "--format 'pdf'"), (["--format", "parquet"], "needs --out FILE")],
        ("fit", "--out"): [(["--out", D], "would overwrite the results cache"), (["--out", F], "family manifest"),
                           (["--out", T / "no" / "x.txt"], "does not exist"), (["--out", EMPTY], "is a folder")],

        ("export", "--what"): [(["--what", "x"], "--what 'x'"), (["--what", ""], "--what ''")],
        ("export", "--format"): [(["--format", "xls"], "--format 'xls'"), (["--format", "png"], "png is for --what figure"),
                                 (["--what", "figure", "--format", "csv", "--out", T / "x.png"], "a figure is written as png"),
                                 (["--what", "figure", "--out", T / "x.csv"], "--format: give png, pdf, svg")],
        ("export", "--domain"): [(["--what", "fits", "--domain", "nosuch"], "--domain 'nosuch': not a domain"),
                                 (["--what", "paper", "--domain", ""], "--domain ''"),
                                 (["--domain", "macro"], "--domain is for --what fits, paper, joint or figure, not results")],
        ("export", "--figure"): [(["--what", "figure", "--figure", v, "--out", T / "x.png"], f"--figure '{v}'")
                                 for v in ("pie", "")] + [(["--figure", "curves"], "--figure is for --what figure")],
        ("export", "--columns"): [(["--what", "figure", "--columns", v, "--out", T / "x.png"], f"--columns {v}")
                                  for v in ("0", "3", "-1")]
                                 + [(["--what", "figure", "--columns", "x", "--out", T / "x.png"], "Invalid value for '--columns'"),
                                    (["--columns", "1"], "--columns is for --what figure")],
        ("export", "--dpi"): [(["--what", "figure", "--dpi", v, "--out", T / "x.png"], f"--dpi {v}: expected 1 to 1,200")
                              for v in ("0", "-5", "100000")]
                             + [(["--what", "figure", "--dpi", "300", "--out", T / "x.pdf"], "--dpi 300: is for --format png"),
                                (["--what", "figure", "--dpi", "x", "--out", T / "x.png"], "Invalid value for '--dpi'"),
                                (["--dpi", "300"], "--dpi is for --what figure")],
        ("export", "--out"): [(["--out", D], "would overwrite the results cache"), (["--out", F], "family manifest"),
                              (["--out", T / "no" / "x.csv"], "does not exist"), (["--out", EMPTY], "is a folder"),
                              (["--out", C / "x.csv"], "lies inside a checkpoint folder")],
        ("export", "--db"): [(["--db", T / "missing.duckdb"], "no results cache there"), (["--db", EMPTY], "is a folder")],
        ("export", "--family"): [(["--family", "nosuch"], "--family 'nosuch'")],
        ("export", "--method"): [(["--method", "nosuch"], "--method 'nosuch'"), (["--method", "base"], "references")],
        ("export", "--size"): [(["--size", "nosuch"], "--size 'nosuch'")],
        ("export", "--bootstrap"): [(["--bootstrap", "-1"], "--bootstrap -1"), (["--bootstrap", big], "up to 100,000")],
        ("export", "--weights"): [(["--weights", ""], "--weights ''")],

        ("export-model", "--family"): [(["--family", T / "nothing.toml"], "family manifest not found"),
                                       (["--family", EMPTY], "family manifest not found")],
        ("export-model", "--size"): [(["--size", "nosuch"], "no size 'nosuch'")],
        ("export-model", "--method"): [(["--method", "nosuch"], "unknown merge method 'nosuch'"),
                                       (["--method", "base"], "unknown merge method 'base'")],
        ("export-model", "--experts"): [(["--experts", ""], "--experts: (none)"), (["--experts", ","], "--experts: (none)"),
                                        (["--experts", "zeta"], "zeta not among"), (["--experts", "alpha,alpha"], "twice")],
        ("export-model", "--out"): [(["--out", E], "is a file"), (["--out", C / "m"], "lies inside the base checkpoint"),
                                    (["--out", F.parent], "already exists and is not empty"),
                                    (["--out", C], "already exists and is not empty")],
        ("export-model", "--hp"): [(["--hp", "average.x=1"], "no hyperparameter 'x'"), (["--hp", "x"], "METHOD.PARAM=VALUE")],
        ("export-model", "--db"): [(["--db", T / "missing.duckdb"], "no results cache there"), (["--db", EMPTY], "is a folder"),
                                   (["--db", F], "cannot open the results cache")],
        ("export-model", "--mergekit-yaml"): [(["--mergekit-yaml", F], "family manifest"),
                                              (["--mergekit-yaml", E], "would overwrite the eval set"),
                                              (["--mergekit-yaml", C / "config.json"], "lies inside the base checkpoint"),
                                              (["--mergekit-yaml", D], "would overwrite a DuckDB database"),
                                              (["--mergekit-yaml", T / "no" / "m.yml"], "does not exist"),
                                              (["--mergekit-yaml", EMPTY], "is a folder")],

        ("worker", "--queue"): [(["--queue", EMPTY], "is a folder"), (["--queue", D], "the results cache"),
                                (["--queue", p["other_db"]], "would overwrite a DuckDB database"),
                                (["--queue", F], "family manifest"),
                                (["--queue", C / "q.sqlite"], "lies inside a checkpoint folder")],
        ("worker", "--once"): [(["--once=1"], "'--once' does not take a value")],
        ("worker", "--idle-exit"): [(["--idle-exit", v], "--idle-exit") for v in ("-1", "nan", "inf")]
                                   + [(["--idle-exit", "x"], "Invalid value for '--idle-exit'")],

        ("methods", None): [(["extra"], "unexpected extra argument")],

        ("", "--verbose"): [(["--verbose=1"], "'--verbose' does not take a value"),
                            (["-v", "-q"], "-v/--verbose and -q/--quiet: pick one")],
        ("", "--quiet"): [(["--quiet=yes"], "'--quiet' does not take a value"), (["-q", "-v"], "pick one")],

        ("family init", "folder"): [([T / "nothing"], "not a folder"), ([E], "not a folder"),
                                    ([EMPTY], "no size folders found"), ([p["stuff"]], "no size folders found"),
                                    ([C.parent], "no size folders found (base/ and experts/ lie directly in it"),
                                    ([F.parent], "family.toml: already exists; pass --force")],
        ("family init", "--name"): [([EMPTY, "--name", "a·b"], "family name 'a·b' contains '·'"),
                                    ([EMPTY, "--name", ""], "family name '' is empty"),
                                    ([EMPTY, "--name", " x"], "starts or ends with whitespace")],
        ("family init", "--force"): [([EMPTY, "--force=1"], "'--force' does not take a value")],

        ("demo build", "--preset"): [(["--preset", "giant"], "--preset 'giant'"), (["--preset", ""], "--preset ''")],
        ("demo build", "--out"): [(["--out", E], "is a file"), (["--out", C / "d"], "lies inside a checkpoint folder"),
                                  (["--out", F.parent], "holds a family manifest"),
                                  (["--out", p["stuff"], "--force"], "replaces only a demo family"),
                                  (["--out", D.parent, "--force"], "holds the results cache")],
        ("demo build", "--seed"): [(["--seed", "-1"], "--seed -1"), (["--seed", "x"], "Invalid value for '--seed'")],
        ("demo build", "--sizes"): [(["--sizes", "nosuch"], "no size 'nosuch'"), (["--sizes", ","], "names nothing")],
        ("demo build", "--force"): [(["--force=yes"], "'--force' does not take a value")],
        ("demo build", "--jobs"): [(["--jobs", "0"], "--jobs 0"), (["--jobs", "-1"], "--jobs -1"),
                                   (["--jobs", "x"], "Invalid value for '--jobs'")],

        ("demo up", "--preset"): [(["--preset", "giant"], "--preset 'giant'")],
        ("demo up", "--ui"): [(["--ui=2"], "'--ui' does not take a value")],
        ("demo up", "--port"): [(["--port", v], f"--port {v}") for v in ("0", "-1", "70000")]
                               + [(["--port", "x"], "Invalid value for '--port'")],
        ("demo up", "--host"): [(["--host", v], f"--host '{v}'") for v in ("a b", "", "-x", "host_with_underscore")],
        ("demo up", "--db"): [(["--db", EMPTY], "is a folder"), (["--db", F], "family manifest")],

        ("sweep", "--downstream"): [(["--downstream", T / "nothing"], "not a folder of lm-eval task YAMLs"),
                                    (["--downstream", EMPTY], "no task YAML in it")],
        ("sweep", "--downstream-per-k"): [(["--downstream-per-k", "2"], "--downstream-per-k is for --downstream"),
                                          (["--downstream-per-k", "x"], "Invalid value for '--downstream-per-k'")],

        ("import", "files"): [([T / "nothing.csv"], "nothing.csv: cannot read"), ([EMPTY], "is a folder"),
                              ([E], "one file per merged model needs its experts"), ([D], "a DuckDB database, not a results file"),
                              ([F], "cannot tell the format"), ([bad_table(T)], "bad.csv line 3, column 'ce': 'x' is not")],
        ("import", "--db"): [([good, "--db", EMPTY], "is a folder"),
                             ([good, "--db", F], "cannot open the results cache"),
                             ([good, "--db", good], "is the results cache itself")],
        ("import", "--family"): [([good, "--family", "a·b"], "'a·b' contains '·'"),
                                 ([good, "--family", ""], "no family column: name the family with --family")],
        ("import", "--metric"): [([good, "--metric", "bleu"], "metric 'bleu' is not known"),
                                 ([good, "--metric", "bleu:up"], "expected NAME or NAME:higher|lower"),
                                 ([good, "--metric", "accuracy:lower"], "accuracy is higher is better")],
        ("import", "--map"): [([good, "--map", "experts"], "expected FIELD=COLUMN"),
                              ([good, "--map", "nope=x"], "--map 'nope': not a field"),
                              ([good, "--map", "experts=nosuch"], "no column 'nosuch'"),
                              ([good, "--map", bad_toml(T)], "not a TOML file")],
        ("import", "--set"): [([good, "--set", "size"], "expected FIELD=VALUE"),
                              ([good, "--set", "colour=red"], "expected FIELD=VALUE")],
        ("import", "--pattern"): [([good, "--pattern", "("], "not a regular expression"),
                                  ([E, "--pattern", "(?P<experts>zzz)"], "does not match this path")],
        ("import", "--dry-run"): [([good, "--dry-run=1"], "'--dry-run' does not take a value")],
    }


def good_table(T: Path) -> Path:
    """A valid file for `mergelab import` (no family column: the fuzz base gives --family)."""
    path = T / "import-good.csv"
    path.write_text("experts,domain,ce\na,x,2.5\na+b,x,2.4\n")
    return path


def bad_table(T: Path) -> Path:
    path = T / "bad.csv"
    path.write_text("experts,domain,ce\na,x,2.5\na+b,x,x\n")
    return path


def bad_toml(T: Path) -> Path:
    path = T / "map.toml"
    path.write_text("experts = [unclosed\n")
    return path


FUZZ_BASE = {  # valid arguments each case is spliced into (its options replace these)
    "sweep": lambda p: ["sweep", "--family", p["manifest"], "--db", p["tmp"] / "new.duckdb", "--methods", "average",
                        "--k", "1", "--device", "cpu"],
    "results": lambda p: ["results", "--db", p["db"]],
    "adaptive replay": lambda p: ["adaptive", "replay", "--target", "L_inf:0.01", "--db", p["db"]],
    "fit": lambda p: ["fit", "--db", p["db"]],
    "export": lambda p: ["export", "--what", "results", "--out", p["tmp"] / "x.csv", "--db", p["db"]],
    "export-model": lambda p: ["export-model", "--family", p["manifest"], "--size", "s", "--experts", "alpha,beta",
                               "--out", p["tmp"] / "m"],
    "worker": lambda p: ["worker", "--queue", p["tmp"] / "q.sqlite", "--once"],
    "methods": lambda p: ["methods"],
    "": lambda p: ["methods"],  # global options go before the command
    "family init": lambda p: ["family", "init"],  # each case names the folder
    "versions": lambda p: ["versions", "--db", p["db"]],
    "adopt": lambda p: ["adopt", "--family", p["manifest"], "--db", p["db"]],
    "demo build": lambda p: ["demo", "build", "--out", p["tmp"] / "d", "--sizes", "xs"],
    "demo up": lambda p: ["demo", "up", "--no-ui", "--db", p["tmp"] / "up.duckdb"],
    "import": lambda p: ["import", "--db", p["tmp"] / "imp.duckdb", "--family", "fz"],  # each case names the file
}


def splice(base: list, extra: list) -> list:
    """`base` without the options `extra` sets (and their values), then `extra`."""
    names = {str(t).split("=")[0] for t in extra if str(t).startswith("--")}
    out, skip = [], False
    for i, token in enumerate(base):
        if skip:
            skip = False
            continue
        if str(token).startswith("--") and str(token).split("=")[0] in names:
            skip = i + 1 < len(base) and not str(base[i + 1]).startswith("--")
            continue
        out.append(token)
    return out + list(extra)


def snapshot(*roots: Path) -> dict[Path, str]:
    import hashlib

    files = [f for root in roots for f in ([root] if root.is_file() else sorted(root.rglob("*"))) if f.is_file()]
    return {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_every_option_of_every_command_refuses_bad_values(family, tmp_path, capsys, monkeypatch, tally):
    import os
    import sqlite3

    import duckdb

    from mergelab.store import ResultStore
    from tests.helpers import synthetic_results

    root = family.parent
    db = tmp_path / "cache" / "r.duckdb"
    db.parent.mkdir()
    ResultStore(db).upsert(synthetic_results({"average": lambda k: 2 + 1 / k}, ["a", "b", "c", "d"]))
    paths = {"manifest": family, "db": db, "tmp": tmp_path, "eval": root / "eval" / "alpha.jsonl",
             "checkpoint": root / "s" / "base", "empty": tmp_path / "empty", "stuff": tmp_path / "stuff",
             "db_link": tmp_path / "link.csv", "db_hardlink": tmp_path / "hard.csv",
             "other_db": tmp_path / "other.duckdb", "queue": tmp_path / "queue.sqlite"}
    paths["empty"].mkdir()
    paths["stuff"].mkdir()
    (paths["stuff"] / "notes.txt").write_text("mine")
    paths["db_link"].symlink_to(db)
    os.link(db, paths["db_hardlink"])
    duckdb.connect(str(paths["other_db"])).close()
    sqlite3.connect(paths["queue"]).execute("CREATE TABLE jobs (id INTEGER)").connection.close()
    for var, value in (("MERGELAB_HOME", tmp_path / "home"), ("MERGELAB_DB", db), ("MERGELAB_JOBS", tmp_path / "jobs.sqlite")):
        monkeypatch.setenv(var, str(value))
    inputs = [family, root / "eval" / "alpha.jsonl", root / "eval" / "beta.jsonl", root / "eval" / "gamma.jsonl",
              root / "s", db.parent, paths["other_db"], paths["queue"], paths["stuff"]]
    before = snapshot(*inputs)

    cases = fuzz_cases(paths)
    assert set(cases) == cli_options(), "options without fuzz cases (or cases for options that are gone): " \
        f"{sorted(set(cases) ^ cli_options(), key=str)}"
    n = 0
    for (command, option), bad in cases.items():
        for extra, fragment in bad:
            args = [*extra, *FUZZ_BASE[command](paths)] if command == "" else splice(FUZZ_BASE[command](paths), extra)
            code, out, err = cli(capsys, *args)
            shown = " ".join(map(str, args))
            assert code == 2, (shown, code, err[-300:])
            assert err.startswith("error: ") and err.count("\n") == 1, (shown, err)
            assert "Traceback" not in err + out, shown
            assert fragment in err, (shown, fragment, err)
            n += 1
    assert snapshot(*inputs) == before  # no input touched, not even the cache
    written = {"new.duckdb", "x.csv", "x.png", "x.pdf", "m", "q.sqlite", "d", "up.duckdb", "home", "jobs.sqlite",
               "imp.duckdb"}
    assert not written & {p.name for p in tmp_path.iterdir()}, sorted(p.name for p in tmp_path.iterdir())
    assert not list(tmp_path.glob(".*.partial-*")) and not list(root.glob(".*.partial-*"))
    tally["bad inputs tried: every CLI option (fuzz)"] += n
    tally["bad inputs tried: paper export options (--domain, --figure, --columns, --dpi, figure --format)"] += sum(
        len(cases[("export", o)]) for o in ("--domain", "--figure", "--columns", "--dpi")) + 3
    tally["CLI options fuzzed"] += len(cases)
    tally["bad inputs tried: mergelab import files and options"] += sum(len(v) for k, v in cases.items() if k[0] == "import")
    tally["bad inputs tried: adaptive targets and budgets (sweep --adaptive/--budget, adaptive replay)"] += sum(
        len(bad) for (command, option), bad in cases.items()
        if command == "adaptive replay" or option in ("--adaptive", "--budget"))
