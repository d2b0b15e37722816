"""Advisory file locks (flock) taken by polling until a deadline, so a waiter can give up with a message."""

from __future__ import annotations

import fcntl
import time


def flock_until(handle, exclusive: bool, deadline: float, poll: float = 0.01) -> bool:
    """Lock the open file `handle` shared or exclusive; False if another process still holds it at
    `deadline` (a time.monotonic() value)."""
    mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    while True:
        try:
            fcntl.flock(handle, mode)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)
