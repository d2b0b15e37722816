"""mergelab: model-merging scaling curves.

Merge subsets of k domain experts fine-tuned from one base model, measure cross-entropy per
domain, cache every result in DuckDB and fit the merging law
L(N, k) = L* + B·N^(−β) + A0·N^(−γ)/(k + b).

Importing the package is cheap: torch, duckdb and the UI stack are imported lazily by the
modules that need them.
"""

__version__ = "0.1.0"
