"""Rate-limited logging of rejections: a flood of bad records must not flood the log.

At most ``per_window`` lines per reason per ``window_s``; the rest are counted and reported
by one "suppressed" line per reason when its window ends (on the next line for that
reason, or :meth:`RateLimitedLog.flush`, which the worker calls from a timer). Exact
counts stay in the metrics. The clock is injected (pure; tests need no sleeping).

>>> import logging
>>> t = [0.0]
>>> lines = []
>>> log = RateLimitedLog(logging.getLogger("x"), per_window=2, window_s=60, clock=lambda: t[0],
...                      emit=lambda level, msg, *args: lines.append(msg % args))
>>> for i in range(5):
...     _ = log.log("not_json", "rejected record %d", i)
>>> t[0] = 61.0
>>> log.flush()
1
>>> for line in lines:
...     print(line)
rejected record 0
rejected record 1
suppressed 3 more rejection log line(s) (reason not_json) in the last 60 s
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any


class RateLimitedLog:
    """Per-reason token window over a logger."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        per_window: int = 10,
        window_s: float = 60.0,
        level: int = logging.INFO,
        clock: Callable[[], float] = time.monotonic,
        emit: Callable[..., None] | None = None,
    ) -> None:
        if per_window < 1 or window_s <= 0:
            raise ValueError("per_window must be >= 1 and window_s > 0")
        self.per_window = per_window
        self.window_s = window_s
        self.level = level
        self.clock = clock
        self._emit = emit if emit is not None else logger.log
        #: reason -> [window start, lines logged in it, lines suppressed in it]
        self._windows: dict[str, list[Any]] = {}

    def log(self, reason: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless ``reason`` used up its window; returns whether logged."""
        now = self.clock()
        window = self._windows.get(reason)
        if window is None or now - window[0] >= self.window_s:
            if window is not None:
                self._report(reason, window)
            window = self._windows[reason] = [now, 0, 0]
        if window[1] < self.per_window:
            window[1] += 1
            self._emit(self.level, msg, *args)
            return True
        window[2] += 1
        return False

    def flush(self) -> int:
        """Report and close every window that has ended; returns how many "suppressed"
        lines were written."""
        now = self.clock()
        reported = 0
        for reason in [r for r, w in self._windows.items() if now - w[0] >= self.window_s]:
            reported += self._report(reason, self._windows.pop(reason))
        return reported

    def suppressed(self, reason: str) -> int:
        window = self._windows.get(reason)
        return 0 if window is None else int(window[2])

    def _report(self, reason: str, window: list[Any]) -> int:
        if not window[2]:
            return 0
        self._emit(
            self.level,
            "suppressed %d more rejection log line(s) (reason %s) in the last %.0f s",
            window[2],
            reason,
            self.window_s,
        )
        return 1
