"""JSON Lines: one JSON object per non-blank line (eval sets, imported results)."""

from __future__ import annotations

import json
from typing import Callable, Iterator


def json_objects(text: str, error: type[Exception], where: Callable[[int], str],
                 max_chars: int | None = None) -> Iterator[tuple[int, dict]]:
    """(line number from 1, object) for each non-blank line of `text`. Raises `error` with `where(line)`
    ("file:3", "file line 3") for a line over `max_chars` characters, one that is not valid JSON (with
    the column) or one that holds something else than a JSON object."""
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if max_chars is not None and len(line) > max_chars:
            raise error(f"{where(lineno)}: line of {len(line):,} characters, over the {max_chars:,} allowed for one "
                        f"record")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{where(lineno)}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(row, dict):
            raise error(f"{where(lineno)}: expected an object per line (JSON Lines), got {type(row).__name__}")
        yield lineno, row
