"""A caller's deadline as a monotonic instant, and the time left of it for the next step."""

from __future__ import annotations

import time

from server.errors import DeadlineExceeded


def deadline_after(timeout_s: float | None) -> float | None:
    """The monotonic instant `timeout_s` from now (None: no deadline)."""
    return None if timeout_s is None else time.monotonic() + timeout_s


def time_left(deadline: float | None) -> float | None:
    """Seconds left before `deadline`; DEADLINE_EXCEEDED once it has passed."""
    if deadline is None:
        return None
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DeadlineExceeded("deadline passed before the request could be processed")
    return remaining
