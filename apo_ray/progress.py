"""Progress of a generation or training phase: a tqdm bar on a terminal, a few log lines otherwise.

Logs of cluster jobs are files, where a redrawn bar turns into thousands of lines; there the phase
logs (INFO) at most one line per `min_interval_s` and one line when it ends.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO

log = logging.getLogger(__name__)


class Progress:
    """Counts work done in one phase; use as a context manager and call update(n) as items finish.

    The bar is drawn on `stream` (default: stderr) when it is a terminal; otherwise the lines are logged.

    `ready`: items that finished before the phase began, while the caller did other work (a call submitted
    earlier and collected now, like the held-out samples an overlapped evaluation draws during the next round's
    steps). They are counted, and the line says so and how long the phase waited instead of a rate, which
    would divide them by a wait they took no part in.
    """

    def __init__(
        self,
        phase: str,
        total: int | None = None,
        unit: str = "it",
        *,
        ready: int = 0,
        stream: TextIO | None = None,
        min_interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.phase = phase
        self.total = total
        self.unit = unit
        self.count = self.ready = ready
        self._stream = stream if stream is not None else sys.stderr
        self._min_interval_s = min_interval_s
        self._clock = clock
        self._started = clock()
        self._last_line = self._started
        self._bar = self._tqdm_bar() if _is_terminal(self._stream) else None

    def _tqdm_bar(self):
        from tqdm import tqdm

        return tqdm(
            total=self.total, initial=self.ready, desc=self.phase, unit=self.unit, file=self._stream, dynamic_ncols=True
        )

    def update(self, n: int = 1) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = self._clock()
        if now - self._last_line >= self._min_interval_s:
            self._log_line(now, state="running")

    def close(self, failed: bool = False) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            self._log_line(self._clock(), state="failed" if failed else "done")

    def _log_line(self, now: float, state: str) -> None:
        self._last_line = now
        elapsed = now - self._started
        counted = f"{self.count}/{self.total}" if self.total is not None else str(self.count)
        level = logging.WARNING if state == "failed" else logging.INFO
        if self.ready:
            log.log(
                level,
                "[%s] %s: %s %s (%d finished during earlier steps); waited %.1f s",
                self.phase,
                state,
                counted,
                self.unit,
                self.ready,
                elapsed,
            )
            return
        rate = f"{self.count / elapsed:.1f} {self.unit}/s" if elapsed > 0 else "-"
        log.log(level, "[%s] %s: %s %s in %.1f s (%s)", self.phase, state, counted, self.unit, elapsed, rate)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type | None, *exc_info: object) -> None:
        self.close(failed=exc_type is not None)


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
