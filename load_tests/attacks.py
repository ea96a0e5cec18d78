"""Attack drill: the security review's attacks (issue 15) against the real stack and a real
worker, each reported as contained or not::

    python -m load_tests.faults attacks --report attacks.json          # full
    python -m load_tests.faults attacks --short --report attacks.json  # the CI variant

Every attack is one small function in :data:`ATTACKS` (``@attack(name, area)``): it does
what an attacker with produce rights on a topic (or write access to a Redis key) could do,
then checks the worker's own evidence -- its metrics, the dead-letter topic, Redis, its
log -- and returns whether the attack was contained. After every attack the runner also
checks that the worker is alive and that a canary listener's list still follows their
plays (an attack that stops or steers the worker is not contained, whatever its own check
said).

"Contained" per attack:

- signals (the ``{app_id}-track-signals`` topic): an unsigned or forged record is dropped
  (``stream_signals_rejected_total{reason}``) and nothing of it is applied; a signed record
  whose entries break the limits (301-digit ``ts``, object ``artist_id``, 200,000-character
  id) has exactly those entries dropped and its valid ones applied.
- plays: a keyless or mis-keyed play, and control characters in any text field, go to the
  dead-letter topic with reason ``key_mismatch`` / ``control_character``; no state for them.
- control: a keyless, unsigned, forged or replayed forget is dead-lettered with its reason
  and the listener keeps their list; a genuine forget still works.
- logs: an injected newline never starts a log line of its own; a flood of junk writes at
  most the rate limit's lines.
- other helpers' areas: a pickle checkpoint (format 1) or a forged format-2 checkpoint in
  ``model:{app_id}`` is not loaded (and runs no code) and is counted as rejected, a ``reco:`` key of the wrong type does not hold up other listeners'
  lists, a burst of unique junk ids leaves the worker responsive and writes no empty
  "more like this" lists.

Bounded: every wait has a timeout; counts are fixed per variant; network on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from stream.adapters.kafka import ensure_topics, make_producer, read_topic, signals_topic
from stream.adapters.redis_store import RecoReader
from stream.config import Settings
from stream.processing.auth import KeyRing
from stream.processing.control import PURPOSE as CONTROL_PURPOSE
from stream.processing.control import encode_forget, forget_record

SIGNALS_PURPOSE = b"signals"

# --------------------------------------------------------------------------- the harness


@dataclass
class Drill:
    """One running worker and what attacks need to talk to it."""

    settings: Settings
    worker: Any  # load_tests.faults.Worker
    start_worker: Callable[[Settings], Any]
    short: bool
    tag: str = field(default_factory=lambda: f"atk{uuid.uuid4().hex[:6]}")
    seq: int = 0
    canary_plays: int = 0

    def __post_init__(self) -> None:
        self.ring = KeyRing.parse(self.settings.worker_keys)
        self.reader = RecoReader(
            self.settings.redis_url,
            password=self.settings.redis_password,
            prefix=self.settings.redis_prefix,
            similar_prefix=self.settings.similar_prefix,
            channel=self.settings.notify_channel,
        )
        self.canary = f"{self.tag}-canary"
        self.now_ms = int(time.time() * 1000)

    # ---- sending
    def send(
        self,
        topic: str,
        records: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]],
    ) -> None:
        async def run() -> None:
            producer = make_producer(self.settings, max_request_size=2 * 1024 * 1024)
            await producer.start()
            try:
                futures = [
                    await producer.send(topic, value=v, key=k, headers=h or None)
                    for k, v, h in records
                ]
                await asyncio.gather(*futures)
            finally:
                await producer.stop()

        asyncio.run(run())

    def play(self, user: str, track: str | None = None, **extra: Any) -> bytes:
        self.seq += 1
        ev = {
            "user_id": user,
            "track_id": track or f"{self.tag}-t{self.seq % 50}",
            "ts": self.now_ms - 3_600_000 + self.seq * 1000,
            "ms_played": 200_000,
            "event_id": f"{self.tag}-e{self.seq}",
        }
        return orjson.dumps(ev | extra)

    def send_plays(self, records: list[tuple[bytes | None, bytes]]) -> None:
        self.send(self.settings.plays_topic, [(k, v, []) for k, v in records])

    def send_signals(self, value: bytes, *, ring: KeyRing | None = None,
                     headers: list[tuple[str, bytes]] | None = None) -> None:
        topic = signals_topic(self.settings)
        key = f"{self.tag}-w".encode()
        if headers is None:
            headers = (ring or self.ring).sign(SIGNALS_PURPOSE, topic, key, value)
        self.send(topic, [(key, value, headers)])

    def signal_batch(self, *entries: dict[str, Any]) -> bytes:
        # the stdlib writes integers of any size (the 301-digit ts)
        return json.dumps({"w": f"{self.tag}-w", "v": 1, "signals": list(entries)}).encode()

    def signal_entry(self, **over: Any) -> dict[str, Any]:
        self.seq += 1
        return {"t": f"{self.tag}-sig{self.seq}", "ts": self.now_ms - 1000, "s": False,
                "h": [f"{self.tag}-t1"], "a": "a1", "c": "radio"} | over

    # ---- observing
    def metric(self, name: str, **labels: str) -> float:
        return float(self.worker.metric_value(name, **labels))

    def wait_metric(self, name: str, target: float, timeout: float = 20.0, **labels: str) -> float:
        deadline = time.monotonic() + timeout
        value = self.metric(name, **labels)
        while value < target and time.monotonic() < deadline:
            time.sleep(0.2)
            value = self.metric(name, **labels)
        return value

    def rejected(self, topic: str, reason: str) -> float:
        return self.metric("stream_events_rejected_total", topic=topic, reason=reason)

    def doc(self, user: str) -> dict[str, Any] | None:
        raw = self.reader.client.get(f"{self.settings.redis_prefix}{user}")
        return None if raw is None else orjson.loads(raw)

    def wait_doc(self, user: str, min_seq: int, timeout: float = 20.0) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            doc = self.doc(user)
            if doc is not None and doc.get("seq", 0) >= min_seq:
                return doc
            time.sleep(0.2)
        return self.doc(user)

    def alive(self) -> bool:
        return self.worker.proc is not None and self.worker.proc.poll() is None

    def canary_fresh(self, timeout: float = 20.0) -> bool:
        """Play once as the canary; True if their list reflects it within ``timeout``."""
        self.canary_plays += 1
        self.send_plays([(self.canary.encode(), self.play(self.canary))])
        doc = self.wait_doc(self.canary, self.canary_plays, timeout)
        return doc is not None and doc.get("seq", 0) >= self.canary_plays

    def log(self) -> str:
        return str(self.worker.log_text())

    def close(self) -> None:
        self.reader.close()


@dataclass
class Result:
    contained: bool
    evidence: dict[str, Any]


Attack = Callable[[Drill], Result]


@dataclass(frozen=True)
class Registered:
    name: str
    area: str
    run: Attack
    #: needs no running worker of the drill (starts its own) -- e.g. a restore-time attack
    own_worker: bool = False


#: every attack, in the order they run (the ones that may break the worker run last)
ATTACKS: list[Registered] = []


def attack(name: str, area: str, own_worker: bool = False) -> Callable[[Attack], Attack]:
    def register(fn: Attack) -> Attack:
        ATTACKS.append(Registered(name, area, fn, own_worker))
        return fn

    return register


def _delta(d: Drill, name: str, expected: float, action: Callable[[], None],
           **labels: str) -> tuple[float, float]:
    """Run ``action``; wait until metric ``name`` rose by ``expected``; (before, after)."""
    before = d.metric(name, **labels)
    action()
    return before, d.wait_metric(name, before + expected, **labels)


# --------------------------------------------------------------------------- signals


def _signal_attack(d: Drill, entries: list[dict[str, Any]], reason: str, bad: int,
                   **send: Any) -> Result:
    """Send one signals message; contained if exactly ``bad`` entries (or the whole record)
    were dropped for ``reason`` and the valid ones -- and only those -- were applied."""
    applied0 = d.metric("stream_track_signals_total", direction="applied")
    before, after = _delta(
        d, "stream_signals_rejected_total", bad,
        lambda: d.send_signals(d.signal_batch(*entries), **send), reason=reason,
    )
    good = len(entries) - bad if reason not in ("unsigned", "bad_signature", "unknown_key") else 0
    applied = d.wait_metric("stream_track_signals_total", applied0 + good, 10.0,
                            direction="applied") - applied0
    if good == 0:
        time.sleep(1.0)  # give a wrongly accepted entry time to show up
        applied = d.metric("stream_track_signals_total", direction="applied") - applied0
    return Result(after - before == bad and applied == good,
                  {"rejected": after - before, "reason": reason, "applied": applied,
                   "applied_expected": good})


@attack("signal-valid-control", "signals")
def signal_valid(d: Drill) -> Result:
    """Not an attack: a genuine signed signal is applied (so the checks below can fail)."""
    applied0 = d.metric("stream_track_signals_total", direction="applied")
    d.send_signals(d.signal_batch(d.signal_entry(), d.signal_entry()))
    applied = d.wait_metric("stream_track_signals_total", applied0 + 2, direction="applied")
    return Result(applied - applied0 == 2, {"applied": applied - applied0})


@attack("signal-unsigned", "signals")
def signal_unsigned(d: Drill) -> Result:
    return _signal_attack(d, [d.signal_entry()], "unsigned", 1, headers=[])


@attack("signal-forged", "signals")
def signal_forged(d: Drill) -> Result:
    kid = d.ring.signing_kid or "k"
    forged = KeyRing.parse(f"{kid}:{uuid.uuid4().hex}")  # right key id, wrong secret
    return _signal_attack(d, [d.signal_entry()], "bad_signature", 1, ring=forged)


@attack("signal-unknown-key", "signals")
def signal_unknown_key(d: Drill) -> Result:
    other = KeyRing.parse(f"attacker:{uuid.uuid4().hex}")
    return _signal_attack(d, [d.signal_entry()], "unknown_key", 1, ring=other)


@attack("signal-oversized-ts", "signals")
def signal_oversized_ts(d: Drill) -> Result:
    """The review's 301-digit ``ts`` (it froze trending on the attacker's track), signed
    with the real key: validation, not only the MAC, must stop it."""
    return _signal_attack(d, [d.signal_entry(ts=10**300), d.signal_entry()], "wrong_type", 1)


@attack("signal-object-artist", "signals")
def signal_object_artist(d: Drill) -> Result:
    """An object as ``artist_id`` (ranking raised TypeError for 22 of 40 listeners)."""
    r = _signal_attack(d, [d.signal_entry(a={"x": 1}), d.signal_entry()], "wrong_type", 1)
    errors = d.metric("stream_model_errors_total")
    fresh = d.canary_fresh()
    r.evidence |= {"model_errors": errors, "canary_fresh": fresh}
    return Result(r.contained and fresh and d.metric("stream_model_errors_total") == errors,
                  r.evidence)


@attack("signal-200k-id", "signals")
def signal_huge_id(d: Drill) -> Result:
    return _signal_attack(
        d, [d.signal_entry(t="x" * 200_000), d.signal_entry()], "string_too_long", 1
    )


# --------------------------------------------------------------------------- plays


def _play_rejection(d: Drill, records: list[tuple[bytes | None, bytes]], reason: str,
                    users: list[str]) -> Result:
    topic = d.settings.plays_topic
    before, after = _delta(d, "stream_events_rejected_total", len(records),
                           lambda: d.send_plays(records), topic=topic, reason=reason)
    leaked = [u for u in users if d.doc(u) is not None]
    return Result(after - before == len(records) and not leaked,
                  {"sent": len(records), "dead_lettered": after - before, "reason": reason,
                   "state_written_for": leaked})


@attack("play-keyless", "plays")
def play_keyless(d: Drill) -> Result:
    user = f"{d.tag}-keyless"
    return _play_rejection(d, [(None, d.play(user))], "key_mismatch", [user])


@attack("play-key-mismatch", "plays")
def play_key_mismatch(d: Drill) -> Result:
    user = f"{d.tag}-mismatch"
    return _play_rejection(d, [(b"someone-else", d.play(user))], "key_mismatch", [user])


@attack("play-control-characters", "plays")
def play_control_chars(d: Drill) -> Result:
    users = [f"{d.tag}-cc{i}" for i in range(5)]
    records = [
        (users[0].encode(), d.play(users[0], context="radio\x1b[2J")),
        (users[1].encode(), d.play(users[1], track="t\x00nul")),
        (users[2].encode(), d.play(users[2], reason_end="end\nINFO forged")),
        (users[3].encode(), d.play(users[3], artist_id="a\u202eevil")),
        (users[4].encode(), d.play(users[4], session_id="s\u2028x")),
    ]
    return _play_rejection(d, records, "control_character", users)


# --------------------------------------------------------------------------- control


def _victim(d: Drill, name: str) -> str:
    """A listener with a list in Redis (the attack's target)."""
    user = f"{d.tag}-{name}"
    d.send_plays([(user.encode(), d.play(user))])
    d.wait_doc(user, 1)
    return user


def _control_attack(d: Drill, user: str, record: tuple[bytes | None, bytes, Any],
                    reason: str) -> Result:
    topic = d.settings.control_topic
    before, after = _delta(d, "stream_events_rejected_total", 1,
                           lambda: d.send(topic, [record]), topic=topic, reason=reason)
    kept = d.doc(user) is not None
    return Result(after - before == 1 and kept,
                  {"refused": after - before, "reason": reason, "victim_list_kept": kept})


@attack("control-forget-works", "control")
def control_genuine(d: Drill) -> Result:
    """Not an attack: a genuine signed forget erases the listener."""
    user = _victim(d, "forgotten")
    topic = d.settings.control_topic
    record = forget_record(user, d.ring, topic)
    before, after = _delta(d, "stream_control_commands_total", 1,
                           lambda: d.send(topic, [record]), result="forgotten")
    deadline = time.monotonic() + 15
    while d.doc(user) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    gone = d.doc(user) is None
    return Result(after - before == 1 and gone, {"forgotten": after - before, "erased": gone})


@attack("control-keyless", "control")
def control_keyless(d: Drill) -> Result:
    """A correctly signed forget without a Kafka key (it would land on any partition)."""
    user = _victim(d, "ctl-keyless")
    value = encode_forget(user)
    headers = d.ring.sign(CONTROL_PURPOSE, d.settings.control_topic, None, value)
    return _control_attack(d, user, (None, value, headers), "key_mismatch")


@attack("control-unsigned", "control")
def control_unsigned(d: Drill) -> Result:
    user = _victim(d, "ctl-unsigned")
    return _control_attack(d, user, (user.encode(), encode_forget(user), []), "unsigned")


@attack("control-forged", "control")
def control_forged(d: Drill) -> Result:
    user = _victim(d, "ctl-forged")
    forged = KeyRing.parse(f"{d.ring.signing_kid or 'k'}:{uuid.uuid4().hex}")
    record = forget_record(user, forged, d.settings.control_topic)
    return _control_attack(d, user, record, "bad_signature")


@attack("control-replayed", "control")
def control_replayed(d: Drill) -> Result:
    """Copy a genuine forget off the topic and send it again after the listener returns."""
    user = _victim(d, "ctl-replay")
    topic = d.settings.control_topic
    record = forget_record(user, d.ring, topic)
    before = d.metric("stream_control_commands_total", result="forgotten")
    d.send(topic, [record])
    d.wait_metric("stream_control_commands_total", before + 1, result="forgotten")
    d.send_plays([(user.encode(), d.play(user))])  # the listener comes back
    back = d.wait_doc(user, 1) is not None
    r = _control_attack(d, user, record, "replayed")
    r.evidence["listener_back_before_replay"] = back
    return Result(r.contained and back, r.evidence)


@attack("control-replayed-after-restart", "control")
def control_replayed_after_restart(d: Drill) -> Result:
    """As control-replayed, but the worker restarts between the forget and the replay (a
    new process: its nonce memory is rebuilt from the topic)."""
    user = _victim(d, "ctl-replay-rs")
    topic = d.settings.control_topic
    record = forget_record(user, d.ring, topic)
    before = d.metric("stream_control_commands_total", result="forgotten")
    d.send(topic, [record])
    d.wait_metric("stream_control_commands_total", before + 1, result="forgotten")
    d.worker.stop()
    d.worker = d.start_worker(d.settings)
    d.send_plays([(user.encode(), d.play(user))])  # the listener comes back
    back = d.wait_doc(user, 1) is not None
    r = _control_attack(d, user, record, "replayed")
    r.evidence["listener_back_before_replay"] = back
    return Result(r.contained and back, r.evidence)


@attack("control-stale", "control")
def control_stale(d: Drill) -> Result:
    """A signed forget whose time is outside the freshness window (an old copy)."""
    user = _victim(d, "ctl-stale")
    old = int(time.time() * 1000) - (d.settings.control_max_age_s + 60) * 1000
    record = forget_record(user, d.ring, d.settings.control_topic, now_ms=old)
    return _control_attack(d, user, record, "stale")


# --------------------------------------------------------------------------- logs


def _forged_lines(d: Drill, marker: str) -> list[str]:
    return [line for line in d.log().splitlines() if line.startswith(marker)]


@attack("log-injection-request-id", "logs")
def log_injection_request_id(d: Drill) -> Result:
    """A signed forget whose request_id carries a newline and a fake log line."""
    user = _victim(d, "ctl-loginj")
    marker = f"[2026-01-01 00:00:00,000] ERROR {d.tag}-FORGED"
    value = orjson.dumps(orjson.loads(encode_forget(user)) | {"request_id": f"r\n{marker}"})
    key = user.encode()
    headers = d.ring.sign(CONTROL_PURPOSE, d.settings.control_topic, key, value)
    r = _control_attack(d, user, (key, value, headers), "control_character")
    # and through a play's Kafka key (logged in the key_mismatch detail)
    before, after = _delta(
        d, "stream_events_rejected_total", 1,
        lambda: d.send_plays([(f"x\n{marker}".encode(), d.play(f"{d.tag}-li"))]),
        topic=d.settings.plays_topic, reason="key_mismatch",
    )
    time.sleep(0.5)
    forged = _forged_lines(d, marker)
    r.evidence |= {"forged_log_lines": forged[:3], "play_rejected": after - before}
    return Result(r.contained and after - before == 1 and not forged, r.evidence)


@attack("log-flood", "logs")
def log_flood(d: Drill) -> Result:
    """Thousands of junk plays: the metrics count all, the log holds a bounded number."""
    n = 500 if d.short else 5000
    topic = d.settings.plays_topic
    marker = f"rejected {topic}["
    lines0 = d.log().count(marker)
    before, after = _flood(d, n, topic)
    lines = d.log().count(marker) - lines0
    limit = 20  # 10 a minute per reason; the drill may straddle a minute
    return Result(after - before == n and lines <= limit,
                  {"sent": n, "counted": after - before, "log_lines": lines,
                   "log_line_limit": limit})


def _flood(d: Drill, n: int, topic: str) -> tuple[float, float]:
    before = d.metric("stream_events_rejected_total", topic=topic, reason="not_json")
    d.send_plays([(None, b"junk %d" % i) for i in range(n)])
    return before, d.wait_metric("stream_events_rejected_total", before + n, 60.0,
                                 topic=topic, reason="not_json")


# --------------------------------------------------------------------------- other areas
# (their defences come from the ckpt, memory and writer branches; reported here too)


@attack("checkpoint-forgery", "checkpoint", own_worker=True)
def checkpoint_forgery(d: Drill) -> Result:
    """Two blobs an attacker with Redis write access plants in ``model:{app_id}``, each
    followed by a worker start on that app id: a pickle that would create a file when
    unpickled, framed as the old (format 1) unsigned checkpoint; then a format-2 checkpoint
    signed under the worker's key id with a guessed secret. Contained: no code ran, the
    worker serves, nothing was restored, and each was counted as rejected."""
    from stream.core.checkpoint import KeySet, seal_models, settings_keys
    from stream.core.recommender import Recommender

    app_id = f"{d.tag}-ckpt-app"
    settings = d.settings.replace(
        app_id=app_id, plays_topic=f"{app_id}-plays", dlq_topic=f"{app_id}-dlq",
        control_topic=f"{app_id}-control", metrics_port=_free_port(),
    )
    marker = Path(tempfile.gettempdir()) / f"{d.tag}-pwned"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (open, (str(marker), "w"))

    legacy = b"SRCK1P" + b"STREAMREC" + bytes([2]) + pickle.dumps(Payload())
    kid = (settings_keys(settings).ids or ["k1"])[0]
    forged = seal_models(Recommender(seed=1), keys=KeySet.parse(f"{kid}:guessed-secret-0000000"),
                         app_id=app_id, created_ms=int(time.time() * 1000))
    key = f"model:{app_id}"
    evidence: dict[str, Any] = {}
    ok = True
    for name, blob, reason in (("format1_pickle", legacy, "version"),
                               ("forged_format2", forged, "bad_signature")):
        d.reader.client.set(key, blob)
        worker = None
        try:
            worker = d.start_worker(settings)
            alive = worker.proc is not None and worker.proc.poll() is None
            restored = worker.metric_value("stream_checkpoint_restored") if alive else None
            rejected = (worker.metric_value("stream_checkpoints_rejected_total", reason=reason)
                        if alive else None)
            ran = marker.exists()
            evidence[name] = {"code_ran": ran, "worker_alive": alive,
                              "checkpoint_restored": restored, f"rejected_{reason}": rejected}
            ok = ok and alive and not ran and restored == 0 and rejected == 1
        except BaseException as exc:  # noqa: BLE001 - pytest.fail is a BaseException
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            # a worker that will not start (or crash-loops) is not contained
            evidence[name] = {"worker_start_error": repr(exc)[:300], "code_ran": marker.exists()}
            ok = False
        finally:
            if worker is not None:
                worker.stop()
            d.reader.client.delete(key)
    marker.unlink(missing_ok=True)
    return Result(ok, evidence)


@attack("junk-ids-burst", "memory")
def junk_ids(d: Drill) -> Result:
    """A burst of plays with unique junk track and user ids."""
    n = 3000 if d.short else 30_000
    jt = f"{d.tag}-junk"
    records = [
        (f"{jt}-u{i}".encode(), d.play(f"{jt}-u{i}", track=f"{jt}-t{i}")) for i in range(n)
    ]
    processed0 = d.metric("stream_events_total", outcome="processed")
    rss0 = _rss_mb(d.worker.proc.pid)
    started = time.monotonic()
    for i in range(0, n, 5000):
        d.send_plays(records[i : i + 5000])
    processed = d.wait_metric("stream_events_total", processed0 + n, 120.0 if d.short else 600.0,
                              outcome="processed") - processed0
    seconds = time.monotonic() - started
    fresh = d.canary_fresh()
    time.sleep(2.0)  # the "more like this" refresh runs 10 times a second
    keys = list(d.reader.client.scan_iter(match=f"{d.settings.similar_prefix}{jt}-t*",
                                          count=1000))[:2000]
    empty = 0
    for raw in d.reader.client.mget(keys) if keys else []:
        if raw is not None and not orjson.loads(raw).get("items"):
            empty += 1
    return Result(processed >= n and fresh and empty == 0,
                  {"plays": n, "processed": processed, "seconds": round(seconds, 1),
                   "canary_fresh_after": fresh, "similar_keys": len(keys),
                   "rss_growth_mb": round(_rss_mb(d.worker.proc.pid) - rss0, 1),
                   "empty_similar_lists": empty})


@attack("wrongtype-reco-key", "writer")
def wrongtype_key(d: Drill) -> Result:
    """``reco:victim`` holds a hash, then the victim and five other listeners keep playing:
    the others' lists must follow within a flush or so (runs last: a writer that retries
    its whole batch with backoff delays every write for seconds)."""
    victim = f"{d.tag}-wt-victim"
    key = f"{d.settings.redis_prefix}{victim}"
    d.reader.client.hset(key, "x", "1")
    others = [f"{d.tag}-wt-{i}" for i in range(5)]
    rounds = 10
    lag: list[float] = []
    try:
        for _ in range(rounds):
            d.send_plays([(u.encode(), d.play(u)) for u in [victim, *others]])
            time.sleep(0.3)
        sent = time.monotonic()
        while time.monotonic() - sent < 15:
            behind = [u for u in others if (d.doc(u) or {}).get("seq", 0) < rounds]
            if not behind:
                break
            time.sleep(0.05)
        lag.append(time.monotonic() - sent)
        behind = [u for u in others if (d.doc(u) or {}).get("seq", 0) < rounds]
    finally:
        d.reader.client.delete(key)
    return Result(not behind and lag[0] <= 2.0,
                  {"other_listeners": len(others), "plays_each": rounds,
                   "behind_after_15s": len(behind),
                   "seconds_until_all_current": round(lag[0], 2), "limit_s": 2.0})


# --------------------------------------------------------------------------- runner


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_attacks(
    settings: Settings,
    start_worker: Callable[[Settings], Any],
    *,
    short: bool = True,
    only: list[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the attacks (all, or those named in ``only``) against one worker; the report
    lists each with ``contained`` and its evidence, ``ok`` if all were contained."""
    if not settings.worker_keys:
        raise ValueError("the attack drill needs worker_keys (it signs as a genuine operator)")
    asyncio.run(ensure_topics(settings))
    chosen = [a for a in ATTACKS if only is None or a.name in only]
    worker = start_worker(settings)
    d = Drill(settings, worker, start_worker, short)
    results: list[dict[str, Any]] = []
    try:
        baseline = d.canary_fresh(30.0)
        for a in chosen:
            if progress:
                print(f"[attacks] {a.name} ...", file=sys.stderr, flush=True)
            started = time.monotonic()
            try:
                r = a.run(d)
            except BaseException as exc:  # noqa: BLE001 - an attack that breaks the drill
                if isinstance(exc, KeyboardInterrupt | SystemExit):
                    raise
                r = Result(False, {"error": repr(exc)[:500]})
            alive = d.alive()
            fresh = alive and (a.own_worker or d.canary_fresh())
            results.append({
                "attack": a.name,
                "area": a.area,
                "contained": bool(r.contained and alive and fresh),
                "worker_alive": alive,
                "canary_fresh": fresh,
                "seconds": round(time.monotonic() - started, 1),
                "evidence": r.evidence,
            })
            if progress:
                print(f"[attacks] {a.name}: "
                      f"{'contained' if results[-1]['contained'] else 'NOT CONTAINED'}",
                      file=sys.stderr, flush=True)
            if not alive:
                break
        dlq = asyncio.run(read_topic(settings, settings.dlq_topic, max_messages=10**6,
                                     timeout_s=5.0))
    finally:
        _cleanup(d)
        d.close()
        d.worker.stop()  # (an attack may have restarted it)
    return {
        "drill": "attacks",
        "variant": "short" if short else "full",
        "ok": bool(results) and baseline and all(r["contained"] for r in results),
        "baseline_canary_fresh": baseline,
        "contained": sum(r["contained"] for r in results),
        "attacks": results,
        "dlq_records": len(dlq),
        "dlq_reasons": _reasons(dlq),
    }


def _reasons(records: list[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        reason = dict(r.headers).get("dlq.reason", b"").decode()
        out[reason] = out.get(reason, 0) + 1
    return out


def _cleanup(d: Drill) -> None:
    client = d.reader.client
    for pattern in (f"{d.settings.redis_prefix}*", f"{d.settings.similar_prefix}*",
                    f"model:{d.settings.app_id}*"):
        keys = list(client.scan_iter(match=pattern, count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])

