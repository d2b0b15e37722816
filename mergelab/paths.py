"""Where user data lives: outside the repository, in the user data dir, overridable by env vars."""

import os
from pathlib import Path

DB_ENV = "MERGELAB_DB"
HOME_ENV = "MERGELAB_HOME"
ROOTS_ENV = "MERGELAB_ROOTS"


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


def repo_data_dir() -> Path:
    """The data/ directory shipped beside the package (paper tables, demo results)."""
    return Path(__file__).resolve().parent.parent / "data"


def allowed_roots() -> list[Path]:
    """Where the dashboard may read families from: the data home plus MERGELAB_ROOTS (os.pathsep-separated)."""
    extra = [Path(p).expanduser() for p in os.environ.get(ROOTS_ENV, "").split(os.pathsep) if p]
    return [p.resolve() for p in [data_home(), *extra]]


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
