"""Waiting for a state another process reaches, for the tests: poll a condition until it holds, or fail."""

from __future__ import annotations

import time


def wait_until(condition, timeout: float = 60, every: float = 0.05, what: str = "timed out"):
    """`condition()`'s first true value, checked every `every` seconds; an `AssertionError` saying `what` after
    `timeout`. For what no event tells (a file another process writes, a log line that follows its answer)."""
    deadline = time.monotonic() + timeout
    while not (reached := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(every)
    return reached
