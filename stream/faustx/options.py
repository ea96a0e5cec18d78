"""What the seam changes in Faust, per app: :class:`SeamOptions`.

Faust builds its consumer and producer itself (from the transport class the broker URL
names), handing them only the app; the options travel on the app
(:class:`stream.faustx.app.SeamApp`), where :func:`seam_options` reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class SeamOptions:
    """The adaptations the seam applies (see :mod:`stream.faustx.consumer` and
    :mod:`stream.faustx.shutdown`)."""

    #: serve the aiokafka consumer on the app's event loop instead of Faust's thread
    in_loop: bool = True
    #: longest the broker may hold an empty fetch (None: Faust's hard-coded 1,500 ms)
    fetch_max_wait_ms: int | None = None
    #: bytes a fetch waits for (with fetch_max_wait_ms)
    fetch_min_bytes: int = 1
    #: hand fetched messages to the conductor without Faust's per-message wait_first
    fast_delivery: bool = True
    #: topics whose partitions are resumed only after the seek to their committed offsets
    hold_topics: frozenset[str] = field(default_factory=frozenset)
    #: bound on a stop (stream.faustx.shutdown): the producer flush gives up after a third of
    #: it, and the worker exits with status 70 if still stopping after all of it (None:
    #: Faust's unbounded stop)
    stop_timeout_s: float | None = None


def seam_options(app: Any) -> SeamOptions:
    """The app's options; a plain ``faust.App`` on the seam's transport gets the defaults."""
    options = getattr(app, "seam", None)
    return options if isinstance(options, SeamOptions) else SeamOptions()
