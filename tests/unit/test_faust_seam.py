"""Contracts of the Faust seam (stream.faustx): the start-up compat check, no private
Faust/aiokafka attribute outside the seam, and what each adaptation promises -- the batch
hand-over's bookkeeping, manual acks and resume-after-seek -- on real Faust objects (an app
on the seam's transport; no broker: nothing connects).
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
from pathlib import Path
from typing import Any

import faust
import pytest
from faust.transport.consumer import Consumer as FaustConsumer
from faust.types import TP
from faust.types.tuples import ConsumerMessage

from stream.errors import CompatError
from stream.faustx import compat, transport
from stream.faustx.app import SeamApp
from stream.faustx.consumer import InLoopConsumerThread, SeamConsumer
from stream.faustx.options import SeamOptions
from stream.faustx.producer import CommitFlushProducer
from stream.faustx.stream import BatchingStream

ROOT = Path(__file__).resolve().parents[2]
PLAYS = "plays"


def _app(name: str, **options: Any) -> faust.App:
    transport.register()
    return SeamApp(name, seam=SeamOptions(**options), broker="faustx://127.0.0.1:1",
                   autodiscover=False, Stream=BatchingStream)


# -- the compat check ------------------------------------------------------------------


def test_the_installed_faust_is_the_tested_one() -> None:
    assert compat.mismatches() == []
    assert compat.check_compat("error") == []


def test_every_pin_names_an_existing_upstream_source() -> None:
    for pin in compat.TESTED:
        assert pin.target.split(":")[0].split(".")[0] in ("faust", "mode", "aiokafka", "file")
        assert re.fullmatch(r"[0-9a-f]{16}", pin.sha256), pin
        compat.source_hash(pin.target)  # resolvable


def test_a_changed_faust_function_fails_the_start_up_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def perform_seek(self: Any) -> None:  # an "upgraded" Faust: seeks differently
        return None

    monkeypatch.setattr(FaustConsumer, "perform_seek", perform_seek)
    with pytest.raises(CompatError, match=r"faust\.transport\.consumer:Consumer\.perform_seek"):
        compat.check_compat("error")
    with pytest.raises(CompatError):
        _create_app_with_check("error")


def test_the_setting_can_let_a_changed_faust_start_loudly(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pins = (compat.Pin("faust.streams:Stream._set_current_event", "0" * 16, "test"),)
    found = compat.check_compat("warn", pins)
    assert len(found) == 1 and "Stream._set_current_event" in found[0]
    assert "Stream._set_current_event" in caplog.text
    assert compat.check_compat("off", pins) == []
    with pytest.raises(CompatError, match="Stream._set_current_event"):
        compat.check_compat("error", pins)


def test_a_vanished_faust_function_fails_the_check() -> None:
    pins = (compat.Pin("faust.streams:Stream._gone_upstream", "0" * 16, "test"),)
    with pytest.raises(CompatError, match="Stream._gone_upstream: not found"):
        compat.check_compat("error", pins)


def test_a_table_get_that_is_no_longer_mapping_get_fails_the_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from faust.tables.table import Table

    assert compat.mismatches() == []
    monkeypatch.setattr(Table, "get", lambda self, key, default=None: default, raising=False)
    found = compat.mismatches()
    assert any("Table.get: is no longer collections.abc:Mapping.get" in line for line in found)


def test_a_getitem_added_on_fausts_table_changes_its_pin(monkeypatch: pytest.MonkeyPatch) -> None:
    from faust.tables.table import Table

    def __getitem__(self: Any, key: Any) -> Any:  # noqa: N807 - a stand-in upstream method
        return None

    monkeypatch.setattr(Table, "__getitem__", __getitem__, raising=False)
    assert any("Table.__getitem__: source changed" in line for line in compat.mismatches())


def test_the_setting_is_validated_at_start_up() -> None:
    from stream.config import load_settings
    from stream.errors import ConfigError

    assert load_settings(env={}, file=None).faust_compat_check == "error"
    s = load_settings(env={"STREAM_FAUST_COMPAT_CHECK": "warn"}, file=None)
    assert s.faust_compat_check == "warn"
    with pytest.raises(ConfigError, match="faust_compat_check"):
        load_settings(env={"STREAM_FAUST_COMPAT_CHECK": "ignore"}, file=None)


def _create_app_with_check(mode: str) -> faust.App:
    from stream.config import load_settings
    from stream.faustx.app import create_app

    settings = load_settings(env={"STREAM_FAUST_COMPAT_CHECK": mode}, file=None)
    return create_app(settings, partitions=4)


def test_create_app_installs_the_seam() -> None:
    app = _create_app_with_check("error")
    assert isinstance(app.transport, transport.Transport)
    assert app.conf.Stream is BatchingStream
    from stream.faustx.changelog_table import BatchedChangelogTable

    assert app.conf.Table is BatchedChangelogTable
    assert isinstance(app.producer, CommitFlushProducer)


# -- no private Faust/aiokafka attribute outside the seam --------------------------------


def _defined_private_names(paths: list[Path]) -> set[str]:
    """Every ``_name`` these files define: functions and methods, ``self._name``
    attributes, module and class attributes."""
    names: set[str] = set()
    for path in paths:
        text = path.read_text()
        names.update(re.findall(r"\b(?:def |self\.|cls\.)(_[A-Za-z]\w*)", text))
        names.update(re.findall(r"^\s*(_[A-Za-z]\w*)\s*[:=]", text, re.M))
    return {n for n in names if not n.startswith("__")}


def _outside_seam() -> list[Path]:
    return [p for p in sorted((ROOT / "stream").rglob("*.py"))
            if "faustx" not in p.relative_to(ROOT).parts]


def _framework_private_names() -> set[str]:
    """The private names faust, mode and aiokafka define, less the ones the project's own
    modules (outside the seam) define too (``stack._wait`` is the project's)."""
    import aiokafka
    import mode

    upstream = [p for package in (faust, mode, aiokafka)
                for p in Path(inspect.getfile(package)).parent.rglob("*.py")]
    return _defined_private_names(upstream) - _defined_private_names(_outside_seam())


#: private names the seam uses: the check must keep seeing them
SEAM_NAMES = {"_drain_messages", "_queue", "_errors", "_client", "_send_pending",
              "_send_request", "_paused_partitions", "_commit_fut", "_set_current_event",
              "_on_message_out", "_producer", "_message_accumulator", "_thread",
              "_create_worker_consumer", "_fetch_max_wait_ms", "_read_offset", "_tp_index"}


#: private by name only: the public API of namedtuples and os
NOT_FRAMEWORK = {"_replace", "_asdict", "_fields", "_make", "_exit"}


def _private_uses(path: Path, private: set[str]) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        name = None
        if isinstance(node, ast.Attribute):
            receiver = node.value
            if isinstance(receiver, ast.Name) and receiver.id in ("self", "cls"):
                continue  # the project's own classes (none subclass a Faust class here)
            name = node.attr
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) > 1
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            name = node.args[1].value
        if name and name in private and name not in NOT_FRAMEWORK:
            out.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    return out


def _framework_subclasses(path: Path) -> list[str]:
    """Classes outside the seam deriving from a Faust/aiokafka class other than the
    documented extension bases (mode services, Faust codecs)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    allowed = {"mode.Service", "Service", "codecs.Codec"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                text = ast.unparse(base)
                if text.startswith(("faust.", "aiokafka.")) and text not in allowed:
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.name}({text})")
    return out


def test_no_private_faust_or_aiokafka_attribute_outside_the_seam() -> None:
    private = _framework_private_names()
    assert private >= SEAM_NAMES
    files = _outside_seam()
    uses = [u for p in files for u in _private_uses(p, private)]
    subclasses = [c for p in files for c in _framework_subclasses(p)]
    assert not uses, "private Faust/aiokafka attributes outside stream/faustx:\n" + "\n".join(uses)
    assert not subclasses, "Faust classes extended outside stream/faustx:\n" + "\n".join(subclasses)


def test_the_private_attribute_check_finds_what_it_looks_for(tmp_path: Path) -> None:
    probe = ROOT / "stream" / "faustx" / "stream.py"  # the seam uses them, by design
    uses = _private_uses(probe, _framework_private_names())
    assert {u.split(": ")[1] for u in uses} >= {"_queue", "_errors"}


# -- the batching stream: take_buffered and manual acks ----------------------------------


def _message(app: faust.App, offset: int, partition: int = 0, generation: int | None = None,
             topic: str = PLAYS) -> ConsumerMessage:
    tp = TP(topic, partition)
    return ConsumerMessage(topic, partition, offset, 0.0, 0, [], b"k", b"v", None,
                           tp=tp, generation_id=app.consumer_generation_id
                           if generation is None else generation)


async def _stream(name: str) -> tuple[faust.App, BatchingStream, Any]:
    app = _app(name)
    topic = app.topic(PLAYS, key_type=bytes, value_type=bytes, key_serializer="raw",
                      value_serializer="raw")
    stream = app.stream(topic)
    assert isinstance(stream, BatchingStream)
    app.topics.acking_topics.add(PLAYS)  # as the conductor does once subscribed
    app.flow_control.resume()
    return app, stream, stream.channel.queue


def _event(app: faust.App, message: ConsumerMessage) -> faust.Event:
    message.incref()  # as the conductor does for each channel it delivers to
    return faust.Event(app, message.key, message.value, message.headers, message)


@pytest.mark.asyncio
async def test_take_buffered_hands_over_as_the_iterator_does() -> None:
    app, stream, queue = await _stream("seam-take")
    events = [_event(app, _message(app, offset)) for offset in range(5)]
    for ev in events:
        queue.put_nowait(ev)
    batch: list[Any] = [object()]  # what the agent already holds
    stream.take_buffered(batch, limit=4)
    assert batch[1:] == events[:3]  # up to the limit, in order
    assert not stream.buffer_empty() and queue.get_nowait() is events[3]
    assert stream.events_total == 3
    for ev in events[:3]:  # tracked as unacked, as the iterator tracks them
        assert ev.message.tracked and ev.message in app.consumer.unacked
    assert not events[3].message.tracked


@pytest.mark.asyncio
async def test_take_buffered_leaves_what_the_iterator_must_see_itself() -> None:
    app, stream, queue = await _stream("seam-take-stops")
    wake = object()
    first = _event(app, _message(app, 0))
    for value in (first, wake):
        queue.put_nowait(value)
    batch: list[Any] = []
    stream.take_buffered(batch, limit=10)
    assert batch == [first] and queue.get_nowait() is wake  # a non-record stops it

    stale = _event(app, _message(app, 1, generation=app.consumer_generation_id + 1))
    queue.put_nowait(stale)
    stream.take_buffered(batch, limit=10)
    assert batch == [first] and not stale.message.tracked  # a stale generation stops it
    queue.get_nowait()

    live = _event(app, _message(app, 2))
    queue.put_nowait(live)
    app.flow_control.suspend()  # a rebalance
    stream.take_buffered(batch, limit=10)
    assert batch == [first]
    app.flow_control.resume()  # (clears the stream buffers)
    assert stream.buffer_empty()
    queue.put_nowait(live)
    queue._errors.append(RuntimeError("decode failed"))  # a queued error
    stream.take_buffered(batch, limit=10)
    assert batch == [first]
    queue._errors.clear()
    stream.take_buffered(batch, limit=10)
    assert batch == [first, live]


@pytest.mark.asyncio
async def test_an_applied_play_is_acked_only_by_ack_processed() -> None:
    app, stream, queue = await _stream("seam-ack")
    stream.manual_acks()
    assert stream.enable_acks is False
    consumer = app.consumer
    tp = TP(PLAYS, 0)
    consumer._committed_offset[tp] = None  # as after the seek to committed offsets
    events = [_event(app, _message(app, offset)) for offset in (10, 11)]
    for ev in events:
        queue.put_nowait(ev)
    batch: list[Any] = []
    stream.take_buffered(batch, limit=10)
    assert consumer._new_offset(tp) is None  # taken, not applied: nothing to commit
    assert stream.ack_processed(batch[0]) is True
    assert batch[0].message not in consumer.unacked
    assert consumer._new_offset(tp) == 11  # committable up to the first play only
    assert stream.ack_processed(batch[0]) is False  # once
    stream.ack_processed(batch[1])
    assert consumer._new_offset(tp) == 12 and not consumer.unacked


@pytest.mark.asyncio
async def test_set_current_event_is_what_a_table_sees() -> None:
    app, stream, _ = await _stream("seam-current")
    ev = _event(app, _message(app, 3, partition=2))
    stream.set_current_event(ev)
    assert stream.current_event is ev and faust.current_event() is ev
    stream.set_current_event(None)
    assert faust.current_event() is None


@pytest.mark.asyncio
async def test_wake_puts_a_non_record_in_the_buffer() -> None:
    app, stream, queue = await _stream("seam-wake")
    marker = object()
    assert stream.buffer_empty()
    assert stream.wake(marker) is True
    assert queue.get_nowait() is marker


# -- the consumer: resume after seek, in-loop thread -------------------------------------


@pytest.mark.asyncio
async def test_hold_topic_partitions_resume_only_after_the_seek_and_flow() -> None:
    app = _app("seam-seek", hold_topics=frozenset({PLAYS}))
    consumer = app.consumer
    assert isinstance(consumer, SeamConsumer)
    plays, changelog = TP(PLAYS, 0), TP("app-sessions-changelog", 0)
    consumer.pause_partitions({plays, changelog})
    seeks: list[str] = []

    async def seek_to_committed() -> dict[TP, int]:
        seeks.append("seek")
        assert plays in consumer.paused_partitions()  # nothing fetched before the seek
        return {plays: 34}

    consumer.seek_to_committed = seek_to_committed  # type: ignore[method-assign]
    # Faust's order (tables/recovery.py): resume, seek, flow_control.resume, resume_flow
    consumer.resume_partitions({plays, changelog})
    assert consumer.paused_partitions() == {plays}  # only the hold topic is held
    await consumer.perform_seek()
    assert seeks == ["seek"] and plays in consumer.paused_partitions()
    # where the plays stream starts now, for the plays agent's offset fence
    assert consumer.start_offsets == {plays: 34} and consumer.seek_epoch == 1
    app.flow_control.resume()
    consumer.resume_flow()
    assert consumer.paused_partitions() == set()
    assert not consumer.held_partitions


@pytest.mark.asyncio
async def test_a_failed_seek_releases_the_held_partitions() -> None:
    app = _app("seam-seek-fails", hold_topics=frozenset({PLAYS}))
    consumer = app.consumer
    plays = TP(PLAYS, 1)
    consumer.pause_partitions({plays})

    async def seek_to_committed() -> dict[TP, int]:
        raise ConnectionError("broker gone")

    consumer.seek_to_committed = seek_to_committed  # type: ignore[method-assign]
    consumer.resume_partitions({plays})
    with pytest.raises(ConnectionError):
        await consumer.perform_seek()
    assert consumer.paused_partitions() == set()  # never held forever


@pytest.mark.asyncio
async def test_a_pause_drops_a_held_partition() -> None:
    app = _app("seam-seek-revoked", hold_topics=frozenset({PLAYS}))
    consumer = app.consumer
    plays = TP(PLAYS, 2)
    consumer.resume_partitions({plays})
    consumer.pause_partitions({plays})  # revoked before the seek
    await asyncio.sleep(0)
    assert not consumer.held_partitions


@pytest.mark.asyncio
async def test_the_consumer_thread_runs_on_the_app_loop_unless_asked() -> None:
    assert isinstance(_app("seam-in-loop").consumer._thread, InLoopConsumerThread)
    threaded = _app("seam-threaded", in_loop=False).consumer._thread
    try:
        assert not isinstance(threaded, InLoopConsumerThread)
        assert threaded.thread_loop is not asyncio.get_running_loop()
    finally:
        threaded.thread_loop.close()


@pytest.mark.asyncio
async def test_the_seam_s_fetch_loop_always_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """It also drops what a reread left behind (below), so ``fast_delivery=false`` only
    turns its direct hand-over off."""
    from stream.faustx import consumer as seam_consumer

    ran: list[str] = []

    async def drain(self: Any, fetcher: Any) -> None:
        ran.append("seam")

    async def faust_drain(self: Any, fetcher: Any) -> None:
        ran.append("faust")

    monkeypatch.setattr(seam_consumer, "drain_messages", drain)
    monkeypatch.setattr(FaustConsumer, "_drain_messages", faust_drain)
    await _app("seam-fast").consumer._drain_messages(None)
    await _app("seam-slow", fast_delivery=False).consumer._drain_messages(None)
    assert ran == ["seam", "seam"]


@pytest.mark.asyncio
async def test_without_fast_delivery_every_message_goes_through_wait_first() -> None:
    app = _app("seam-wait-first", fast_delivery=False)
    app.flow_control.resume()  # the direct hand-over would be possible
    tp = TP(PLAYS, 0)
    consumer, fetcher = _fetch_loop(app, [[1, 2]], tp)
    waited: list[int] = []
    delivered: list[int] = []

    async def callback(message: Any) -> None:
        delivered.append(message.offset)

    async def wait_first(coro: Any, *others: Any) -> None:
        waited.append(len(others))
        for other in others:  # suspend_flow.wait(): never awaited here
            other.close()
        await coro

    consumer.callback = callback
    consumer.wait_first = wait_first
    await asyncio.wait_for(consumer._drain_messages(fetcher), 5)
    assert delivered == [1, 2] and waited == [1, 1]


@pytest.mark.asyncio
async def test_direct_hand_over_only_when_nothing_could_block_it() -> None:
    from stream.faustx.delivery import can_deliver_now

    app, stream, queue = await _stream("seam-deliver")
    consumer = app.consumer
    tp = TP(PLAYS, 0)
    app.topics._tp_index[tp].add(stream.channel)  # as the conductor indexes a subscription
    assert can_deliver_now(app, consumer, tp)
    consumer.suspend_flow.set()  # a rebalance is suspending flow
    assert not can_deliver_now(app, consumer, tp)
    consumer.suspend_flow.clear()
    app.flow_control.suspend()  # on_message would wait in flow_control.acquire()
    assert not can_deliver_now(app, consumer, tp)
    app.flow_control.resume()
    async with app.topics._tp_to_callback_lock:  # the conductor is re-indexing
        assert not can_deliver_now(app, consumer, tp)
    for _ in range(queue.maxsize):  # the stream buffer is full: on_message would wait
        queue.put_nowait(object())
    assert not can_deliver_now(app, consumer, tp)
    while not queue.empty():
        queue.get_nowait()
    buffer = app.producer.buffer
    for i in range(buffer.max_messages + 1):  # the producer buffer is over its limit
        buffer.pending.put_nowait(i)
    assert not can_deliver_now(app, consumer, tp)
    while not buffer.pending.empty():
        buffer.pending.get_nowait()
    assert can_deliver_now(app, consumer, tp)


# -- the consumer: reading a partition again (the plays agent's offset fence) ----------------


class _Fetcher:
    def __init__(self) -> None:
        self._stopped = asyncio.Event()


def _fetch_loop(app: faust.App, batches: list[list[int]], tp: TP,
                during_fetch: dict[int, Any] | None = None) -> tuple[Any, _Fetcher]:
    """The seam's consumer with a fake fetch (Faust's ``getmany``: one batch per call) and a
    fake ``_seek``; ``during_fetch[i]`` runs while batch ``i`` is being collected."""
    consumer: Any = app.consumer
    fetcher = _Fetcher()
    calls = {"n": 0}
    consumer.sought = []

    async def _seek(partition: TP, offset: int) -> None:
        consumer.sought.append((partition, offset))

    def getmany(timeout: float) -> Any:
        i = calls["n"]
        calls["n"] += 1

        async def batch() -> Any:
            if i >= len(batches):
                fetcher._stopped.set()
                return
            if during_fetch and i in during_fetch:
                await during_fetch[i]()
            for offset in batches[i]:
                yield tp, _message(app, offset, partition=tp.partition)
        return batch()

    consumer.getmany = getmany
    consumer._seek = _seek
    return consumer, fetcher


@pytest.mark.asyncio
async def test_records_fetched_before_a_reread_are_not_delivered_and_gaps_are_cut() -> None:
    """The review's high finding (docs/reliability.md): after the agent's seek back to 5 the
    fetch loop still held 12 and 13 of a batch collected before it. Faust's loop would
    deliver them, set its read offset past 5 and record a gap 6..12 that its commit then
    counts as acked. The seam's loop drops them, the gaps from 5 on are cut, and the first
    record fetched after the seek is marked for the agent."""
    app = _app("seam-reread")
    tp = TP(PLAYS, 0)
    consumer, fetcher = _fetch_loop(app, [[10, 11, 12, 13], [5, 6, 7]], tp)
    consumer._gap[tp].addi(3, 9)  # a gap recorded earlier, partly past the seek offset
    delivered: list[Any] = []

    async def callback(message: Any) -> None:
        delivered.append(message)
        if message.offset == 11:  # the agent found a hole: read again from 5
            await consumer.read_again(tp, 5)

    consumer.callback = callback
    await asyncio.wait_for(consumer._drain_messages(fetcher), 5)
    assert [m.offset for m in delivered] == [10, 11, 5, 6, 7]
    assert consumer.sought == [(tp, 5)]
    assert consumer.first_after_reread(tp) is delivered[2]
    assert consumer.rereads == {}
    assert sorted((iv.begin, iv.end) for iv in consumer._gap[tp]) == [(3, 5)]
    assert consumer._read_offset[tp] == 7


@pytest.mark.asyncio
async def test_a_reread_during_another_threads_fetch_is_sought_again() -> None:
    """With the consumer on its own thread a batch may be collected before or after a seek
    that happened while it was fetched: the loop cannot tell, so it seeks again and drops
    that batch's records of the partition."""
    app = _app("seam-reread-thread", in_loop=False)
    tp = TP(PLAYS, 0)

    async def agent_seeks() -> None:
        await consumer.read_again(tp, 5)

    consumer, fetcher = _fetch_loop(app, [[10], [20, 21], [5, 6]], tp, {1: agent_seeks})
    assert consumer.exact_batches is False
    delivered: list[int] = []

    async def callback(message: Any) -> None:
        delivered.append(message.offset)

    consumer.callback = callback
    await asyncio.wait_for(consumer._drain_messages(fetcher), 5)
    assert delivered == [10, 5, 6]
    assert consumer.sought == [(tp, 5), (tp, 5)]
    assert consumer.first_after_reread(tp).offset == 5
    consumer._thread.thread_loop.close()  # the never-started consumer thread's own loop


@pytest.mark.asyncio
async def test_a_seek_to_committed_offsets_ends_every_reread() -> None:
    app = _app("seam-reread-rebalance", hold_topics=frozenset({PLAYS}))
    consumer: Any = app.consumer
    tp = TP(PLAYS, 0)

    async def _seek(partition: TP, offset: int) -> None:
        return None

    async def seek_to_committed() -> dict[TP, int]:
        return {tp: 3}

    consumer._seek = _seek
    consumer.seek_to_committed = seek_to_committed
    await consumer.read_again(tp, 5)
    assert consumer.rereads
    await consumer.perform_seek()
    assert consumer.rereads == {} and consumer.first_after_reread(tp) is None
