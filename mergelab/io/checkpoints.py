"""Lazy per-tensor reading of Hugging Face safetensors directories (single file or sharded).

Only safetensors are read: pickle-based checkpoints (.bin/.pt) are refused, never unpickled.
Tensors are read with plain file reads at the offsets the header gives, not through a memory map,
so a sweep that reads M experts never holds their pages in its own memory.

The weight files are chosen as `from_pretrained` chooses them: config.json's `transformers_weights` if
set, else model.safetensors, else model.safetensors.index.json (so a stray model.safetensors beside a
sharded index wins, as it does in transformers). A shard index must agree with its shards' headers.

Stored layouts that transformers converts on load (`StoredLayout`): a Mixtral or Qwen3-MoE file holds one
tensor per expert, which transformers 5 packs into `mlp.experts.gate_up_proj` / `down_proj`; a Gemma 3
multimodal file holds `language_model.model.*` beside a vision tower. Such a checkpoint is read through
transformers' own checkpoint conversion mapping (what `from_pretrained` applies), so `names`, `shapes` and
the tensors read are those of the model mergelab builds (`model_config`). For Gemma 3 that is the text model
(Gemma3ForCausalLM): the vision tower and projector are left out of the merge (`StoredLayout.left_out`).

`check_compatible` refuses an expert that would compute something else than the base with the same
weights: a config field that changes the forward pass (`config_mismatch`), or a tokenizer that maps
text to other ids (`tokenizer_mismatch`).
"""

from __future__ import annotations

import json
import math
import re
from functools import cached_property, lru_cache
from pathlib import Path

from mergelab.errors import CheckpointError

SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
# The other dtypes the safetensors format defines: quantized or packed storage that mergelab does not merge. A
# header that uses them is well formed; reading or merging such a tensor is refused by `storage_problem`.
STORED_ONLY_DTYPES = {"F8_E4M3": "FP8 (E4M3)", "F8_E5M2": "FP8 (E5M2)", "F8_E8M0": "an 8-bit exponent-only scale (MX)",
                      "F6_E2M3": "FP6 (E2M3, MX)", "F6_E3M2": "FP6 (E3M2, MX)", "F4": "FP4 (MXFP4/NVFP4)",
                      "U16": "uint16", "U32": "uint32", "U64": "uint64", "C64": "complex64"}
MAX_HEADER = 100_000_000
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TIED_HEAD = "lm_head.weight"


class Checkpoint:
    """One HF checkpoint directory: config.json + model.safetensors (or shards + index).

    A PEFT LoRA adapter directory opens as `mergelab.io.adapters.AdapterCheckpoint` (base + scale·B·A)
    when `path` carries its base (an `AdapterPath`, as `load_family` gives adapter experts); without one
    it is refused with a message that says it is an adapter."""

    def __new__(cls, path=None, *args, **kwargs):
        # a path that says how to open it (an AdapterPath: its AdapterCheckpoint, then __init__(path) runs)
        opener = getattr(type(path), "checkpoint_class", None)
        if cls is Checkpoint and opener is not None and getattr(path, "base", None) is not None:
            return super().__new__(opener)
        return super().__new__(cls)

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            try:
                self.path.resolve(strict=self.path.is_symlink())
            except (RuntimeError, OSError) as exc:  # RuntimeError: a symlink loop
                raise CheckpointError(f"{self.path}: checkpoint directory cannot be resolved (symlink loop or "
                                      f"dangling link: {exc})") from exc
            raise CheckpointError(f"{self.path}: checkpoint directory not found")
        self.stored = self._tensor_files()  # stored tensor key -> its file, as the headers name them

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r})"

    @cached_property
    def config(self) -> dict:
        config_path = self.path / "config.json"
        try:
            return json.loads(config_path.read_text())
        except FileNotFoundError as exc:
            raise CheckpointError(f"{config_path}: config.json missing") from exc
        except OSError as exc:  # a symlink loop, a directory, no permission
            raise CheckpointError(f"{config_path}: cannot read config.json ({exc.strerror or exc})") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from exc

    @cached_property
    def layout(self) -> "StoredLayout | None":
        """How the stored tensors become the parameters of the model mergelab builds, where transformers
        converts them on load (renamed, packed, a multimodal wrapper's text part); None where the stored
        names are the model's own. Raises CheckpointError for an unreadable config.json."""
        return stored_layout(self)

    @cached_property
    def files(self) -> dict[str, Path]:
        """Tensor name (as the built model names it) -> the file holding it (its first stored source)."""
        if self.layout is None:
            return self.stored
        return {name: self.stored[sources[0][1]] for name, sources in self.layout.sources.items()}

    def model_config(self):
        """The transformers config of the causal LM mergelab builds and evaluates for this checkpoint: the
        checkpoint's own, or its text model's for a multimodal wrapper read text-only (Gemma 3)."""
        if self.layout is not None and self.layout.text_config is not None:
            return self.layout.text_config
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.path, trust_remote_code=False)

    @cached_property
    def tied_embeddings(self) -> bool:
        """config.json's tie_word_embeddings, or the architecture's default where the file leaves it out
        (Gemma's configs do, and transformers ties them)."""
        if self.layout is not None and self.layout.text_config is not None:
            return bool(self.layout.text_config.tie_word_embeddings)
        if "tie_word_embeddings" in self.config:
            return bool(self.config["tie_word_embeddings"])
        from transformers import AutoConfig

        try:
            return bool(getattr(AutoConfig.for_model(self.config["model_type"]), "tie_word_embeddings", False))
        except (KeyError, ValueError):
            return False

    @cached_property
    def vocab_rows(self) -> int | None:
        """The vocabulary size in config.json (top level, or its text_config for multimodal wrappers)."""
        config = self.config if "vocab_size" in self.config else self.config.get("text_config") or {}
        rows = config.get("vocab_size")
        return rows if isinstance(rows, int) and not isinstance(rows, bool) else None

    @cached_property
    def vocab_tensors(self) -> list[str]:
        """Tensors with one row per vocabulary entry (input embedding, untied lm_head, any bias over the
        vocabulary), found by shape: their first dim is the config's vocab_size, whatever their names."""
        return [n for n, shape in self.shapes.items() if shape and shape[0] == self.vocab_rows]

    @cached_property
    def names(self) -> list[str]:
        """Tensor names in storage order; a tied lm_head stored anyway (a copy of the embedding, whatever
        the embedding is called) is left out."""
        names = list(self.files)
        if self.tied_embeddings and TIED_HEAD in names:
            head = self._shape(TIED_HEAD)
            if any(self._shape(n) == head for n in names if n != TIED_HEAD):
                names.remove(TIED_HEAD)
        return names

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: self._shape(name) for name in self.names}

    def _shape(self, name: str) -> tuple[int, ...]:
        if self.layout is not None and name in self.layout.packed:
            return self.layout.shapes[name]  # of the model transformers builds; checked when read
        key = self._key(name)
        return self._open_file(self.stored[key]).shape(key)

    def _key(self, name: str) -> str:
        """The stored key of a tensor that is stored whole (renamed at most)."""
        return self.layout.sources[name][0][1] if self.layout is not None and name in self.layout.sources else name

    @cached_property
    def n_params(self) -> int:
        """Parameters stored: the elements of every tensor in `names` (a tied lm_head once), from the
        safetensors headers alone (no tensor data is read)."""
        return sum(math.prod(shape) for shape in self.shapes.values())

    def stored_dtype(self, name: str) -> str:
        """How tensor `name` is stored: a torch dtype name, or a safetensors code (`STORED_ONLY_DTYPES`);
        for a packed tensor, that of a source that is not floating point if any, else of its first."""
        keys = [key for _, key in self.layout.sources[name]] if self.layout is not None and name in self.layout.sources \
            else [name]
        dtypes = [self._open_file(self.stored[key]).dtype(key) for key in keys]
        return next((d for d in dtypes if d not in FLOAT_DTYPES), dtypes[0])

    def tensor(self, name: str, dtype=None, device: str = "cpu"):
        """Read one tensor, check it is finite, and cast it (e.g. to fp32 for accumulation)."""
        t = self._read_checked(name)
        return t.to(device=device, dtype=dtype or t.dtype)

    def read_into(self, name: str, out) -> None:
        """Read one tensor into `out` (same shape; cast to its dtype and moved to its device), checking
        it is finite. A CPU `out` of the stored dtype is filled straight from the file, with no copy."""
        if self.shapes.get(name, tuple(out.shape)) != tuple(out.shape):
            raise CheckpointError(f"{self.files[name]}: tensor {name!r} has shape {list(self.shapes[name])}, "
                                  f"expected {list(out.shape)}")
        t = self._read_checked(name, out)
        if t is not out:
            out.copy_(t)

    def _read_checked(self, name: str, into=None):
        import torch

        if name not in self.files:
            raise CheckpointError(f"{self.path}: tensor {name!r} missing")
        if self.stored_dtype(name) not in FLOAT_DTYPES:  # never cast quantized or integer storage into weights
            try:
                config = self.config
            except CheckpointError:
                config = {}
            raise CheckpointError(storage_problem(self.files[name], name, self.stored_dtype(name), config))
        try:
            if self.layout is not None and name in self.layout.packed:
                t = self.layout.read_packed(self, name)
            else:
                key = self._key(name)
                t = self._open_file(self.stored[key]).read(key, into)
        except OSError as exc:
            raise CheckpointError(f"{self.files[name]}: cannot read tensor {name!r} ({exc})") from exc
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{self.files[name]}: tensor {name!r} has {bad} NaN/Inf values")
        return t

    def _read_stored(self, key: str):
        """One stored tensor by its key in the file (a source of a packed tensor), checked to be floating point."""
        dtype = self._open_file(self.stored[key]).dtype(key)
        if dtype not in FLOAT_DTYPES:
            raise CheckpointError(storage_problem(self.stored[key], key, dtype, self.config))
        return self._open_file(self.stored[key]).read(key)

    def close(self) -> None:
        """Forget the parsed headers (they are re-read on the next access)."""
        self.__dict__.pop("_handles", None)

    # -- internals ---------------------------------------------------------------------------

    def _tensor_files(self) -> dict[str, Path]:
        # The order of transformers' _get_resolved_checkpoint_files for a local folder: the file config.json
        # names in `transformers_weights`, else model.safetensors, else the sharded index.
        explicit = self._explicit_weights()
        if explicit:
            if not explicit.is_file():
                raise CheckpointError(f"{self.path / 'config.json'}: transformers_weights names {explicit.name}, "
                                      f"which is missing")
            if explicit.name.endswith(".index.json"):
                return self._sharded_files(explicit)
            return {name: explicit for name in self._open_file(explicit).keys()}
        single, index = self.path / SINGLE_FILE, self.path / INDEX_FILE
        if single.is_file():
            return {name: single for name in self._open_file(single).keys()}
        if index.is_file():
            return self._sharded_files(index)
        if (self.path / "adapter_config.json").is_file():  # mergelab.io.adapters reads it as an expert of a base
            raise CheckpointError(f"{self.path}: a LoRA adapter (adapter_config.json), not a full checkpoint: a base "
                                  f"must be a full checkpoint (config.json + {SINGLE_FILE}); name the adapter as an "
                                  f"expert of a family size, whose base it is applied to")
        pickled = sorted(p.name for p in self.path.glob("*") if p.suffix in {".bin", ".pt", ".pth"})
        hint = f" (found {', '.join(pickled)}: pickle checkpoints are never loaded; convert them to safetensors)" if pickled else ""
        raise CheckpointError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")

    def _explicit_weights(self) -> Path | None:
        """config.json's `transformers_weights` (a file in this folder), which from_pretrained loads first."""
        try:
            name = json.loads((self.path / "config.json").read_text()).get("transformers_weights")
        except (OSError, ValueError, AttributeError):
            return None  # no readable config: `config` says so when it is needed
        if name is None:
            return None
        if not isinstance(name, str) or not name.endswith((".safetensors", ".safetensors.index.json")) or \
                Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{self.path / 'config.json'}: transformers_weights = {name!r} must name a "
                                  f".safetensors or .safetensors.index.json file inside the checkpoint folder")
        return self.path / name

    def _sharded_files(self, index: Path) -> dict[str, Path]:
        """Tensor -> shard from the index, checked against every shard's header both ways (transformers
        loads every tensor of every listed shard, so the index and the shards must agree)."""
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError("weight_map must map tensor names to shard file names")
        except OSError as exc:
            raise CheckpointError(f"{index}: cannot read the shard index ({exc.strerror or exc})") from exc
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{index}: malformed shard index ({exc!r})") from exc
        files = {name: self.path / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                why = " (a symlink loop or dangling link)" if shard.is_symlink() else ""
                raise CheckpointError(f"{index}: shard {shard.name} listed but missing{why}")
            held = set(self._open_file(shard).keys())
            listed = {name for name, f in files.items() if f == shard}
            if listed - held:
                lost = sorted(listed - held)
                raise CheckpointError(f"{index}: maps tensor {lost[0]!r} to {shard.name}, which does not hold it "
                                      f"({len(lost)} such tensors); the index and its shards disagree: re-save the checkpoint")
            if held - listed:
                stray = sorted(held - listed)
                raise CheckpointError(f"{shard}: holds tensor {stray[0]!r}, which {index.name} does not map to this shard "
                                      f"({len(stray)} such tensors); the index and its shards disagree: re-save the checkpoint")
        return files

    def _open(self, name: str):
        return self._open_file(self.stored[self._key(name)])

    def _open_file(self, file: Path) -> "SafetensorsFile":
        handles = self.__dict__.setdefault("_handles", {})
        if file not in handles:
            handles[file] = SafetensorsFile(file)
        return handles[file]


class SafetensorsFile:
    """One .safetensors file: the JSON header parsed and checked once, tensors read on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                prefix = f.read(8)
                length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
                if not 0 < length <= min(MAX_HEADER, size - 8):
                    self._fail(f"header length {length} does not fit a file of {size} bytes")
                header = json.loads(f.read(length))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            self._fail(str(exc))
        if not isinstance(header, dict):
            self._fail("header is not a JSON object")
        header.pop("__metadata__", None)
        self.start, self.entries = 8 + length, {}
        for name, entry in header.items():
            try:
                code, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
                if code not in SAFETENSORS_DTYPES and code not in STORED_ONLY_DTYPES:
                    raise KeyError(code)
                dtype = SAFETENSORS_DTYPES.get(code, code)  # a torch dtype name, or the code of quantized storage
            except (KeyError, TypeError, ValueError):
                self._fail(f"tensor {name!r} has a malformed header entry {entry!r}")
            if not 0 <= begin <= end <= size - self.start:
                self._fail(f"tensor {name!r} ends at byte {self.start + end}, the file has {size} (truncated?)")
            self.entries[name] = (dtype, shape, begin, end)

    def _fail(self, why: str):
        raise CheckpointError(f"{self.path}: not a readable safetensors file ({why})")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> str:
        """The stored dtype: a torch dtype name ("bfloat16"), or a safetensors code of quantized storage ("F8_E4M3")."""
        return self.entries[name][0]

    def read(self, name: str, into=None):
        """The tensor's values: read into `into` when that is a contiguous CPU tensor of the stored
        dtype and shape (then `into` is returned), else into a new tensor."""
        import math

        import torch

        dtype_name, shape, begin, end = self.entries[name]
        if dtype_name in STORED_ONLY_DTYPES:
            raise CheckpointError(storage_problem(self.path, name, dtype_name))
        dtype = getattr(torch, dtype_name)
        if (end - begin) != math.prod(shape) * torch.empty((), dtype=dtype).element_size():
            self._fail(f"tensor {name!r} has {end - begin} bytes for shape {list(shape)} in {dtype_name}")
        direct = (into is not None and into.dtype == dtype and into.device.type == "cpu"
                  and into.is_contiguous() and tuple(into.shape) == shape)
        if direct and end > begin:
            buffer = into.view(-1).view(torch.uint8).numpy()
        else:
            buffer = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self.start + begin)
            if f.readinto(buffer) != end - begin:
                self._fail(f"tensor {name!r} is cut short")
        if direct:
            return into
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


# -- stored layouts that transformers converts on load ----------------------------------------------------------

# Multimodal wrappers merged and evaluated as their text model (what mergelab scores is text), with what is left out.
TEXT_ONLY_WRAPPERS = {"gemma3": "the vision tower and multimodal projector"}
_LAYOUTS: dict = {}  # (config.json, stored keys) -> StoredLayout | None: one meta model per distinct checkpoint layout


class StoredLayout:
    """How stored tensors become the parameters of the model mergelab builds, by transformers' checkpoint
    conversion mapping (`get_model_conversion_mapping`, the renamings and WeightConverters `from_pretrained`
    applies, in its order: keys sorted by `dot_natural_key`).

    sources: model name -> [(source pattern, stored key), ...] it is made from (one for a renamed tensor;
    for a packed MoE tensor every expert's, in expert order). packed: model name -> (the group's first target
    in the converter's model, this name in that model), for tensors a WeightConverter forms. shapes: the
    packed tensors' shapes in the model transformers builds. left_out: stored keys the built model does not
    hold (a multimodal wrapper's vision tower), with `left_out_what` in words. text_config: the config of the
    text model built instead of a multimodal wrapper (else None)."""

    def __init__(self, model, converters, text_config, sources, packed, shapes, left_out, left_out_what=""):
        self.model, self.converters, self.text_config = model, converters, text_config
        self.sources, self.packed, self.shapes = sources, packed, shapes
        self.left_out, self.left_out_what = left_out, left_out_what
        # a name as stored or as transformers' model names it -> the built model's name (None: not in it), e.g.
        # for a LoRA adapter trained on the multimodal wrapper; names are not renamed when nothing is converted
        self.model_name = lambda name: name

    def note(self) -> str:
        """One line on what is converted and what is left out, for logs and the sweep's plan ('' if nothing)."""
        parts = []
        n_packed = len(self.packed)
        if n_packed:
            n_sources = sum(len(self.sources[n]) for n in self.packed)
            parts.append(f"{n_sources} stored per-expert tensors are packed into {n_packed} (e.g. "
                         f"{next(iter(self.packed))!r}) as transformers loads them; per-tensor steps (TIES trimming, "
                         f"DARE) treat each packed tensor as one tensor, across its experts")
        if self.left_out:
            parts.append(f"{len(self.left_out)} stored tensors of {self.left_out_what} (e.g. {self.left_out[0]!r}) are "
                         f"left out: mergelab merges and evaluates the text model ({type(self.model).__name__} read as "
                         f"{self.text_config.model_type}), so {self.left_out_what} stay the base's")
        return "; ".join(parts)

    def read_packed(self, ckpt: "Checkpoint", name: str):
        """Form packed tensor `name` of `ckpt` from its stored sources with the WeightConverter transformers
        uses, and check its shape. Raises CheckpointError."""
        import copy

        first, full_name = self.packed[name]
        converter = copy.deepcopy(self.converters[name])
        for pattern, key in self.sources[name]:
            converter.add_tensor(first, key, pattern, lambda key=key: ckpt._read_stored(key))
        try:
            out = converter.convert(first, model=self.model, config=self.model.config)
        except CheckpointError:
            raise
        except Exception as exc:  # the converter's own shape or count checks
            raise CheckpointError(f"{ckpt.files[name]}: cannot pack {len(self.sources[name])} stored tensors into "
                                  f"{name!r} as transformers does ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc
        t = out.get(full_name)
        t = t[0] if isinstance(t, list) else t
        if t is None or tuple(t.shape) != self.shapes[name]:
            got = "nothing" if t is None else f"shape {list(t.shape)}"
            raise CheckpointError(f"{ckpt.files[name]}: packing {self.sources[name][0][1]!r} and the other "
                                  f"{len(self.sources[name]) - 1} stored tensors gives {got} for {name!r}, the model "
                                  f"built from config.json expects {list(self.shapes[name])}")
        return t


def stored_layout(ckpt: "Checkpoint") -> StoredLayout | None:
    """The `StoredLayout` of `ckpt`, or None where its stored names are the built model's own (checked for
    architectures transformers has a conversion mapping for, and for TEXT_ONLY_WRAPPERS). Cached per
    (config.json, stored keys): experts of one base share one meta model. Raises CheckpointError."""
    model_type = ckpt.config.get("model_type")
    if not isinstance(model_type, str) or not _may_convert(model_type):
        return None
    key = (json.dumps(ckpt.config, sort_keys=True), tuple(ckpt.stored))
    if key not in _LAYOUTS:
        _LAYOUTS[key] = _build_layout(ckpt)
    return _LAYOUTS[key]


@lru_cache(maxsize=None)
def _may_convert(model_type: str) -> bool:
    """Whether transformers has a checkpoint conversion mapping for `model_type` (or reads it text-only). Asked
    without importing transformers while it is not loaded yet (its conversion_mapping.py names every model_type
    it maps, quoted), so that reading headers (n_params, fingerprints) stays free of torch: 0.03 s, not 6 s."""
    import sys

    if model_type in TEXT_ONLY_WRAPPERS:
        return True
    if "transformers.conversion_mapping" not in sys.modules:
        named = _named_in_conversion_source(model_type)
        if named is not None:
            return named
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    return get_checkpoint_conversion_mapping(model_type) is not None


def _named_in_conversion_source(model_type: str) -> bool | None:
    """Whether transformers' conversion_mapping.py names `model_type` (quoted), read as text without importing
    it; None where the file cannot be found."""
    import importlib.util

    spec = importlib.util.find_spec("transformers")
    folders = list(spec.submodule_search_locations or []) if spec else []
    try:
        return f'"{model_type}"' in (Path(folders[0]) / "conversion_mapping.py").read_text(encoding="utf-8")
    except (OSError, IndexError):
        return None


def _build_layout(ckpt: "Checkpoint") -> StoredLayout | None:
    import copy

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    config = _config_object(ckpt)
    with torch.device("meta"):  # names, shapes and the conversions only: no memory
        full = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    transforms = get_model_conversion_mapping(full)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    params = full.state_dict()
    groups: dict[str, list[tuple[str, str]]] = {}
    group_converter = {}
    for stored in sorted(ckpt.stored, key=dot_natural_key):  # from_pretrained's order: experts stack 0, 1, 2, ...
        renamed, pattern = rename_source_key(stored, renamings, converters, full.base_model_prefix, params)
        if renamed not in params:  # as from_pretrained: a key the model holds as it is stays; others are refused later
            renamed, pattern = stored, None
        groups.setdefault(renamed, []).append((pattern or stored, stored))
        if pattern is not None:
            group_converter[renamed] = by_pattern[pattern]

    text_config, built, to_model, what = None, full, (lambda n: n), ""
    if ckpt.config.get("model_type") in TEXT_ONLY_WRAPPERS:
        what = TEXT_ONLY_WRAPPERS[ckpt.config["model_type"]]
        text_config = copy.deepcopy(config.get_text_config())
        text_config.tie_word_embeddings = full.lm_head.weight is full.get_input_embeddings().weight
        with torch.device("meta"):
            built = AutoModelForCausalLM.from_config(text_config, trust_remote_code=False)
        lm_path = next(n for n, m in full.named_modules() if m is full.get_decoder())
        text_path = next(n for n, m in built.named_modules() if m is built.get_decoder())
        built_params = built.state_dict()

        def to_model(full_name: str) -> str | None:
            if full_name.startswith(lm_path + "."):
                return f"{text_path}.{full_name[len(lm_path) + 1:]}"
            return full_name if full_name in built_params else None  # e.g. lm_head.weight; None: not text

    sources, packed, shapes, left_out = {}, {}, {}, []
    model_params = built.state_dict()
    for first, members in groups.items():
        converter = group_converter.get(first)
        targets = [first] if converter is None or len(converter.target_patterns) == 1 else \
            [first.replace(converter.target_patterns[0], t) for t in converter.target_patterns]
        for full_name in targets:
            name = to_model(full_name) if first in params else full_name
            if name is None:
                left_out += [key for _, key in members]
                continue
            sources[name] = members
            if converter is not None:
                packed[name] = (first, full_name)
                group_converter[name] = converter
                shapes[name] = tuple(model_params[name].shape)
    if not packed and not left_out and all(name == members[0][1] for name, members in sources.items()):
        return None
    layout = StoredLayout(full, {n: group_converter[n] for n in packed}, text_config, sources, packed, shapes,
                          sorted(set(left_out)), what)

    def model_name(stored: str) -> str | None:
        renamed, _ = rename_source_key(stored, renamings, [], full.base_model_prefix, params)
        return to_model(renamed) if renamed in params else (to_model(stored) if stored in params else None)

    layout.model_name = model_name
    note = layout.note()
    if note:
        import logging

        logging.getLogger(__name__).info("%s: %s", ckpt.path, note)
    return layout


FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")


def check_mergeable(ckpt: Checkpoint) -> None:
    """Refuse custom-code architectures (mergelab never runs remote code: trust_remote_code stays off)
    and non-floating-point weights, naming the file."""
    from transformers import CONFIG_MAPPING

    model_type = ckpt.config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        custom = "; its auto_map asks for custom code, which mergelab never runs" if "auto_map" in ckpt.config else ""
        raise CheckpointError(f"{ckpt.path / 'config.json'}: model_type {model_type!r} is not an architecture "
                              f"transformers ships{custom}")
    for name in ckpt.names:
        problem = storage_problem(ckpt.files[name], name, ckpt.stored_dtype(name), ckpt.config)
        if problem:
            raise CheckpointError(problem)


def storage_problem(file, name: str, dtype: str, config: dict | None = None) -> str | None:
    """Why tensor `name` of `file`, stored as `dtype` (a torch dtype name or a safetensors code such as
    "F8_E4M3"), cannot be merged, in one line that names the tensor, its dtype and what to do; None for
    floating-point storage (F16, BF16, F32, F64). `config` (config.json) names the quantization method if any."""
    if dtype in FLOAT_DTYPES:
        return None
    code = next((c for c, t in SAFETENSORS_DTYPES.items() if t == dtype), dtype)
    shown = dtype if code == dtype else f"{code} ({dtype})"
    method = ((config or {}).get("quantization_config") or {}).get("quant_method") if isinstance(
        (config or {}).get("quantization_config"), dict) else None
    if code in STORED_ONLY_DTYPES or method:
        kind = f"{STORED_ONLY_DTYPES[code]} " if code in STORED_ONLY_DTYPES and STORED_ONLY_DTYPES[code] != dtype else ""
        quantized = f", quantized by {method} (config.json quantization_config)" if method else ""
        return (f"{file}: tensor {name!r} is stored as {shown}: {kind}quantized or packed storage{quantized}, which "
                f"mergelab does not merge; dequantize the checkpoint to BF16 or F16 first (e.g. load it with "
                f"transformers and save_pretrained it in bfloat16) and name that copy in the family")
    return (f"{file}: tensor {name!r} is stored as {shown}; weights must be floating point (F16, BF16, F32 or F64): "
            f"convert the checkpoint to bfloat16 first")


def check_compatible(base: Checkpoint, other: Checkpoint, vocab_policy: str = "refuse") -> None:
    """Raise a CheckpointError naming the file and tensor, field or token if `other` cannot be merged with
    `base`: another architecture or tying, a config field that changes the forward pass (`check_config`),
    missing, extra or reshaped tensors, or a tokenizer that maps text to other ids (`check_tokenizer`).

    Vocabulary tensors whose row counts differ (a padded or resized vocabulary) are refused unless
    `vocab_policy` is "base_rows" or "common_rows" (the engine then aligns them on the base's rows)."""
    check_mergeable(base)
    check_mergeable(other)
    if other.config.get("model_type") != base.config.get("model_type"):
        raise CheckpointError(f"{other.path / 'config.json'}: model_type {other.config.get('model_type')!r} but the base "
                              f"is {base.config.get('model_type')!r}")
    if other.tied_embeddings != base.tied_embeddings:
        raise CheckpointError(
            f"{other.path}: tie_word_embeddings={other.tied_embeddings} but the base has {base.tied_embeddings}"
        )
    check_config(base, other)
    missing = [n for n in base.names if n not in other.shapes]
    if missing:
        raise CheckpointError(f"{other.path}: tensor {missing[0]!r} missing ({len(missing)} missing in all)")
    extra = [n for n in other.names if n not in base.shapes]
    if extra:
        raise CheckpointError(f"{other.path}: unexpected tensor {extra[0]!r} not in the base ({len(extra)} extra)")
    vocab = set(base.vocab_tensors)
    for name, shape in base.shapes.items():
        got = other.shapes[name]
        if got == shape:
            continue
        if name in vocab and got[1:] == shape[1:]:
            if vocab_policy == "refuse":
                raise CheckpointError(
                    f"{other.files[name]}: tensor {name!r} has {got[0]} vocabulary rows, the base has {shape[0]} "
                    f"(shape {list(got)} vs {list(shape)}); to merge anyway set vocab_policy = \"base_rows\" "
                    f"(merge over the base's rows) or \"common_rows\" (merge over the rows all share) in the family manifest")
            continue
        raise CheckpointError(f"{other.path}: tensor {name!r} has shape {list(got)}, base has {list(shape)}")
    check_tokenizer(base, other)


# -- config fields that change what the model computes -----------------------------------------------------

# config.json fields that do not change the logits the loaded weights give on an eval example, each with why.
# Every other field of the architecture's transformers config class (its dataclass fields, or its and
# PretrainedConfig's __init__ arguments on older transformers), of its sub-configs, and any other key in
# the files that is not private (a leading '_'), must be equal in base and expert (`config_mismatch`).
CONFIG_BOOKKEEPING = {
    "transformers_version": "the library version that wrote the file",
    "architectures": "the head class; mergelab builds the causal LM of model_type and checks every tensor name",
    "dtype": "the storage dtype; each tensor's dtype is read from the file and mergelab computes in its own",
    "torch_dtype": "the storage dtype (transformers < 5); as dtype",
    "use_cache": "keeps keys/values for generation; one forward pass scores an example",
    "return_dict": "the container forward returns",
    "torchscript": "export flag",
    "use_bfloat16": "TensorFlow-era storage flag",
    "tf_legacy_loss": "TensorFlow loss flag",
    "chunk_size_feed_forward": "splits the feed-forward into chunks with the same result",
    "attn_implementation": "the attention kernel; mergelab picks it and the kernels agree",
    "id2label": "classification labels; the causal LM has no classifier",
    "label2id": "classification labels",
    "num_labels": "classification labels",
    "problem_type": "classification loss type",
    "finetuning_task": "task metadata",
    "task_specific_params": "generation presets per task",
    "tokenizer_class": "tokenizer metadata; the tokenizers are compared from their own files",
    "prefix": "a generation prompt prefix",
    "bos_token_id": "generation only; the tokenizers' special tokens are compared from their own files",
    "eos_token_id": "generation only; as bos_token_id",
    "pad_token_id": "the padding embedding's gradient at training; forward is unchanged",
    "sep_token_id": "generation only",
    "decoder_start_token_id": "generation only (encoder-decoders)",
    "router_aux_loss_coef": "a training loss term (mixture-of-experts load balancing)",
    "model_type": "compared first, on its own",
    "tie_word_embeddings": "compared first, on its own",
    "vocab_size": "vocabulary rows are the tensors' first dimension, handled by vocab_policy",
    "auto_map": "custom code, which mergelab never runs (trust_remote_code stays off)",
    "custom_pipelines": "custom code, never run",
    "transformers_weights": "which file holds the weights; resolved like from_pretrained does",
    # transformers < 5 kept generation settings in every config
    **{name: "a generation setting" for name in (
        "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
        "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
        "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
        "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
        "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens")},
}
# Kinds of fields, by name, that cannot change an eval-mode forward pass of loaded weights.
CONFIG_BOOKKEEPING_PATTERNS = {
    r"^output_": "what forward returns besides the logits (attentions, hidden states, router logits)",
    r"dropout|_pdrop$|layerdrop|^drop_path": "inactive in eval mode; mergelab evaluates with model.eval()",
    r"(^|_)init(ializer)?(_|$)": "how weights are initialised before the checkpoint's are loaded",
    r"_version$": "the version of a tool that wrote the file",
}


def config_counts(name: str) -> bool:
    """Whether a config field changes what the model computes (not in CONFIG_BOOKKEEPING or its patterns)."""
    return name not in CONFIG_BOOKKEEPING and not any(re.search(p, name) for p in CONFIG_BOOKKEEPING_PATTERNS)


def _declared_fields(cls) -> set[str]:
    """The fields transformers' config class declares: its dataclass fields (transformers >= 5), else the
    arguments of its and PretrainedConfig's __init__."""
    import dataclasses
    import inspect

    from transformers import PretrainedConfig

    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return {p for c in (cls, PretrainedConfig) for p in inspect.signature(c.__init__).parameters} - {"self", "kwargs"}


def _config_object(ckpt: Checkpoint):
    """config.json as transformers reads it (defaults filled in, legacy fields such as rope_theta moved
    where the modeling code reads them)."""
    import logging

    from transformers import CONFIG_MAPPING

    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)  # config classes warn about legacy fields; the comparison is what matters
    try:
        return CONFIG_MAPPING[ckpt.config["model_type"]].from_dict(dict(ckpt.config))
    except Exception as exc:  # the config class's own validation
        raise CheckpointError(f"{ckpt.path / 'config.json'}: transformers cannot read this "
                              f"{ckpt.config.get('model_type')} config ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc
    finally:
        logger.setLevel(level)


_UNSET = object()


def _show(value) -> str:
    text = "(unset)" if value is _UNSET else repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def config_mismatch(base_config, other_config, prefix: str = "") -> tuple[str, object, object] | None:
    """The first field (dotted through sub-configs) that counts (`config_counts`) and differs between two
    transformers config objects of the same class, as (field, base value, other value); None if none does."""
    from transformers import PretrainedConfig

    declared = _declared_fields(type(base_config))
    base_dict, other_dict = base_config.to_dict(), other_config.to_dict()
    for name in dict.fromkeys([*sorted(declared), *base_dict, *other_dict]):
        if not config_counts(name) or (name.startswith("_") and name not in declared):
            continue
        a, b = getattr(base_config, name, None), getattr(other_config, name, None)
        if isinstance(a, PretrainedConfig) and isinstance(b, PretrainedConfig) and type(a) is type(b):
            found = config_mismatch(a, b, f"{prefix}{name}.")
            if found:
                return found
            continue
        a, b = base_dict.get(name, _UNSET), other_dict.get(name, _UNSET)
        if isinstance(a, dict) and isinstance(b, dict):  # e.g. rope_parameters: name the entry that differs
            for key in dict.fromkeys([*a, *b]):
                if a.get(key, _UNSET) != b.get(key, _UNSET):
                    return f"{prefix}{name}.{key}", a.get(key, _UNSET), b.get(key, _UNSET)
        elif a != b:
            return f"{prefix}{name}", a, b
    return None


def check_config(base: Checkpoint, other: Checkpoint) -> None:
    """Refuse `other` if a config field that changes the forward pass differs from the base's (both read
    by transformers' config class, so a field left out means the class default), naming the field and
    both values. Raises CheckpointError."""
    found = config_mismatch(_config_object(base), _config_object(other))
    if found:
        name, a, b = found
        raise CheckpointError(
            f"{other.path / 'config.json'}: {name} = {_show(b)} but the base has {_show(a)}; this field changes what "
            f"the model computes, so the expert's rows would not describe it: use experts with the base's config")


# -- tokenizers -----------------------------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                   "chat_template.jinja", "chat_template.json")
SLOW_VOCAB_FILES = ("vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                    "sentencepiece.bpe.model", "added_tokens.json")  # read when there is no tokenizer.json
SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
                 "additional_special_tokens", "extra_special_tokens")
# mergelab pads batches itself and never scores padding: the pad token does not change a scored id.
UNSCORED_ROLES = ("pad_token",)
# tokenizer_config.json keys that do not change the ids mergelab scores, each with why; every other key counts.
TOKENIZER_BOOKKEEPING = {
    "name_or_path": "where it was loaded from",
    "model_max_length": "mergelab cuts examples at the manifest's max_length itself",
    "padding_side": "mergelab batches and pads itself",
    "truncation_side": "mergelab cuts examples itself",
    "clean_up_tokenization_spaces": "decoding only",
    "spaces_between_special_tokens": "decoding only",
    "errors": "decoding only (how invalid bytes are shown)",
    "model_input_names": "names of the returned tensors",
    "processor_class": "metadata",
    "tokenizer_file": "a path, the file itself is compared",
    "special_tokens_map_file": "a path, the file itself is compared",
    "auto_map": "custom code, never run",
    "added_tokens_decoder": "compared as the added tokens",
    "chat_template": "compared as the chat template",
    **{role: "compared as the special tokens" for role in SPECIAL_ROLES},
}
# tokenizer.json parts that do not change encoding: truncation and padding are reset by transformers on every
# call, the decoder only decodes, version is the format's.
TOKENIZER_JSON_BOOKKEEPING = ("version", "truncation", "padding", "decoder")


def _read_json(path: Path, default=None):
    if not path.is_file():
        if path.is_symlink():
            raise CheckpointError(f"{path}: a symlink loop or dangling link")
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes() if path.is_file() else None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def _content(token):
    """A special token as its text: tokenizer configs store str, {'content': ...} or lists of them."""
    if isinstance(token, dict):
        return token.get("content")
    if isinstance(token, list):
        return [_content(t) for t in token]
    return token


class _TokenizerFiles:
    """What a checkpoint folder's tokenizer files say about encoding text, read from the files."""

    def __init__(self, path: Path):
        self.path = path
        self.present = [f for f in TOKENIZER_FILES if (path / f).is_file() or (path / f).is_symlink()]
        self.fast = _read_json(path / "tokenizer.json")
        self.config = _read_json(path / "tokenizer_config.json", {})
        if not isinstance(self.config, dict) or not isinstance(self.fast, (dict, type(None))):
            raise CheckpointError(f"{path}: tokenizer_config.json and tokenizer.json must hold JSON objects")
        special_map = _read_json(path / "special_tokens_map.json", {})
        # an empty list or mapping of extra tokens is as good as none (fine-tuning tools write either)
        self.special = {role: _content(v) for role, v in {**special_map, **self.config}.items()
                        if role in SPECIAL_ROLES and v not in (None, [], {}, "")}

    @property
    def slow_files(self) -> list[str]:
        return [f for f in SLOW_VOCAB_FILES if f in self.present]

    @cached_property
    def chat_template(self):
        if (self.path / "chat_template.jinja").is_file():
            return _read_bytes(self.path / "chat_template.jinja").decode("utf-8", "replace")
        if (self.path / "chat_template.json").is_file():
            return (_read_json(self.path / "chat_template.json") or {}).get("chat_template")
        return self.config.get("chat_template")

    def token_id(self, token) -> str:
        """' (id N)' for a token of tokenizer.json's vocabulary or added tokens, else ''."""
        if not isinstance(token, str) or not self.fast:
            return ""
        for added in self.fast.get("added_tokens") or []:
            if added.get("content") == token:
                return f" (id {added.get('id')})"
        vocab = (self.fast.get("model") or {}).get("vocab")
        return f" (id {vocab[token]})" if isinstance(vocab, dict) and token in vocab else ""


def _merge_text(merge) -> str:
    return " ".join(merge) if isinstance(merge, list) else str(merge)


def _fast_mismatch(base: dict, other: dict) -> str | None:
    """The first difference between two tokenizer.json files that changes encoding, in words."""
    base_model, other_model = base.get("model") or {}, other.get("model") or {}
    a, b = base_model.get("vocab"), other_model.get("vocab")
    if a == b:
        pass  # the usual case, checked at dict speed before any search for the first difference
    elif isinstance(a, dict) and isinstance(b, dict):
        for token, id_ in sorted(a.items(), key=lambda item: (str(item[1]), item[0])):
            if b.get(token, _UNSET) != id_:
                got = "is missing" if token not in b else f"has id {b[token]}"
                return f"token {token!r} {got} in the expert's vocabulary, id {id_} in the base's (tokenizer.json)"
        extra = sorted(set(b) - set(a), key=lambda t: (str(b[t]), t))
        if extra:
            return f"token {extra[0]!r} has id {b[extra[0]]} in the expert's vocabulary, which the base's lacks (tokenizer.json)"
    else:  # Unigram: a list of [piece, score]
        a, b = list(a or []), list(b or [])
        for i in range(max(len(a), len(b))):
            x, y = (a[i] if i < len(a) else _UNSET), (b[i] if i < len(b) else _UNSET)
            if x != y:
                return f"vocabulary entry {i} is {_show(y)} in the expert, {_show(x)} in the base (tokenizer.json)"
    a, b = base_model.get("merges") or [], other_model.get("merges") or []
    if a != b and [_merge_text(m) for m in a] != [_merge_text(m) for m in b]:  # "a b" and ["a", "b"] are one merge
        a, b = [_merge_text(m) for m in a], [_merge_text(m) for m in b]
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        x, y = (a[i] if i < len(a) else _UNSET), (b[i] if i < len(b) else _UNSET)
        return f"merge {i} is {_show(y)} in the expert, {_show(x)} in the base (tokenizer.json, {len(b)} vs {len(a)} merges)"
    for key in dict.fromkeys([*base_model, *other_model]):
        if key not in ("vocab", "merges") and base_model.get(key, _UNSET) != other_model.get(key, _UNSET):
            return (f"model.{key} is {_show(other_model.get(key, _UNSET))} in the expert, "
                    f"{_show(base_model.get(key, _UNSET))} in the base (tokenizer.json)")
    a = {t.get("content"): t for t in base.get("added_tokens") or []}
    b = {t.get("content"): t for t in other.get("added_tokens") or []}
    for token in dict.fromkeys([*a, *b]):
        if a.get(token, _UNSET) != b.get(token, _UNSET):
            def show(t):
                return "missing" if t is _UNSET else f"id {t.get('id')}" + (" special" if t.get("special") else "")
            return (f"added token {token!r} is {show(b.get(token, _UNSET))} in the expert, "
                    f"{show(a.get(token, _UNSET))} in the base (tokenizer.json)")
    for key in dict.fromkeys([*base, *other]):
        if key not in (*TOKENIZER_JSON_BOOKKEEPING, "model", "added_tokens") and base.get(key) != other.get(key):
            return f"{key} is {_show(other.get(key))} in the expert, {_show(base.get(key))} in the base (tokenizer.json)"
    return None


def _setting(key: str, value):
    """A tokenizer_config.json value as it bears on encoding: empty is unset, and a fast tokenizer class
    encodes as its slow twin (Qwen2TokenizerFast and Qwen2Tokenizer give the same ids)."""
    if value in ([], {}, "", None):
        return _UNSET
    if key == "tokenizer_class" and isinstance(value, str):
        return value.removesuffix("Fast")
    return value


def tokenizer_mismatch(base_dir: Path, other_dir: Path) -> str | None:
    """How the tokenizer files in `other_dir` encode text differently from those in `base_dir`, in words
    (the file, the token or setting, both values), or None: same vocabulary and ids, merges, added and
    special tokens, pre- and post-processing, encoding settings and chat template. A folder without
    tokenizer files uses the base's (None); so does a base without any (the sweep refuses it when it
    loads the base's tokenizer). Raises CheckpointError for unreadable or malformed files."""
    other = _TokenizerFiles(Path(other_dir))
    if not other.present:
        return None
    base = _TokenizerFiles(Path(base_dir))
    if not base.present:
        return None
    if base.fast is not None and other.fast is not None:
        found = _fast_mismatch(base.fast, other.fast)
        if found:
            return found
    elif base.fast is not None or other.fast is not None:
        has, lacks = ("expert", "base") if other.fast is not None else ("base", "expert")
        lacking = base if lacks == "base" else other
        if lacking.slow_files or lacks == "base":
            return (f"the {has}'s tokenizer is defined by tokenizer.json, the {lacks}'s by "
                    f"{', '.join(lacking.slow_files) or 'no vocabulary file'}, so they cannot be compared")
    else:
        for name in dict.fromkeys([*base.slow_files, *other.slow_files]):
            a, b = _read_bytes(base.path / name), _read_bytes(other.path / name)
            if a != b:
                if a is None or b is None:
                    return f"{name} is {'missing' if b is None else 'present'} in the expert, {'missing' if a is None else 'present'} in the base"
                return f"{name} differs from the base's ({len(b):,} vs {len(a):,} bytes)"
    for role in SPECIAL_ROLES:
        if role in UNSCORED_ROLES:
            continue
        a, b = base.special.get(role, _UNSET), other.special.get(role, _UNSET)
        if a != b:
            return (f"{role} is {_show(b)}{other.token_id(b)} in the expert, {_show(a)}{base.token_id(a)} in the base "
                    f"(tokenizer_config.json / special_tokens_map.json)")
    a = {str(k): (v.get("content"), v.get("special")) for k, v in (base.config.get("added_tokens_decoder") or {}).items()}
    b = {str(k): (v.get("content"), v.get("special")) for k, v in (other.config.get("added_tokens_decoder") or {}).items()}
    if a and b and a != b:  # written by transformers < 5 beside tokenizer.json's added_tokens
        id_ = next(k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k))
        return (f"added token id {id_} is {_show(b.get(id_, _UNSET))} in the expert, {_show(a.get(id_, _UNSET))} in the "
                f"base (tokenizer_config.json added_tokens_decoder)")
    for key in dict.fromkeys([*base.config, *other.config]):
        a, b = _setting(key, base.config.get(key, _UNSET)), _setting(key, other.config.get(key, _UNSET))
        if key not in TOKENIZER_BOOKKEEPING and a != b:
            return f"{key} is {_show(b)} in the expert, {_show(a)} in the base (tokenizer_config.json)"
    if base.chat_template != other.chat_template:
        a, b = base.chat_template or "", other.chat_template or ""
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return (f"the chat template differs from the base's (first at character {at}: "
                f"{_show(b[at:at + 30] or _UNSET)} vs {_show(a[at:at + 30] or _UNSET)})")
    return None


def check_tokenizer(base: Checkpoint, other: Checkpoint) -> None:
    """Refuse an expert whose own tokenizer files encode text differently from the base's (the sweep
    tokenizes every eval set with the base's tokenizer only). Raises CheckpointError."""
    found = tokenizer_mismatch(base.path, other.path)
    if found:
        raise CheckpointError(f"{other.path}: its tokenizer maps text to other ids than the base's: {found}; "
                              f"give the expert the base's tokenizer files, or none (it then uses the base's)")
