"""A family: one base checkpoint per size, M experts per size, one eval set per domain.

The TOML manifest is the source of truth; relative paths are resolved against its directory.

    name = "demo-micro"
    domains = ["algebra", ...]
    token_budget = 512          # response tokens evaluated per domain (optional)
    vocab_policy = "refuse"     # experts whose vocabulary rows differ: refuse | base_rows | common_rows
    max_length = 512            # tokens per eval example; longer ones are cut and counted (optional)

    [eval]
    algebra = "eval/algebra.jsonl"

    [sizes.xs]
    n_params = 41234            # optional; see below
    base = "xs/base"
    [sizes.xs.experts]
    algebra = "xs/experts/algebra"

A size may set its own `vocab_policy`, overriding the family's.

An optional `[merge]` table gives options every method of a sweep or export of this family takes
unless `--hp` sets them (`mergelab.merge_options`; part of the cache key like any hyperparameter):

    [merge]
    weights = { algebra = 0.5, code = 1.5 }   # or "algebra:0.5,code:1.5"; experts not named: 1
    exclude = ["*embed_tokens*", "lm_head.weight"]   # these tensors keep the base's values
    include = "model.layers.*"               # only these are merged

`n_params` is never trusted: the size's parameter count is counted from the base checkpoint's
safetensors headers (every tensor mergelab merges, a tied lm_head once; `Checkpoint.n_params`) when a
sweep or the memory guard first needs it (`SizeSpec.n_params`). A manifest may leave `n_params` out; if
it gives one, it must equal that count exactly (the count is exact, and the joint law's N and the memory
plan use it), else a ManifestError names both numbers. Loading a manifest reads no checkpoint.

Names: the family's `name`, size names and domain names (which are also the experts' names) may not
contain the separators mergelab joins them with, nor be a reserved word (`mergelab.names.name_problem`):
a domain may not contain '+', ',', ':' or '·' nor be 'macro' or 'base'; a size may not contain ',' or
'·'; the family's name may not contain '·'; no name may be empty, start or end with whitespace or hold
a control character. The manifest may start with a UTF-8 byte-order mark; a symlink loop on any path it
names (or on the manifest itself) is refused with the path.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass, field as dataclass_field
from functools import cached_property
from pathlib import Path

from mergelab.errors import ManifestError
from mergelab.names import name_problem

DEFAULT_TOKEN_BUDGET = 512
DEFAULT_MAX_LENGTH = 512  # tokens per eval example; longer ones are cut (mergelab.engine.evaluate)
# What to do when an expert's embedding / lm_head rows differ from the base's (see checkpoints.py).
VOCAB_POLICIES = ("refuse", "base_rows", "common_rows")


@dataclass(frozen=True)
class SizeSpec:
    """One size of a family: its base checkpoint, one expert per domain, and the parameter count the
    manifest declares (`declared_n_params`, None when left out; the count that is used is `n_params`)."""

    name: str
    declared_n_params: int | None
    base: Path
    experts: dict[str, Path]
    vocab_policy: str = "refuse"
    manifest: Path | None = dataclass_field(default=None, compare=False, repr=False)

    @property
    def expert_names(self) -> tuple[str, ...]:
        return tuple(self.experts)

    @cached_property
    def n_params(self) -> int:
        """Parameters of the base checkpoint, counted from its safetensors headers (tensors mergelab merges,
        a tied lm_head once): what rows record, the joint law's N and the memory guard use. Reads the
        headers once (no tensor data). Raises CheckpointError for an unreadable base and ManifestError when
        the manifest's n_params is not exactly this count."""
        from mergelab.io.checkpoints import Checkpoint

        counted = Checkpoint(self.base).n_params
        if self.declared_n_params is not None and self.declared_n_params != counted:
            raise ManifestError(
                f"{self.manifest or 'family manifest'}: sizes.{self.name}.n_params = {self.declared_n_params:,} but the "
                f"base checkpoint {self.base} holds {counted:,} parameters (counted from its safetensors headers, a "
                f"tied lm_head once); write n_params = {counted} or leave n_params out")
        return counted


@dataclass(frozen=True)
class Family:
    """A family as its manifest describes it: domains, one eval set per domain, and per size (`SizeSpec`:
    parameter count, base checkpoint, one expert per domain) — all paths absolute."""

    name: str
    manifest: Path
    domains: tuple[str, ...]
    eval_sets: dict[str, Path]
    sizes: tuple[SizeSpec, ...]
    token_budget: int = DEFAULT_TOKEN_BUDGET
    vocab_policy: str = "refuse"
    max_length: int = DEFAULT_MAX_LENGTH
    merge: dict = dataclass_field(default_factory=dict)  # [merge]: options of every method (canonical text)

    def size(self, name: str) -> SizeSpec:
        for spec in self.sizes:
            if spec.name == name:
                return spec
        raise ManifestError(f"{self.manifest}: no size {name!r} (sizes: {', '.join(self.size_names)})")

    @property
    def size_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sizes)


def load_family(path: str | Path) -> Family:
    """Read and validate a family manifest (`path`: family.toml or its directory; format in the module
    docstring). Relative paths resolve against the manifest's folder and must stay inside it; every file
    must exist. Names must pass `mergelab.names.name_problem`. Raises ManifestError naming the manifest and
    the field for anything missing, malformed, reserved or behind a symlink loop. Checkpoint contents
    (and the parameter count) are checked later, when a sweep or export opens them (CheckpointError)."""
    manifest = Path(path)
    if manifest.is_dir():
        manifest = manifest / "family.toml"
    try:
        raw = tomllib.loads(manifest.read_bytes().decode("utf-8-sig"))  # a byte-order mark (Windows editors) is fine
    except FileNotFoundError as exc:
        raise ManifestError(f"{manifest}: family manifest not found") from exc
    except OSError as exc:  # a symlink loop (ELOOP), a directory, no permission
        raise ManifestError(f"{manifest}: cannot read the family manifest ({exc.strerror or exc})") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{manifest}: not valid TOML ({exc})") from exc

    def fail(msg: str):
        raise ManifestError(f"{manifest}: {msg}")

    def resolved(p: Path, where: str) -> Path:
        try:
            return p.resolve()
        except (RuntimeError, OSError) as exc:  # Python raises RuntimeError for a symlink loop
            fail(f"{where} = {str(p)!r} cannot be resolved: symlink loop or unreadable link ({exc})")

    def checked_name(name: str, kind: str, where: str) -> str:
        problem = name_problem(name, kind)
        if problem:
            fail(f"{where} {name!r} {problem}; rename it")
        return name

    root, manifest_path = resolved(manifest.parent, "the manifest's folder"), resolved(manifest, "the manifest")

    def field(table: dict, key: str, kind: type, where: str = ""):
        if key not in table:
            fail(f"missing field {where}{key!r}")
        value = table[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            fail(f"field {where}{key!r} must be {kind.__name__}, got {type(value).__name__}")
        return value

    def existing(rel: str, where: str, is_dir: bool) -> Path:
        # A relative path must stay inside the family directory (symlinks in it may point anywhere);
        # anything else must be written as an absolute path, on purpose.
        if not Path(rel).is_absolute() and os.path.normpath(rel).split(os.sep)[0] == "..":
            fail(f"{where} = {rel!r} escapes the family directory {root}; use a path inside it or an absolute path")
        p = resolved(root / rel, where)
        if not (p.is_dir() if is_dir else p.is_file()):
            fail(f"{where} points at {p}, which does not exist")
        return p

    name = checked_name(field(raw, "name", str), "family", "field 'name':")
    domains = field(raw, "domains", list)
    if not domains or not all(isinstance(d, str) and d for d in domains):
        fail("field 'domains' must be a non-empty list of names")
    if len(set(domains)) != len(domains):
        fail("field 'domains' lists a domain twice")
    for domain in domains:  # experts are named by their domains, so this covers expert names too
        checked_name(domain, "domain", "field 'domains': domain")
    def positive(key: str, default: int) -> int:
        value = raw.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            fail(f"field {key!r} must be a positive integer, got {value!r}")
        return value

    budget, max_length = positive("token_budget", DEFAULT_TOKEN_BUDGET), positive("max_length", DEFAULT_MAX_LENGTH)

    def policy(table: dict, where: str = "", default: str = "refuse") -> str:
        value = table.get("vocab_policy", default)
        if value not in VOCAB_POLICIES:
            fail(f"field {where}'vocab_policy' must be one of {', '.join(VOCAB_POLICIES)}, got {value!r}")
        return value

    vocab_policy = policy(raw)
    eval_table = field(raw, "eval", dict)
    eval_sets = {}
    for domain in domains:
        eval_sets[domain] = existing(field(eval_table, domain, str, "eval."), f"eval.{domain}", is_dir=False)
    unknown = sorted(set(eval_table) - set(domains))
    if unknown:
        fail(f"eval.{unknown[0]} is not one of the family's domains")

    sizes_table = field(raw, "sizes", dict)
    if not sizes_table:
        fail("no sizes under [sizes]")
    sizes = []
    for size_name, table in sizes_table.items():
        where = f"sizes.{size_name}."
        checked_name(size_name, "size", "[sizes]: size")
        if not isinstance(table, dict):
            fail(f"[sizes.{size_name}] must be a table")
        n_params = field(table, "n_params", int, where) if "n_params" in table else None  # counted when left out
        if n_params is not None and n_params < 1:
            fail(f"field {where}'n_params' must be a positive integer, got {n_params}")
        base = existing(field(table, "base", str, where), f"{where}base", is_dir=True)
        experts_table = field(table, "experts", dict, where)
        if not experts_table:
            fail(f"{where}experts is empty")
        strangers = sorted(set(experts_table) - set(domains))
        if strangers:  # an expert is named by the domain it was fine-tuned on (synergy pairs them up)
            fail(f"{where}experts.{strangers[0]} is not one of the family's domains ({', '.join(domains)})")
        experts = {e: existing(field(experts_table, e, str, f"{where}experts."), f"{where}experts.{e}", True)
                   for e in experts_table}
        experts = {e: _with_base(p, base) for e, p in experts.items()}  # a LoRA adapter dir applies to this base
        if len(set(experts.values())) != len(experts):
            fail(f"{where}experts lists the same checkpoint twice")
        sizes.append(SizeSpec(size_name, n_params, base, experts, policy(table, where, vocab_policy), manifest_path))
    return Family(name, manifest_path, tuple(domains), eval_sets, tuple(sizes), budget, vocab_policy, max_length,
                  _merge_options(raw.get("merge", {}), domains, fail))


def _merge_options(table, domains, fail) -> dict:
    """The manifest's [merge] table in canonical form (`mergelab.merge_options.resolve_options`)."""
    from mergelab.merge_options import OPTIONS, resolve_options, weight_map
    from mergelab.errors import HyperparameterError

    if not isinstance(table, dict):
        fail("[merge] must be a table")
    unknown = sorted(set(table) - set(OPTIONS))
    if unknown:
        fail(f"field merge.{unknown[0]} is not a merge option ({', '.join(OPTIONS)})")
    try:
        options = resolve_options("merge", table)
    except HyperparameterError as exc:
        fail(f"field {exc}")
    strangers = sorted(set(weight_map(options)) - set(domains))
    if strangers:
        fail(f"field merge.weights names {strangers[0]!r}, which is not one of the family's domains ({', '.join(domains)})")
    return options


def _with_base(path: Path, base: Path) -> Path:
    """An expert folder as SizeSpec holds it: a PEFT LoRA adapter directory becomes an AdapterPath carrying
    the size's base, which `Checkpoint` reads as base + scale·B·A (`mergelab.io.adapters`)."""
    from mergelab.io.adapters import AdapterPath, is_adapter_dir

    return AdapterPath(path, base) if is_adapter_dir(path) else path


def write_manifest(path: Path, name: str, domains, eval_sets: dict[str, str],
                   sizes: list[dict], token_budget: int = DEFAULT_TOKEN_BUDGET, vocab_policy: str | None = None,
                   max_length: int | None = None) -> Path:
    """Write a manifest (paths relative to its directory). `sizes`: dicts of name, n_params (None: left out,
    then counted from the base checkpoint), base, experts."""
    q = json.dumps  # TOML basic strings accept JSON string escapes

    def key(name: str) -> str:  # a bare key where TOML allows one, else quoted (a '.' would nest tables)
        return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else q(name)

    lines = [f"name = {q(name)}", f"domains = [{', '.join(q(d) for d in domains)}]",
             f"token_budget = {int(token_budget)}"]
    lines += [f"vocab_policy = {q(vocab_policy)}"] if vocab_policy else []
    lines += [f"max_length = {int(max_length)}"] if max_length else []
    lines += ["", "[eval]"]
    lines += [f"{key(d)} = {q(p)}" for d, p in eval_sets.items()]
    for size in sizes:
        n_params = [f"n_params = {int(size['n_params'])}"] if size.get("n_params") is not None else []
        lines += ["", f"[sizes.{key(size['name'])}]", *n_params, f"base = {q(size['base'])}",
                  "", f"[sizes.{key(size['name'])}.experts]"]
        lines += [f"{key(e)} = {q(p)}" for e, p in size["experts"].items()]
    path.write_text("\n".join(lines) + "\n")
    return path
