"""N workers learn as one (issue #17), in the pure core: the listener/item state split,
item steps replicated through signals, and replaying the signals topic after a restore
without a gap or a double count."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import numpy as np
import orjson
import pytest

from stream.core.checkpoint import pack_state
from stream.core.events import PlayEvent
from stream.core.listener_record import decode_listener_record, encode_listener_record
from stream.core.models.blend import N_FEATURES
from stream.core.recommender import Recommender
from stream.core.session import UserState, update_session
from stream.core.signal_positions import Restored, SignalPositions
from stream.processing.replication import (
    SIGNAL_REJECTION_REASONS,
    TrackSignal,
    apply_signals,
    decode_batch,
    encode_batch,
    signal_from,
)
from stream.tools.replay import replay
from stream.tools.simulate import partition_of, replay_workers

T0 = 1_700_000_000_000


def plays(n: int = 600, users: int = 12, tracks: int = 40, prefix: str = "u"
          ) -> list[PlayEvent]:
    """Listeners with short sessions over a small catalogue, in time order."""
    out = []
    for i in range(n):
        u = i % users
        out.append(PlayEvent(f"{prefix}{u}", f"t{(i * 7 + u * 3) % tracks}", T0 + i * 20_000,
                             200_000 if i % 5 else 10_000, f"e{i}", artist_id=f"a{i % 6}",
                             context="radio" if i % 3 else "search"))
    return out


def learn(rec: Recommender, states: dict[str, UserState], event: PlayEvent) -> TrackSignal:
    update = update_session(states.get(event.user_id), event)
    learned = rec.learn_one(update, event)
    states[event.user_id] = update.state
    return signal_from("w", update, event, learned)


def by_track(rec: Recommender, values: np.ndarray) -> dict[str, float]:
    ids = rec.vocabulary.ids
    return {ids[r]: float(values[r]) for r in range(len(ids))}


# -- the listener record ------------------------------------------------------------------


def test_listener_record_round_trips_and_rejects_bad_input() -> None:
    vec = np.linspace(-1, 1, 8).astype(np.float32)
    rec = encode_listener_record(vec, ["t1", "t2"])
    got, own = decode_listener_record(rec, n_factors=8, max_own=4)
    assert got is not None and np.array_equal(got, vec) and own == ["t1", "t2"]
    assert orjson.loads(orjson.dumps({"m": rec}))["m"] == rec  # JSON-safe as it is
    assert encode_listener_record(None) == ""
    # the factors-only record (the common one, with a fast path) is the same bytes as the
    # general layout, from a float32 vector, a big-endian one or a strided view alike
    general = base64.b64encode(b"L1" + (8).to_bytes(2, "little")
                               + vec.astype("<f4").tobytes() + b"\0").decode()
    wide = np.repeat(vec, 2)[::2]
    for v in (vec, vec.astype(">f4"), vec.astype(np.float64), wide):
        assert encode_listener_record(v) == general
    bad_vec = base64.b64encode(b"L1" + (1).to_bytes(2, "little")
                               + np.array([np.nan], "<f4").tobytes() + b"\0").decode()
    for record, field_name in [
        ("not base64!", "not base64"),
        (base64.b64encode(b"XX").decode(), "unknown format"),
        (rec, "the model has 4"),  # another n_factors
        (rec + "AAAA", "trailing"),
        (bad_vec, "not finite"),
        (encode_listener_record(vec, ["t1", "t2", "t3"]), "at most 2"),
    ]:
        with pytest.raises(ValueError, match=field_name):
            decode_listener_record(record, n_factors=4 if field_name.startswith("the")
                                   else (1 if record is bad_vec else 8), max_own=2)


# -- the state split ----------------------------------------------------------------------


def test_listener_state_lives_in_the_session_and_not_in_the_item_checkpoint() -> None:
    rec = Recommender(seed=1, repeats=3)
    states: dict[str, UserState] = {}
    for e in plays(300, prefix="listener-name-"):
        learn(rec, states, e)
    for user, state in states.items():  # learning keeps each session's record current
        factors, own = decode_listener_record(state.model, n_factors=rec.n_factors,
                                              max_own=3)
        assert factors is not None and np.array_equal(factors, rec.mf.user_factors[user])
        assert own == list(rec.own_history[user])
    manifest, arrays = rec.export_state(users=False)
    assert arrays["mf.user_factors"].shape == (0, rec.n_factors)
    assert len(arrays["own_history.counts"]) == 0
    blob = pack_state(manifest, arrays)
    assert not any(u.encode() in blob for u in states)  # no listener id at all
    # P3: the record adds ~180 bytes to a listener's changelog value
    sizes = [len(orjson.dumps(s.to_dict())) - len(orjson.dumps(
        {**s.to_dict(), "model": ""})) for s in states.values()]
    assert max(sizes) < 260


def test_item_checkpoint_plus_sessions_ranks_like_the_whole_model() -> None:
    rec = Recommender(seed=2)
    states: dict[str, UserState] = {}
    for e in plays(400):
        learn(rec, states, e)
    twin = Recommender.import_state(*rec.export_state(users=False))
    assert not twin.mf.user_factors
    now = T0 + 10**7
    for state in states.values():  # the listener's factors come from their session
        assert twin.recommend(state, 10, now) == rec.recommend(state, 10, now)
        assert twin.recommend(state, 10, now, variant="mf") == rec.recommend(
            state, 10, now, variant="mf")


def test_a_listener_moving_to_another_worker_keeps_their_factors() -> None:
    """Rebalance continuity in the core: the new owner takes the listener's factors from
    the session that moved with them and continues learning from them."""
    a, b = Recommender(seed=3), Recommender(seed=4)
    states: dict[str, UserState] = {}
    events = plays(400)
    for e in events[:300]:
        sig = learn(a, states, e)
        b.apply_item_steps([sig])
    mover = "u5"
    before = a.mf.user_factors[mover].copy()
    state = states[mover]
    assert mover not in b.mf.user_factors
    # b ranks them with their own factors before learning anything of them
    b_user = b._user_vector(state)
    assert b_user is not None and np.array_equal(b_user, before)
    nxt = next(e for e in events[300:] if e.user_id == mover)
    update = update_session(state, nxt)
    b.learn_one(update, nxt)
    after = b.mf.user_factors[mover]
    assert not np.array_equal(after, before)  # learned on from there
    assert np.linalg.norm(after - before) < 0.5 * np.linalg.norm(before)
    assert update.state.model == b.export_user(mover)


def test_a_bad_record_in_a_session_is_ignored_not_fatal() -> None:
    rec = Recommender(seed=0)
    state = UserState("u1", model="garbage")
    up = update_session(state, PlayEvent("u1", "t1", T0, 200_000, "e1"))
    rec.learn_one(up)  # a fresh start for this listener
    assert "u1" in rec.mf.user_factors and up.state.model != "garbage"


# -- item steps ---------------------------------------------------------------------------


def test_a_receiver_takes_exactly_the_owners_item_step() -> None:
    """From the same item state, the step a signal carries (through encode/decode) moves
    the receiver's MF item factors, trending, co-occurrence and skip model exactly as
    learning the play moved the owner's."""
    owner = Recommender(seed=5)
    states: dict[str, UserState] = {}
    events = plays(500, tracks=30)
    for e in events[:450]:
        learn(owner, states, e)
    receiver = Recommender.import_state(*owner.export_state())
    sigs = [learn(owner, states, e) for e in events[450:]]
    decoded = decode_batch(encode_batch("w", sigs), now_ms=T0 + 10**8)
    assert not decoded.rejected and len(decoded.signals) == len(sigs)
    counts = apply_signals(receiver, decoded.signals)
    assert (counts.applied, counts.errors) == (len(sigs), 0)
    assert receiver.vocabulary.ids == owner.vocabulary.ids
    n = len(owner.vocabulary)
    np.testing.assert_array_equal(receiver.mf.item_factors[:n], owner.mf.item_factors[:n])
    np.testing.assert_allclose(receiver.popularity.weights(), owner.popularity.weights())
    assert receiver.skip.classifier.weights == pytest.approx(owner.skip.classifier.weights)
    for t in ("t1", "t7"):
        assert receiver.similar(t, 5) == owner.similar(t, 5)
    # the listener's own factors were not touched on the receiver
    for user, vec in receiver.mf.user_factors.items():
        assert not np.array_equal(vec, owner.mf.user_factors[user]) or user not in {
            e.user_id for e in events[450:]}


def test_a_receiver_takes_exactly_the_owners_blend_step() -> None:
    """The learned blend's weights are shared item-side state too (issue #17: a per-worker
    blend learned from 1/N of the plays cost 30Music MRR@10 3-6 %): its example rows travel
    in the signal and the receiver's blend ends with the owner's weights, bit for bit."""
    owner = Recommender(seed=5)
    states: dict[str, UserState] = {}
    events = plays(120, tracks=40)
    for e in events[:50]:
        learn(owner, states, e)
    receiver = Recommender.import_state(*owner.export_state())
    before = owner.ranker.weights
    sigs = [learn(owner, states, e) for e in events[50:]]
    stepped = [s for s in sigs if s.blend_pairs is not None]
    assert len(stepped) >= 20 and all(s.blend_pairs.shape[1] == N_FEATURES for s in stepped)
    assert not np.array_equal(owner.ranker.weights, before)
    decoded = decode_batch(encode_batch("w", sigs), now_ms=T0 + 10**8)
    assert not decoded.rejected
    assert apply_signals(receiver, decoded.signals).applied == len(sigs)
    np.testing.assert_array_equal(receiver.ranker.weights, owner.ranker.weights)
    assert receiver.ranker.n_pairs == owner.ranker.n_pairs
    # a receiver ranking with the fixed blend ignores the pairs (its blend does not learn)
    fixed = Recommender.import_state(*owner.export_state())
    fixed.use_ranker("fixed")
    kept = fixed.ranker.weights
    apply_signals(fixed, decoded.signals)
    np.testing.assert_array_equal(fixed.ranker.weights, kept)


def test_blend_rows_of_another_loss_or_feature_count_are_dropped_alone() -> None:
    """A mixed fleet (a rolling upgrade, another ``blend_params``): the blend rows travel
    tagged with their loss and feature count (``g``); a receiver whose blend differs, or
    that gets the untagged ``b`` of an earlier sender, leaves out the rows only (counted by
    reason) and applies the rest of the signal. Senders no longer write ``b``, so earlier
    receivers ignore the rows instead of applying another loss's or refusing the signal."""
    owner = Recommender(seed=5, blend_params={"loss": "pairwise", "lr_decay": 0.0})
    states: dict[str, UserState] = {}
    events = plays(120, tracks=40)
    for e in events[:50]:
        learn(owner, states, e)
    manifest, arrays = owner.export_state()
    softmax = Recommender.import_state(manifest, arrays)
    softmax.ranker = type(softmax.ranker)(seed=5)  # the receiver learns with softmax
    same = Recommender.import_state(manifest, arrays)
    sigs = [learn(owner, states, e) for e in events[50:]]
    stepped = sum(s.blend_pairs is not None for s in sigs)
    assert stepped >= 20 and {s.blend_loss for s in sigs if s.blend_pairs is not None} == {
        "pairwise"}
    raw = encode_batch("w", sigs)
    assert b'"b":' not in raw and raw.count(b'"g":') == stepped
    decoded = decode_batch(raw, now_ms=T0 + 10**8)
    kept = softmax.ranker.weights
    counts = apply_signals(softmax, decoded.signals)
    assert (counts.applied, counts.errors) == (len(sigs), 0)
    assert counts.blend_dropped == ["blend_loss"] * stepped
    np.testing.assert_array_equal(softmax.ranker.weights, kept)
    assert softmax.ranker.n_pairs == 0 and softmax.vocabulary.ids == owner.vocabulary.ids
    counts = apply_signals(same, decoded.signals)  # the same loss: the owner's step
    assert counts.blend_dropped == [] and counts.applied == len(sigs)
    np.testing.assert_array_equal(same.ranker.weights, owner.ranker.weights)
    # another feature count, an unknown loss, an untagged "b": the rest of it applies
    good = {"t": "t1", "ts": T0, "s": False}
    entries = [({**good, "t": "x1", "g": g(np.ones(31), n=31)}, "blend_features"),
               ({**good, "t": "x2", "g": g(np.ones(N_FEATURES), loss="listwise")}, "blend_loss"),
               ({**good, "t": "x3", "b": g(np.ones(31))["r"]}, "blend_untagged")]
    decoded = decode_batch(orjson.dumps({"w": "w2", "signals": [e for e, _ in entries]}),
                           now_ms=T0)
    assert decoded.rejected == [] and all(s.blend_pairs is None for s in decoded.signals)
    kept = softmax.ranker.weights
    counts = apply_signals(softmax, decoded.signals)
    assert counts.blend_dropped == [r for _, r in entries] and counts.applied == 3
    assert {"x1", "x2", "x3"} <= set(softmax.vocabulary.index)
    np.testing.assert_array_equal(softmax.ranker.weights, kept)
    assert set(counts.blend_dropped) <= set(SIGNAL_REJECTION_REASONS)


def g(rows: np.ndarray, n: int = N_FEATURES, loss: str = "softmax") -> dict[str, object]:
    """A signal's tagged learned-blend step ``g``."""
    return {"l": loss, "n": n, "r": base64.b64encode(rows.astype("<f4").tobytes()).decode()}


def test_signals_are_validated_as_untrusted_input() -> None:
    good = {"t": "t1", "ts": T0, "s": False}
    nan = base64.b64encode(np.array([np.nan, 1], "<f4").tobytes()).decode()
    cases = [
        ({**good, "f": nan}, "bad_value"),
        ({**good, "f": "!!"}, "bad_value"),
        ({**good, "f": base64.b64encode(b"abc").decode()}, "bad_value"),
        ({**good, "n": ["x"] * 65}, "wrong_type"),
        ({**good, "x": {"evil": 1.0}}, "bad_value"),
        ({**good, "x": {"position": 1e9}}, "bad_value"),
        ({**good, "x": {"position": "1"}}, "wrong_type"),
        ({**good, "p": -2}, "wrong_type"),
        ({**good, "i": "7"}, "wrong_type"),
        ({**good, "g": g(np.ones(22))}, "bad_value"),
        ({**good, "g": g(np.full(N_FEATURES, np.inf))}, "bad_value"),
        ({**good, "g": g(np.full(N_FEATURES, 1e6))}, "bad_value"),
        ({**good, "g": g(np.ones(N_FEATURES * 17))}, "wrong_type"),  # over 16 rows: by length
        ({**good, "g": {**g(np.ones(N_FEATURES)), "r": "x" * 10_000}}, "wrong_type"),
        ({**good, "g": {**g(np.ones(N_FEATURES)), "r": 7}}, "wrong_type"),
        ({**good, "g": {**g(np.ones(N_FEATURES)), "n": 0}}, "wrong_type"),
        ({**good, "g": {**g(np.ones(N_FEATURES)), "n": 10**6}}, "wrong_type"),
        ({**good, "g": {**g(np.ones(N_FEATURES)), "l": 3}}, "wrong_type"),
        ({**good, "g": "rows"}, "wrong_type"),
    ]
    for entry, reason in cases:
        raw = orjson.dumps({"w": "w2", "signals": [entry, good]})
        got = decode_batch(raw, now_ms=T0)
        assert got.rejected == [reason], entry
        assert len(got.signals) == 1  # the good entry survives
    # factors of another size are refused by the model, the rest still applies
    rec = Recommender(seed=0, n_factors=4)
    wrong = TrackSignal("w2", "t1", T0, False, (), factors=np.ones(3, np.float32))
    bad_pairs = TrackSignal("w2", "t3", T0, False, (), blend_pairs=np.ones((1, 5), np.float32))
    nan_pairs = TrackSignal("w2", "t4", T0, False, (), blend_loss="softmax",
                            blend_pairs=np.full((1, N_FEATURES), np.nan, np.float32))
    counts = apply_signals(rec, [wrong, bad_pairs, nan_pairs,
                                 TrackSignal("w2", "t2", T0, False, ())])
    assert (counts.applied, counts.errors) == (1, 3)
    assert "t3" not in rec.vocabulary.index and "t4" not in rec.vocabulary.index
    assert np.isfinite(rec.ranker.weights).all()
    assert "t1" not in rec.vocabulary.index and "t2" in rec.vocabulary.index


# -- restart: replay the signals topic without a gap or a double count ----------------------


@dataclass
class Topic:
    """An in-memory signals topic: per partition, the (key, value) records."""

    partitions: list[list[tuple[str, bytes]]] = field(default_factory=lambda: [[], []])

    def send(self, worker: str, partition: int, sigs: list[TrackSignal]) -> None:
        if sigs:
            self.partitions[partition].append((worker, encode_batch(worker, sigs)))


@dataclass
class Worker:
    name: str
    partition: int
    rec: Recommender
    positions: SignalPositions
    pending: list[TrackSignal] = field(default_factory=list)
    states: dict[str, UserState] = field(default_factory=dict)

    def play(self, event: PlayEvent) -> None:
        update = update_session(self.states.get(event.user_id), event)
        learned = self.rec.learn_one(update, event)
        self.states[event.user_id] = update.state
        self.pending.append(signal_from(self.name, update, event, learned))

    def flush(self, topic: Topic) -> None:
        topic.send(self.name, self.partition, self.pending)
        self.pending = []

    def read(self, topic: Topic, limit: int | None = None) -> None:
        for p, records in enumerate(topic.partitions):
            start = self.positions.offsets.get(p, 0)
            stop = len(records) if limit is None else min(len(records), start + limit)
            for offset in range(start, stop):
                key, value = records[offset]
                if key != self.name:
                    decoded = decode_batch(value, now_ms=T0 + 10**9)
                    keep = [s for s in decoded.signals
                            if self.positions.should_apply(decoded.worker, s.seq)]
                    self.rec.apply_item_steps(keep)
                self.positions.handled(p, offset)


def popularity(rec: Recommender) -> dict[str, float]:
    return by_track(rec, rec.popularity.weights())


@pytest.mark.parametrize("honour_positions", [True, False])
def test_a_restored_worker_replays_signals_without_gap_or_double_count(
    honour_positions: bool,
) -> None:
    """Worker A writes a checkpoint while some of its plays are not sent yet and some of
    B's signals are not read yet; B then crashes and restarts from A's checkpoint. After
    everything is read, the restarted B's item state equals A's (which never stopped).
    Reading the topic from its start instead (ignoring the positions) double-counts."""
    topic = Topic()
    a = Worker("A", 0, Recommender(seed=0), SignalPositions("A"))
    b = Worker("B", 1, Recommender(seed=0), SignalPositions("B"))
    events = plays(600)
    owner = {e.user_id: (a if partition_of(e.user_id, 2) == 0 else b) for e in events}
    for i, e in enumerate(events[:300]):
        owner[e.user_id].play(e)
        if i % 7 == 0:
            a.flush(topic)
        if i % 11 == 0:
            b.flush(topic)
        if i % 13 == 0:
            a.read(topic, limit=1)
            b.read(topic, limit=1)
    # the snapshot: A has unsent plays and unread signals of B at this instant
    assert a.pending and a.positions.offsets.get(1, 0) < len(topic.partitions[1])
    manifest, arrays = a.rec.export_state(users=False)
    saved = Restored.from_manifest(a.positions.checkpoint(a.rec.n_learned).to_manifest())
    b.flush(topic)  # B's last plays reach the topic, then B dies (its sessions survive)
    sessions = b.states
    restored = saved if honour_positions else Restored("A", -1, {})
    b2 = Worker("B2", 1, Recommender.import_state(manifest, arrays),
                SignalPositions("B2", restored), states=sessions)
    for i, e in enumerate(events[300:]):
        w = owner[e.user_id]
        (b2 if w is b else a).play(e)
        if i % 5 == 0:
            a.flush(topic)
            b2.flush(topic)
            a.read(topic)
            b2.read(topic)
    for w in (a, b2):
        w.flush(topic)
    a.read(topic)
    b2.read(topic)
    got, want = popularity(b2.rec), popularity(a.rec)
    assert sum(want.values()) > 0
    if honour_positions:
        assert got.keys() == want.keys()
        assert got == pytest.approx(want, rel=1e-9)
        assert b2.positions.skipped_restored > 0
    else:
        assert sum(got.values()) > sum(want.values()) * 1.05


# -- the simulator ------------------------------------------------------------------------


def test_simulated_single_worker_is_the_plain_replay() -> None:
    events = plays(400)
    plain = replay(events, variants=("blend", "mf")).report
    sim, _ = replay_workers(events, workers=1, signal_delay_ms=1000, partitions=4,
                            variants=("blend", "mf"))
    assert sim["variants"] == plain["variants"] and sim["events"] == plain["events"]
    assert sim["workers"] == 1 and sim["signals"]["sent"] == 0


def test_simulated_workers_are_deterministic_and_exchange_signals() -> None:
    events = plays(400)
    runs = [replay_workers(events, workers=3, signal_delay_ms=1000, partitions=6,
                           variants=("blend",))[0] for _ in range(2)]
    assert runs[0]["variants"] == runs[1]["variants"]
    r = runs[0]
    assert r["workers"] == 3 and sum(r["events_per_worker"]) == r["events"] == 400
    sig = r["signals"]
    assert sig["sent"] == 400 and sig["rejected"] == sig["errors"] == 0
    # all but the last second's plays reached the two other workers
    assert 2 * (400 - 1000 // 20_000 - 1) <= sig["applied"] <= 2 * 400
    users = {e.user_id for e in events}
    owners = {u: partition_of(u, 6) % 3 for u in users}
    assert len(set(owners.values())) > 1


@pytest.mark.parametrize("ranker", ["fixed", "learned"])
def test_without_item_steps_the_models_learn_exactly_the_same(ranker: str) -> None:
    """A worker that sends no signals builds no item steps (emit_item_steps(False)): the
    results carry no step, and everything else -- predictions, the learned state (byte for
    byte), the listeners' records, the lists -- is what the default learning gives."""
    events = plays(500, tracks=30)
    recs = [Recommender(seed=3, blend=ranker, session_models=ranker == "learned")
            for _ in range(2)]
    recs[1].emit_item_steps(False)
    states: list[dict[str, UserState]] = [{}, {}]
    for e in events:
        got = []
        for rec, st in zip(recs, states, strict=True):
            update = update_session(st.get(e.user_id), e)
            got.append(rec.learn_one(update, e))
            st[e.user_id] = update.state
        with_step, without = got
        assert with_step.step is not None and without.step is None
        assert (without.skip_probability, without.skipped, without.drift) == (
            with_step.skip_probability, with_step.skipped, with_step.drift)
    assert recs[0].n_learned == recs[1].n_learned == len(events)
    assert pack_state(*recs[1].export_state()) == pack_state(*recs[0].export_state())
    assert states[1] == states[0]
    now = T0 + 10**7
    for state in states[0].values():
        assert recs[1].recommend(state, 10, now) == recs[0].recommend(state, 10, now)
