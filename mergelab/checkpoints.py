"""Lazy per-tensor reading of Hugging Face safetensors directories (single file or sharded).

Only safetensors are read: pickle-based checkpoints (.bin/.pt) are refused, never unpickled.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

from mergelab.errors import CheckpointError

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
        except FileNotFoundError:
            raise CheckpointError(f"{config_path}: config.json missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from None

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    @cached_property
    def names(self) -> list[str]:
        """Tensor names in storage order; a tied lm_head (a copy of the embedding) is left out."""
        names = list(self.files)
        if self.tied_embeddings and TIED_HEAD in names and any("embed_tokens" in n for n in names):
            names.remove(TIED_HEAD)
        return names

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(self._open(name).get_slice(name).get_shape()) for name in self.names}

    def tensor(self, name: str, dtype=None, device: str = "cpu"):
        """Read one tensor, check it is finite, and cast it (e.g. to fp32 for accumulation)."""
        import torch

        if name not in self.files:
            raise CheckpointError(f"{self.path}: tensor {name!r} missing")
        try:
            t = self._open(name).get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"{self.files[name]}: cannot read tensor {name!r} ({exc})") from None
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{self.files[name]}: tensor {name!r} has {bad} NaN/Inf values")
        return t.to(device=device, dtype=dtype or t.dtype)

    # -- internals ---------------------------------------------------------------------------

    def _tensor_files(self) -> dict[str, Path]:
        single, index = self.path / SINGLE_FILE, self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"{index}: malformed shard index ({exc!r})") from None
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

    def _open_file(self, file: Path):
        handles = self.__dict__.setdefault("_handles", {})
        if file not in handles:
            from safetensors import safe_open

            try:
                handles[file] = safe_open(str(file), framework="pt")
            except Exception as exc:
                raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None
        return handles[file]


def check_compatible(base: Checkpoint, other: Checkpoint) -> None:
    """Raise a CheckpointError naming the file and tensor if `other` cannot be merged with `base`."""
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
    for name, shape in base.shapes.items():
        got = other.shapes[name]
        if got != shape:
            what = " (vocabulary size differs)" if "embed" in name or name == TIED_HEAD else ""
            raise CheckpointError(f"{other.path}: tensor {name!r} has shape {list(got)}, base has {list(shape)}{what}")
