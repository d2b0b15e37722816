"""Fingerprints of checkpoints: what a cached row's losses were computed from.

A checkpoint's fingerprint hashes everything that decides what the model computes and that a user
can replace under the same path: config.json (without bookkeeping fields), the tokenizer files, and
every weight file mergelab reads — each safetensors header, the file's size, and three 4 KiB samples
of every tensor's bytes (start, middle, end). A retrained or replaced checkpoint changes nearly every
tensor, so the samples see it; reading them costs 12 KiB per tensor, not a pass over the weights
(about 4 MiB for a 7B model's 339 tensors, however large its files; bench/fingerprint_cost.py).

Fingerprints are cached in memory per process, keyed by the files' (size, mtime, inode): a sweep
re-planned from the dashboard does not re-read anything unless a file changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mergelab.errors import CheckpointError

SAMPLE_BYTES = 4096
FINGERPRINT_CHARS = 16
# config.json fields that record how or where a file was saved, not what the model computes.
BOOKKEEPING_FIELDS = ("transformers_version", "_name_or_path", "torch_dtype", "dtype")

_CACHE: dict[tuple, str] = {}


def checkpoint_fingerprint(path: str | Path) -> str:
    """The fingerprint (16 hex characters) of the HF checkpoint directory `path`: config.json minus
    BOOKKEEPING_FIELDS, the tokenizer files present (mergelab.io.checkpoints.TOKENIZER_FILES), and each
    weight file's header, size and sampled tensor bytes. Raises CheckpointError (via Checkpoint) for a directory that is not a checkpoint."""
    from mergelab.io.checkpoints import INDEX_FILE, TOKENIZER_FILES, Checkpoint

    ckpt = Checkpoint(path)
    if hasattr(ckpt, "adapter_file"):  # a LoRA adapter expert (mergelab.io.adapters): its files and its base's
        return _adapter_fingerprint(ckpt)
    weight_files = sorted(set(ckpt.stored.values()))  # every weight file, also what a converted layout leaves out
    extras = [ckpt.path / name for name in ("config.json", INDEX_FILE, *TOKENIZER_FILES)]
    files = weight_files + [p for p in extras if p.is_file()]
    key = (str(ckpt.path.resolve()), tuple((str(p), *_stat(p)) for p in files))
    if key not in _CACHE:
        digest = hashlib.sha256()
        config = {k: v for k, v in ckpt.config.items() if k not in BOOKKEEPING_FIELDS}
        digest.update(json.dumps(config, sort_keys=True).encode())
        for name in TOKENIZER_FILES:  # every file that decides the ids (mergelab.io.checkpoints)
            if (ckpt.path / name).is_file():
                digest.update(name.encode() + b"\0" + (ckpt.path / name).read_bytes())
        for file in weight_files:
            _hash_weights(file, digest)
        _CACHE[key] = digest.hexdigest()[:FINGERPRINT_CHARS]
    return _CACHE[key]


def _adapter_fingerprint(ckpt) -> str:
    """A LoRA adapter expert's fingerprint: its base's, adapter_config.json, the adapter's tokenizer files
    (if any) and its safetensors file (header, size, sampled bytes), so a changed base or adapter changes it."""
    from mergelab.io.checkpoints import TOKENIZER_FILES

    base_fp = checkpoint_fingerprint(ckpt.base.path)
    files = [ckpt.adapter_file, ckpt.path / "adapter_config.json"]
    files += [p for p in (ckpt.path / n for n in TOKENIZER_FILES) if p.is_file()]
    key = (str(ckpt.path.resolve()), base_fp, tuple((str(p), *_stat(p)) for p in files))
    if key not in _CACHE:
        digest = hashlib.sha256(b"lora adapter\0" + base_fp.encode())
        config = {k: v for k, v in ckpt.adapter_config.items() if k not in ("peft_version", "inference_mode")}
        digest.update(json.dumps(config, sort_keys=True).encode())
        for name in TOKENIZER_FILES:
            if (ckpt.path / name).is_file():
                digest.update(name.encode() + b"\0" + (ckpt.path / name).read_bytes())
        _hash_weights(ckpt.adapter_file, digest)
        _CACHE[key] = digest.hexdigest()[:FINGERPRINT_CHARS]
    return _CACHE[key]


def combine(*parts: str) -> str:
    """One fingerprint for several (e.g. a base checkpoint and the vocabulary policy it is merged under)."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:FINGERPRINT_CHARS]


def _stat(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


def _hash_weights(file: Path, digest) -> None:
    """Header, size and three SAMPLE_BYTES samples of each tensor (start, middle, end) of one
    safetensors file."""
    try:
        with open(file, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            length = int.from_bytes(f.read(8), "little")
            header = f.read(length)
            digest.update(file.name.encode() + b"\0" + size.to_bytes(8, "little") + header)
            entries = json.loads(header)
            entries.pop("__metadata__", None)
            for name in sorted(entries):
                begin, end = entries[name]["data_offsets"]
                for at in sorted({begin, max(begin, (begin + end) // 2 - SAMPLE_BYTES // 2), max(begin, end - SAMPLE_BYTES)}):
                    f.seek(8 + length + at)
                    digest.update(f.read(min(SAMPLE_BYTES, end - at)))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{file}: cannot fingerprint ({exc})") from exc


def size_fingerprints(size) -> tuple[str, dict[str, str]]:
    """(base_fp, {expert: fp}) of one size of a family (`mergelab.io.family.SizeSpec`): what its cached rows
    are keyed by. The vocabulary policy joins the base's fingerprint where it changes the merge (an expert's
    vocabulary rows differ from the base's); under "common_rows" the merged rows depend on the whole pool, so
    every expert's fingerprint joins it too."""
    from mergelab.io.checkpoints import Checkpoint

    base = Checkpoint(size.base)
    base_fp = checkpoint_fingerprint(size.base)
    experts = {name: checkpoint_fingerprint(path) for name, path in size.experts.items()}
    vocab = {name: base.shapes[name] for name in base.vocab_tensors}
    if any(Checkpoint(path).shapes.get(name) != shape for path in size.experts.values() for name, shape in vocab.items()):
        pool = [f"{e}={fp}" for e, fp in sorted(experts.items())] if size.vocab_policy == "common_rows" else []
        base_fp = combine(base_fp, f"vocab_policy={size.vocab_policy}", *pool)
    return base_fp, experts
