"""The session table's batched changelog (stream.faustx.changelog_table): what reaches the
producer.

A real Faust app on the seam's transport, with the table class installed as the worker's
(``App(Table=BatchedChangelogTable)``; no broker: nothing connects); only the producer's
``send`` is replaced by a recorder whose delivery futures the test resolves.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import faust
import pytest

from stream.core.session import UserState
from stream.faustx import transport
from stream.faustx.app import SeamApp
from stream.faustx.changelog_table import BatchedChangelogTable, ChangelogSendError
from stream.worker.topics import USER_STATE_CODEC, UserStateCodec


class RecordingProducer:
    """Stands in for ``app.producer.send``: records each call, returns a future."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.sent: list[tuple[str, bytes, bytes, int]] = []
        self.futures: list[asyncio.Future[Any]] = []
        self.fail_after = fail_after

    async def send(self, topic: str, key: bytes, value: bytes, partition: int,
                   timestamp: float, headers: Any) -> asyncio.Future[Any]:
        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            raise RuntimeError("producer is down")
        self.sent.append((topic, key, value, partition))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.futures.append(fut)
        return fut


def _table(
    name: str, producer: RecordingProducer | None = None
) -> tuple[faust.App, BatchedChangelogTable, RecordingProducer]:
    """A real Faust app and batched table whose producer ``send`` is the recorder."""
    transport.register()
    app = SeamApp(name, broker="faustx://127.0.0.1:1", autodiscover=False,
                  Table=BatchedChangelogTable)
    recorder = producer if producer is not None else RecordingProducer()
    app.producer.send = recorder.send  # type: ignore[method-assign]
    table = app.Table(
        "sessions", default=None, partitions=4,
        schema=faust.Schema(key_serializer="json", value_serializer=USER_STATE_CODEC),
    )
    assert isinstance(table, BatchedChangelogTable)  # the app's Table class
    table.key_serializer = "json"
    table.value_serializer = USER_STATE_CODEC
    partitions = {"u1": 1, "u2": 3}
    table.partition_for_key = lambda key: partitions[key]  # as inside stream iteration
    return app, table, recorder


def _state(user: str, seq: int, born: int = -1, last: int = -1) -> UserState:
    return UserState(user_id=user, seq=seq, recent=[f"t{seq}"], born_offset=born,
                     last_offset=last)


def _decoded(value: bytes) -> UserState:
    state = UserStateCodec().loads(value)
    assert isinstance(state, UserState)
    return state


@pytest.mark.asyncio
async def test_a_key_set_many_times_is_one_record_with_its_latest_value() -> None:
    app, table, producer = _table("changelog-coalesce")
    for seq in (1, 2, 3):
        table["u1"] = _state("u1", seq)
    table["u2"] = _state("u2", 1)
    assert table.dirty == 2
    assert await table.send_dirty() == 2
    assert table.dirty == 0
    (t1, k1, v1, p1), (_, k2, v2, p2) = producer.sent
    assert t1 == table.changelog_topic.get_topic_name()
    assert (json.loads(k1), p1, _decoded(v1).seq) == ("u1", 1, 3)
    assert (json.loads(k2), p2, _decoded(v2).seq) == ("u2", 3, 1)
    assert table["u1"].seq == 3  # the store itself is Faust's, unchanged
    assert await table.send_dirty() == 0  # nothing new: nothing sent


@pytest.mark.asyncio
async def test_delete_is_a_tombstone_on_the_same_queue_after_the_pending_value() -> None:
    app, table, producer = _table("changelog-delete")
    table["u1"] = _state("u1", 1)
    del table["u1"]
    assert await table.send_dirty() == 1  # the older value is never sent
    ((_, key, value, partition),) = producer.sent
    assert (json.loads(key), value, partition) == ("u1", None, 1)
    table["u1"] = _state("u1", 2)  # plays again after being forgotten
    await table.send_dirty()
    assert _decoded(producer.sent[-1][2]).seq == 2  # after the tombstone, same queue


@pytest.mark.asyncio
async def test_a_failed_record_is_resent_with_the_current_value_never_its_own() -> None:
    app, table, producer = _table("changelog-current")
    table["u1"] = _state("u1", 1)
    await table.send_dirty()  # V1 in flight
    table["u1"] = _state("u1", 2)
    await table.send_dirty()  # V2 in flight, later on the same partition
    producer.futures[0].set_exception(RuntimeError("leader not available"))
    producer.futures[1].set_result(None)  # V2 delivered
    with pytest.raises(ChangelogSendError):
        table.check_delivered()
    await table.send_dirty()
    assert _decoded(producer.sent[-1][2]).seq == 2  # not V1 again after V2


@pytest.mark.asyncio
async def test_a_failed_value_of_a_deleted_key_is_resent_as_a_tombstone() -> None:
    app, table, producer = _table("changelog-failed-then-deleted")
    table["u1"] = _state("u1", 1)
    await table.send_dirty()
    del table["u1"]
    await table.send_dirty()  # the tombstone
    producer.futures[0].set_exception(RuntimeError("request timed out"))
    producer.futures[1].set_result(None)
    with pytest.raises(ChangelogSendError):
        table.check_delivered()
    await table.send_dirty()
    assert producer.sent[-1][2] is None  # a forgotten listener stays forgotten


@pytest.mark.asyncio
async def test_a_commit_waits_for_an_agent_hand_over_in_progress() -> None:
    app, table, _ = _table("changelog-in-progress")
    gate = asyncio.Event()
    handed: list[str] = []

    async def slow_send(topic: str, key: bytes, value: bytes, partition: int,
                        timestamp: float, headers: Any) -> asyncio.Future[Any]:
        await gate.wait()  # e.g. aiokafka waiting for a full batch to drain
        handed.append(json.loads(key))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    app.producer.send = slow_send  # type: ignore[method-assign]
    table["u1"] = _state("u1", 1)
    table["u2"] = _state("u2", 1)
    agent = asyncio.ensure_future(table.send_dirty())  # takes both keys, then blocks
    await asyncio.sleep(0.01)
    commit = asyncio.ensure_future(table.send_dirty())  # nothing dirty: must still wait
    await asyncio.sleep(0.01)
    assert not commit.done()
    gate.set()
    await asyncio.gather(agent, commit)
    assert handed == ["u1", "u2"]  # both handed over before the commit's call returned


@pytest.mark.asyncio
async def test_failed_delivery_fails_the_check_and_the_key_is_sent_again() -> None:
    app, table, producer = _table("changelog-fail")
    table["u1"] = _state("u1", 1)
    table["u2"] = _state("u2", 1)
    await table.send_dirty()
    producer.futures[0].set_exception(RuntimeError("message too large"))
    producer.futures[1].set_result(None)
    table["u2"] = _state("u2", 2)  # newer value of a delivered key, not yet sent
    with pytest.raises(ChangelogSendError, match="not delivered"):
        table.check_delivered()
    assert table.dirty == 2
    await table.send_dirty()
    resent = {json.loads(k): _decoded(v).seq for _, k, v, _ in producer.sent[2:]}
    assert resent == {"u1": 1, "u2": 2}
    for fut in producer.futures[2:]:
        fut.set_result(None)
    assert table.check_delivered() == 0


@pytest.mark.asyncio
async def test_a_failed_resend_never_replaces_a_newer_pending_value() -> None:
    app, table, producer = _table("changelog-newer")
    table["u1"] = _state("u1", 1)
    await table.send_dirty()
    table["u1"] = _state("u1", 2)
    producer.futures[0].set_exception(RuntimeError("broker gone"))
    with pytest.raises(ChangelogSendError):
        table.check_delivered()
    await table.send_dirty()
    assert _decoded(producer.sent[-1][2]).seq == 2


@pytest.mark.asyncio
async def test_producer_error_keeps_the_unsent_keys_dirty() -> None:
    app, table, producer = _table("changelog-producer-down", RecordingProducer(fail_after=1))
    table["u1"] = _state("u1", 1)
    table["u2"] = _state("u2", 1)
    with pytest.raises(RuntimeError, match="producer is down"):
        await table.send_dirty()
    assert len(producer.sent) == 1
    assert table.dirty == 1  # u2: sent by the next call (the commit retries it)


@pytest.mark.asyncio
async def test_a_codec_that_cannot_be_resolved_keeps_every_key_dirty() -> None:
    app, table, producer = _table("changelog-bad-codec")
    table["u1"] = _state("u1", 1)
    table["u2"] = _state("u2", 1)
    table.value_serializer = "no-such-codec"
    with pytest.raises(KeyError):
        await table.send_dirty()
    assert producer.sent == []
    assert table.dirty == 2  # nothing was handed over, nothing was forgotten


@pytest.mark.asyncio
async def test_commit_flush_sends_pending_records_and_fails_on_undelivered_ones() -> None:
    app, table, producer = _table("changelog-commit")
    buffer = app.producer.buffer
    await buffer.start()
    try:
        table["u1"] = _state("u1", 1)
        flush = asyncio.ensure_future(app.producer.flush())
        for _ in range(50):
            if producer.futures:
                break
            await asyncio.sleep(0.01)
        assert len(producer.sent) == 1  # handed over by the flush itself
        producer.futures[0].set_exception(RuntimeError("not authorised"))
        with pytest.raises(ChangelogSendError):
            await flush  # Faust does not commit: the offsets stay, the record is resent
        assert table.dirty == 1
    finally:
        await buffer.stop()


@pytest.mark.asyncio
async def test_delivered_offsets_are_recorded_as_faust_does_for_a_rocksdb_store() -> None:
    app, table, producer = _table("changelog-persisted")
    persisted: list[tuple[Any, int]] = []
    table.data.set_persisted_offset = lambda tp, offset: persisted.append((tp, offset))
    table["u1"] = _state("u1", 1)
    table["u2"] = _state("u2", 1)
    await table.send_dirty()
    meta = type("RecordMetadata", (), {})
    for fut, (tp, offset) in zip(producer.futures, (("tp1", 7), ("tp1", 9)), strict=True):
        m = meta()
        m.topic_partition, m.offset = tp, offset
        fut.set_result(m)
    assert table.check_delivered() == 0
    assert persisted == [("tp1", 9)]  # the highest offset per partition, once


@pytest.mark.asyncio
async def test_delete_on_names_the_partition_outside_stream_iteration() -> None:
    """A session evicted by the max_sessions cap (stream.processing.pipeline.evict_sessions) is
    deleted outside stream iteration: the tombstone goes to the partition given; with
    ``changelog=False`` (a partition no longer owned) the key only leaves the store."""
    app, table, producer = _table("changelog-delete-on")
    table["u1"] = _state("u1", 1)
    table["u2"] = _state("u2", 1)
    await table.send_dirty()
    table.partition_for_key = lambda key: None  # no current event
    assert table.delete_on("u1", 2) is True
    assert table.delete_on("u2", 3, changelog=False) is True
    assert table.delete_on("nobody", 0) is False
    assert "u1" not in table.data and "u2" not in table.data
    assert await table.send_dirty() == 1
    topic, key, value, partition = producer.sent[-1]
    assert (json.loads(key), value, partition) == ("u1", None, 2)


def _rocksdb_table(name: str, tmp_path: Any) -> tuple[faust.App, BatchedChangelogTable,
                                                      RecordingProducer]:
    """As ``_table``, with faust-streaming's RocksDB store in ``tmp_path``."""
    transport.register()
    app = SeamApp(name, broker="faustx://127.0.0.1:1", autodiscover=False,
                  Table=BatchedChangelogTable, store="rocksdb://", datadir=str(tmp_path))
    app.conf.tabledir.mkdir(parents=True, exist_ok=True)
    recorder = RecordingProducer()
    app.producer.send = recorder.send  # type: ignore[method-assign]
    table = app.batched_table(
        "sessions", default=None, partitions=4,
        schema=faust.Schema(key_serializer="json", value_serializer=USER_STATE_CODEC),
    )
    table.key_serializer = "json"
    table.value_serializer = USER_STATE_CODEC
    table.partition_for_key = lambda key: {"u1": 1, "u2": 3}[key]
    return app, table, recorder


def _put_in_partition(table: BatchedChangelogTable, partition: int, state: UserState) -> None:
    """What ``table[key] = state`` leaves in a RocksDB store (it needs Faust's current event
    for the partition, which only exists inside stream iteration)."""
    store: Any = table.data
    store._db_for_partition(partition).put(store._encode_key(state.user_id),
                                           store._encode_value(state))


@pytest.mark.asyncio
async def test_resend_puts_locally_stored_state_back_on_the_changelog(tmp_path: Any) -> None:
    """A replayed play (already in the RocksDB state, its changelog record lost in a crash)
    sends the stored state again, read from the key's own partition whatever event is
    current; the memory store needs nothing (its state comes from the changelog)."""
    _, table, producer = _rocksdb_table("changelog-resend", tmp_path)
    _put_in_partition(table, 1, _state("u1", 5))
    table.resend("u1")
    assert table.dirty == 1
    assert await table.send_dirty() == 1
    (_, key, value, partition), = producer.sent
    assert (json.loads(key), partition) == ("u1", 1)
    assert _decoded(value).seq == 5
    table.resend("u2")  # nothing stored: a tombstone, as for a deleted key
    await table.send_dirty()
    assert producer.sent[-1][2] is None and producer.sent[-1][3] == 3

    _, mem, mem_producer = _table("changelog-resend-memory")
    mem["u1"] = _state("u1", 5)
    await mem.send_dirty()
    mem.resend("u1")
    assert mem.dirty == 0 and await mem.send_dirty() == 0 and len(mem_producer.sent) == 1


@pytest.mark.asyncio
async def test_a_failed_record_is_resent_from_its_partition_in_a_rocksdb_store(
    tmp_path: Any,
) -> None:
    """check_delivered reads the current value from the record's partition: with RocksDB a
    lookup outside stream iteration would otherwise search by the current event."""
    _, table, producer = _rocksdb_table("changelog-failed-rocksdb", tmp_path)
    _put_in_partition(table, 3, _state("u2", 2))
    table._dirty["u2"] = (3, _state("u2", 1))  # as on_key_set leaves it
    await table.send_dirty()
    _put_in_partition(table, 3, _state("u2", 4))  # a newer value, applied since
    producer.futures[0].set_exception(RuntimeError("broker down"))
    with pytest.raises(ChangelogSendError):
        table.check_delivered()
    await table.send_dirty()
    assert _decoded(producer.sent[-1][2]).seq == 4


# -- recovery: the newer of two records of a listener ---------------------------------------

def _changelog_event(state: UserState | None, user: str, partition: int, offset: int) -> Any:
    """A changelog event as Faust's recovery hands it to the table: decoded key and value
    plus the raw message (a tombstone has no value)."""
    from types import SimpleNamespace

    from faust.types import TP

    raw = None if state is None else UserStateCodec().dumps(state)
    message = SimpleNamespace(key=json.dumps(user).encode(), value=raw, partition=partition,
                              offset=offset, tp=TP("app-sessions-changelog", partition))
    return SimpleNamespace(key=user, value=state, message=message)


def _recover(table: BatchedChangelogTable, records: list[tuple[str, int | None]],
             born: int = -1, last: int | None = None) -> None:
    """``last``: the plays offset of the first record's last play (one more per record)."""
    from stream.worker.topics import state_order

    table.order = state_order
    parts = {"u1": 1, "u2": 3}
    table.apply_changelog_batch([
        _changelog_event(None if seq is None else _state(
            user, seq, born, -1 if last is None else last + i), user, parts[user], i)
        for i, (user, seq) in enumerate(records)
    ])


@pytest.mark.asyncio
async def test_recovery_keeps_the_newer_record_when_a_zombies_older_one_lands_after_it() -> None:
    """A fenced worker's late records (seq 21, 22) follow the new owner's (seq 121) in the
    changelog: recovery keeps 121, within one batch and across batches."""
    _, table, _ = _table("changelog-recover-newer")
    _recover(table, [("u1", 120), ("u2", 3), ("u1", 121), ("u1", 21), ("u1", 22), ("u2", 4)])
    assert table.data["u1"].seq == 121 and table.data["u2"].seq == 4
    assert table.older_skipped == 2
    _recover(table, [("u1", 27)])  # the next batch
    assert table.data["u1"].seq == 121 and table.older_skipped == 3
    _recover(table, [("u1", 121), ("u1", 122)])  # equal and newer apply
    assert table.data["u1"].seq == 122 and table.older_skipped == 3


@pytest.mark.asyncio
async def test_recovery_applies_a_tombstone_whatever_its_order_and_then_a_fresh_start() -> None:
    """A forget's tombstone always applies, and the listener's state after it starts again
    at seq 1 (a new listener): not skipped as older than the forgotten one."""
    _, table, _ = _table("changelog-recover-tombstone")
    _recover(table, [("u1", 50), ("u1", None)])
    assert "u1" not in table.data
    _recover(table, [("u1", 50), ("u1", None), ("u1", 1), ("u1", 2)])
    assert table.data["u1"].seq == 2 and table.older_skipped == 0


@pytest.mark.asyncio
async def test_recovery_without_an_order_applies_the_log_as_faust_does() -> None:
    _, table, _ = _table("changelog-recover-log-order")
    table.apply_changelog_batch([_changelog_event(_state("u1", 9), "u1", 1, 0),
                                 _changelog_event(_state("u1", 3), "u1", 1, 1)])
    assert table.data["u1"].seq == 3 and table.older_skipped == 0


@pytest.mark.asyncio
async def test_recovery_into_a_rocksdb_store_compares_with_the_stored_state(tmp_path: Any) -> None:
    """RocksDB: the value already held comes from the key's partition on disk (a restart
    keeps it), and the kept records are written raw as Faust writes them."""
    _, table, _ = _rocksdb_table("changelog-recover-rocksdb", tmp_path)
    _put_in_partition(table, 1, _state("u1", 40))
    _recover(table, [("u1", 30), ("u2", 5), ("u2", 2)])
    store: Any = table.data
    assert _decoded(store._db_for_partition(1).get(store._encode_key("u1"))).seq == 40
    assert _decoded(store._db_for_partition(3).get(store._encode_key("u2"))).seq == 5
    assert table.older_skipped == 2


@pytest.mark.asyncio
async def test_recovery_into_a_rocksdb_store_that_still_holds_an_old_life(tmp_path: Any) -> None:
    """The review's medium finding (docs/reliability.md): this worker's RocksDB still holds
    the listener's old life (seq 40, begun at offset 100) and the tombstone of the forget
    was compacted away before it recovered; the changelog then holds only the new life
    (seq 1, 2, begun at offset 900). Ordered by seq alone the new life was skipped as older;
    by (born_offset, seq) it applies, and a late record of the old life does not."""
    _, table, _ = _rocksdb_table("changelog-recover-lives", tmp_path)
    _put_in_partition(table, 1, _state("u1", 40, born=100))
    _recover(table, [("u1", 1), ("u1", 2)], born=900)
    store: Any = table.data
    assert _decoded(store._db_for_partition(1).get(store._encode_key("u1"))).seq == 2
    assert table.older_skipped == 0
    _recover(table, [("u1", 41)], born=100)  # the old life, late
    assert _decoded(store._db_for_partition(1).get(store._encode_key("u1"))).seq == 2
    assert table.older_skipped == 1


def test_a_life_is_stamped_with_the_offset_of_its_first_play_and_kept() -> None:
    from stream.core.events import PlayEvent
    from stream.core.session import update_session

    def play(i: int) -> PlayEvent:
        return PlayEvent(user_id="u1", track_id=f"t{i}", ts_ms=1000 * i, ms_played=30_000,
                         event_id=f"e{i}")

    first = update_session(None, play(1), position=(2, 900)).state
    assert first.born_offset == 900 and first.seq == 1
    later = update_session(first, play(2), position=(2, 901)).state
    assert later.born_offset == 900 and later.seq == 2
    restored = _decoded(UserStateCodec().dumps(later))
    assert restored.born_offset == 900
    # a record written before the field existed reads -1: older than a stamped life that
    # began after its last play, else compared by seq (it may continue that life)
    from stream.worker.topics import state_order

    old = UserState.from_dict({"user_id": "u1", "seq": 7, "last_offset": 400})
    assert old.born_offset == -1
    assert state_order(old) < state_order(first) and not state_order(first) < state_order(old)
    continued = UserState.from_dict({"user_id": "u1", "seq": 7, "last_offset": 950})
    assert state_order(later) < state_order(continued)


@pytest.mark.asyncio
async def test_recovery_during_a_rolling_upgrade_compares_unstamped_records_by_seq() -> None:
    """Review of session 12 (M1): a new worker begins u1's life at offset 500 (seq 1-5), a
    rebalance moves the partition to a worker of the previous version, which continues the
    life without the field (seq 6-10, born_offset -1). Recovery must keep seq 10: records
    of a worker that predates born_offset are compared by seq alone."""
    _, table, _ = _table("changelog-recover-upgrade")
    _recover(table, [("u1", s) for s in range(1, 6)], born=500, last=500)
    _recover(table, [("u1", s) for s in range(6, 11)], born=-1, last=505)
    assert table.data["u1"].seq == 10 and table.older_skipped == 0
    _recover(table, [("u1", 11)], born=500, last=510)  # a new worker again: the life's stamp
    assert table.data["u1"].seq == 11 and table.older_skipped == 0
    _recover(table, [("u1", 9)], born=-1, last=508)  # a late record of the old worker
    assert table.data["u1"].seq == 11 and table.older_skipped == 1
    # an old worker's record of an earlier life (its last play before this life began)
    _recover(table, [("u1", 40)], born=-1, last=120)
    assert table.data["u1"].seq == 11 and table.older_skipped == 2


# -- the record encoder: Faust's bytes, its lookups once per batch -------------------------


class _Point(faust.Record, serializer="json"):
    x: int


def _encoder_cases() -> list[tuple[Any, Any]]:
    from array import array

    from stream.faustx.changelog_table import _TOMBSTONE

    full = UserState(user_id="ü-1", seq=7, recent=["a", "b\u00e9", "c"],
                     recent_skipped=[True, False, True], born_offset=3, last_offset=9,
                     seen=array("q", [1, -2, 2**62]), model="AAEC", session_key="s")
    return [("u1", _state("u1", 1)), ("ü-1", full), ("u1", _TOMBSTONE), (b"raw-key", full),
            (17, full), ("u1", b"raw-value"), ("u1", _Point(x=3)), ("u1", {"a": 1}),
            (_Point(x=1), full), ("", UserState(user_id=""))]


def test_the_record_encoder_gives_fausts_bytes_and_headers_for_every_kind_of_record() -> None:
    from stream.faustx.changelog_table import RecordEncoder

    app, table, _ = _table("changelog-encoder")
    topic = table.changelog_topic
    encode = RecordEncoder(topic, app, table.key_serializer, table.value_serializer)
    assert encode._key_codec is not None  # the worker's table takes the direct path
    for key, value in _encoder_cases():
        assert encode(key, value) == encode.faust_record(key, value), (key, value)
    # and faust_record is Faust's own prepare_* sequence (what send_dirty did before)
    headers = topic.prepare_headers(None)
    key_bytes, headers = topic.prepare_key("u1", "json", None, headers)
    value_bytes, headers = topic.prepare_value(_state("u1", 1), USER_STATE_CODEC, None, headers)
    assert encode("u1", _state("u1", 1)) == (key_bytes, value_bytes, headers or None)


def test_the_record_encoder_takes_fausts_path_where_faust_is_adapted() -> None:
    from stream.faustx.changelog_table import RecordEncoder

    app, table, _ = _table("changelog-encoder-adapted")
    topic = table.changelog_topic

    class Prefixed(type(topic)):  # type: ignore[misc]
        def prepare_key(self, key: Any, *args: Any) -> Any:
            key_bytes, headers = super().prepare_key(key, *args)
            return b"p:" + key_bytes, headers

    topic.__class__ = Prefixed
    encode = RecordEncoder(topic, app, table.key_serializer, table.value_serializer)
    assert encode._key_codec is None
    assert encode("u1", _state("u1", 1))[0] == b'p:"u1"'
    unnamed = RecordEncoder(table.changelog_topic, app, None, table.value_serializer)
    assert unnamed._key_codec is None


def test_get_is_fausts_get_inlined() -> None:
    from collections.abc import Mapping

    app, table, _ = _table("changelog-get")
    table["u1"] = _state("u1", 1)
    gets: list[Any] = []
    faust_on_get = table.on_key_get
    table.on_key_get = lambda key: (gets.append(key), faust_on_get(key))  # type: ignore[method-assign]
    for key, default in (("u1", None), ("u2", None), ("u2", "d"), ("u1", "d")):
        assert table.get(key, default) == Mapping.get(table, key, default)
    assert table.get("u1") is table.data["u1"]
    assert gets == ["u1", "u1", "u2", "u2", "u2", "u2", "u1", "u1", "u1"]  # the sensor, each get
    table.default = lambda: "fresh"  # a table with a default gives it, as Faust's does
    assert table.get("u3", "d") == Mapping.get(table, "u3", "d") == "fresh"


def test_the_workers_own_session_table_takes_the_direct_path() -> None:
    """The app and table as the worker builds them (create_app, declare_topics): a change
    there that made the encoder fall back to Faust's path would be slower, silently."""
    from stream.config import Settings
    from stream.faustx.app import create_app
    from stream.faustx.changelog_table import RecordEncoder
    from stream.worker.topics import declare_topics

    settings = Settings(kafka_bootstrap="127.0.0.1:1")
    app = create_app(settings, 4)
    sessions = declare_topics(app, settings, 4).sessions
    encode = RecordEncoder(sessions.changelog_topic, app, sessions.key_serializer,
                           sessions.value_serializer)
    assert encode._key_codec is not None
    state = _state("u1", 3)
    assert encode("u1", state) == encode.faust_record("u1", state)


@pytest.mark.asyncio
async def test_the_memory_store_keeps_its_listeners_in_shards_through_recovery() -> None:
    """The memory store's dict is a ShardedDict (one growth rehashes 1/64 of the listeners,
    docs/benchmarks.md "sharded maps"), and Faust's recovery writes and tombstones go
    through it."""
    from stream.core.shards import ShardedDict

    _, table, _ = _table("changelog-sharded-store")
    store: Any = table.data
    assert type(store.data) is ShardedDict
    _recover(table, [("u1", 5), ("u2", 7), ("u1", None)])
    assert type(store.data) is ShardedDict
    assert "u1" not in table.data and table.data["u2"].seq == 7
    assert sorted(table.keys_snapshot()) == ["u2"]
    # keys_chunks: one shard a list, each listed when asked for (the session bound's seed)
    for i in range(300):
        store.data[f"v{i}"] = None
    chunks = table.keys_chunks(8)
    first = next(chunks)
    assert first == list(store.data.shards[0])
    store.data["late"] = None  # after the first shard was listed
    rest = list(chunks)
    assert len(rest) == len(store.data.shards) - 1
    listed = first + [k for c in rest for k in c]
    assert sorted(listed) == sorted(table.keys_snapshot()) or (
        "late" not in listed and sorted([*listed, "late"]) == sorted(table.keys_snapshot()))
