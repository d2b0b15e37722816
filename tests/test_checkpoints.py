"""Reading HF safetensors dirs (single file and sharded) and refusing what cannot be merged."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergelab.io.checkpoints import Checkpoint, check_compatible
from mergelab.errors import CheckpointError
from tests.helpers import save_checkpoint, tiny_config


@pytest.fixture
def base(tmp_path):
    save_checkpoint(tmp_path / "base", tiny_config(), seed=0)
    return Checkpoint(tmp_path / "base")


def copy_with(tmp_path, base, name, edit=None, config_edit=None):
    """A copy of `base` whose tensors (dict) pass through `edit` and config through `config_edit`."""
    out = tmp_path / name
    out.mkdir()
    tensors = load_file(base.path / "model.safetensors")
    config = dict(base.config)
    if edit:
        tensors = edit(tensors)
    if config_edit:
        config_edit(config)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    return Checkpoint(out)


def test_tied_head_is_left_out_and_tensors_are_read(base):
    assert base.tied_embeddings and "lm_head.weight" not in base.names
    assert "model.embed_tokens.weight" in base.names
    t = base.tensor("model.embed_tokens.weight", torch.float32)
    assert t.shape == (264, 16) and base.shapes["model.embed_tokens.weight"] == (264, 16)


def test_sharded_checkpoint_reads_the_same_tensors(tmp_path, base):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base.path))
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    sharded = Checkpoint(tmp_path / "sharded")
    assert len(set(sharded.files.values())) > 1
    assert sorted(sharded.names) == sorted(base.names)
    for name in base.names:
        assert torch.equal(sharded.tensor(name), base.tensor(name))
    check_compatible(base, sharded)


def test_bf16_storage_is_upcast_on_request(tmp_path, base):
    ckpt = copy_with(tmp_path, base, "bf16", lambda ts: {k: v.to(torch.bfloat16) for k, v in ts.items()})
    t = ckpt.tensor(base.names[0], torch.float32)
    assert t.dtype == torch.float32
    assert torch.equal(t, base.tensor(base.names[0]).to(torch.bfloat16).float())


def test_read_into_fills_the_given_tensor_in_place_and_casts(tmp_path, base):
    """Straight from the file into a slice of a bigger buffer when dtypes match; cast on the way in
    when they do not; a wrong shape is named."""
    name = "model.layers.0.mlp.up_proj.weight"
    expected = load_file(base.path / "model.safetensors")[name]
    buffer = torch.zeros(expected.numel() + 10)
    out = buffer[5:5 + expected.numel()].view(expected.shape)
    base.read_into(name, out)
    assert torch.equal(out, expected) and out.data_ptr() == buffer.data_ptr() + 5 * 4
    assert buffer[:5].eq(0).all() and buffer[-5:].eq(0).all()  # nothing written outside the view
    bf16 = copy_with(tmp_path, base, "bf16", lambda ts: {k: v.to(torch.bfloat16) for k, v in ts.items()})
    bf16.read_into(name, out)
    assert torch.equal(out, expected.to(torch.bfloat16).float())
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' has shape \[32, 16\], expected \[16, 32\]"):
        base.read_into(name, torch.empty(16, 32))


def test_pickle_checkpoints_are_refused(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle checkpoints are never loaded"):
        Checkpoint(d)


def test_missing_dir_and_truncated_file(tmp_path, base):
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        Checkpoint(tmp_path / "nope")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes((base.path / "model.safetensors").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        Checkpoint(broken)


def test_missing_shard_is_named(tmp_path):
    d = tmp_path / "idx"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001.safetensors"}}))
    with pytest.raises(CheckpointError, match="shard model-00001.safetensors listed but missing"):
        Checkpoint(d)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_name_file_and_tensor(tmp_path, base, value):
    name = "model.layers.0.mlp.up_proj.weight"

    def poison(ts):
        ts[name] = ts[name].clone()
        ts[name][0, 0] = value
        return ts

    ckpt = copy_with(tmp_path, base, "nan", poison)
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{name}' has 1 NaN/Inf values"):
        ckpt.tensor(name)
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{name}' has 1 NaN/Inf values"):
        ckpt.read_into(name, torch.empty(ckpt.shapes[name]))


def test_shape_vocab_missing_extra_and_tied_mismatches(tmp_path, base):
    embed = "model.embed_tokens.weight"
    vocab = copy_with(tmp_path, base, "vocab", lambda ts: {**ts, embed: torch.zeros(300, 16)})
    with pytest.raises(CheckpointError) as err:
        check_compatible(base, vocab)
    assert str(err.value).startswith(f"{vocab.path / 'model.safetensors'}: tensor '{embed}' has 300 vocabulary rows, "
                                     "the base has 264 (shape [300, 16] vs [264, 16]); to merge anyway set "
                                     'vocab_policy = "base_rows"')
    assert '"common_rows"' in str(err.value) and "family manifest" in str(err.value)
    for policy in ("base_rows", "common_rows"):
        check_compatible(base, vocab, policy)
    wide = copy_with(tmp_path, base, "wide", lambda ts: {**ts, embed: torch.zeros(300, 17)})
    with pytest.raises(CheckpointError, match=r"'model.embed_tokens.weight' has shape \[300, 17\], base has \[264, 16\]$"):
        check_compatible(base, wide, "base_rows")  # the policies cover rows only, never the hidden size
    gone = "model.norm.weight"
    missing = copy_with(tmp_path, base, "missing", lambda ts: {k: v for k, v in ts.items() if k != gone})
    with pytest.raises(CheckpointError, match=f"missing/model.safetensors|tensor '{gone}' missing"):
        check_compatible(base, missing)
    extra = copy_with(tmp_path, base, "extra", lambda ts: {**ts, "model.extra.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.extra.weight'"):
        check_compatible(base, extra)
    untied = copy_with(tmp_path, base, "untied", config_edit=lambda c: c.update(tie_word_embeddings=False))
    with pytest.raises(CheckpointError, match="tie_word_embeddings=False but the base has True"):
        check_compatible(base, untied)


def test_reader_equals_safetensors_and_names_truncated_data(tmp_path, base):
    reference = load_file(base.path / "model.safetensors")
    for name in base.names:
        assert torch.equal(base.tensor(name), reference[name])
    halves = copy_with(tmp_path, base, "half", lambda ts: {k: v.to(torch.float16) for k, v in ts.items()})
    assert torch.equal(halves.tensor(base.names[0]), reference[base.names[0]].to(torch.float16))
    data = (base.path / "model.safetensors").read_bytes()
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "model.safetensors").write_bytes(data[: len(data) - 64])
    with pytest.raises(CheckpointError, match=r"cut/model.safetensors: not a readable safetensors file \(tensor .* \(truncated\?\)\)"):
        Checkpoint(cut).shapes


def test_tied_default_comes_from_the_architecture_when_config_omits_it(tmp_path, base):
    """Gemma's config.json files leave tie_word_embeddings out (transformers ties them); an expert saved
    by transformers writes it. They must still be compatible, and a head stored anyway is left out."""
    from tests.realarch import real_config

    gemma = tmp_path / "gemma"
    save_checkpoint(gemma, real_config("gemma2"), seed=0)
    written = Checkpoint(gemma)
    omitted = copy_with(tmp_path, written, "omitted", config_edit=lambda c: c.pop("tie_word_embeddings"))
    assert omitted.tied_embeddings and written.tied_embeddings and "tie_word_embeddings" not in omitted.config
    check_compatible(omitted, written)
    embed = "model.embed_tokens.weight"
    with_head = copy_with(tmp_path, written, "with_head", lambda ts: {**ts, "lm_head.weight": ts[embed].clone()})
    assert "lm_head.weight" in with_head.files and with_head.names == written.names
    untied = copy_with(tmp_path, base, "llama_default",
                       config_edit=lambda c: (c.pop("tie_word_embeddings"), c.update(model_type="llama")))
    assert not untied.tied_embeddings  # LlamaConfig's default


def test_vocab_tensors_are_found_by_shape_not_by_name(tmp_path, base):
    from tests.realarch import real_config

    assert base.vocab_rows == 264 and base.vocab_tensors == ["model.embed_tokens.weight"]
    save_checkpoint(tmp_path / "llama", real_config("llama"), seed=0)
    llama = Checkpoint(tmp_path / "llama")
    assert sorted(llama.vocab_tensors) == ["lm_head.weight", "model.embed_tokens.weight"]
    renamed = copy_with(tmp_path, llama, "renamed", lambda ts: {k.replace("embed_tokens", "wte"): v for k, v in ts.items()})
    assert sorted(renamed.vocab_tensors) == ["lm_head.weight", "model.wte.weight"]


# -- quantized and packed storage (issue 17 item 3) ---------------------------------------------------------

LAYER = "model.layers.0.mlp.up_proj.weight"
QUANTIZED = {  # torch dtype of the stored tensor: the safetensors code the message names
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "float8_e8m0fnu": "F8_E8M0", "float4_e2m1fn_x2": "F4",
    "uint16": "U16", "uint32": "U32", "uint64": "U64",
}


def _stored_as(dtype_name):
    def edit(tensors):
        t = tensors[LAYER]
        if dtype_name == "float4_e2m1fn_x2":  # two FP4 values per byte: a packed half-width tensor
            tensors[LAYER] = torch.zeros(t.shape[0], t.shape[1] // 2, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
        elif dtype_name.startswith("uint"):
            tensors[LAYER] = t.abs().mul(100).to(torch.int64).to(getattr(torch, dtype_name))
        else:
            tensors[LAYER] = t.to(getattr(torch, dtype_name))
        return tensors
    return edit


@pytest.mark.parametrize("dtype_name", list(QUANTIZED))
def test_quantized_storage_is_named_not_called_malformed(tmp_path, base, dtype_name):
    """A handcrafted safetensors file with one FP8/FP4/unsigned tensor: its header reads (it is well formed);
    merging or reading it is refused naming the file, the tensor, the dtype and what to do."""
    ckpt = copy_with(tmp_path, base, dtype_name, _stored_as(dtype_name))
    code = QUANTIZED[dtype_name]
    assert ckpt.stored_dtype(LAYER) == code and LAYER in ckpt.shapes  # the header is read, not refused
    for refuse in (lambda: check_compatible(base, ckpt), lambda: ckpt.tensor(LAYER, torch.float32)):
        with pytest.raises(CheckpointError) as err:
            refuse()
        msg = str(err.value)
        assert str(ckpt.files[LAYER]) in msg and repr(LAYER) in msg and code in msg, msg
        assert "dequantize" in msg and "bfloat16" in msg and "malformed" not in msg and "\n" not in msg, msg


def test_int_packs_name_the_quantization_method(tmp_path, base):
    """GPTQ-style int32 packs beside a config.json quantization_config: the method is named too."""
    def edit(tensors):
        tensors[LAYER] = torch.zeros(tensors[LAYER].shape, dtype=torch.int32)
        return tensors

    ckpt = copy_with(tmp_path, base, "gptq", edit,
                     lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4}))
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.up_proj.weight' is stored as I32 \(int32\).*"
                                              r"quantized by gptq.*dequantize"):
        check_compatible(base, ckpt)


def test_an_unknown_dtype_code_is_still_malformed(tmp_path, base):
    ckpt = copy_with(tmp_path, base, "odd")
    path = ckpt.path / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + n].replace(b'"F32"', b'"X99"', 1)
    path.write_bytes(raw[:8] + header + raw[8 + n:])
    with pytest.raises(CheckpointError, match="malformed header entry"):
        Checkpoint(ckpt.path).shapes
