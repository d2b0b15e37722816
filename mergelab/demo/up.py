"""The main job's preparation: a demo family on disk, the shipped results in the cache, a sweep if
nothing is cached for the family yet."""

from __future__ import annotations

from pathlib import Path

from mergelab.paths import data_home, repo_data_dir

SHIPPED_RESULTS = "demo/results.parquet"


def shipped_results_path() -> Path:
    return repo_data_dir() / SHIPPED_RESULTS


def load_shipped_results(store) -> int:
    """Load the shipped demo results into an empty cache; returns the number of rows added."""
    path = shipped_results_path()
    if store.count() or not path.is_file():
        return 0
    return store.import_parquet(path)


def _seeded_marker(store) -> Path:
    return store.path.with_name(store.path.name + ".seeded")


def seed_first_cache(store) -> int:
    """The dashboard's first run: load the shipped demo results into `store` only when it is the
    default cache (MERGELAB_DB unset) and is created for the first time (a marker beside it remembers
    the seeding, so a cache deleted later is not filled again). A cache the user named (MERGELAB_DB,
    --db) is never created or filled unasked, so a mistyped or deleted path is reported instead of
    silently becoming a cache of demo rows; `mergelab demo up` seeds any cache, on request.
    Returns the number of rows added (0 when it did nothing)."""
    import os

    from mergelab.paths import DB_ENV

    if os.environ.get(DB_ENV) or store.exists() or _seeded_marker(store).exists():
        return 0
    added = load_shipped_results(store)
    if added:
        _seeded_marker(store).write_text(f"{added} shipped demo rows loaded on the first run\n")
    return added


def missing_cache_note(store) -> str | None:
    """Why `store` (which does not exist) is not created on the pages, for the user; None on a first run."""
    import os

    from mergelab.paths import DB_ENV

    if store.exists():
        return None
    if os.environ.get(DB_ENV):
        return (f"The results cache {store.path} ({DB_ENV}) does not exist: check the path. It is not created "
                f"here; a sweep creates it, and `mergelab demo up --db PATH` fills it with the demo results.")
    if _seeded_marker(store).exists():
        return (f"The results cache {store.path} was deleted after its first run; it is not refilled with the demo "
                f"results here: a sweep creates it again, and `mergelab demo up` reloads the demo results.")
    return None


def prepare_demo(preset: str = "micro", db: Path | None = None, progress: bool = True) -> Path:
    """Build the demo family if absent, seed the cache, sweep the family if nothing is cached for it."""
    from mergelab.demo.build import build_family
    from mergelab.io.family import load_family
    from mergelab.store import ResultStore
    from mergelab.sweep.plan import SweepSpec
    from mergelab.sweep.runner import run_sweep

    family_dir = data_home() / f"demo-{preset}"
    if not (family_dir / "family.toml").is_file():
        print(f"building the {preset} demo family in {family_dir} ...")
        build_family(preset, family_dir, progress=progress, force=True)
    family = load_family(family_dir / "family.toml")
    store = ResultStore(db)
    added = load_shipped_results(store)
    if added:
        print(f"loaded {added} shipped demo result rows into {store.path}")
    if store.results(family=family.name).empty:
        print(f"no cached results for {family.name}: running the default sweep (all subsets, average)")
        spec = SweepSpec(family, list(family.size_names), {"average": {}}, list(range(1, 10)))
        run_sweep(spec, store, progress=progress)
    return family_dir / "family.toml"
