"""What one worker tells the others about tracks: compact, item-side learning signals.

Listeners are partitioned across workers (the Kafka way), so each worker sees only its
listeners' plays. Item-side knowledge -- what is trending, what is played after what, the
MF item factors, the skip model -- must still reflect everyone. After learning from a play,
the owning worker publishes a :class:`TrackSignal` to the signals topic: the item step it
took (:class:`stream.core.recommender.ItemStep`: the track, the tracks played before it, skip
flag, time, artist, context, session position, an opaque session token, the listener's MF
factors *before* the step with the negatives it sampled, the skip model's features and
the learned blend's example rows) -- never the listener's id. Every worker reads all
partitions of that topic (no consumer group: a broadcast) and takes the same item step
through
:meth:`stream.core.recommender.Recommender.apply_item_steps` (:func:`receive_batch`). The
listener's own state never leaves its owner's partition (it lives in their session,
:mod:`stream.core.listener_record`). Design and delays: docs/scaling.md. Pure: no I/O here.

>>> sig = TrackSignal("w1", "t9", 1_700_000_000_000, False, ("t1", "t2"), "a1", "radio")
>>> decode_signal(encode_signal(sig), now_ms=1_700_000_000_000) == sig
True
>>> bad = (b'{"w": "w2", "signals": [{"t": "t1", "ts": 1e301, "s": false},'
...        b' {"t": "t2", "ts": 1700000000000, "s": false, "a": {"x": 1}}]}')
>>> decode_batch(bad, now_ms=1_700_000_000_000).rejected
['wrong_type', 'wrong_type']

Messages are validated (:func:`decode_batch`) before anything reaches a model, and are
authenticated by the worker (:mod:`stream.processing.auth`, purpose ``b"signals"``).
"""

from __future__ import annotations

import base64
import binascii
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import orjson

from stream.core.events import (
    MAX_FUTURE_MS,
    MIN_TS_MS,
    REJECTION_REASONS,
    InvalidField,
    PlayEvent,
    check_id,
    check_text,
)
from stream.core.models.blend import LOSSES, MAX_ROW_VALUE, N_FEATURES
from stream.core.models.skip import FEATURE_NAMES
from stream.core.recommender import ITEM_HISTORY, LearnResult, Recommender, same_array
from stream.core.session import SessionUpdate

#: how many preceding tracks travel with a signal (the longest item-side window)
HISTORY_SENT: Final = ITEM_HISTORY
#: the most negatives / factors / skip features one signal may carry
MAX_NEGATIVES: Final = 64
MAX_FACTORS: Final = 1024
#: factor and feature values beyond these are not a trained model's
MAX_FACTOR_VALUE: Final = 1e4
MAX_FEATURE_VALUE: Final = 1e3
MAX_SESSION_TOKEN_LEN: Final = 64
#: the most learned-blend pairs one signal may carry (the blend's ``negatives``, 3 by
#: default), each N_FEATURES float32 values bounded by the blend's MAX_ROW_VALUE (1e3: what
#: its owner applies too)
MAX_BLEND_PAIRS: Final = 16
#: the most features a blend step row may name (a sender with more is dropped as unusable)
MAX_BLEND_FEATURES: Final = 256
#: why a signal's learned-blend rows were left out while the rest of it applied: made by
#: a blend with other features (``blend_features``) or another loss (``blend_loss``), or
#: sent untagged by a worker before the tags (``blend_untagged``: its loss is unknown)
BLEND_DROP_REASONS: Final = ("blend_features", "blend_loss", "blend_untagged")


@dataclass(frozen=True, slots=True)
class TrackSignal:
    worker: str
    track_id: str
    ts_ms: int
    skipped: bool
    history: tuple[str, ...]
    artist_id: str | None = None
    context: str | None = None
    #: position in the listener's session (0: first play), -1 unknown (older senders)
    position: int = -1
    #: opaque session token (stream.core.recommender.session_token), "" unknown
    session: str = ""
    #: the listener's MF factors before the owner's step (float32), None: no MF step
    factors: np.ndarray | None = None
    negatives: tuple[str, ...] = ()
    skip_features: Mapping[str, float] | None = None
    #: the sender's number of this play (its recommender's ``n_learned`` after it), -1
    #: unknown: a checkpoint includes its writer's plays up to a number
    #: (stream.core.signal_positions)
    seq: int = -1
    #: the learned blend's step rows (float32, N_FEATURES) the owner learned from this play:
    #: one softmax gradient row, or one ``x_pos - x_neg`` row per pair with the pairwise
    #: loss (stream.core.models.blend.LearnedBlend.pairs), None: no blend step
    blend_pairs: np.ndarray | None = None
    #: the loss that made ``blend_pairs`` ("softmax", "pairwise"; "" unknown)
    blend_loss: str = ""
    #: why the sender's blend rows were left out on decoding (BLEND_DROP_REASONS), ""
    blend_dropped: str = ""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TrackSignal):
            return NotImplemented
        return (same_array(self.factors, other.factors)
                and same_array(self.blend_pairs, other.blend_pairs)
                and all(getattr(self, f) == getattr(other, f) for f in _COMPARED))

    __hash__ = None  # type: ignore[assignment]


_COMPARED: Final = ("worker", "track_id", "ts_ms", "skipped", "history", "artist_id",
                    "context", "position", "session", "negatives", "skip_features", "seq",
                    "blend_loss", "blend_dropped")


def signal_from(
    worker: str, update: SessionUpdate, event: PlayEvent, learned: LearnResult | None = None
) -> TrackSignal:
    """The signal of one play this worker learned: the item step of ``learned``
    (:meth:`stream.core.recommender.Recommender.learn_one`'s result) or, without it, only the
    play (trending and co-occurrence then learn it elsewhere, nothing else)."""
    step = learned.step if learned is not None else None
    if step is not None:
        return TrackSignal(
            worker=worker, track_id=step.track_id, ts_ms=step.ts_ms, skipped=step.skipped,
            history=step.history[-HISTORY_SENT:], artist_id=step.artist_id,
            context=step.context, position=step.position, session=step.session,
            factors=step.factors, negatives=step.negatives,
            skip_features=step.skip_features, seq=step.seq, blend_pairs=step.blend_pairs,
            blend_loss=step.blend_loss,
        )
    history = tuple(update.before.recent[-HISTORY_SENT:]) if update.before.recent else ()
    return TrackSignal(
        worker=worker,
        track_id=event.track_id,
        ts_ms=event.ts_ms,
        skipped=update.is_skip,
        history=history,
        artist_id=event.artist_id,
        context=event.context,
    )


def _as_dict(sig: TrackSignal) -> dict[str, object]:
    out: dict[str, object] = {
        "t": sig.track_id,
        "ts": sig.ts_ms,
        "s": sig.skipped,
        "h": list(sig.history),
        "a": sig.artist_id,
        "c": sig.context,
    }
    if sig.position >= 0:
        out["p"] = sig.position
    if sig.session:
        out["k"] = sig.session
    if sig.factors is not None:
        out["f"] = base64.b64encode(
            np.ascontiguousarray(sig.factors, dtype="<f4").tobytes()).decode("ascii")
        out["n"] = list(sig.negatives)
    if sig.skip_features:
        out["x"] = {name: float(v) for name, v in sig.skip_features.items()}
    if sig.seq >= 0:
        out["i"] = sig.seq
    if sig.blend_pairs is not None and len(sig.blend_pairs):
        # "g", not the untagged "b" of earlier senders: those ignore "g" (and apply the
        # rest), where they would apply rows of another loss or drop the whole signal
        out["g"] = {"l": sig.blend_loss, "n": int(sig.blend_pairs.shape[1]),
                    "r": base64.b64encode(np.ascontiguousarray(
                        sig.blend_pairs, dtype="<f4").tobytes()).decode("ascii")}
    return out


#: the most signals one message may carry (the sender chunks by this many)
MAX_SIGNALS_PER_MESSAGE: Final = 1000
#: the largest signals message read (1,000 signals with long ids and a full history)
MAX_SIGNAL_BYTES: Final = 1024 * 1024
MAX_WORKER_ID_LEN: Final = 64

#: why a signal (or a whole message) was dropped: the play-event reasons of the fields
#: plus "too_many_signals" and the authentication ones (stream.processing.auth.AUTH_REASONS)
SIGNAL_REJECTION_REASONS: Final = (
    *REJECTION_REASONS,
    "too_many_signals",
    *BLEND_DROP_REASONS,
)


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    """What one signals message held: the sender, its valid signals, and one rejection
    reason per dropped entry (or one for the whole message when it is unusable)."""

    worker: str
    signals: list[TrackSignal]
    rejected: list[str]
    #: the sender's message sequence number and send time (epoch ms), None if absent (a
    #: sender before replay protection): see :class:`ReplayGuard`
    seq: int | None = None
    sent_ms: int | None = None
    #: listeners the sender's control agent forgot: (user id, forget time ms); every
    #: worker drops their model state (see :func:`encode_batch`)
    forgets: tuple[tuple[str, int], ...] = ()


def _from_dict(worker: str, d: object, now_ms: int, max_future_ms: int) -> TrackSignal:
    """One entry, validated as strictly as a play's fields (stream.core.events), or
    :class:`InvalidField`."""
    if not isinstance(d, dict):
        raise InvalidField("not_object", "a signal must be a JSON object")
    for name in ("t", "ts", "s"):
        if d.get(name) is None:
            raise InvalidField("missing_field", f"signal field '{name}' is missing")
    track = check_id(d["t"], "t")
    ts = d["ts"]
    if type(ts) is not int:
        raise InvalidField("wrong_type", "signal 'ts' must be an integer (epoch ms)")
    if ts < MIN_TS_MS:
        raise InvalidField("too_old_timestamp", f"signal 'ts' {ts} is before 1990")
    if ts > now_ms + max_future_ms:
        raise InvalidField("future_timestamp", "signal 'ts' is ahead of the processing clock")
    skipped = d["s"]
    if type(skipped) is not bool:
        raise InvalidField("wrong_type", "signal 's' must be a boolean")
    raw_history = d.get("h")
    if raw_history is None:
        raw_history = []
    if not isinstance(raw_history, list):
        raise InvalidField("wrong_type", "signal 'h' must be an array of track ids")
    if len(raw_history) > HISTORY_SENT:
        raise InvalidField("bad_value", f"signal 'h' has over {HISTORY_SENT} entries")
    history = tuple(check_id(t, "h") for t in raw_history)
    artist = d.get("a")
    context = d.get("c")
    blend_pairs, blend_loss, blend_dropped = _blend_step(d.get("g"), d.get("b"))
    return TrackSignal(
        worker=worker,
        track_id=track,
        ts_ms=ts,
        skipped=skipped,
        history=history,
        artist_id=None if artist is None else check_id(artist, "a"),
        context=None if context is None else check_text(context, "c"),
        position=_position(d.get("p")),
        session=("" if d.get("k") is None
                 else check_id(d["k"], "k", MAX_SESSION_TOKEN_LEN, share=False)),
        factors=_factors(d.get("f")),
        negatives=_negatives(d.get("n")),
        skip_features=_skip_features(d.get("x")),
        seq=_seq(d.get("i")),
        blend_pairs=blend_pairs, blend_loss=blend_loss, blend_dropped=blend_dropped,
    )


def _seq(value: object) -> int:
    if value is None:
        return -1
    if type(value) is not int or not 0 <= value < 1 << 62:
        raise InvalidField("wrong_type", "signal 'i' must be an integer >= 0")
    return value


def _position(value: object) -> int:
    if value is None:
        return -1
    if type(value) is not int or not 0 <= value < 1 << 31:
        raise InvalidField("wrong_type", "signal 'p' must be an integer >= 0")
    return value


def _factors(value: object) -> np.ndarray | None:
    if value is None:
        return None
    if type(value) is not str or len(value) > 8 * MAX_FACTORS:
        raise InvalidField("wrong_type", "signal 'f' must be base64 of float32 factors")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise InvalidField("bad_value", "signal 'f' is not base64") from None
    if not raw or len(raw) % 4 or len(raw) // 4 > MAX_FACTORS:
        raise InvalidField("bad_value", "signal 'f' is not a float32 vector")
    vec = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if not np.all(np.isfinite(vec)) or float(np.abs(vec).max()) > MAX_FACTOR_VALUE:
        raise InvalidField("bad_value", "signal 'f' has values out of range")
    return vec


def _blend_step(tagged: object, untagged: object
                ) -> tuple[np.ndarray | None, str, str]:
    """The learned-blend rows of a signal (``g``: ``{"l": loss, "n": features, "r": base64
    of float32 rows}``), their loss and why they were left out ("" if not): rows of
    another feature count or an unknown loss, or an untagged ``b`` of an earlier sender,
    are dropped alone (the rest of the signal applies); a malformed ``g`` rejects the
    signal."""
    if tagged is None:
        return None, "", "" if untagged is None else "blend_untagged"
    if not isinstance(tagged, dict):
        raise InvalidField("wrong_type", "signal 'g' must be an object {l, n, r}")
    loss, n, value = tagged.get("l"), tagged.get("n"), tagged.get("r")
    if type(loss) is not str or len(loss) > 32:
        raise InvalidField("wrong_type", "signal 'g.l' must be the blend's loss")
    if type(n) is not int or not 0 < n <= MAX_BLEND_FEATURES:
        raise InvalidField("wrong_type", "signal 'g.n' must be the blend's feature count")
    rows = _blend_rows(value, n)
    if n != N_FEATURES:
        return None, "", "blend_features"
    if loss not in LOSSES:
        return None, "", "blend_loss"
    return rows, loss, ""


def _blend_rows(value: object, n: int) -> np.ndarray:
    row_bytes = 4 * n
    if type(value) is not str or len(value) > 4 * MAX_BLEND_PAIRS * row_bytes // 3 + 4:
        raise InvalidField("wrong_type", "signal 'g.r' must be base64 of float32 rows")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise InvalidField("bad_value", "signal 'g.r' is not base64") from None
    if not raw or len(raw) % row_bytes or len(raw) // row_bytes > MAX_BLEND_PAIRS:
        raise InvalidField("bad_value", f"signal 'g.r' is not rows of {n} float32")
    rows = np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(-1, n)
    if not np.all(np.isfinite(rows)) or float(np.abs(rows).max()) > MAX_ROW_VALUE:
        raise InvalidField("bad_value", "signal 'g.r' has values out of range")
    return rows


def _negatives(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_NEGATIVES:
        raise InvalidField("wrong_type", f"signal 'n' must be at most {MAX_NEGATIVES} ids")
    return tuple(check_id(t, "n") for t in value)


def _skip_features(value: object) -> dict[str, float] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > len(FEATURE_NAMES):
        raise InvalidField("wrong_type", "signal 'x' must be an object of skip features")
    out: dict[str, float] = {}
    for name, v in value.items():
        if name not in FEATURE_NAMES:
            raise InvalidField("bad_value", "signal 'x' names an unknown skip feature")
        if type(v) is not float and type(v) is not int:
            raise InvalidField("wrong_type", "signal 'x' values must be numbers")
        if not math.isfinite(v) or abs(v) > MAX_FEATURE_VALUE:
            raise InvalidField("bad_value", "signal 'x' values out of range")
        out[name] = float(v)
    return out


def encode_signal(sig: TrackSignal) -> bytes:
    """One signal as a batch of one (see :func:`encode_batch`)."""
    return encode_batch(sig.worker, [sig])


def encode_batch(
    worker: str,
    sigs: list[TrackSignal],
    *,
    seq: int | None = None,
    sent_ms: int | None = None,
    forgets: Sequence[tuple[str, int]] = (),
) -> bytes:
    """Many signals from one worker in one message (one Kafka record per flush, not per
    play: the per-message cost is what matters at high rates). ``seq`` (the sender's
    message counter, from 1) and ``sent_ms`` go inside the signed value, so a captured
    message cannot be replayed (:class:`ReplayGuard`). ``forgets`` broadcasts forgotten
    listeners (id, forget time): user-side model state may be held by any worker (a
    shared checkpoint, a rebalance), so every worker must drop it."""
    d: dict[str, object] = {"w": worker, "v": 2 if seq is not None else 1,
                            "signals": [_as_dict(s) for s in sigs]}
    if seq is not None:
        d["n"] = seq
        d["at"] = sent_ms
    if forgets:
        d["f"] = [{"u": user, "at": at} for user, at in forgets]
    return orjson.dumps(d)


def decode_batch(
    raw: bytes | None, *, now_ms: int, max_future_ms: int = MAX_FUTURE_MS
) -> DecodedBatch:
    """Validate a signals message; never raises. Every entry passes the limits of a play
    (ids printable and at most 256 characters, timestamps from 1990 to ``max_future_ms``
    ahead of ``now_ms``, strict types); a bad entry is dropped (its reason listed), the
    others are kept. A message that is not a JSON object with a valid sender and a list of
    at most MAX_SIGNALS_PER_MESSAGE entries yields no signal and one reason."""
    try:
        return _decode(raw, now_ms, max_future_ms)
    except InvalidField as exc:
        return DecodedBatch("", [], [exc.reason])
    except (RecursionError, MemoryError, ValueError, TypeError, OverflowError):
        return DecodedBatch("", [], ["bad_value"])


def _decode(raw: bytes | None, now_ms: int, max_future_ms: int) -> DecodedBatch:
    if not raw:
        raise InvalidField("not_json", "empty signals message")
    if len(raw) > MAX_SIGNAL_BYTES:
        raise InvalidField("oversized", f"signals message over {MAX_SIGNAL_BYTES} bytes")
    try:
        d = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidField("not_json", "signals message is not JSON") from None
    if not isinstance(d, dict):
        raise InvalidField("not_object", "signals message must be a JSON object")
    if d.get("w") is None or d.get("signals") is None:
        raise InvalidField("missing_field", "signals message needs 'w' and 'signals'")
    worker = check_id(d["w"], "w", MAX_WORKER_ID_LEN)
    items = d["signals"]
    if not isinstance(items, list):
        raise InvalidField("wrong_type", "'signals' must be an array")
    if len(items) > MAX_SIGNALS_PER_MESSAGE:
        raise InvalidField("too_many_signals", f"over {MAX_SIGNALS_PER_MESSAGE} signals")
    seq, sent = d.get("n"), d.get("at")
    if seq is not None and (type(seq) is not int or not 0 < seq < 2**63):
        raise InvalidField("wrong_type", "'n' must be a positive integer")
    if sent is not None and (type(sent) is not int or not MIN_TS_MS <= sent < 2**63):
        raise InvalidField("wrong_type", "'at' must be an epoch-ms integer")
    forgets: list[tuple[str, int]] = []
    raw_forgets = d.get("f")
    if raw_forgets is not None:
        if not isinstance(raw_forgets, list) or len(raw_forgets) > MAX_FORGETS_PER_MESSAGE:
            raise InvalidField("wrong_type", "'f' must be an array of forgets")
        for f in raw_forgets:
            if not isinstance(f, dict) or type(f.get("at")) is not int:
                raise InvalidField("wrong_type", "a forget must be {u: id, at: ms}")
            forgets.append((check_id(f.get("u"), "u"), f["at"]))
    out: list[TrackSignal] = []
    rejected: list[str] = []
    for item in items:
        try:
            out.append(_from_dict(worker, item, now_ms, max_future_ms))
        except InvalidField as exc:
            rejected.append(exc.reason)
    return DecodedBatch(worker, out, rejected, seq, sent, tuple(forgets))


#: most forgotten listeners one signals message may carry
MAX_FORGETS_PER_MESSAGE: Final = 1000
#: a signals message sent longer ago than this is refused as stale (seconds)
SIGNAL_MAX_AGE_S: Final = 300
#: senders whose last sequence number is remembered (workers are few; ids change per run)
MAX_SENDERS: Final = 4096


class ReplayGuard:
    """Refuses replayed and stale signals messages (review finding 4): each message
    carries its sender's sequence number and send time inside the signed value. A message
    sent more than ``max_age_ms`` ago (or further ahead than ``max_future_ms``), or whose
    sequence number is not above the last one seen from its sender, is refused. A sender
    keys its messages by its id, so its messages reach every reader in order; a worker id
    is new at each start, so its counter starts at 1 again under a new id. Pure (time
    passed in); remembers at most ``max_senders`` senders (least recently heard out).

    >>> g = ReplayGuard(max_age_ms=60_000)
    >>> g.check("w1", 1, 1_000_000, 1_000_100), g.check("w1", 2, 1_000_050, 1_000_100)
    (None, None)
    >>> g.check("w1", 2, 1_000_050, 1_000_200), g.check("w1", 3, 900_000, 1_000_200)
    ('replayed', 'stale')
    """

    def __init__(self, max_age_ms: int = SIGNAL_MAX_AGE_S * 1000,
                 max_future_ms: int = 60_000, max_senders: int = MAX_SENDERS) -> None:
        self.max_age_ms = max_age_ms
        self.max_future_ms = max_future_ms
        self.max_senders = max_senders
        self.last: OrderedDict[str, int] = OrderedDict()

    def check(self, worker: str, seq: int | None, sent_ms: int | None,
              now_ms: int) -> str | None:
        """None if the message is new, else why not (a rejection reason)."""
        if seq is None or sent_ms is None:
            return "missing_field"  # no sequence: a replay could not be told apart
        if now_ms - sent_ms > self.max_age_ms:
            return "stale"
        if sent_ms - now_ms > self.max_future_ms:
            return "future_timestamp"
        last = self.last.get(worker)
        if last is not None and seq <= last:
            return "replayed"
        self.last[worker] = seq
        self.last.move_to_end(worker)
        while len(self.last) > self.max_senders:
            self.last.popitem(last=False)
        return None


def decode_signal(raw: bytes, now_ms: int) -> TrackSignal | None:
    """The first valid signal of a message, or None if there is none."""
    sigs = decode_batch(raw, now_ms=now_ms).signals
    return sigs[0] if sigs else None


@dataclass(slots=True)
class ReceiveCounts:
    """What :func:`receive_batch` did with one message."""

    applied: int = 0
    errors: int = 0
    #: signals applied without their learned-blend rows, one BLEND_DROP_REASONS entry each
    blend_dropped: list[str] = field(default_factory=list)


def apply_signals(recommender: Recommender, signals: Iterable[TrackSignal]) -> ReceiveCounts:
    """Apply validated signals one by one; a signal the model cannot take (e.g. factors
    of another size) is counted as an error and skipped, the others still apply. Blend
    rows this recommender's learned blend does not take (another feature count or loss,
    or untagged) are counted in ``blend_dropped``; the rest of their signal applies."""
    counts = ReceiveCounts()
    learned = recommender.blend == "learned"
    for sig in signals:
        if sig.blend_dropped and learned:
            counts.blend_dropped.append(sig.blend_dropped)
        elif recommender.takes_blend_rows(sig) is False:
            counts.blend_dropped.append("blend_loss")
        try:
            recommender.apply_item_steps((sig,))
        except ValueError:
            counts.errors += 1
        else:
            counts.applied += 1
    return counts
