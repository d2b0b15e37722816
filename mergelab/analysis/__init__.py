"""From cached losses to laws: per-k means (`means`), the fitted forms and the joint law (`fit`),
expert-bootstrap intervals (`intervals`), held-out checks (`heldout`), the variance law (`variance`),
planners (`planning`), donor→receiver synergy (`synergy`), simulated families (`simulate`), the
paper's published tables (`reference`), and the tables the CLI and pages show (`tables`).

Everything here takes arrays or the DataFrames the cache returns: no torch, no streamlit."""
