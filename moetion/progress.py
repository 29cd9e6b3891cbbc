"""Progress bars for offline work that takes more than a few seconds (inspect, planner, fault harness).

A bar is drawn only on a terminal: when stderr is not a TTY (CI, a pipe, a log file) or the
command got ``--quiet``, nothing at all is written. With the optional ``tqdm`` package
(``pip install -e '.[progress]'``) the bar has a rate and an ETA; without it, a plain one-line
counter is redrawn in place. tqdm rather than rich: one small pure-Python package without
dependencies that does exactly this, where rich is a whole terminal-rendering framework.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")


class Progress:
    """A bar over ``total`` steps named ``desc``; use as a context manager and call :meth:`update`."""

    def __init__(self, *, total: int | None, desc: str, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.total, self.desc, self.done = total, desc, 0
        self._stream = stream if stream is not None else sys.stderr
        self.enabled = not quiet and self._stream.isatty()
        self._bar = _tqdm(total=total, desc=desc, file=self._stream) if self.enabled else None

    def update(self, steps: int = 1) -> None:
        self.done += steps
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(steps)
        else:
            of = f"/{self.total}" if self.total is not None else ""
            self._stream.write(f"\r{self.desc}: {self.done}{of}")
            self._stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            self._stream.write("\r\033[K")  # erase the counter: what follows starts on a clean line
            self._stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def track(items: Iterable[T], *, desc: str, total: int | None = None, quiet: bool = False,
          stream: TextIO | None = None) -> Iterator[T]:
    """Yields ``items``, advancing a :class:`Progress` bar by one for each."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(total=total, desc=desc, quiet=quiet, stream=stream) as bar:
        for item in items:
            yield item
            bar.update()


def _tqdm(**options: Any) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(leave=False, dynamic_ncols=True, **options)
