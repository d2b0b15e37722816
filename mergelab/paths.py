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


def streamlit_options() -> list[str]:
    """The shipped .streamlit/config.toml as `streamlit run` flags (theme, toolbar, usage stats, no file
    watching), so the dashboard behaves the same whatever folder it is started from. Address, port and
    headless are left to the caller (`mergelab demo up` passes them itself)."""
    import tomllib

    path = shipped_root() / ".streamlit" / "config.toml"
    if not path.is_file():
        return []
    config = tomllib.loads(path.read_text())
    return [f"--{section}.{key}={str(value).lower() if isinstance(value, bool) else value}"
            for section, options in config.items() for key, value in options.items()
            if f"{section}.{key}" not in CALLER_OPTIONS]


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
