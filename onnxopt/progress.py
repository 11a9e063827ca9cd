"""Progress reporting for long passes: a single self-overwriting stderr line on a terminal,
an occasional plain line otherwise, nothing when disabled (quiet mode, library use)."""

from __future__ import annotations

import sys
import time
from typing import IO, Iterable, Iterator, TypeVar

T = TypeVar("T")


class Progress:
    def __init__(self, enabled: bool = True, stream: IO[str] | None = None, min_seconds: float = 1.0) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        #: Iterations quicker than this never print anything.
        self.min_seconds = min_seconds

    def track(self, items: Iterable[T], total: int | None = None, label: str = "") -> Iterator[T]:
        if not self.enabled:
            yield from items
            return
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        interactive = self.stream.isatty()
        interval = 0.2 if interactive else 10.0
        start = last = time.perf_counter()
        printed = False
        count = 0
        for count, item in enumerate(items, 1):
            yield item
            now = time.perf_counter()
            if now - start >= self.min_seconds and now - last >= interval:
                self._print(label, count, total, now - start, interactive)
                last, printed = now, True
        if printed:
            self._print(label, count, total, time.perf_counter() - start, interactive)
            if interactive:
                self.stream.write("\n")
            self.stream.flush()

    def _print(self, label: str, count: int, total: int | None, elapsed: float, interactive: bool) -> None:
        of_total = f"/{total}" if total else ""
        line = f"{label}: {count}{of_total} ({elapsed:.1f}s)"
        self.stream.write(("\r" + line) if interactive else (line + "\n"))
        self.stream.flush()
