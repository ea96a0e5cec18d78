"""Worker-to-worker signals and operator control commands: HMAC keys, validation,
freshness and replays (stream.processing.auth, stream.processing.replication,
stream.processing.control), and the rate-limited rejection log (stream.processing.ratelog).
Pure logic: no Kafka, no clocks."""

from __future__ import annotations

import json
import logging

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.config import load_settings
from stream.core.events import MAX_FUTURE_MS, Rejection
from stream.errors import ConfigError
from stream.processing.auth import AUTH_REASONS, KeyRing
from stream.processing.control import ControlCommand, ControlGate, encode_forget, forget_record
from stream.processing.ratelog import RateLimitedLog
from stream.processing.replication import (
    HISTORY_SENT,
    MAX_SIGNALS_PER_MESSAGE,
    SIGNAL_REJECTION_REASONS,
    TrackSignal,
    decode_batch,
    encode_batch,
)

NOW = 1_700_000_000_000
K1 = "k1:" + "a" * 32
K2 = "k2:" + "b" * 32
TOPIC = "app-control"

# --------------------------------------------------------------------------- keys


def test_key_setting_parses_and_the_first_key_signs() -> None:
    ring = KeyRing.parse(f" {K2} , {K1} ")
    assert [k for k, _ in ring.keys] == ["k2", "k1"] and ring.signing_kid == "k2"
    assert not KeyRing.parse("") and KeyRing.parse("").sign(b"x", "t", None, b"v") == []


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("nocolon", "no ':'"),
        ("k1:short", "at least 16"),
        ("bad id!:" + "a" * 20, "key id"),
        (f"{K1},{K1}", "twice"),
        (f"{K1},,{K2}", "empty"),
    ],
)
def test_bad_key_settings_fail_at_start_up_without_echoing_secrets(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match="worker_keys") as info:
        load_settings(env={"STREAM_WORKER_KEYS": text}, file=None)
    assert needle in str(info.value)
    assert "a" * 16 not in str(info.value)
    assert load_settings(env={"STREAM_WORKER_KEYS": K1}, file=None).masked()["worker_keys"] == "***"


def test_rotation_old_key_verifies_new_key_signs() -> None:
    old, rotated = KeyRing.parse(K1), KeyRing.parse(f"{K2},{K1}")
    headers = old.sign(b"signals", "s", b"w", b"{}")
    assert rotated.verify(headers, b"signals", "s", b"w", b"{}") is None
    new_headers = rotated.sign(b"signals", "s", b"w", b"{}")
    assert dict(new_headers)["auth.kid"] == b"k2"
    assert old.verify(new_headers, b"signals", "s", b"w", b"{}") == "unknown_key"


def test_mac_binds_purpose_topic_key_and_value() -> None:
    ring = KeyRing.parse(K1)
    headers = ring.sign(b"control", TOPIC, b"u1", b"v")
    assert ring.verify(headers, b"control", TOPIC, b"u1", b"v") is None
    for args in [
        (b"signals", TOPIC, b"u1", b"v"),
        (b"control", "other-app-control", b"u1", b"v"),
        (b"control", TOPIC, b"u2", b"v"),
        (b"control", TOPIC, None, b"v"),
        (b"control", TOPIC, b"u1", b"v2"),
    ]:
        assert ring.verify(headers, *args) == "bad_signature", args
    forged = KeyRing.parse("k1:" + "z" * 32).sign(b"control", TOPIC, b"u1", b"v")
    assert ring.verify(forged, b"control", TOPIC, b"u1", b"v") == "bad_signature"
    assert ring.verify(None, b"control", TOPIC, b"u1", b"v") == "unsigned"
    assert ring.verify([("auth.kid", b"k1")], b"control", TOPIC, b"u1", b"v") == "unsigned"


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["auth.kid", "auth.mac", "x"]), st.binary(max_size=80))),
    st.binary(max_size=200),
)
def test_arbitrary_headers_never_verify_and_never_raise(
    headers: list[tuple[str, bytes]], value: bytes
) -> None:
    assert KeyRing.parse(K1).verify(headers, b"control", TOPIC, b"u", value) in AUTH_REASONS


# --------------------------------------------------------------------------- signals


def entry(**over: object) -> dict[str, object]:
    return {"t": "t1", "ts": NOW, "s": False, "h": ["t0"], "a": "a1", "c": "radio"} | over


def batch(*entries: object, worker: object = "w2") -> bytes:
    # the stdlib writes integers of any size (orjson refuses those beyond 64 bits)
    return json.dumps({"w": worker, "v": 1, "signals": list(entries)}).encode()


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (entry(ts=10**300), "wrong_type"),  # the 301-digit ts that froze trending
        (entry(ts=1e300), "wrong_type"),
        (entry(ts=NOW + MAX_FUTURE_MS + 1), "future_timestamp"),
        (entry(ts=5), "too_old_timestamp"),
        (entry(ts=True), "wrong_type"),
        (entry(a={"x": 1}), "wrong_type"),  # the object artist that broke ranking
        (entry(a=[1]), "wrong_type"),
        (entry(a=True), "wrong_type"),
        (entry(t="x" * 200_000), "string_too_long"),  # the 200k-character id
        (entry(t=""), "bad_value"),
        (entry(t="t\x1b[2J"), "control_character"),
        (entry(c="radio\nFAKE"), "control_character"),
        (entry(c=7), "wrong_type"),
        (entry(h=["t"] * (HISTORY_SENT + 1)), "bad_value"),
        (entry(h="t0"), "wrong_type"),
        (entry(h=[{"x": 1}]), "wrong_type"),
        (entry(s="yes"), "wrong_type"),
        ({"t": "t1"}, "missing_field"),
        ("not an object", "not_object"),
    ],
)
def test_a_bad_signal_is_dropped_with_its_reason_and_the_rest_kept(
    bad: object, reason: str
) -> None:
    decoded = decode_batch(batch(entry(t="ok1"), bad, entry(t="ok2")), now_ms=NOW)
    assert [s.track_id for s in decoded.signals] == ["ok1", "ok2"]
    assert decoded.rejected == [reason]


def test_integer_artist_ids_are_kept_as_strings() -> None:
    decoded = decode_batch(batch(entry(a=77)), now_ms=NOW)
    assert decoded.signals[0].artist_id == "77" and not decoded.rejected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "not_json"),
        (b"{", "not_json"),
        (b"[]", "not_object"),
        (orjson.dumps({"signals": []}), "missing_field"),
        (batch(worker="w\nforged"), "control_character"),
        (batch(worker={"x": 1}), "wrong_type"),
        (orjson.dumps({"w": "w2", "signals": {"t": 1}}), "wrong_type"),
        (batch(*[entry()] * (MAX_SIGNALS_PER_MESSAGE + 1)), "too_many_signals"),
        (b" " * (1024 * 1024 + 1), "oversized"),
    ],
)
def test_an_unusable_signals_message_yields_nothing(raw: bytes, reason: str) -> None:
    decoded = decode_batch(raw, now_ms=NOW)
    assert decoded.signals == [] and decoded.rejected == [reason]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.dictionaries(
            st.sampled_from(["t", "ts", "s", "h", "a", "c"]),
            st.none() | st.booleans() | st.integers() | st.text(max_size=300)
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.lists(st.text(max_size=5), max_size=10) | st.just({"x": 1}),
        ),
        max_size=5,
    )
)
def test_decoded_signals_always_have_valid_fields(entries: list[dict[str, object]]) -> None:
    """Whatever arrives, what reaches a model has string ids of <= 256 printable chars,
    an integer time in the play window and a boolean skip flag."""
    decoded = decode_batch(batch(*entries), now_ms=NOW)
    assert len(decoded.signals) + len(decoded.rejected) == len(entries)
    assert set(decoded.rejected) <= set(SIGNAL_REJECTION_REASONS)
    for sig in decoded.signals:
        assert isinstance(sig, TrackSignal)
        for text in (sig.track_id, *sig.history, *([sig.artist_id] if sig.artist_id else [])):
            assert isinstance(text, str) and 0 < len(text) <= 256 and text.isprintable()
        assert type(sig.ts_ms) is int and sig.ts_ms <= NOW + MAX_FUTURE_MS
        assert type(sig.skipped) is bool and len(sig.history) <= HISTORY_SENT
        assert sig.context is None or isinstance(sig.context, str)


def test_signals_round_trip() -> None:
    sigs = [TrackSignal("w1", f"t{i}", NOW + i, i % 2 == 0, ("a",), "77") for i in range(3)]
    decoded = decode_batch(encode_batch("w1", sigs), now_ms=NOW)
    assert decoded.worker == "w1" and decoded.signals == sigs


# --------------------------------------------------------------------------- control


def gate(ring: str = K1, insecure: bool = False, max_age_s: int = 900) -> ControlGate:
    return ControlGate(KeyRing.parse(ring), insecure=insecure, max_age_ms=max_age_s * 1000)


def admit(g: ControlGate, record: tuple[bytes | None, bytes, list[tuple[str, bytes]]], *,
          offset: int = 0, record_ts: int | None = NOW, append_time: bool = True,
          now: int = NOW) -> ControlCommand | Rejection:
    key, value, headers = record
    return g.admit(TOPIC, 0, offset, key, value, headers, record_ts, append_time, now)


def signed(user: str = "u1", ring: str = K1, **kw: object) -> tuple[bytes, bytes, list]:
    return forget_record(user, KeyRing.parse(ring), TOPIC, now_ms=NOW, **kw)  # type: ignore[arg-type]


def test_a_signed_fresh_command_is_admitted() -> None:
    cmd = admit(gate(), signed(request_id="r-1"))
    assert isinstance(cmd, ControlCommand)
    assert (cmd.op, cmd.user_id, cmd.request_id) == ("forget_user", "u1", "r-1")


def test_unsigned_forged_and_unknown_key_commands_are_refused() -> None:
    key, value, _ = signed()
    assert admit(gate(), (key, value, [])).reason == "unsigned"  # type: ignore[union-attr]
    forged = signed(ring="k1:" + "f" * 32)
    assert admit(gate(), forged).reason == "bad_signature"  # type: ignore[union-attr]
    other = signed(ring="k9:" + "a" * 32)
    assert admit(gate(), other).reason == "unknown_key"  # type: ignore[union-attr]
    # no keys at all: refused, whatever it carries, unless explicitly insecure
    assert admit(gate(ring=""), signed()).reason == "unknown_key"  # type: ignore[union-attr]
    assert admit(gate(ring=""), (key, value, [])).reason == "unsigned"  # type: ignore[union-attr]
    assert isinstance(admit(gate(ring="", insecure=True), (key, value, [])), ControlCommand)
    # insecure accepts unsigned, never a wrong signature
    assert admit(gate(insecure=True), forged).reason == "bad_signature"  # type: ignore[union-attr]


def test_the_record_key_must_be_the_user_id() -> None:
    ring = KeyRing.parse(K1)
    value = encode_forget("victim", now_ms=NOW)
    for key in (None, b"someone-else"):
        record = (key, value, ring.sign(b"control", TOPIC, key, value))
        result = admit(gate(), record)
        assert isinstance(result, Rejection) and result.reason == "key_mismatch"


def test_stale_and_far_future_commands_are_refused() -> None:
    g = gate(max_age_s=60)
    old = forget_record("u1", KeyRing.parse(K1), TOPIC, now_ms=NOW - 61_000)
    assert admit(g, old).reason == "stale"  # type: ignore[union-attr]
    ahead = forget_record("u1", KeyRing.parse(K1), TOPIC, now_ms=NOW + 61_000)
    assert admit(g, ahead).reason == "stale"  # type: ignore[union-attr]
    # broker append time is the reference: a worker catching up an hour later still
    # applies a command that was fresh when it was written ...
    assert isinstance(admit(g, signed(), record_ts=NOW + 5, now=NOW + 3_600_000), ControlCommand)
    # ... but a producer-chosen timestamp is not trusted: the worker's clock decides
    late = admit(gate(max_age_s=60), signed(), record_ts=NOW, append_time=False, now=NOW + 120_000)
    assert late.reason == "stale"  # type: ignore[union-attr]


def test_a_replayed_nonce_is_refused_but_a_redelivery_is_not() -> None:
    g = gate()
    record = signed()
    assert isinstance(admit(g, record, offset=5), ControlCommand)
    assert isinstance(admit(g, record, offset=5), ControlCommand)  # same position: redelivery
    replay = admit(g, record, offset=9, record_ts=NOW + 1000)
    assert isinstance(replay, Rejection) and replay.reason == "replayed"
    assert isinstance(admit(g, signed(), offset=10), ControlCommand)  # a new nonce is fine


def test_nonce_memory_is_bounded_by_the_window_and_the_cap() -> None:
    g = ControlGate(KeyRing.parse(K1), insecure=False, max_age_ms=1000, max_nonces=3)
    for i in range(5):
        admit(g, signed(), offset=i)
    assert len(g.seen) == 3
    admit(g, forget_record("u1", KeyRing.parse(K1), TOPIC, now_ms=NOW + 10_000), offset=99,
          record_ts=NOW + 10_000, now=NOW + 10_000)
    assert len(g.seen) == 1  # the others expired


def test_nonces_read_back_after_a_restart_refuse_a_replay() -> None:
    record = signed()
    key, value, headers = record
    fresh = gate()  # a new process: empty memory
    assert fresh.learn(TOPIC, 0, 5, key, value, headers, NOW)  # read back from the topic
    replay = admit(fresh, record, offset=9)
    assert isinstance(replay, Rejection) and replay.reason == "replayed"
    assert isinstance(admit(fresh, record, offset=5), ControlCommand)  # its redelivery
    # only authentic commands are remembered (a stranger cannot block a future nonce)
    assert not fresh.learn(TOPIC, 0, 6, key, value, [], NOW)
    forged = signed(ring="k1:" + "f" * 32)
    assert not fresh.learn(TOPIC, 0, 7, *forged, NOW)
    assert not fresh.learn(TOPIC, 0, 8, key, b"{", headers, NOW)


@pytest.mark.parametrize(
    ("patch", "reason"),
    [
        ({"requested_at": None}, "missing_field"),
        ({"nonce": None}, "missing_field"),
        ({"requested_at": "now"}, "wrong_type"),
        ({"nonce": "short"}, "bad_value"),
        ({"request_id": "r\nINFO forged line"}, "control_character"),
        ({"request_id": "r" * 129}, "string_too_long"),
        ({"user_id": "u1\x1b[31m"}, "control_character"),
        ({"op": "drop_tables"}, "bad_value"),
    ],
)
def test_control_fields_are_validated(patch: dict[str, object], reason: str) -> None:
    obj = orjson.loads(encode_forget("u1", now_ms=NOW)) | patch
    value = orjson.dumps(obj)
    key = str(obj["user_id"]).encode()
    record = (key, value, KeyRing.parse(K1).sign(b"control", TOPIC, key, value))
    result = admit(gate(), record)
    assert isinstance(result, Rejection) and result.reason == reason
    assert "\n" not in result.detail and "\x1b" not in result.detail


# --------------------------------------------------------------------------- rejection log


def test_rejection_log_is_rate_limited_per_reason_and_reports_what_it_suppressed() -> None:
    t = [0.0]
    lines: list[str] = []
    log = RateLimitedLog(
        logging.getLogger("t"), per_window=3, window_s=60.0, clock=lambda: t[0],
        emit=lambda level, msg, *args: lines.append(msg % args),
    )
    logged = [log.log("not_json", "bad %d", i) for i in range(1000)]
    assert logged.count(True) == 3 and lines == ["bad 0", "bad 1", "bad 2"]
    assert log.log("oversized", "big") and len(lines) == 4  # reasons have their own budget
    t[0] = 30.0
    assert log.flush() == 0 and log.suppressed("not_json") == 997  # window still open
    t[0] = 60.0
    assert log.flush() == 1
    assert lines[-1] == (
        "suppressed 997 more rejection log line(s) (reason not_json) in the last 60 s"
    )
    assert log.suppressed("not_json") == 0 and log.flush() == 0  # reported once
    # a new window: logging resumes
    assert log.log("not_json", "bad again") and lines[-1] == "bad again"


def test_the_next_line_after_a_window_reports_the_suppressed_count_first() -> None:
    t = [0.0]
    lines: list[str] = []
    log = RateLimitedLog(logging.getLogger("t"), per_window=1, window_s=10.0,
                         clock=lambda: t[0], emit=lambda lv, msg, *a: lines.append(msg % a))
    log.log("r", "one")
    log.log("r", "two")
    t[0] = 10.5
    log.log("r", "three")
    assert lines == ["one", "suppressed 1 more rejection log line(s) (reason r) in the last 10 s",
                     "three"]


def test_rate_limited_log_writes_to_its_logger(caplog: pytest.LogCaptureFixture) -> None:
    log = RateLimitedLog(logging.getLogger("stream.test"), per_window=1, level=logging.WARNING)
    with caplog.at_level(logging.WARNING, logger="stream.test"):
        log.log("r", "first %s", "x")
        log.log("r", "second")
    assert [r.getMessage() for r in caplog.records] == ["first x"]


def test_stream_forget_refuses_to_send_an_unsigned_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from stream.tools.cli import main

    for name in ("STREAM_WORKER_KEYS", "STREAM_WORKER_INSECURE", "STREAM_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    # an unreachable broker: the refusal must come before any connection attempt
    monkeypatch.setenv("STREAM_KAFKA_BOOTSTRAP", "127.0.0.1:1")
    assert main(["forget", "u1"]) == 2
    assert "worker_keys" in capsys.readouterr().err
