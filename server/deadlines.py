"""A caller's deadline as a monotonic instant, the time left of it for the next step, and
work handed to a thread pool within it."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

from server.errors import DeadlineExceeded

T = TypeVar("T")


def deadline_after(timeout_s: float | None) -> float | None:
    """The monotonic instant `timeout_s` from now (None: no deadline)."""
    return None if timeout_s is None else time.monotonic() + timeout_s


def time_left(
    deadline: float | None, what: str = "before the request could be processed"
) -> float | None:
    """Seconds left before `deadline`; DEADLINE_EXCEEDED ("deadline passed {what}") once it
    has passed."""
    if deadline is None:
        return None
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DeadlineExceeded(f"deadline passed {what}")
    return remaining


async def run_in_pool(
    executor: Executor, work: Callable[[], T], deadline: float | None, what: str
) -> T:
    """`work()` on `executor`, in the caller's context (the worker's spans are children of the
    caller's), within `deadline`: DEADLINE_EXCEEDED naming `what` once it has passed, checked
    before anything is queued. Work still queued when the time runs out (or the caller is
    cancelled) never starts."""
    timeout = time_left(deadline, f"before {what}")
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    future = loop.run_in_executor(executor, context.run, work)
    try:
        return await asyncio.wait_for(future, timeout=timeout)
    except TimeoutError:
        raise DeadlineExceeded(f"deadline passed during {what}") from None
