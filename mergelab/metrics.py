"""The metrics a result row may carry, defined once: name, direction and unit.

Every cached row holds one number (`loss` column, kept under that name for older caches) and says which
metric it is (`metric`, part of the cache key), whether higher is better (`higher_better`) and its unit.
Cross-entropy ('ce', nats per token, lower is better) is the default and what sweeps measure.

The analysis (fits, planners, synergy) is written for a falling curve, floor L∞ + A/(k+b). A metric where
higher is better is analysed mirrored: its values are negated (`oriented`), fitted and planned there, and
the fitted bound is negated back (`shown`), so it reads as a ceiling C with value(k) = C − A/(k+b) (A > 0
for a rising curve). A gain (synergy, ΔL) is then "improvement", positive when the metric gets better.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergelab.errors import MergelabError


@dataclass(frozen=True)
class Metric:
    """One metric: `name` (the cache's key value), `higher_better`, `unit` (e.g. 'nats/token', 'fraction')
    and `label` (its long name on axes)."""

    name: str
    higher_better: bool = False
    unit: str = ""
    label: str = ""

    @property
    def direction(self) -> str:
        return "higher" if self.higher_better else "lower"

    @property
    def sign(self) -> int:
        """+1 lower-is-better, −1 higher-is-better: oriented value = sign × value (always lower-is-better)."""
        return -1 if self.higher_better else 1

    @property
    def bound(self) -> str:
        """What the fitted L∞ is for this metric: 'floor' (lower is better) or 'ceiling'."""
        return "ceiling" if self.higher_better else "floor"

    @property
    def axis(self) -> str:
        """An axis title: 'cross-entropy (nats/token)', 'accuracy (fraction)'."""
        name = self.label or self.name
        return f"{name} ({self.unit})" if self.unit else name

    @property
    def units(self) -> str:
        """The unit for table headers and captions ('' shown as 'units')."""
        return self.unit or "units"

    @property
    def described(self) -> str:
        """The metric in words for captions: 'cross-entropy (nats/token, lower is better)'."""
        return f"{self.label or self.name} ({self.units}, {self.direction} is better)"

    @property
    def law(self) -> str:
        """The fitted law in this metric's sign: 'L∞ + A/(k+b)' falling to a floor, 'C − A/(k+b)' rising to a ceiling."""
        return "C − A/(k+b)" if self.higher_better else "L∞ + A/(k+b)"


CE = Metric("ce", False, "nats/token", "cross-entropy")
REGISTRY = {m.name: m for m in [
    CE,
    Metric("accuracy", True, "fraction", "accuracy"),
    Metric("acc", True, "fraction", "accuracy"),
    Metric("acc_norm", True, "fraction", "normalised accuracy"),
    Metric("exact_match", True, "fraction", "exact match"),
    Metric("pass@1", True, "fraction", "pass@1"),
    Metric("f1", True, "fraction", "F1"),
    Metric("perplexity", False, "", "perplexity"),
    Metric("word_perplexity", False, "", "word perplexity"),
    Metric("bits_per_byte", False, "bits/byte", "bits per byte"),
    Metric("loss", False, "nats/token", "loss"),
]}
DIRECTIONS = {"lower": False, "higher": True}
DEFAULT = CE.name


def get(name: str | None) -> Metric:
    """The registered metric `name` (None → CE). Raises MergelabError naming the known ones for another
    name (declare a new one with `parse`, e.g. 'bleu:higher:points')."""
    if name is None or name == "":
        return CE
    if name in REGISTRY:
        return REGISTRY[name]
    raise MergelabError(f"metric {name!r} is not known (known: {', '.join(REGISTRY)}); declare it as "
                        f"NAME:higher|lower[:UNIT], e.g. {name}:higher:fraction")


def parse(spec: str | None) -> Metric:
    """A metric from `spec`: a registered name ('accuracy'), or NAME:DIRECTION[:UNIT] with DIRECTION
    'higher' or 'lower' for any other ('bleu:higher:points'). Raises MergelabError for a malformed spec."""
    if spec is None or ":" not in spec:
        return get(spec)
    name, _, rest = spec.partition(":")
    direction, _, unit = rest.partition(":")
    if not name.strip() or direction not in DIRECTIONS:
        raise MergelabError(f"metric {spec!r}: expected NAME or NAME:higher|lower[:UNIT], e.g. bleu:higher:points")
    known = REGISTRY.get(name)
    if known is not None and known.higher_better != DIRECTIONS[direction]:
        raise MergelabError(f"metric {spec!r}: {name} is {known.direction} is better; drop ':{direction}'")
    return Metric(name, DIRECTIONS[direction], unit or (known.unit if known else ""), known.label if known else name)


def of_rows(rows) -> Metric:
    """The metric of result rows (a DataFrame with metric / higher_better / unit columns, or without them:
    CE). Raises MergelabError when the rows hold more than one metric (pick one with `select`)."""
    if rows is None or "metric" not in rows or not len(rows):
        return CE
    names = sorted(_column(rows).unique())
    if len(names) > 1:
        raise MergelabError(f"these rows hold {len(names)} metrics ({', '.join(names)}): pick one")
    return from_row(rows.iloc[0])


def from_row(row) -> Metric:
    """The metric a result row names (its `higher_better` and `unit` when present, else the registry's)."""
    name = row.get("metric", DEFAULT) if hasattr(row, "get") else DEFAULT
    name = DEFAULT if not isinstance(name, str) else name  # NaN: a row from before metrics, CE
    known = REGISTRY.get(name, Metric(name))
    higher = row.get("higher_better") if hasattr(row, "get") else None
    unit = row.get("unit") if hasattr(row, "get") else None
    return Metric(name, known.higher_better if higher is None or higher != higher else bool(higher),
                  known.unit if unit is None or unit != unit else str(unit), known.label or name)


def names(rows) -> list[str]:
    """The metrics present in result rows, CE first."""
    if rows is None or "metric" not in rows or not len(rows):
        return [DEFAULT]
    found = sorted(_column(rows).unique())
    return sorted(found, key=lambda n: (n != DEFAULT, n))


def select(rows, metric: str | None = None):
    """The rows of one metric (default: CE when present, else the first) — the analysis takes one at a time."""
    if rows is None or "metric" not in rows:
        return rows
    metric = metric or names(rows)[0]
    return rows[_column(rows) == metric]


def _column(rows):
    """The metric of each row; a row without one (a frame built before metrics) is CE."""
    return rows["metric"].fillna(DEFAULT) if "metric" in rows else None


def oriented(rows):
    """A copy of single-metric result rows with `loss` negated when higher is better: the lower-is-better
    space every fit and planner works in (see the module docstring)."""
    metric = of_rows(rows)
    if not metric.higher_better:
        return rows
    out = rows.copy()
    out["loss"] = -out["loss"]
    return out


BOUND_COLUMNS = ("L_inf", "L_star")  # fitted bounds: negated back for display (a floor becomes a ceiling)
FORMULAS = {"L∞ + A/(k+b)": "C − A/(k+b)"}


def shown(table, metric: Metric, columns=BOUND_COLUMNS):
    """A table computed on oriented values (see `oriented`) with its bounds (`columns`, and their `ci_`
    intervals, ends swapped) back in the metric's own sign, the formula written for a ceiling, and
    metric / direction / unit columns. Tail sizes (A, B, A0) and gains keep their sign: positive is better."""
    import numpy as np

    out = table.copy()
    if metric.higher_better:
        for column in columns:
            if column in out and out[column].dtype.kind in "fi":
                out[column] = -out[column]
            ci = f"ci_{column}"
            if ci in out:
                out[ci] = [[-v[1], -v[0]] if isinstance(v, (list, tuple, np.ndarray)) and len(v) == 2 else v
                           for v in out[ci]]
            lo, hi = f"{column}_lo", f"{column}_hi"  # the paper table's interval columns
            if lo in out and hi in out:
                out[lo], out[hi] = -out[hi], -out[lo]
        if "formula" in out:
            out["formula"] = out["formula"].map(lambda f: FORMULAS.get(f, f) if isinstance(f, str) else f)
    if len(out):
        out["metric"], out["direction"], out["unit"] = metric.name, metric.direction, metric.unit
    return out
