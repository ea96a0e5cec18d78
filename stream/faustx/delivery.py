"""Faust's fetcher hands each fetched message over without four tasks and an ``asyncio.wait``.

faust-streaming 0.15's ``Consumer._drain_messages`` delivers every message with
``await self.wait_first(callback(message), self.suspend_flow.wait())``. ``wait_first``
wraps each of the callback, ``suspend_flow.wait()``, ``_stopped.wait()`` and
``_crashed.wait()`` in a task, waits for the first with ``asyncio.wait`` and cancels the
other three: four tasks, a waiter future and a dozen event-loop handles per message,
although the callback (the conductor's ``on_message``: decode, put in the stream's buffer)
nearly always completes without ever suspending. That hand-over was the largest fixed cost
of a play in the worker (docs/benchmarks.md, session 7).

:func:`drain_messages` is the same loop, run by :class:`stream.faustx.consumer.SeamConsumer`
in place of Faust's, that awaits the callback directly whenever nothing it could block on is
in the way:

- flow is not being suspended (``suspend_flow``) and the app's flow control is active
  (else ``on_message`` blocks in ``flow_control.acquire()``);
- the conductor is not re-indexing its callbacks (its lock is free);
- the producer's buffer is not over its limit (else ``on_message`` flushes it);
- no stream buffer subscribed to the message's partition is full (else ``on_message``
  waits for room).

Otherwise it falls back to Faust's ``wait_first``, so a delivery blocked by back-pressure
is still abandoned when a rebalance suspends flow (with ``fast_delivery`` off, always).

While a partition is out of the fetch because its stream buffer was full, a fetch waits
:data:`BUFFERED_WAIT_S`, not Faust's 1 s: the partition's records are asked for again soon
after its buffer drained.

One more difference: records of a partition that the plays agent reads again
(:meth:`stream.faustx.consumer.SeamConsumer.read_again`) are dropped from a batch collected
before that reread's seek -- they lie past the seek offset, and Faust's loop would deliver
them and record a gap up to them -- and the first record collected after it is marked. The
loop notes the consumer's reread count before each fetch and when the batch's first record
is yielded. Everything else (read offsets, gaps, ``commit_every``, stop and error handling)
is Faust's loop as it is.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

from faust.transport.consumer import CONSUMER_FETCHING

#: how long one fetch waits while a partition is left out of it because its stream
#: buffer was full (``Consumer.on_buffer_full``). aiokafka's ``Fetcher.fetched_records``
#: looks at the active partitions again only when a fetch response brings new data; when
#: the partition came back (``on_buffer_drop``) with its next records already prefetched,
#: nothing woke the wait, and Faust's waits 1 s. That paused every P1 drain for 0.3-1 s at
#: ~15.7k of 20k plays (session 15). The poll costs ~0.1 ms of CPU per empty wait (~1 %
#: of a core while a buffer stays full). Not done: waking aiokafka's waiters from
#: ``on_buffer_drop`` (its private ``_fetch_waiters``, and a thread hop in thread mode).
#: Faust's ``_wait_next_records`` still sleeps 1 s when *no* partition is active; the
#: worker's other topics' partitions are always active, so it never does.
BUFFERED_WAIT_S: Final = 0.01


def can_deliver_now(app: Any, consumer: Any, tp: Any) -> bool:
    """Whether the conductor's ``on_message`` for a message of ``tp`` would complete
    without suspending (see the module doc); ``False`` whenever unsure."""
    if consumer.suspend_flow.is_set() or not app.flow_control.is_active():
        return False
    conductor = app.topics
    if conductor._tp_to_callback_lock.locked():
        return False
    buffer = app.producer.buffer
    if buffer.size > buffer.max_messages:
        return False
    return not any(chan.queue.full() for chan in conductor._tp_index.get(tp, ()))


async def drain_messages(self: Any, fetcher: Any) -> None:  # pragma: no cover - Faust's loop
    # faust/transport/consumer.py Consumer._drain_messages (faust-streaming 0.15.3), with
    # the direct hand-over and the reread filter (lines marked "the seam's"). Kept line
    # for line otherwise (stream.faustx.compat pins the
    # original's source: a changed upstream loop fails the start-up).
    callback = self.callback
    getmany = self.getmany
    consumer_should_stop = self._stopped.is_set
    fetcher_should_stop = fetcher._stopped.is_set
    app = self.app

    get_read_offset = self._read_offset.__getitem__
    set_read_offset = self._read_offset.__setitem__
    flag_consumer_fetching = CONSUMER_FETCHING
    set_flag = self.diag.set_flag
    unset_flag = self.diag.unset_flag
    commit_every = self._commit_every
    acks_enabled_for = self.app.topics.acks_enabled_for

    yield_every = 100
    num_since_yield = 0
    sleep = asyncio.sleep
    direct = self.fast_delivery
    rereads = self.rereads  # the seam's: partitions read again, until one record came

    try:
        while not (consumer_should_stop() or fetcher_should_stop()):
            set_flag(flag_consumer_fetching)
            fetch_no = self.reread_count  # the seam's: rereads before this fetch began
            first_no = -1
            # the seam's: BUFFERED_WAIT_S while a full buffer's partition is out of it
            ait = getmany(timeout=BUFFERED_WAIT_S if self._buffered_partitions else 1.0)

            # Sleeping because sometimes getmany is called in a loop
            # never releasing to the event loop
            await self.sleep(0)
            if not self.should_stop:
                async for tp, message in ait:
                    if first_no < 0:  # the seam's: rereads when the batch was collected
                        first_no = self.reread_count
                    num_since_yield += 1
                    if num_since_yield > yield_every:
                        await sleep(0)
                        num_since_yield = 0
                    if rereads and tp in rereads:  # the seam's: a partition read again
                        before = self.fetched_before_reread(tp, message, fetch_no, first_no)
                        if before is None:  # cannot tell: seek again, drop the rest
                            await self.read_again(tp, rereads[tp][1])
                            continue
                        if before:
                            continue

                    offset = message.offset
                    r_offset = get_read_offset(tp)
                    if r_offset is None or offset >= r_offset:
                        gap = offset - (r_offset or 0)
                        # We have a gap in income messages
                        if gap > 1 and r_offset:
                            acks_enabled = acks_enabled_for(message.topic)
                            if acks_enabled:
                                await self._add_gap(tp, r_offset + 1, offset)
                        if commit_every is not None and self._n_acked >= commit_every:
                            self._n_acked = 0
                            await self.commit()
                        if rereads and tp in rereads and rereads[tp][0] > first_no:
                            continue  # the seam's: read again while we awaited above
                        if direct and can_deliver_now(app, self, tp):
                            await callback(message)
                        else:
                            await self.wait_first(callback(message), self.suspend_flow.wait())
                        if not (rereads and tp in rereads and rereads[tp][0] > first_no):
                            # (the seam's condition: not read again during the callback,
                            # which set the read offset to the seek's)
                            set_read_offset(tp, offset)
                    else:
                        self.log.dev(
                            "DROPPED MESSAGE ROFF %r: k=%r v=%r",
                            offset,
                            message.key,
                            message.value,
                        )
                unset_flag(flag_consumer_fetching)

    except self.consumer_stopped_errors:
        if self.transport.app.should_stop:
            # we're already stopping so ignore
            self.log.info("Broker stopped consumer, shutting down...")
            return
        raise
    except asyncio.CancelledError:
        if self.transport.app.should_stop:
            # we're already stopping so ignore
            self.log.info("Consumer shutting down for user cancel.")
            return
        raise
    except Exception as exc:
        self.log.exception("Drain messages raised: %r", exc)
        raise
    finally:
        unset_flag(flag_consumer_fetching)
