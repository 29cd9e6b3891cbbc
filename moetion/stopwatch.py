"""Time the training thread spends inside moetion's own work (snapshot capture, upstream logging).

A component owns a :class:`Stopwatch` named ``busy`` and marks its training-thread entry points
with :func:`timed`; the metrics read and reset it once per committed iteration. Only the thread
that calls a marked method is charged, so background threads (compression, copies) cost nothing
here: this measures what training waits for, not what the machine does.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class Stopwatch:
    """Seconds accumulated by :func:`timed` calls since the last :meth:`take`."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def take(self) -> float:
        """The seconds accumulated so far; starts the next count at zero."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def timed(method: F) -> F:
    """Charges the wall time of each call of ``method`` to its object's ``busy`` stopwatch."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.busy.seconds += time.perf_counter() - start

    return wrapper  # type: ignore[return-value]
