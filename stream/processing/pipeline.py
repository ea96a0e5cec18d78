"""What the worker does with one Kafka record, independent of Faust.

validate -> (dead-letter | dedupe -> update session state -> learn -> rank -> enqueue the
Redis write). The session table is any mutable mapping (a Faust Table in the worker, a dict
in tests and benchmarks); the Redis writer and the DLQ sender are injected. Faust, Redis and
Prometheus objects are passed in -- this module imports none of them.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any, Final

from stream.config import Settings
from stream.core.catalog import TrackCatalog
from stream.core.evaluation import ComponentQuality
from stream.core.events import (  # noqa: F401 - murmur2, key_partition: re-exported
    PlayEvent,
    Rejection,
    escape_text,
    key_partition,
    murmur2,
    parse_event,
    partition_problem,
)
from stream.core.models._vocab import EvictionSteps, drain
from stream.core.ranking import RankedItem, top_up
from stream.core.recommender import Recommendation, Recommender
from stream.core.session import SessionUpdate, UserState, update_session
from stream.core.shards import MASK as SHARD_MASK
from stream.core.shards import ShardedDict, ShardedLRU
from stream.core.slots import positional_builder
from stream.processing.documents import (
    PendingWrite,
    encode_document,
    encode_similar,
    session_summary,
)
from stream.processing.ratelog import RateLimitedLog

logger = logging.getLogger(__name__)

OUTCOMES: Final = ("processed", "rejected", "duplicate")
#: listeners with a short list remembered for the background refresh (each holds a state)
MAX_SHORT_LISTS: Final = 10_000

#: Most tracks waiting for a "more like this" refresh. The refresh timer writes at most ~200
#: lists a second, so 10,000 waiting is ~50 s of its work: under a flood of new track ids
#: the oldest waiting ones are dropped (refreshed again when next played) instead of the
#: set growing with every id ever played.
MAX_TOUCHED_TRACKS: Final = 10_000
#: evicted tracks forgotten per slice of an eviction (Processor._forget_tracks_steps)
FORGET_SLICE: Final = 2_048

#: most first-play listeners waiting to be ranked (see Processor.pending_first): ~20 s of
#: ranking at 300k+ tracks; a flood of new ids beyond it sheds the oldest
MAX_PENDING_FIRST: Final = 20_000
#: most listeners ranked in one budgeted call (Processor.rank_pending)
MAX_RANK_CHUNK: Final = 1024
#: a budgeted call ranks at most this many listeners at a time (fewer when they are dear:
#: Processor._rank_budgeted), then checks the time spent
RANK_SUB_CHUNK: Final = 8


@dataclass(frozen=True, slots=True)
class Record:
    """The parts of a Kafka record the pipeline needs."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None


#: ``Record(topic, partition, offset, key, value, timestamp_ms)`` with every field given,
#: without the frozen __init__ (stream.core.slots): the worker builds one per play
build_record: Final = positional_builder(Record)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A rejected record: original bytes plus why and where it came from."""

    record: Record
    rejection: Rejection

    def headers(self) -> list[tuple[str, bytes]]:
        r = self.record
        return [
            ("dlq.reason", self.rejection.reason.encode()),
            ("dlq.detail", self.rejection.detail.encode("utf-8", "replace")[:1024]),
            ("dlq.topic", r.topic.encode()),
            ("dlq.partition", str(r.partition).encode()),
            ("dlq.offset", str(r.offset).encode()),
            ("dlq.timestamp", str(r.timestamp_ms or "").encode()),
        ]


@dataclass(slots=True)
class Outcome:
    outcome: str
    event: PlayEvent | None = None
    update: SessionUpdate | None = None
    recs: list[Recommendation] | None = None
    rejection: Rejection | None = None
    model_error: Exception | None = None
    #: what learning the play revealed (its item step goes to the other workers)
    learned: Any = None


class StageTimer:
    """Accumulates per-stage durations for one event (reported via a callback)."""

    __slots__ = ("stages", "_t")

    def __init__(self) -> None:
        self.stages: list[tuple[str, float]] = []
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages.append((stage, now - self._t))
        self._t = now


class Processor:
    """Applies records to the session table and the recommender; emits writes and DLQ items."""

    def __init__(
        self,
        settings: Settings,
        recommender: Recommender,
        table: MutableMapping[str, Any],
        submit: Callable[[PendingWrite], None],
        dead_letter: Callable[[DeadLetter], None],
        clock: Callable[[], float] = time.time,
        evaluator: Any = None,
        max_tracked_users: int = 100_000,
        defer_ranking: bool = False,
        max_touched_tracks: int = MAX_TOUCHED_TRACKS,
        defer_eviction: bool = False,
        reject_log: RateLimitedLog | None = None,
        partitions: int | None = None,
    ) -> None:
        self.settings = settings
        #: bounded session table (``max_sessions``; 0 = unbounded): listeners in the
        #: order of their last applied play, least recent first (see evict_sessions)
        self.max_sessions = settings.max_sessions
        #: (in shards: no single hash-table growth rehashes every listener, stream.core.shards)
        self.session_order: ShardedLRU[str, None] = ShardedLRU()
        self.sessions_evicted = 0
        #: the plays topic's partition count: a record not on its key's partition (Kafka's
        #: default partitioner) is rejected as ``wrong_partition``; None: not checked
        self.partitions = partitions
        #: rejection log lines, at most 10 per reason per minute (the metrics count all)
        self.reject_log = reject_log if reject_log is not None else RateLimitedLog(logger)
        self.recommender = recommender
        self.table = table
        self.submit = submit
        self.dead_letter = dead_letter
        self.clock = clock
        self.gap_ms = settings.session_gap_s * 1000
        self.max_future_ms = settings.max_future_s * 1000
        #: live test-then-train evaluator (a windowed stream.core.evaluation.Prequential) or None
        self.evaluator = evaluator
        #: ranks the single components on a sample of plays for the live per-variant
        #: quality (stream.core.evaluation.ComponentQuality; setting quality_components_every)
        self.components = (ComponentQuality(settings.quality_components_every)
                           if evaluator is not None and settings.quality_components_every
                           else None)
        #: each listener's last published list, to score their next play against (bounded)
        #: (at most max_tracked_users, 100k, least recently published first; read on every
        #: play; in shards, stream.core.shards: as one OrderedDict its hash-table growths
        #: held the loop 41-104 ms in the junk-ids harnesses of sessions 14 and 15)
        self.last_recs: ShardedLRU[str, tuple[str, ...]] = ShardedLRU()
        self.max_tracked_users = max_tracked_users
        self.model_errors = 0
        self.defer_ranking = defer_ranking
        self.max_tracks = settings.max_tracks
        self.evicted_tracks = 0
        #: with ``defer_eviction`` a catalogue over ``max_tracks`` only sets
        #: ``eviction_due``; the caller runs :meth:`evict_due` when nothing else uses the
        #: models (the worker: in a thread, off its event loop)
        self.defer_eviction = defer_eviction
        self.eviction_due = False
        self.eviction_seconds: list[float] = []
        #: tracks played since their "more like this" list was last refreshed, oldest first
        #: (at most ``max_touched_tracks``; evicted tracks leave it)
        self.touched_tracks: OrderedDict[str, None] = OrderedDict()
        self.max_touched_tracks = max_touched_tracks
        self.touched_dropped = 0
        #: refreshes that found no similar track (nothing written)
        self.similar_empty = 0
        #: track -> when its "more like this" list was last refreshed (up to 4 x
        #: max_tracked_users; in shards: stream.core.shards)
        self.similar_refreshed: ShardedDict[str, float] = ShardedDict()
        #: listeners whose list must be re-ranked: user -> (latest event, state, ingest ts)
        self.pending_rank: OrderedDict[str, tuple[PlayEvent, UserState, int | None]] = (
            OrderedDict())
        #: the same for listeners at their first play (a flood of never-seen ids lands
        #: here): ranked after ``pending_rank``, at most MAX_PENDING_FIRST wait (the oldest
        #: is shed, counted in ``rank_shed``: that listener gets a list at their next play)
        self.pending_first: OrderedDict[str, tuple[PlayEvent, UserState, int | None]] = (
            OrderedDict())
        self.rank_shed = 0
        #: seconds one listener's ranking takes (moving average), to size budgeted chunks
        self.rank_cost_s = 0.001
        #: track names seen in plays (bounded); documents carry them
        self.catalog = TrackCatalog(settings.catalog_max_tracks, settings.catalog_max_chars)
        #: listeners whose last list came out shorter than top_k (bounded, oldest first
        #: out): re-ranked by refresh_short_lists when the catalogue has grown since
        self.short_lists: OrderedDict[str, tuple[PlayEvent, UserState, int]] = OrderedDict()
        #: listeners queued by refresh_short_lists only (their re-ranking is not fresh)
        self._refreshing: set[str] = set()

    def reject(self, record: Record, rejection: Rejection) -> Outcome:
        self.reject_log.log(
            rejection.reason,
            "rejected %s[%d]@%d: %s: %s",
            record.topic,
            record.partition,
            record.offset,
            rejection.reason,
            escape_text(rejection.detail, 300),
        )
        self.dead_letter(DeadLetter(record, rejection))
        return Outcome("rejected", rejection=rejection)

    def process(self, record: Record, timer: StageTimer | None = None) -> Outcome:
        """Apply one record (a batch of one; see :meth:`process_batch`)."""
        stages: dict[str, float] = {}
        outcome = self.process_batch([record], stages)[0]
        if timer is not None:
            timer.stages.extend(stages.items())
        return outcome

    def process_batch(
        self,
        records: Sequence[Record],
        stages: dict[str, float] | None = None,
        before_state: Callable[[int], None] | None = None,
    ) -> list[Outcome]:
        """Apply ``records`` in order; one :class:`Outcome` each, in the same order.

        Stage by stage (decode every record, then every session update, then learning
        and ranking or enqueueing, event by event): the result is exactly that of
        :meth:`process` called on each record in turn -- a record's learning and ranking
        see the models as they were after the records before it -- but each stage's code
        and data stay in the CPU caches across the batch. In the worker, between Faust,
        asyncio and aiokafka, one event at a time ran every stage about twice as slowly
        as in a tight loop (docs/benchmarks.md, session 6).

        ``stages`` (if given) accumulates seconds per stage over the batch.
        ``before_state(i)`` is called before the session state of ``records[i]`` is read
        and written (the worker points Faust's current event at that record there, so its
        table access goes to the record's partition). A record that raises unexpectedly is
        rejected as ``internal_error`` (dead-lettered); the others go on."""
        clock = time.perf_counter
        t0 = clock()
        now_ms = int(self.clock() * 1000)
        outcomes: list[Outcome | None] = [None] * len(records)
        events: list[tuple[int, PlayEvent]] = []
        max_bytes, max_future_ms = self.settings.max_event_bytes, self.max_future_ms
        for i, record in enumerate(records):
            parsed = parse_event(
                record.value, now_ms=now_ms, max_bytes=max_bytes, max_future_ms=max_future_ms
            )
            if isinstance(parsed, Rejection):
                outcomes[i] = self.reject(record, parsed)
            elif record.key != parsed.user_id.encode():
                # State is partitioned by the record key; a missing or mismatched key would
                # split a listener's state across partitions (and workers).
                shown = "no key" if record.key is None else f"key {record.key[:64]!r}"
                outcomes[i] = self.reject(
                    record,
                    Rejection(
                        "key_mismatch",
                        f"record has {shown}, user_id is {escape_text(parsed.user_id, 64)}",
                    ),
                )
            else:
                wrong = partition_problem(record.key, record.partition, self.partitions)
                if wrong is not None:
                    outcomes[i] = self.reject(record, wrong)
                else:
                    events.append((i, parsed))
        t1 = clock()
        applied: list[tuple[int, PlayEvent, SessionUpdate]] = []
        for i, event in events:
            try:
                if before_state is not None:
                    before_state(i)
                update = self._apply_session(records[i], event)
            except Exception as exc:  # noqa: BLE001 - a bug must not kill the stream
                outcomes[i] = self._internal_error(records[i], exc)
                continue
            if update.duplicate:
                outcomes[i] = Outcome("duplicate", event=event, update=update)
            else:
                applied.append((i, event, update))
        t2 = clock()
        learn = rank = enqueue = 0.0
        for i, event, update in applied:
            try:
                outcomes[i], times = self._learn_and_rank(records[i], event, update, now_ms)
            except Exception as exc:  # noqa: BLE001
                outcomes[i] = self._internal_error(records[i], exc)
                continue
            learn += times[0]
            rank += times[1]
            enqueue += times[2]
        if stages is not None:
            for name, seconds in (("decode", t1 - t0), ("session", t2 - t1), ("learn", learn),
                                  ("rank", rank), ("enqueue", enqueue)):
                if seconds or name in ("decode", "session"):
                    stages[name] = stages.get(name, 0.0) + seconds
        out: list[Outcome] = outcomes  # type: ignore[assignment]  # every slot is set
        return out

    def _internal_error(self, record: Record, exc: Exception) -> Outcome:
        logger.exception(
            "unexpected error on %s[%d]@%d", record.topic, record.partition, record.offset,
            exc_info=exc,
        )
        return self.reject(record, Rejection("internal_error", repr(exc)[:500]))

    def _apply_session(self, record: Record, event: PlayEvent) -> SessionUpdate:
        stored = self.table.get(event.user_id)
        # the worker's table holds UserState objects (serialised by a codec on the changelog);
        # plain dicts are accepted too (older changelog entries, simple test tables)
        state = UserState.from_dict(stored) if isinstance(stored, dict) else stored
        update = update_session(
            state,
            event,
            gap_ms=self.gap_ms,
            max_recent=self.settings.max_recent,
            max_seen=self.settings.max_seen,
            position=(record.partition, record.offset) if record.offset >= 0 else None,
        )
        if update.duplicate:
            # a table with a persistent store (stream.changelog) may hold this state without
            # its changelog record having gone out before a crash: send it again
            resend = getattr(self.table, "resend", None)
            if resend is not None:
                resend(event.user_id)
            if self.defer_ranking and state is not None:
                # A replay after a crash: the state has this play, but the worker that applied
                # it may have died before its Redis flush. Re-publish the listener's current
                # list (same seq: the guard accepts it) so Redis always catches up.
                self.pending_rank.setdefault(event.user_id, (event, state, None))
            return update
        self.table[event.user_id] = update.state
        if self.max_sessions:  # dropped by evict_sessions (through the table), not here
            order, user = self.session_order, event.user_id
            h = hash(user) & SHARD_MASK
            shard = order.shards[h]
            if user in shard:  # order.move_to_end(user), inlined
                shard.move_to_end(user)
                order.stamps[h][user] = order.next_stamp()
            else:
                order.touch(user, None)
        return update

    def _learn_and_rank(
        self, record: Record, event: PlayEvent, update: SessionUpdate, now_ms: int
    ) -> tuple[Outcome, tuple[float, float, float]]:
        """Learn one applied play, then rank (or queue the ranking). Returns the outcome
        and the seconds spent learning, ranking and enqueueing."""
        clock = time.perf_counter
        t0 = clock()
        self.catalog.observe(
            event.track_id, event.track_name, event.artist_name, event.album_name,
            ts_ms=event.ts_ms,
        )
        user = event.user_id
        previous = self.last_recs.shards[hash(user) & SHARD_MASK].get(user)  # .get, inlined
        if self.evaluator is not None and previous is not None:
            # test-then-train: was this play in the list we published before it?
            self.evaluator.observe("blend", previous, event.track_id)
        if self.components is not None and previous is not None:
            try:  # the single components' lists for the same play, before learning it
                self.components.observe(self.evaluator, self.recommender, update.before,
                                        event.track_id, event.ts_ms)
            except Exception as exc:  # noqa: BLE001 - a ranking bug must not lose the play
                self._model_error(exc, record)
        try:
            result = self.recommender.learn_one(update, event)
            skip_p = getattr(result, "skip_probability", None)
            if self.evaluator is not None and skip_p is not None:
                self.evaluator.observe_skip(float(skip_p), update.is_skip)
            if self.max_tracks and self.recommender.catalogue_size() > self.max_tracks:
                if self.defer_eviction:
                    self.eviction_due = True
                else:
                    self._evict()
        except Exception as exc:  # noqa: BLE001 - a model bug must not lose the play
            # the session state is already applied (and will be changelogged): the play
            # counts; only the model update is missed. Counted and logged, never dead-lettered.
            self._model_error(exc, record)
            return (Outcome("processed", event=event, update=update, model_error=exc),
                    (clock() - t0, 0.0, 0.0))
        t1 = clock()
        learned = result
        touched = self.touched_tracks
        touched[event.track_id] = None
        if len(touched) > self.max_touched_tracks:
            touched.popitem(last=False)
            self.touched_dropped += 1
        if self.defer_ranking:
            # rank later, once per listener per ranking pass (see rank_pending): a burst of plays
            # from one listener costs one ranking, and the agent never waits for it
            self._queue_rank(event.user_id, (event, update.state, record.timestamp_ms))
            self._refreshing.discard(event.user_id)
            # positional (outcome, event, update, recs, rejection, model_error, learned):
            # keywords cost ~0.3 us of every play
            return (Outcome("processed", event, update, None, None, None, learned),
                    (t1 - t0, 0.0, clock() - t1))
        try:
            recs = self.recommender.recommend(update.state, self.settings.top_k, now_ms)
        except Exception as exc:  # noqa: BLE001
            self._model_error(exc, record)
            return (Outcome("processed", event=event, update=update, model_error=exc,
                            learned=learned), (t1 - t0, clock() - t1, 0.0))
        t2 = clock()
        self._publish(event, update.state, recs, record.timestamp_ms)
        return (Outcome("processed", event=event, update=update, recs=recs, learned=learned),
                (t1 - t0, t2 - t1, clock() - t2))

    def evict_due(self) -> None:
        """Run the eviction :attr:`eviction_due` asks for (see ``defer_eviction``) here and
        now (:meth:`eviction_steps`, every step)."""
        drain(self.eviction_steps())

    def eviction_steps(self) -> EvictionSteps[None]:
        """The eviction :attr:`eviction_due` asks for, in steps
        (:data:`stream.core.models._vocab.EvictionSteps`; the worker runs the slices on its
        event loop between its other work and the compiled passes in a thread:
        stream.worker.eviction). Touches the models, ``touched_tracks`` and
        ``similar_refreshed`` only; the caller keeps every other user of those away until
        the last step has run."""
        if self.eviction_due:
            self.eviction_due = False
            if self.max_tracks and self.recommender.catalogue_size() > self.max_tracks:
                yield from self._evict_steps()

    def _evict(self) -> None:
        drain(self._evict_steps())

    def _evict_steps(self) -> EvictionSteps[None]:
        """Bound the catalogue (hostile or just huge): drop the least popular 10 % of the
        allowed size in one go, so eviction runs rarely. ``eviction_seconds`` gets its
        wall time, from the first step to the last."""
        started = time.perf_counter()
        evicted: list[str] = []
        n = yield from self.recommender.eviction_steps(int(self.max_tracks * 0.9),
                                                       on_evicted=evicted.extend)
        yield from self._forget_tracks_steps(evicted)
        self.evicted_tracks += n
        self.eviction_seconds.append(time.perf_counter() - started)
        logger.info(
            "catalogue above max_tracks=%d: evicted %d least popular tracks in %.0f ms",
            self.max_tracks,
            n,
            (time.perf_counter() - started) * 1000,
        )

    def _forget_tracks_steps(self, track_ids: list[str]) -> EvictionSteps[None]:
        """Evicted tracks: no "more like this" refresh is due for them any more. In slices
        of :data:`FORGET_SLICE` tracks (or one shard of ``similar_refreshed``): done in one
        piece, the ~50k evicted tracks of an eviction at the 500k cap held the event loop
        52-79 ms of its own CPU in the 1M junk drill (docs/benchmarks.md, "The 1M drill of
        session 16")."""
        touched, refreshed = self.touched_tracks, self.similar_refreshed
        vocabulary = getattr(self.recommender, "vocabulary", None)
        if vocabulary is not None and len(track_ids) > len(touched) + len(refreshed):
            index = vocabulary.index  # walk the smaller side
            for track in [t for t in touched if t not in index]:
                del touched[track]
            yield None
            for shard in refreshed.shards:
                for track in [t for t in shard if t not in index]:
                    del shard[track]
                yield None
            return
        for lo in range(0, len(track_ids), FORGET_SLICE):
            part = track_ids[lo : lo + FORGET_SLICE]
            deque(map(touched.pop, part, repeat(None)), maxlen=0)
            deque(map(refreshed.pop, part, repeat(None)), maxlen=0)
            yield None

    def _queue_rank(self, user: str, entry: tuple[PlayEvent, UserState, int | None]) -> None:
        """Queue a listener's ranking: a first play (a never-seen id) waits behind the
        listeners with a history, in a bounded queue (see ``pending_first``)."""
        if entry[1].plays_total <= 1 and user not in self.pending_rank:
            first = self.pending_first
            first[user] = entry
            if len(first) > MAX_PENDING_FIRST:
                first.popitem(last=False)
                self.rank_shed += 1
            return
        self.pending_first.pop(user, None)
        self.pending_rank[user] = entry

    def rank_waiting(self) -> bool:
        """Whether any listener waits to be ranked."""
        return bool(self.pending_rank or self.pending_first)

    def rank_pending(
        self, on_ranked: Callable[[float], None] | None = None, budget_s: float | None = None
    ) -> int:
        """Rank the listeners with new plays since the last call and submit their lists.

        Called by the worker's ranker (stream.worker.ranker) whenever the pacing says so
        (stream.processing.pacing) (``Recommender.recommend_many`` over them; one by one if
        that raises, so a listener whose ranking fails loses only their own update).
        Listeners with a history first, then first plays. Without ``budget_s`` every
        waiting listener is ranked; with it, only as many as fit in it, judged after each
        listener (:meth:`_rank_budgeted`; at least one): a ranking scans the catalogue's factors,
        ~5-10 ms a listener at 300k+ tracks, so ranking a backlog of thousands at once held
        the event loop for up to 56 s in the junk-ids drill. The rest wait for the next
        call. ``on_ranked`` gets each listener's share of the
        ranking time. Returns how many were ranked."""
        if not (self.pending_rank or self.pending_first):
            return 0
        now_ms = int(self.clock() * 1000)
        started = time.perf_counter()
        entries: list[tuple[PlayEvent, UserState, int | None]] = []
        ranked: list[list[RankedItem] | None] = []
        if budget_s is None:
            entries = [*self.pending_rank.values(), *self.pending_first.values()]
            self.pending_rank, self.pending_first = OrderedDict(), OrderedDict()
            ranked = self._rank_entries(entries, now_ms)
        else:
            entries, ranked = self._rank_budgeted(budget_s, started, now_ms)
        per_listener = (time.perf_counter() - started) / len(entries)
        self.rank_cost_s = 0.7 * self.rank_cost_s + 0.3 * per_listener
        refreshing = self._refreshing
        for (event, state, ingest_ts), recs in zip(entries, ranked, strict=True):
            user = event.user_id
            was_refresh = user in refreshing
            if was_refresh:
                refreshing.discard(user)
            if recs is None:
                continue
            fresh = event.event_id == state.last_event_id and not was_refresh
            self._publish(event, state, recs, ingest_ts, fresh=fresh)
            if on_ranked is not None:
                on_ranked(per_listener)
        return len(entries)

    def _rank_budgeted(
        self, budget_s: float, started: float, now_ms: int
    ) -> tuple[list[tuple[PlayEvent, UserState, int | None]], list[list[RankedItem] | None]]:
        """Rank waiting listeners (history first) until the next one would pass ``budget_s``
        since ``started``: one listener first, then sub-chunks of up to RANK_SUB_CHUNK sized
        by the dearest listener of this call so far (the batched kernel ranks a sub-chunk
        in one call). One listener's cost varies by 100x (a
        first play against a long history, each scanning 500k tracks' factors, and a
        loaded machine's wall time on top), so a chunk sized from an earlier average held
        the loop for 7.8 s, and a fixed sub-chunk of 8 for 74-113 ms: now a call ends
        within its budget unless one listener alone costs more than the dearest before
        it (or a sub-chunk's listeners cost more than twice that). At least one listener is
        ranked."""
        entries: list[tuple[PlayEvent, UserState, int | None]] = []
        ranked: list[list[RankedItem] | None] = []
        dearest = 0.0
        while (self.pending_rank or self.pending_first) and len(entries) < MAX_RANK_CHUNK:
            left = budget_s - (time.perf_counter() - started)
            if entries and left < dearest:
                break
            # a sub-chunk predicted to take at most half of what is left: within the budget
            # while no listener costs more than twice the dearest before it
            size = 1 if not entries else min(RANK_SUB_CHUNK, MAX_RANK_CHUNK - len(entries),
                                              max(1, int(left / (2 * max(dearest, 1e-6)))))
            chunk: list[tuple[PlayEvent, UserState, int | None]] = []
            for queue in (self.pending_rank, self.pending_first):
                while queue and len(chunk) < size:
                    chunk.append(queue.popitem(last=False)[1])
            t0 = time.perf_counter()
            ranked += self._rank_entries(chunk, now_ms)
            dearest = max(dearest, (time.perf_counter() - t0) / len(chunk))
            entries += chunk
        return entries, ranked

    def _rank_entries(self, entries: list[tuple[PlayEvent, UserState, int | None]],
                      now_ms: int) -> list[list[RankedItem] | None]:
        """The lists of ``entries`` (``rank_items_many``, else ``recommend_many``; one by
        one if that raises)."""
        many = (getattr(self.recommender, "rank_items_many", None)
                or getattr(self.recommender, "recommend_many", None))
        if many is not None:
            try:
                return list(many([e[1] for e in entries], self.settings.top_k, now_ms))
            except Exception as exc:  # noqa: BLE001 - then one by one (below)
                self._model_error(exc, None)
        return [self._rank_one(state, now_ms) for _, state, _ in entries]

    def _rank_one(self, state: UserState, now_ms: int) -> list[RankedItem] | None:
        try:
            return list(self.recommender.recommend(state, self.settings.top_k, now_ms))
        except Exception as exc:  # noqa: BLE001
            self._model_error(exc, None)
            return None

    def similar_due(
        self, now: float, limit: int = 50, budget_s: float | None = None
    ) -> list[tuple[str, bytes]]:
        """Refresh the "more like this" lists of recently played tracks: at most ``limit``
        per call and, with ``budget_s``, only while this call has used less than that much
        time (each list scans the MF factors of the whole catalogue: background work must
        not starve the plays); each track at most once per ``similar_refresh_s``; the
        longest-waiting tracks first. Returns (key, JSON)."""
        out: list[tuple[str, bytes]] = []
        interval = self.settings.similar_refresh_s
        started = time.perf_counter()
        for track in list(self.touched_tracks):
            if len(out) >= limit:
                break
            if budget_s is not None and time.perf_counter() - started > budget_s:
                break
            if now - self.similar_refreshed.get(track, -1e18) < interval:
                continue
            del self.touched_tracks[track]
            self.similar_refreshed[track] = now
            try:
                items = self.recommender.similar(track, self.settings.top_k)
            except Exception as exc:  # noqa: BLE001
                self._model_error(exc, None)
                continue
            if not items:  # nothing to say about it (yet): no key for it
                self.similar_empty += 1
                continue
            doc = encode_similar(track, self.catalog.items(items),
                                 model_version=self.recommender.model_version,
                                 generated_at_ms=int(now * 1000))
            out.append((f"{self.settings.similar_prefix}{track}", doc))
        if len(self.similar_refreshed) > 4 * self.max_tracked_users:
            self.similar_refreshed.clear()  # bounded; worst case a list refreshes early
        return out

    def _publish(
        self,
        event: PlayEvent,
        state: UserState,
        recs: Sequence[RankedItem],
        ingest: int | None,
        fresh: bool = True,
    ) -> None:
        recs = self._top_up(event, state, recs)
        self._remember(event.user_id, tuple([r[0] for r in recs]))  # r[0]: track_id
        self.submit(self.make_write(event, state, recs, ingest, fresh=fresh))

    def _top_up(
        self, event: PlayEvent, state: UserState, recs: Sequence[RankedItem]
    ) -> Sequence[RankedItem]:
        """A list shorter than top_k is filled from trending (reason ``trending_topup``);
        a listener whose list is still short is remembered for refresh_short_lists."""
        k = self.settings.top_k
        user = state.user_id
        if len(recs) < k:
            recent_filter = getattr(self.recommender, "recent_filter", 0)
            avoid = set(state.recent[-recent_filter:]) if recent_filter else set()
            trending = self.recommender.trending(k + len(avoid) + len(recs))
            recs = top_up(recs, trending, k, avoid)
        if len(recs) < k:
            self.short_lists[user] = (event, state, self.recommender.catalogue_size())
            self.short_lists.move_to_end(user)
            if len(self.short_lists) > min(self.max_tracked_users, MAX_SHORT_LISTS):
                self.short_lists.popitem(last=False)
        else:
            self.short_lists.pop(user, None)
        return recs

    def refresh_short_lists(self, limit: int = 500) -> int:
        """Queue for re-ranking (with the next flush) up to ``limit`` listeners whose list
        came out shorter than top_k and for whom the catalogue has grown since (the
        bounded background refresh: the worker calls this every ``short_refresh_s``).
        Their documents keep their ``seq``. Returns how many were queued."""
        size = self.recommender.catalogue_size()
        queued = 0
        for user, (event, state, seen_size) in list(self.short_lists.items()):
            if queued >= limit:
                break
            if seen_size >= size or user in self.pending_rank or user in self.pending_first:
                continue
            self.short_lists[user] = (event, state, size)
            self.pending_rank[user] = (event, state, None)
            self._refreshing.add(user)
            queued += 1
        return queued

    def take_evicted_tracks(self) -> int:
        """Tracks evicted since the last call (for the metrics)."""
        n, self.evicted_tracks = self.evicted_tracks, 0
        return n

    def report_model_error(self, exc: Exception, record: Record | None) -> None:
        """Count and log (bounded) a model error outside the batch (e.g. an eviction)."""
        self._model_error(exc, record)

    def _model_error(self, exc: Exception, record: Record | None) -> None:
        self.model_errors += 1
        if self.model_errors <= 10 or self.model_errors % 1000 == 0:
            where = f"{record.topic}[{record.partition}]@{record.offset}" if record else "ranking"
            logger.error("model error #%d at %s: %r", self.model_errors, where, exc, exc_info=exc)

    def _remember(self, user_id: str, track_ids: tuple[str, ...]) -> None:
        # the most recent; past max_tracked_users the least recent goes (a cap of 0 keeps
        # nothing, as the OrderedDict did)
        last_recs = self.last_recs
        last_recs.touch(user_id, track_ids, self.max_tracked_users)
        if not self.max_tracked_users:
            last_recs.clear()

    def forget_user(self, user_id: str) -> bool:
        """Purge a listener: session state (a changelog tombstone, so a restart cannot
        resurrect it) and user-side model parameters. Returns whether state existed.
        The caller deletes the Redis document."""
        self._drop_queued(user_id)
        stored = self.table.get(user_id)
        existed = stored is not None
        if existed:
            del self.table[user_id]  # with it their model record (UserState.model)
        self.session_order.pop(user_id, None)
        forget = getattr(self.recommender, "forget_user", None)
        if callable(forget):
            if isinstance(stored, UserState):  # its session token names their STAN link
                forget(user_id, stored)
            else:
                forget(user_id)
        return existed

    def forget_model_state(self, user_id: str) -> bool:
        """Drop what this process holds about a listener *outside* the session table:
        their user-side model state (MF factors, own history, session-kNN link), queued
        ranking and remembered lists. For a forget another worker applied (its broadcast
        on the signals topic): this worker may hold their model state from a shared
        checkpoint or from before a rebalance, never their session (not its partition).
        Returns whether the models held anything."""
        self._drop_queued(user_id)
        forget = getattr(self.recommender, "forget_user", None)
        return bool(forget(user_id)) if callable(forget) else False

    def _drop_queued(self, user_id: str) -> None:
        """Forget a listener's queued ranking and remembered lists (not their session)."""
        self.last_recs.pop(user_id, None)
        self.pending_rank.pop(user_id, None)
        self.pending_first.pop(user_id, None)
        self._refreshing.discard(user_id)
        self.short_lists.pop(user_id, None)

    def sessions_over(self) -> int:
        """How many listeners the session table holds above ``max_sessions`` (0 if none
        or unbounded), counting only those this processor has seen play."""
        if not self.max_sessions:
            return 0
        return max(0, len(self.session_order) - self.max_sessions)

    def track_sessions(self, users: Sequence[str]) -> int:
        """Put listeners already in the table (restored from the changelog: no play seen
        here yet) into the eviction order as the least recent. Returns how many were new."""
        order, added = self.session_order, 0
        for user in users:
            if user not in order:
                order[user] = None
                order.move_to_end(user, last=False)
                added += 1
        return added

    def evict_sessions(
        self,
        limit: int,
        delete: Callable[[str, int, bool], object] | None = None,
        owned: Callable[[int], bool] | None = None,
    ) -> list[str]:
        """Keep the session table at ``max_sessions``: evict up to ``limit`` of the least
        recently active listeners above it (bounded work per call). Each is deleted
        *through the table* -- ``delete(user, partition, changelog)``, by default
        ``del table[user]`` -- so the changelog gets a tombstone and a restart does not
        bring them back; a listener on a partition this worker no longer owns
        (``owned(partition)`` false: revoked in a rebalance) leaves only this process's
        memory. Their queued ranking and remembered list go too (their model state stays,
        bounded by ``max_users``). Returns the evicted listeners on owned partitions: the
        caller deletes their Redis lists, so a returning listener starts at seq 1 with no
        document the seq guard would hold against them."""
        out: list[str] = []
        order = self.session_order
        n = 0
        while n < limit and self.max_sessions and len(order) > self.max_sessions:
            user, _ = order.drop_oldest()
            n += 1
            state = self.table.get(user)
            if state is None:
                continue  # forgotten already
            partition = getattr(state, "last_partition", -1)
            if isinstance(state, dict):
                partition = int(state.get("last_partition", -1))
            mine = owned is None or owned(partition)
            if delete is None:
                del self.table[user]
            else:
                delete(user, partition, mine)
            self.last_recs.pop(user, None)
            self.pending_rank.pop(user, None)
            self.pending_first.pop(user, None)
            self.short_lists.pop(user, None)
            self._refreshing.discard(user)
            if mine:
                out.append(user)
        self.sessions_evicted += len(out)
        return out

    def redis_key(self, user_id: str) -> str:
        return f"{self.settings.redis_prefix}{user_id}"

    def make_write(
        self,
        event: PlayEvent,
        state: UserState,
        recs: Sequence[RankedItem],
        ingest_ts_ms: int | None,
        fresh: bool = True,
    ) -> PendingWrite:
        doc, note = encode_document(
            user_id=event.user_id,
            seq=state.seq,
            items=self.catalog.items(recs),
            generated_at_ms=int(self.clock() * 1000),
            event_ts_ms=state.last_event_ts_ms,
            event_id=state.last_event_id,
            model_version=self.recommender.model_version,
            lineage=self.settings.app_id,
            session=session_summary(state),
        )
        return PendingWrite(  # positional, in field order (keywords: ~1 us per write)
            self.redis_key(event.user_id),  # key
            state.seq,  # seq
            doc,  # doc
            note,  # notification
            state.last_event_ts_ms,  # event_ts_ms
            ingest_ts_ms,  # ingest_ts_ms
            time.perf_counter(),  # enqueued_at
            self.settings.app_id,  # lineage
            fresh,  # fresh
        )
