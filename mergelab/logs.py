"""Diagnostics of the command line: the standard `logging` module and tqdm progress bars.

Every module logs to a child of the "mergelab" logger (`logging.getLogger(__name__)`); nothing is
shown until `configure` installs a handler, which the CLI does once per command (`-v` shows debug
lines, `-q` only warnings and errors, the default info lines too). Command results stay on stdout
(typer.echo); diagnostics go to stderr. The worker's lines carry a timestamp and a level
(WORKER_FORMAT), since they end up in worker.log.

Progress bars (`progress_bar`) draw only when the CLI asked for them (`configure(progress=True)`, not
with -q) and stderr is a terminal: never in the dashboard, never as cursor codes in a log file."""

from __future__ import annotations

import logging
import sys

ROOT = "mergelab"
CONSOLE_FORMAT = "%(message)s"
WORKER_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}

_progress = False
_quiet = False


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is when a record is emitted (a test's capture, a log
    file the worker's stderr was redirected to), not the stream of the moment it was made."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it
        pass


class _Console(logging.Formatter):
    """Info lines as they are (they replace prints); others prefixed by their level, e.g. 'warning: …'."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno == logging.INFO else f"{record.levelname.lower()}: {text}"


def configure(verbosity: int = 0, timestamps: bool = False, progress: bool = True) -> None:
    """Show mergelab's log records on stderr: verbosity -1 (warnings and errors), 0 (and info) or 1
    (and debug); `timestamps` uses WORKER_FORMAT ("2025-01-01 12:00:00,123 INFO mergelab.sweep.worker:
    …"). `progress` allows progress bars (they still draw only on a terminal). Calling it again replaces
    the handler it installed before (one per process, however many commands a test runs in it)."""
    global _progress, _quiet
    logger = logging.getLogger(ROOT)
    for handler in [h for h in logger.handlers if getattr(h, "_mergelab", False)]:
        logger.removeHandler(handler)
    handler = _Stderr()
    handler._mergelab = True
    handler.setFormatter(logging.Formatter(WORKER_FORMAT) if timestamps else _Console(CONSOLE_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(LEVELS[max(-1, min(1, verbosity))])
    logger.propagate = False  # shown once, by this handler, whatever the root logger does
    _progress = progress and verbosity >= 0
    _quiet = verbosity < 0


def progress_enabled() -> bool:
    """Whether a progress bar would draw now: the CLI allowed them and stderr is a terminal."""
    try:
        return _progress and sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def quiet() -> bool:
    """Whether the CLI was asked for -q: no progress at all, bars or plain lines."""
    return _quiet
