"""Where user data lives: outside the repository, in the user data dir, overridable by env vars."""

import math
import os
from pathlib import Path

DB_ENV = "MERGELAB_DB"
HOME_ENV = "MERGELAB_HOME"
ROOTS_ENV = "MERGELAB_ROOTS"
UPLOAD_ENV = "MERGELAB_UPLOAD_MB"
UPLOAD_MB = 50  # per file: a results table of a million rows is ~50 MB of CSV


def data_home() -> Path:
    """MERGELAB_HOME, else the platform's user data dir (e.g. ~/.local/share/mergelab)."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("mergelab", appauthor=False))


def default_db_path() -> Path:
    """MERGELAB_DB, else results.duckdb in the data home."""
    if os.environ.get(DB_ENV):
        return Path(os.environ[DB_ENV]).expanduser()
    return data_home() / "results.duckdb"


SHIPPED = "_shipped"  # inside an installed wheel: app.py, pages/ and data/ (see setup.py)


def shipped_root() -> Path:
    """Where app.py, pages/ and data/ are: the repository root in a source checkout (or an editable
    install), `mergelab/_shipped/` in an installed wheel, which carries copies of them."""
    package = Path(__file__).resolve().parent
    bundled = package / SHIPPED
    return bundled if (bundled / "app.py").is_file() else package.parent


def repo_data_dir() -> Path:
    """The shipped data/ directory (paper tables, demo results)."""
    return shipped_root() / "data"


def app_path() -> Path:
    """The dashboard's entry page, app.py (its pages/ directory lies beside it)."""
    return shipped_root() / "app.py"


CALLER_OPTIONS = {"server.address", "server.port", "server.headless"}


def upload_limit_mb() -> float:
    """The Import page's limit per uploaded file, in MB (2**20 bytes): MERGELAB_UPLOAD_MB, else 50. The one
    source of it: the page's label and check and Streamlit's server.maxUploadSize (`streamlit_options`)
    all read it. Raises MergelabError when the variable is not a positive number."""
    from mergelab.errors import MergelabError

    raw = os.environ.get(UPLOAD_ENV, "").strip()
    if not raw:
        return float(UPLOAD_MB)
    try:
        limit = float(raw)
    except ValueError:
        limit = float("nan")
    if not limit > 0 or limit == float("inf"):
        raise MergelabError(f"{UPLOAD_ENV}={raw!r}: not a positive number of MB; set it to e.g. 50, or unset it")
    return limit


def streamlit_options() -> list[str]:
    """The shipped .streamlit/config.toml as `streamlit run` flags (theme, toolbar, usage stats, no file
    watching), so the dashboard behaves the same whatever folder it is started from. Address, port and
    headless are left to the caller (`mergelab demo up` passes them itself)."""
    import tomllib

    path = shipped_root() / ".streamlit" / "config.toml"
    if not path.is_file():
        return []
    config = tomllib.loads(path.read_text())
    # Streamlit's own upload limit follows MERGELAB_UPLOAD_MB (whole MB, at least 1), so its "… MB per file"
    # and the Import page's label agree; config.toml holds the default for a bare `streamlit run app.py`
    config.setdefault("server", {})["maxUploadSize"] = max(1, math.ceil(upload_limit_mb()))
    return [f"--{section}.{key}={str(value).lower() if isinstance(value, bool) else value}"
            for section, options in config.items() for key, value in options.items()
            if f"{section}.{key}" not in CALLER_OPTIONS]


def allowed_roots() -> list[Path]:
    """Where the dashboard may read families from: the data home plus MERGELAB_ROOTS (os.pathsep-separated)."""
    extra = [Path(p).expanduser() for p in os.environ.get(ROOTS_ENV, "").split(os.pathsep) if p]
    return [p.resolve() for p in [data_home(), *extra]]


def family_manifests(depth: int = 3, limit: int = 200) -> list[Path]:
    """family.toml files at most `depth` folders below each allowed root (the data home, MERGELAB_ROOTS),
    sorted; a shallow walk that skips hidden folders and unreadable ones and stops after `limit` finds,
    so a root such as $HOME stays quick. What the Sweep page offers in its family picker."""
    found: set[Path] = set()
    for root in allowed_roots():
        level = [root]
        for _ in range(depth + 1):
            deeper = []
            for folder in level:
                try:
                    entries = sorted(folder.iterdir())
                except OSError:
                    continue
                for entry in entries:
                    if entry.name == "family.toml" and entry.is_file():
                        found.add(entry.resolve())
                    elif entry.is_dir() and not entry.name.startswith(".") and not entry.is_symlink():
                        deeper.append(entry)
            if len(found) >= limit:
                break
            level = deeper
    return sorted(found)[:limit]


def confined(path: str | Path) -> Path:
    """`path` resolved (symlinks and '..' followed) if it lies under an allowed root, else a clear error."""
    from mergelab.errors import MergelabError

    try:
        resolved = Path(path).expanduser().resolve()
    except (ValueError, OSError, RuntimeError) as exc:  # NUL bytes, symlink loops, unknown ~user
        raise MergelabError(f"{path!r}: not a usable path ({exc})") from exc
    roots = allowed_roots()
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        raise MergelabError(f"{path}: outside the allowed folders ({', '.join(map(str, roots))}); "
                            f"add its folder to {ROOTS_ENV} to use it")
    return resolved


# -- outputs never over inputs ---------------------------------------------------------------------------
# Every command that writes checks each output path with `check_output` before it does any work, so no
# option can send a table or a model over the results cache, a job queue, a family manifest, an eval set
# or a checkpoint, and a path that cannot be written is refused at once rather than after a long job.

CHECKPOINT_MARKERS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json")
DATABASE_MAGIC = {"queue": (0, b"SQLite format 3\x00", "a SQLite database (a job queue?)"),
                  "cache": (8, b"DUCK", "a DuckDB database (a results cache?)")}
MANIFEST_SEARCH_DEPTH = 6  # parent folders searched for a family.toml whose inputs an output may not touch


def cache_files(db: str | Path | None) -> list[tuple[Path, str]]:
    """The results cache `db` (None: the default) and the files DuckDB and mergelab keep beside it, each
    with what it is: inputs no output may overwrite."""
    path = Path(db).expanduser() if db is not None else default_db_path()
    return [(path, "the results cache"), (Path(f"{path}.wal"), "the results cache's write-ahead log"),
            (Path(f"{path}.writer-lock"), "the results cache's lock file")]


def family_files(family) -> list[tuple[Path, str]]:
    """A loaded family's inputs (`mergelab.io.family.Family`): its manifest, eval sets and checkpoint
    folders (everything inside those folders counts)."""
    files = [(family.manifest, "the family manifest")]
    files += [(path, f"the eval set of domain {domain!r}") for domain, path in family.eval_sets.items()]
    for size in family.sizes:
        files.append((size.base, f"the base checkpoint of size {size.name!r}"))
        files += [(path, f"the checkpoint of expert {name!r} (size {size.name!r})") for name, path in size.experts.items()]
    return files


def _manifest_inputs(folder: Path) -> list[tuple[Path, str]]:
    """Inputs named by the family.toml in `folder`, read leniently (a broken manifest still protects
    what it names); [] when there is none."""
    import tomllib

    manifest = folder / "family.toml"
    if not manifest.is_file():
        return []
    found = [(manifest, "a family manifest")]
    try:
        raw = tomllib.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return found

    def named(value, what):
        return [(folder / value, f"{what} of the family in {folder}")] if isinstance(value, str) and value else []

    for domain, rel in (raw.get("eval") if isinstance(raw.get("eval"), dict) else {}).items():
        found += named(rel, f"the eval set {domain!r}")
    for size, table in (raw.get("sizes") if isinstance(raw.get("sizes"), dict) else {}).items():
        if isinstance(table, dict):
            found += named(table.get("base"), f"the base checkpoint of size {size!r}")
            experts = table.get("experts") if isinstance(table.get("experts"), dict) else {}
            found += [p for e, rel in experts.items() for p in named(rel, f"the checkpoint of expert {e!r}")]
    return found


def _sniff(path: Path) -> tuple[str | None, str | None]:
    """(kind, what) of an existing file an output must never replace: ("cache", …) for a DuckDB file,
    ("queue", …) for SQLite, (None, …) for safetensors; (None, None) for anything else."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None, None
    for kind, (offset, magic, what) in DATABASE_MAGIC.items():
        if head[offset:offset + len(magic)] == magic:
            return kind, what
    if path.suffix == ".safetensors":
        return None, "a safetensors checkpoint file"
    return None, None


def _same(a: Path, b: Path) -> bool:
    """`a` and `b` name one file: the same resolved path, or (both existing) the same inode (hard links)."""
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


OUTPUT_KINDS = ("file", "folder", "cache", "queue")


def check_output(path: str | Path, option: str, *, kind: str = "file",
                 protected: "list[tuple[Path, str]] | tuple" = (), replace: bool = False) -> Path:
    """Refuse an output path before any work is done; returns it resolved.

    `path` is where `option` (e.g. "--out") will write, as `kind`: "file" (a new file or one to replace;
    its folder must exist and be writable), "folder" (new or empty; missing parents are created; a
    non-empty one only with `replace`, which replaces it whole), "cache" or "queue" (a results cache or
    job queue, created or updated in place; the store reports unwritable places itself). Refused, with a
    MergelabError naming the option, the path and the reason: a path that cannot be resolved (NUL byte,
    symlink loop); a file where a folder is wanted or the reverse; a file output in a missing or
    read-only folder; any path that is, lies inside, or (for a folder output) holds one of `protected`
    ((path, what it is) pairs, e.g. `cache_files`, `family_files`), followed through symlinks and hard
    links; anything inside a checkpoint folder (config.json beside model weights) or named by a
    family.toml in one of its parent folders; an existing database of another kind, or a safetensors file."""
    from mergelab.errors import MergelabError

    if kind not in OUTPUT_KINDS:
        raise ValueError(f"kind must be one of {OUTPUT_KINDS}, got {kind!r}")

    def refuse(reason: str):
        raise MergelabError(f"{option} {path}: {reason}")

    try:
        target = Path(path).expanduser().resolve()
    except (ValueError, OSError, RuntimeError) as exc:  # NUL bytes, symlink loops, unknown ~user
        raise MergelabError(f"{option} {path!r}: not a usable path ({exc})") from exc
    folder_out = kind == "folder"
    if folder_out:
        if target.exists() and not target.is_dir():
            refuse("is a file; name a new or empty folder")
        existing = target
        while not existing.exists():  # missing parents are created: the nearest existing one must take them
            existing = existing.parent
        if not existing.is_dir():
            refuse(f"{existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            refuse(f"cannot write in the folder {existing} (permission denied)")
    elif target.is_dir():
        refuse("is a folder; name a file")
    elif kind == "file":
        if not target.parent.is_dir():
            refuse(f"the folder {target.parent} does not exist; create it first or pick another")
        if not os.access(target.parent, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
            refuse(f"cannot write {'the file' if target.exists() else 'in the folder ' + str(target.parent)} "
                   "(permission denied)")

    inputs = list(protected)
    for folder in [target, *target.parents][:MANIFEST_SEARCH_DEPTH + 1]:
        if not (replace and folder == target):  # a family in the folder being replaced goes with it
            inputs += _manifest_inputs(folder)
        if (folder / "config.json").is_file() and any((folder / m).is_file() for m in CHECKPOINT_MARKERS):
            inputs.append((folder, "a checkpoint folder"))
    for input_path, what in inputs:
        try:
            resolved = Path(input_path).expanduser().resolve()
        except (ValueError, OSError, RuntimeError):
            continue
        if _same(target, resolved):
            refuse(f"would overwrite {what} ({resolved}); write somewhere else")
        if target.is_relative_to(resolved):
            refuse(f"lies inside {what} ({resolved}); write somewhere else")
        if folder_out and resolved.is_relative_to(target) and (target.exists() or replace):
            refuse(f"holds {what} ({resolved}), which writing this folder would replace; pick another folder")
    if not folder_out and target.is_file():
        found, what = _sniff(target)
        if what and found != kind:
            refuse(f"would overwrite {what}; write somewhere else")
    return target


# -- staging folders -------------------------------------------------------------------------------------
# A folder output (a demo family, an exported model) is written into a hidden staging folder beside it and
# renamed into place, so a crash never leaves half of one. A process killed with SIGKILL cannot remove its
# staging folder; the next writer of the same output does, once the pid that made it is gone.

OWNER_FILE = ".mergelab-writer"  # in a staging folder: "pid start-time" of the process writing it


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` (Linux /proc, clock ticks since boot), None if unknown or gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def make_staging(out: Path) -> Path:
    """A new hidden staging folder beside `out` (`.NAME.partial-XXXX`), marked with this process's pid
    and start time so a later writer can tell a live one from the leftovers of a killed one."""
    import tempfile

    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    (staging / OWNER_FILE).write_text(f"{os.getpid()} {_process_start(os.getpid()) or ''}".strip())
    return staging


def remove_stale_staging(out: Path, grace_seconds: float = 60.0) -> list[Path]:
    """Remove the staging folders of earlier writes of `out` whose process is gone (killed before it
    could clean up): the pid no longer runs, or runs as another process (its start time differs).
    Unmarked ones (being made, or from an older mergelab) go once older than `grace_seconds`. A writer
    still running keeps its folder. Returns the folders removed."""
    import shutil
    import time

    removed = []
    for staging in Path(out).parent.glob(f".{Path(out).name}.partial-*"):
        if not staging.is_dir() or staging.is_symlink():
            continue
        try:
            pid, *start = (staging / OWNER_FILE).read_text().split()
            alive = _pid_alive(int(pid)) and (not start or _process_start(int(pid)) in (None, start[0]))
        except (OSError, ValueError):
            try:
                alive = time.time() - staging.stat().st_mtime < grace_seconds
            except OSError:
                continue
        if not alive:
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or not a pid at all
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def write_failure(exc: BaseException) -> str | None:
    """Why a write failed, in words, if `exc` is a failed write: an OSError (its reason; 'disk is full'
    for ENOSPC, EFBIG, EDQUOT) or a safetensors/Rust IO error naming a full disk or a file too large.
    None for anything else (a bug, to be raised as it is)."""
    import errno

    if isinstance(exc, OSError):
        full = exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
        return f"disk is full: {exc.strerror}" if full else (exc.strerror or str(exc))
    text = str(exc).splitlines()[0] if str(exc) else ""
    if "No space left" in text or "too large" in text.lower() or "Disk quota" in text:
        return f"disk is full: {text}"
    return None
