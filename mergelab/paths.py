"""Where user data lives: outside the repository, in the user data dir, overridable by env vars."""

import os
from pathlib import Path

DB_ENV = "MERGELAB_DB"
HOME_ENV = "MERGELAB_HOME"


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
