"""mergelab: model-merging scaling curves.

Merge subsets of k domain experts fine-tuned from one base model, measure cross-entropy per
domain, cache every result in DuckDB and fit the merging law
L(N, k) = L* + B·N^(−β) + A0·N^(−γ)/(k + b).

The subpackages are the pipeline, and imports only point down it (tests/test_layout.py checks):

    errors, paths, locks, names, logs   shared by every layer
    io/        family manifest, checkpoints
    engine/    merge methods, flat buffers, memory plan, merge session, evaluation, model export
    store      the DuckDB results cache
    sweep/     plans, evaluator, local and Ray backends, runner, job queue, worker
    analysis/  per-k means, fits (per curve and joint), intervals, held-out checks, variance,
               planning, synergy, simulation, the paper's tables, result tables
    export     tables out (CSV, JSON, LaTeX, Parquet) and what each export holds
    demo/      the demo family (builder, domains, tokenizer, `demo up`)
    ui/        figures, per-curve helpers and Streamlit helpers for app.py and pages/
    cli        the `mergelab` command

Importing the package is cheap: torch, duckdb and the UI stack are imported lazily by the
modules that need them.
"""

__version__ = "0.2.0"
