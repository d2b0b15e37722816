"""`mergelab family init`: write a family.toml for a folder of Hugging Face checkpoints.

The layout it reads (the one `mergelab demo build` writes):

    FOLDER/
      SIZE/base/                 an HF checkpoint: config.json, safetensors, tokenizer
      SIZE/experts/DOMAIN/       one fine-tuned checkpoint per domain (the expert's name)
      eval/DOMAIN.jsonl          the domain's eval set (optional here; see below)

Every subfolder of FOLDER holding both `base/` and `experts/` is a size (named by the subfolder);
folders starting with '.' are skipped (an interrupted build or export leaves hidden ones). The domains
are the experts' names over all sizes. Each checkpoint is opened (its safetensors headers only) and
each size's `n_params` is counted from its base's headers and written, so a wrong count can never be
declared by hand. A domain without `eval/DOMAIN.jsonl` gets that path as a placeholder, marked
`# MISSING` in the manifest and reported: `load_family` (and so a sweep) refuses the manifest, naming
the file, until it exists."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mergelab.errors import ManifestError
from mergelab.names import name_problem

MANIFEST = "family.toml"
EVAL_DIR = "eval"
MISSING_MARK = "# MISSING: write this eval set (one JSON object per line) before `mergelab sweep`"


@dataclass
class ScaffoldReport:
    """What `init_family` wrote: the manifest, per size (name, n_params, expert names), the domains,
    and the domains whose eval set is a placeholder."""

    manifest: Path
    name: str
    sizes: list[tuple[str, int, list[str]]] = field(default_factory=list)
    domains: list[str] = field(default_factory=list)
    missing_eval: list[str] = field(default_factory=list)


def _subfolders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def init_family(folder: str | Path, name: str | None = None, force: bool = False) -> ScaffoldReport:
    """Scan `folder` (layout in the module docstring) and write `folder/family.toml` with paths relative
    to it. `name`: the family's name (default: the folder's name). `force`: replace an existing manifest.
    Raises ManifestError for a folder without sizes, a name mergelab cannot use (naming the folder and the
    rule), a size without experts or an existing manifest without `force`, and CheckpointError (via
    `Checkpoint`) for a base or expert folder that is not a safetensors checkpoint. Reads only headers."""
    from mergelab.io.checkpoints import Checkpoint
    from mergelab.io.family import write_manifest

    root = Path(folder)
    if not root.is_dir():
        raise ManifestError(f"{root}: not a folder; name the folder holding SIZE/base and SIZE/experts/DOMAIN")
    root = root.resolve()
    manifest = root / MANIFEST
    if manifest.exists() and not force:
        raise ManifestError(f"{manifest}: already exists; pass --force to replace it")
    name = root.name if name is None else name
    problem = name_problem(name, "family")
    if problem:
        raise ManifestError(f"family name {name!r} {problem}; pass --name")

    sizes = [p for p in _subfolders(root) if (p / "base").is_dir() and (p / "experts").is_dir()]
    if not sizes:
        hint = (" (base/ and experts/ lie directly in it: move them into a size folder, e.g. "
                f"{root.name}/main/base)") if (root / "base").is_dir() else ""
        raise ManifestError(f"{root}: no size folders found{hint}; expected SIZE/base and SIZE/experts/DOMAIN "
                            "checkpoints (see `mergelab family init --help`)")
    report = ScaffoldReport(manifest, name)
    entries = []
    for size in sizes:
        problem = name_problem(size.name, "size")
        if problem:
            raise ManifestError(f"{size}: size name {size.name!r} {problem}; rename the folder")
        experts = {}
        for expert in _subfolders(size / "experts"):
            problem = name_problem(expert.name, "domain")
            if problem:
                raise ManifestError(f"{expert}: expert (domain) name {expert.name!r} {problem}; rename the folder")
            from mergelab.io.adapters import AdapterPath, is_adapter_dir

            # a safetensors checkpoint (or a LoRA adapter of this size's base), headers readable
            Checkpoint(AdapterPath(expert, size / "base") if is_adapter_dir(expert) else expert).shapes
            experts[expert.name] = f"{size.name}/experts/{expert.name}"
        if not experts:
            raise ManifestError(f"{size / 'experts'}: no expert folders in it; add one checkpoint per domain")
        n_params = Checkpoint(size / "base").n_params
        entries.append({"name": size.name, "n_params": n_params, "base": f"{size.name}/base", "experts": experts})
        report.sizes.append((size.name, n_params, list(experts)))
    entries.sort(key=lambda e: e["n_params"])  # smallest first, as the curves are read
    report.sizes.sort(key=lambda s: s[1])
    report.domains = sorted({d for e in entries for d in e["experts"]})
    evals = {d: f"{EVAL_DIR}/{d}.jsonl" for d in report.domains}
    report.missing_eval = [d for d in report.domains if not (root / evals[d]).is_file()]
    write_manifest(manifest, name, report.domains, evals, entries)
    if report.missing_eval:  # flag each placeholder where the manifest is read
        lines = manifest.read_text().splitlines()
        placeholders = tuple(f" = {json.dumps(evals[d])}" for d in report.missing_eval)  # only [eval] lines name eval/
        manifest.write_text("\n".join(f"{line}  {MISSING_MARK}" if line.endswith(placeholders) else line
                                      for line in lines) + "\n")
    return report
