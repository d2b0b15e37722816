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
    n_params = 41234
    base = "xs/base"
    [sizes.xs.experts]
    algebra = "xs/experts/algebra"

A size may set its own `vocab_policy`, overriding the family's.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from mergelab.errors import ManifestError

DEFAULT_TOKEN_BUDGET = 512
DEFAULT_MAX_LENGTH = 512  # tokens per eval example; longer ones are cut (mergelab.engine.evaluate)
# What to do when an expert's embedding / lm_head rows differ from the base's (see checkpoints.py).
VOCAB_POLICIES = ("refuse", "base_rows", "common_rows")


@dataclass(frozen=True)
class SizeSpec:
    name: str
    n_params: int
    base: Path
    experts: dict[str, Path]
    vocab_policy: str = "refuse"

    @property
    def expert_names(self) -> tuple[str, ...]:
        return tuple(self.experts)


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
    must exist. Raises ManifestError naming the manifest and the field for anything missing or malformed.
    Checkpoint contents are checked later, when a sweep or export opens them (CheckpointError)."""
    manifest = Path(path)
    if manifest.is_dir():
        manifest = manifest / "family.toml"
    try:
        raw = tomllib.loads(manifest.read_text())
    except FileNotFoundError as exc:
        raise ManifestError(f"{manifest}: family manifest not found") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{manifest}: not valid TOML ({exc})") from exc
    root = manifest.parent.resolve()

    def fail(msg: str):
        raise ManifestError(f"{manifest}: {msg}")

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
        p = (root / rel).resolve()
        if not (p.is_dir() if is_dir else p.is_file()):
            fail(f"{where} points at {p}, which does not exist")
        return p

    name = field(raw, "name", str)
    domains = field(raw, "domains", list)
    if not domains or not all(isinstance(d, str) and d for d in domains):
        fail("field 'domains' must be a non-empty list of names")
    if len(set(domains)) != len(domains):
        fail("field 'domains' lists a domain twice")
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
        if not isinstance(table, dict):
            fail(f"[sizes.{size_name}] must be a table")
        n_params = field(table, "n_params", int, where)
        if n_params < 1:
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
        if len(set(experts.values())) != len(experts):
            fail(f"{where}experts lists the same checkpoint twice")
        sizes.append(SizeSpec(size_name, n_params, base, experts, policy(table, where, vocab_policy)))
    return Family(name, manifest.resolve(), tuple(domains), eval_sets, tuple(sizes), budget, vocab_policy, max_length)


def write_manifest(path: Path, name: str, domains, eval_sets: dict[str, str],
                   sizes: list[dict], token_budget: int = DEFAULT_TOKEN_BUDGET, vocab_policy: str | None = None,
                   max_length: int | None = None) -> Path:
    """Write a manifest (paths relative to its directory). `sizes`: dicts of name, n_params, base, experts."""
    q = json.dumps  # TOML basic strings accept JSON string escapes for the ASCII names used here
    lines = [f"name = {q(name)}", f"domains = [{', '.join(q(d) for d in domains)}]",
             f"token_budget = {int(token_budget)}"]
    lines += [f"vocab_policy = {q(vocab_policy)}"] if vocab_policy else []
    lines += [f"max_length = {int(max_length)}"] if max_length else []
    lines += ["", "[eval]"]
    lines += [f"{d} = {q(p)}" for d, p in eval_sets.items()]
    for size in sizes:
        lines += ["", f"[sizes.{size['name']}]", f"n_params = {int(size['n_params'])}", f"base = {q(size['base'])}",
                  "", f"[sizes.{size['name']}.experts]"]
        lines += [f"{e} = {q(p)}" for e, p in size["experts"].items()]
    path.write_text("\n".join(lines) + "\n")
    return path
