"""Lazy per-tensor reading of Hugging Face safetensors directories (single file or sharded).

Only safetensors are read: pickle-based checkpoints (.bin/.pt) are refused, never unpickled.
Tensors are read with plain file reads at the offsets the header gives, not through a memory map,
so a sweep that reads M experts never holds their pages in its own memory.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

from mergelab.errors import CheckpointError

SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
MAX_HEADER = 100_000_000
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TIED_HEAD = "lm_head.weight"


class Checkpoint:
    """One HF checkpoint directory: config.json + model.safetensors (or shards + index)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: checkpoint directory not found")
        self.files = self._tensor_files()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r})"

    @cached_property
    def config(self) -> dict:
        config_path = self.path / "config.json"
        try:
            return json.loads(config_path.read_text())
        except FileNotFoundError as exc:
            raise CheckpointError(f"{config_path}: config.json missing") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from exc

    @cached_property
    def tied_embeddings(self) -> bool:
        """config.json's tie_word_embeddings, or the architecture's default where the file leaves it out
        (Gemma's configs do, and transformers ties them)."""
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
            head = self._open(TIED_HEAD).shape(TIED_HEAD)
            if any(self._open(n).shape(n) == head for n in names if n != TIED_HEAD):
                names.remove(TIED_HEAD)
        return names

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: self._open(name).shape(name) for name in self.names}

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
        try:
            t = self._open(name).read(name, into)
        except OSError as exc:
            raise CheckpointError(f"{self.files[name]}: cannot read tensor {name!r} ({exc})") from exc
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{self.files[name]}: tensor {name!r} has {bad} NaN/Inf values")
        return t

    def close(self) -> None:
        """Forget the parsed headers (they are re-read on the next access)."""
        self.__dict__.pop("_handles", None)

    # -- internals ---------------------------------------------------------------------------

    def _tensor_files(self) -> dict[str, Path]:
        single, index = self.path / SINGLE_FILE, self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"{index}: malformed shard index ({exc!r})") from exc
            files = {name: self.path / shard for name, shard in weight_map.items()}
            for shard in sorted(set(files.values())):
                if not shard.is_file():
                    raise CheckpointError(f"{index}: shard {shard.name} listed but missing")
            return files
        if single.is_file():
            return {name: single for name in self._open_file(single).keys()}
        pickled = sorted(p.name for p in self.path.glob("*") if p.suffix in {".bin", ".pt", ".pth"})
        hint = f" (found {', '.join(pickled)}: pickle checkpoints are never loaded; convert them to safetensors)" if pickled else ""
        raise CheckpointError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")

    def _open(self, name: str):
        return self._open_file(self.files[name])

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
                dtype, shape, (begin, end) = SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]), entry["data_offsets"]
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

    def read(self, name: str, into=None):
        """The tensor's values: read into `into` when that is a contiguous CPU tensor of the stored
        dtype and shape (then `into` is returned), else into a new tensor."""
        import math

        import torch

        dtype_name, shape, begin, end = self.entries[name]
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
        dtype = ckpt._open(name).entries[name][0]
        if dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{ckpt.files[name]}: tensor {name!r} is stored as {dtype}; weights must be "
                                  f"floating point (F16, BF16, F32 or F64)")


def check_compatible(base: Checkpoint, other: Checkpoint, vocab_policy: str = "refuse") -> None:
    """Raise a CheckpointError naming the file and tensor if `other` cannot be merged with `base`.

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
