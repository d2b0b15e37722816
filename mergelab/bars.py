"""Progress bars that suit where they are written: a tqdm bar on a terminal, plain lines elsewhere.

A tqdm bar redraws itself with carriage returns and cursor codes; written into a log file (the
worker's worker.log) or a pipe, those codes pile up as unreadable text. Off a terminal, progress is
one plain line at most every `PLAIN_EVERY` seconds, and one at the end.
"""

from __future__ import annotations

import sys
import time

PLAIN_EVERY = 10.0  # seconds between plain progress lines


def is_terminal(stream=None) -> bool:
    """Whether `stream` (default: stderr, where bars go) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


class PlainProgress:
    """tqdm's small interface used here (update, set_postfix, close, a context manager), written as
    plain lines: '<desc>: 400/1,042 merge (38%), 12 s[, loss=1.234]'."""

    def __init__(self, total: int | None, desc: str, unit: str, disable: bool = False, stream=None,
                 every: float = PLAIN_EVERY):
        self.total, self.desc, self.unit, self.disable = total, desc, unit, disable
        self.stream, self.every = stream, every
        self.n, self.postfix, self.started = 0, "", time.monotonic()
        self.last, self.shown = self.started, None  # self.shown: n at the last line printed
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.disable and time.monotonic() - self.last >= self.every:
            self._line()

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed and not self.disable and self.shown is not None and self.shown != self.n:
            self._line()
        self.closed = True

    def _line(self) -> None:
        self.last, self.shown = time.monotonic(), self.n
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        done = f"{self.n:,}/{self.total:,}" if self.total else f"{self.n:,}"
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done} {self.unit}{share}, {self.last - self.started:.0f} s{extra}",
              file=self.stream or sys.stderr, flush=True)

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: int | None, desc: str, unit: str = "it", disable: bool = False, leave: bool = False):
    """A tqdm bar when stderr is a terminal, else a `PlainProgress` writing plain lines to stderr;
    `disable`, or the CLI's -q (mergelab.logs.quiet), silences either."""
    from mergelab.logs import quiet

    disable = disable or quiet()
    if is_terminal():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, disable=disable, leave=leave)
    return PlainProgress(total, desc, unit, disable=disable)


def asked_bar(total: int | None = None, desc: str = "", unit: str = "it", leave: bool = False):
    """A bar for work the CLI asked to see (bootstrap fits, export-model): drawn only when
    mergelab.logs.progress_enabled() (never in the dashboard, nor off a terminal)."""
    from mergelab.logs import progress_enabled

    return progress_bar(total, desc, unit, disable=not progress_enabled(), leave=leave)
