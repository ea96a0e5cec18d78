"""The plays agent's stream: :class:`BatchingStream` (installed with ``App(Stream=...)``).

Faust's stream hands the agent one event per iteration, and acks an event when the
iteration moves on to the next one. The worker applies plays in batches and acks each play
only once it is applied, so its stream adds:

- :meth:`BatchingStream.take_buffered`: move the events already in the stream's buffer into
  a batch without a trip through the stream iterator per event, doing the iterator's
  bookkeeping for each (track the message as unacked, count it);
- :meth:`BatchingStream.ack_processed`: ack an applied event as the iterator would (without
  its per-event sensors: the worker's metrics are its own), and
  :attr:`~faust.Stream.enable_acks` off so the iterator does not;
- :meth:`BatchingStream.set_current_event` (so Faust's table sees the event being applied,
  for the partition of its changelog record), :meth:`buffer_empty` and :meth:`wake` (a
  non-record value in the buffer that ends the iterator's wait).

Faust's iterator (``Stream._py_aiter`` and its Cython twin ``faust/_cython/streams.pyx``) is
what :meth:`take_buffered` mirrors; stream.faustx.compat pins both sources.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import faust
from faust.types import EventT


class BatchingStream(faust.Stream):  # type: ignore[type-arg]
    """A Faust stream with batch hand-over and manual acks (see the module doc)."""

    def manual_acks(self) -> None:
        """Ack nothing when the iteration moves on: the agent acks with :meth:`ack_processed`."""
        self.enable_acks = False

    def buffer_empty(self) -> bool:
        """Whether the stream's buffer holds nothing (for a stream over a channel)."""
        queue = getattr(self.channel, "queue", None)
        return queue is None or queue.empty()

    def wake(self, value: Any) -> bool:
        """Put a non-record ``value`` in the buffer (the iterator yields it with
        ``current_event`` None); False if the buffer is full or there is none."""
        queue = getattr(self.channel, "queue", None)
        if queue is None:
            return False
        with contextlib.suppress(asyncio.QueueFull):
            queue.put_nowait(value)
            return True
        return False

    def take_buffered(self, batch: list[Any], limit: int) -> None:
        """Move the events already in the stream's buffer into ``batch`` (up to ``limit``)
        as the iterator would hand them over one by one: track each as unacked and count
        it; its per-event sensors are not called. Stops at the first value the iterator must
        see itself: a wake-up or any non-record, any record it would skip (flow control
        off, a stale generation), or a queued error."""
        queue = getattr(self.channel, "queue", None)
        if queue is None:
            return
        errors = queue._errors  # the iterator raises these (ThrowableQueue)
        pending = queue._queue  # asyncio.Queue's deque: peek without taking
        get = queue.get_nowait
        app = self.app
        flow_active = app.flow_control.is_active
        acking_topics = app.topics.acking_topics
        track_message = app.consumer.track_message
        generation = app.consumer_generation_id
        while len(batch) < limit and pending and not errors:
            event = pending[0]
            if not isinstance(event, EventT) or not flow_active():
                return
            message = event.message
            if message.generation_id != generation:
                return
            get()
            if message.topic in acking_topics and not message.tracked:
                message.tracked = True
                track_message(message)
            self.events_total += 1
            batch.append(event)

    def set_current_event(self, event: EventT[Any] | None) -> None:
        """Make ``event`` the one being processed (what ``table[key] = ...`` sees)."""
        self._set_current_event(event)

    def drop_unapplied(self, event: EventT[Any]) -> None:
        """Forget a tracked event that will not be applied (its partition is read again from
        an earlier offset): not acked -- its offset must not be committed -- and not left for
        a revocation to wait on (Faust's consumer ignores a message marked acked)."""
        message = event.message
        message.acked = True
        consumer: Any = self.app.consumer  # Faust's Consumer (ConsumerT does not declare it)
        consumer._unacked_messages.discard(message)

    def ack_processed(self, event: EventT[Any]) -> bool:
        """Ack ``event`` (processed, or dropped as stale) as the iterator acks one; True
        when this was its message's last reference (its offset may now be committed)."""
        last = event.ack()
        if last:
            message = event.message
            self._on_message_out(message.tp, message.offset, message)
        return last
