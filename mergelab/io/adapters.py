"""LoRA adapters (PEFT's adapter_config.json + adapter_model.safetensors) read as experts of a base.

A family may name an adapter directory as an expert of a size. `load_family` gives it as an
`AdapterPath` (the adapter directory, carrying the size's base), and `Checkpoint(path)` then opens an
`AdapterCheckpoint`: the same interface as a full checkpoint, whose tensors are

    θ0 + scale · B·A      for every module the adapter adapts (transposed where fan_in_fan_out),
    θ0                    elsewhere,

with scale = lora_alpha / r (lora_alpha / √r with use_rslora; r and alpha per module from rank_pattern and
alpha_pattern, matched as PEFT matches them) — what PEFT's `merge_and_unload()` writes. The engine reads
it like any expert, so its task vector is scale·B·A (up to the fp32 rounding of (θ0 + d) − θ0), and no
merged model is written to disk.

Refused, naming adapter_config.json and the field: other PEFT types, DoRA (use_dora), modules_to_save,
trained biases (bias, lora_bias), and the variants whose weights do not merge into the base's
(layer_replication, trainable_token_indices, alora_invocation_tokens, target_parameters, use_qalora,
arrow_config, monteclora_config); an adapter whose tensors do not fit the base's shapes (trained on
another base), and a base_model_name_or_path that names another model than the family's base.
"""

from __future__ import annotations

import json
import math
import re
import sys
from functools import cached_property
from pathlib import Path

from mergelab.errors import CheckpointError
from mergelab.io.checkpoints import FLOAT_DTYPES, INDEX_FILE, SINGLE_FILE, Checkpoint, SafetensorsFile, storage_problem

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# adapter_config.json fields whose non-empty value makes the adapter more than scale·B·A added to base weights
UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA rescales each weight column by a learned magnitude, so its task vector is not scale·B·A",
    "modules_to_save": "modules_to_save stores whole replacement modules, not a LoRA update",
    "lora_bias": "lora_bias trains a bias beside B",
    "layer_replication": "layer_replication changes the model's layer stack",
    "trainable_token_indices": "trainable_token_indices stores replacement embedding rows",
    "alora_invocation_tokens": "an activated LoRA applies only after its invocation tokens, which no weight merge equals",
    "target_parameters": "target_parameters adapts raw parameters (e.g. packed MoE experts), not modules",
    "use_qalora": "QA-LoRA pools inputs over quantization groups",
    "arrow_config": "Arrow routes between adapters per token",
    "monteclora_config": "MonteCLoRA samples its update",
}


def is_adapter_dir(path) -> bool:
    """A PEFT adapter directory: adapter_config.json and no full checkpoint's weights beside it."""
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / SINGLE_FILE).is_file() and not (path / INDEX_FILE).is_file()


class AdapterPath(type(Path())):
    """An adapter directory named as an expert, carrying the base checkpoint it is applied to (`base`).
    It is the adapter's path everywhere a path is used; `Checkpoint(it)` opens an `AdapterCheckpoint`."""

    base: Path | None = None  # None on paths derived from it (parent, resolve): those are plain folders
    checkpoint_class = None  # AdapterCheckpoint (set below): what Checkpoint(path) opens

    def __new__(cls, path, base=None):
        return super().__new__(cls, path)  # Python 3.11 builds the path here; 3.12+ in __init__

    def __init__(self, path, base=None):
        if sys.version_info >= (3, 12):
            super().__init__(path)
        self.base = Path(base) if base is not None else None

    def with_segments(self, *segments):  # Python 3.12+: derived paths are plain paths
        return Path(*segments)

    def __reduce__(self):
        return type(self), (str(self), None if self.base is None else str(self.base))

    def __repr__(self) -> str:
        return f"AdapterPath({str(self)!r}, base={None if self.base is None else str(self.base)!r})"


def _pattern_key(patterns, key: str):
    """The rank_pattern / alpha_pattern key that matches module `key`, as PEFT's get_pattern_key matches
    it (the pattern must match a dotted suffix of the module name); None if none does."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return None


class AdapterCheckpoint(Checkpoint):
    """A LoRA adapter read as the full expert base + adapter (module docstring). Same interface as
    Checkpoint: its config, names, shapes and tokenizer are the base's (an adapter dir's own tokenizer
    files, if any, are compared with the base's by `check_tokenizer`)."""

    def __init__(self, path, base=None):
        self.path = Path(path)
        base = base if base is not None else getattr(path, "base", None)
        if not (self.path / ADAPTER_CONFIG).is_file():
            raise CheckpointError(f"{self.path}: not a LoRA adapter directory ({ADAPTER_CONFIG} missing)")
        if base is None:
            raise CheckpointError(f"{self.path}: a LoRA adapter ({ADAPTER_CONFIG}), not a full checkpoint: a base "
                                  f"must be a full checkpoint (config.json + {SINGLE_FILE}); name the adapter as an "
                                  f"expert of a family size, whose base it is applied to")
        self.base = base if isinstance(base, Checkpoint) else Checkpoint(base)
        if isinstance(self.base, AdapterCheckpoint):
            raise CheckpointError(f"{self.base.path}: the base of adapter {self.path} is itself an adapter; "
                                  f"name a full checkpoint as the base")
        self.adapter_config = self._read_config()
        self.adapter_file = self.path / ADAPTER_WEIGHTS
        if not self.adapter_file.is_file():
            pickled = sorted(p.name for p in self.path.glob("adapter_model.*") if p.suffix in {".bin", ".pt", ".pth"})
            hint = (f" (found {', '.join(pickled)}: pickle files are never loaded; re-save the adapter with "
                    f"safe_serialization=True)") if pickled else ""
            raise CheckpointError(f"{self.path}: LoRA adapter without {ADAPTER_WEIGHTS}{hint}")
        self.weights = SafetensorsFile(self.adapter_file)
        self.modules = self._modules()
        self.files = {name: (self.adapter_file if name in self.modules else file) for name, file in self.base.files.items()}

    def __repr__(self) -> str:
        return f"AdapterCheckpoint({str(self.path)!r}, base={str(self.base.path)!r})"

    # -- what the adapter says ---------------------------------------------------------------------------

    def _read_config(self) -> dict:
        where = self.path / ADAPTER_CONFIG
        try:
            config = json.loads(where.read_text(encoding="utf-8"))
        except OSError as exc:
            raise CheckpointError(f"{where}: cannot read ({exc.strerror or exc})") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{where}: not valid JSON ({exc})") from exc
        if not isinstance(config, dict):
            raise CheckpointError(f"{where}: must hold a JSON object")
        peft_type = config.get("peft_type")
        if peft_type != "LORA":
            raise CheckpointError(f"{where}: peft_type = {peft_type!r}; mergelab reads plain LoRA adapters "
                                  f"(peft_type 'LORA') only: merge this adapter into its base with PEFT and name that copy")
        for key, why in UNSUPPORTED_FIELDS.items():
            if config.get(key) not in (None, False, [], {}, ""):
                raise CheckpointError(f"{where}: {key} = {config[key]!r}: {why}, which mergelab does not read; merge "
                                      f"this adapter into its base with PEFT (merge_and_unload) and name that copy")
        if config.get("bias", "none") != "none":
            raise CheckpointError(f"{where}: bias = {config['bias']!r}: the adapter trains biases, which mergelab does "
                                  f"not read (only bias = 'none'); merge it with PEFT (merge_and_unload) and name that copy")
        for key in ("r", "lora_alpha"):
            value = config.get(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise CheckpointError(f"{where}: {key} = {value!r} must be a positive number")
        for key in ("rank_pattern", "alpha_pattern"):
            if not isinstance(config.get(key) or {}, dict):
                raise CheckpointError(f"{where}: {key} must map module name patterns to numbers")
        self._check_base_model(where, config.get("base_model_name_or_path"))
        return config

    def _check_base_model(self, where: Path, claimed) -> None:
        """Refuse an adapter whose base_model_name_or_path names another model than the family's base, where
        that can be told: a local checkpoint with other weights, or another hub id than the base's _name_or_path."""
        if not isinstance(claimed, str) or not claimed:
            return
        local = Path(claimed).expanduser()
        if local.is_dir() and (local / "config.json").is_file():
            from mergelab.io.fingerprint import checkpoint_fingerprint

            if local.resolve() != self.base.path.resolve() and \
                    checkpoint_fingerprint(local) != checkpoint_fingerprint(self.base.path):
                raise CheckpointError(f"{where}: base_model_name_or_path = {claimed!r}, a checkpoint with other weights "
                                      f"than the family's base {self.base.path}; apply the adapter to the base it was "
                                      f"trained on")
            return
        known = self.base.config.get("_name_or_path")
        if isinstance(known, str) and known and not Path(known).expanduser().exists() and known.lower() != claimed.lower():
            raise CheckpointError(f"{where}: base_model_name_or_path = {claimed!r} but the family's base "
                                  f"{self.base.path} is {known!r} (its config.json _name_or_path); apply the adapter to "
                                  f"the base it was trained on, or correct base_model_name_or_path if they are the same weights")

    def _modules(self) -> dict[str, tuple[str, str, float, bool]]:
        """{base tensor name: (A key, B key, scale, transpose)} for every module the adapter file adapts,
        checked against the base's shapes."""
        config, where = self.adapter_config, self.adapter_file
        pairs: dict[str, dict[str, str]] = {}
        for key in self.weights.keys():
            found = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)|"
                                 r"(.+)\.base_layer\.weight", key)
            if not found:
                raise CheckpointError(f"{where}: tensor {key!r} is not a LoRA A or B matrix; mergelab reads plain LoRA "
                                      f"adapters only (lora_A/lora_B or lora_embedding_A/lora_embedding_B)")
            if found[5]:  # PEFT saves an adapted embedding's base weight too (save_embedding_layers) and loads it
                pairs.setdefault(found[5].removeprefix(PEFT_PREFIX), {})["base"] = key
                continue
            module, part = (found[1], found[2]) if found[1] else (found[3], found[4])
            pairs.setdefault(module.removeprefix(PEFT_PREFIX), {})[part[-1]] = key
        if not pairs:
            raise CheckpointError(f"{where}: holds no LoRA matrices")
        modules, self.replaced = {}, {}  # replaced: base tensor -> the adapter's own copy of it, which PEFT loads
        ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
        for module, parts in pairs.items():
            if not {"A", "B"} <= set(parts):
                lacking = "B" if "A" in parts else "A"
                raise CheckpointError(f"{where}: module {module!r} has no lora_{lacking} matrix")
            a, b = parts["A"], parts["B"]
            name = f"{module}.weight"
            if name not in self.base.shapes and self.base.layout is not None:  # e.g. trained on Gemma 3's wrapper
                name = self.base.layout.model_name(name) or name
            if name not in self.base.shapes:
                raise CheckpointError(f"{where}: adapts module {module!r}, but the base {self.base.path} has no tensor "
                                      f"{name!r} that mergelab merges; the adapter was trained on another base "
                                      f"(or adapts a tied lm_head)")
            for key in (a, b):
                if self.weights.dtype(key) not in FLOAT_DTYPES:
                    raise CheckpointError(storage_problem(where, key, self.weights.dtype(key)))
            shape_a, shape_b, shape = self.weights.shape(a), self.weights.shape(b), self.base.shapes[name]
            embedding = a.endswith("lora_embedding_A")
            transpose = embedding or bool(config.get("fan_in_fan_out"))
            product = (shape_b[0], shape_a[1]) if len(shape_a) == len(shape_b) == 2 else None
            if product is None or shape_a[0] != shape_b[1] or (product[::-1] if transpose else product) != shape:
                raise CheckpointError(f"{where}: {a!r} {list(shape_a)} and {b!r} {list(shape_b)} do not make an update of "
                                      f"the base's {name!r} {list(shape)}; the adapter was trained on another base")
            pattern = _pattern_key(ranks, module)
            r = ranks[pattern] if pattern is not None else config["r"]
            if r != shape_a[0]:
                field = f"rank_pattern[{pattern!r}]" if pattern is not None else "r"
                raise CheckpointError(f"{self.path / ADAPTER_CONFIG}: {field} = {r} but {a!r} has rank {shape_a[0]}")
            pattern = _pattern_key(alphas, module)
            alpha = alphas[pattern] if pattern is not None else config["lora_alpha"]
            scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
            if "base" in parts:
                if self.weights.shape(parts["base"]) != shape or self.weights.dtype(parts["base"]) not in FLOAT_DTYPES:
                    raise CheckpointError(f"{where}: {parts['base']!r} {list(self.weights.shape(parts['base']))} "
                                          f"({self.weights.dtype(parts['base'])}) cannot stand for the base's {name!r} "
                                          f"{list(shape)}; the adapter was trained on another (or a resized) base")
                self.replaced[name] = parts["base"]
            modules[name] = (a, b, scale, transpose)
        return modules

    # -- the Checkpoint interface --------------------------------------------------------------------------

    @property
    def config(self) -> dict:
        return self.base.config

    @property
    def tied_embeddings(self) -> bool:
        return self.base.tied_embeddings

    @property
    def layout(self):
        return self.base.layout  # names are the base's, converted as the base's are

    def model_config(self):
        return self.base.model_config()

    @cached_property
    def names(self) -> list[str]:
        return list(self.base.names)

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.base.shapes)

    def stored_dtype(self, name: str) -> str:
        """The base's dtype where the adapter does not reach; float32 (the sum is formed in fp32) where it does."""
        return "float32" if name in self.modules else self.base.stored_dtype(name)

    def delta(self, name: str):
        """The task vector of an adapted tensor: scale · B·A (transposed where the module stores [in, out]),
        in fp32, as PEFT's get_delta_weight forms it. Raises CheckpointError for a non-finite A or B."""
        import torch

        a, b, scale, transpose = self.modules[name]
        parts = []
        for key in (b, a):
            t = self.weights.read(key).to(torch.float32)
            if not torch.isfinite(t).all():
                raise CheckpointError(f"{self.adapter_file}: tensor {key!r} has {int((~torch.isfinite(t)).sum())} NaN/Inf values")
            parts.append(t)
        product = parts[0] @ parts[1]
        return (product.T if transpose else product) * scale

    def _read_checked(self, name: str, into=None):
        import torch

        if name not in self.modules:
            return self.base._read_checked(name, into)
        if name in self.replaced:  # what PEFT loads into the base layer before adding B·A
            merged = self.weights.read(self.replaced[name]).to(torch.float32)
        else:
            merged = self.base._read_checked(name).to(torch.float32)
        merged += self.delta(name)  # θ0 + scale·B·A, in fp32 as merge_and_unload of an fp32 model
        if not torch.isfinite(merged).all():
            raise CheckpointError(f"{self.adapter_file}: base + adapter of {name!r} has NaN/Inf values")
        return merged

    def close(self) -> None:
        self.base.close()


AdapterPath.checkpoint_class = AdapterCheckpoint
