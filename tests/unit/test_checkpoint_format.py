"""stream.core.checkpoint: the signed, data-only checkpoint format and its refusals."""

from __future__ import annotations

import json
import random
import struct

import numpy as np
import pytest

from stream.config import load_settings
from stream.core.checkpoint import (
    FUTURE_SKEW_MS,
    MAGIC,
    REJECT_REASONS,
    CheckpointRejected,
    KeySet,
    open_checkpoint,
    open_models,
    pack_state,
    seal,
    seal_models,
    unpack_state,
)
from stream.core.events import PlayEvent
from stream.core.recommender import Recommender
from stream.core.session import UserState, update_session
from stream.errors import ConfigError

KEYS = KeySet.parse("k2:second-secret-0123456789,k1:first-secret-0123456789")
NOW = 1_800_000_000_000
T0 = 1_700_000_000_000


def trained(n: int = 600) -> tuple[Recommender, dict[str, UserState]]:
    rec = Recommender(seed=5)
    states: dict[str, UserState] = {}
    for i in range(n):
        user, track = f"u{i % 13}", f"t{(i * 7919) % 89}"
        ev = PlayEvent(user, track, T0 + i * 1000, 200_000, f"e{i}", artist_id=f"a{i % 7}",
                       skipped=i % 5 == 0, context=("radio", "search", None)[i % 3])
        up = update_session(states.get(user), ev)
        rec.learn_one(up, ev)
        states[user] = up.state
    return rec, states


def reason_of(blob: bytes, **checks: object) -> str:
    args: dict[str, object] = {"keys": KEYS, "app_id": "app", "now_ms": NOW} | checks
    with pytest.raises(CheckpointRejected) as info:
        open_models(blob, **args)
    assert info.value.reason in REJECT_REASONS
    return info.value.reason


def test_a_restored_recommender_ranks_and_learns_exactly_like_the_saved_one() -> None:
    rec, states = trained()
    blob = seal_models(rec, keys=KEYS, app_id="app", created_ms=NOW - 1000)
    twin, opened = open_models(blob, keys=KEYS, app_id="app", now_ms=NOW)
    assert (opened.kid, opened.app_id, opened.created_ms) == ("k2", "app", NOW - 1000)
    listeners = list(states.values())
    for state in listeners:
        for variant in ("blend", "popularity", "mf", "cooccurrence"):
            assert (twin.recommend(state, 10, T0 + 10**6, variant=variant)
                    == rec.recommend(state, 10, T0 + 10**6, variant=variant))
    assert twin.recommend_many(listeners, 10, T0) == rec.recommend_many(listeners, 10, T0)
    assert twin.similar("t3", 10) == rec.similar("t3", 10)
    assert twin.artist_of == rec.artist_of and twin.n_learned == rec.n_learned
    for i in range(600, 900):  # both keep learning the same plays: still identical
        user, track = f"u{i % 17}", f"t{(i * 31) % 97}"
        ev = PlayEvent(user, track, T0 + i * 1000, 200_000, f"e{i}", skipped=i % 3 == 0)
        up = update_session(states.get(user), ev)
        assert twin.learn_one(up, ev) == rec.learn_one(up, ev)
        states[user] = up.state
    for state in states.values():
        assert twin.recommend(state, 10, T0 + 10**7) == rec.recommend(state, 10, T0 + 10**7)


def test_keys_rotate_newest_signs_any_verifies() -> None:
    old = KeySet.parse("k1:first-secret-0123456789")
    blob = seal(pack_state({}, {}), keys=old, app_id="app", created_ms=NOW)
    assert open_checkpoint(blob, keys=KEYS, app_id="app", now_ms=NOW).kid == "k1"
    assert json.loads(blob[len(MAGIC) + 4 :].split(b"}")[0] + b"}")["kid"] == "k1"
    resigned = seal(pack_state({}, {}), keys=KEYS, app_id="app", created_ms=NOW)
    assert open_checkpoint(resigned, keys=KEYS, app_id="app", now_ms=NOW).kid == "k2"
    # once k1 is dropped from the list, what it signed no longer verifies
    with pytest.raises(CheckpointRejected) as info:
        open_checkpoint(blob, keys=KeySet.parse("k2:second-secret-0123456789"),
                        app_id="app", now_ms=NOW)
    assert info.value.reason == "unknown_key"


def test_every_refusal_has_its_reason() -> None:
    rec, _ = trained(200)
    good = seal_models(rec, keys=KEYS, app_id="app", created_ms=NOW)
    other_key = KeySet.parse("k2:an-attackers-guess-000000")
    assert reason_of(seal_models(rec, keys=other_key, app_id="app", created_ms=NOW)) \
        == "bad_signature"
    assert reason_of(seal_models(rec, keys=KeySet.parse("zz:0123456789abcdefgh"), app_id="app",
                                 created_ms=NOW)) == "unknown_key"
    assert reason_of(seal_models(rec, keys=KEYS, app_id="other-app", created_ms=NOW)) \
        == "foreign_app"
    assert reason_of(seal_models(rec, keys=KEYS, app_id="app",
                                 created_ms=NOW + FUTURE_SKEW_MS + 1000)) == "future"
    assert reason_of(seal_models(rec, keys=KEYS, app_id="app", created_ms=NOW - 100_000),
                     max_age_s=60) == "too_old"
    unsigned = seal_models(rec, keys=KeySet(), app_id="app", created_ms=NOW)
    assert reason_of(unsigned) == "unsigned"  # keys are set: a signature is required
    assert reason_of(unsigned, keys=KeySet()) == "unsigned"  # no keys, not insecure
    twin, _ = open_models(unsigned, keys=KeySet(), insecure=True, app_id="app", now_ms=NOW)
    assert twin.n_learned == rec.n_learned
    assert reason_of(good, max_bytes=len(good) - 1) == "oversized"
    assert reason_of(good[:-1]) == "truncated"
    assert reason_of(good[: len(good) // 2]) == "truncated"
    assert reason_of(good[:5]) == "truncated"
    assert reason_of(good + b"x") == "malformed"
    assert reason_of(b"garbage" * 100) == "malformed"
    assert reason_of(b"SRCK1P\x80\x05junk") == "version"  # format 1 is never read
    # a forged payload byte: the signature no longer verifies
    forged = bytearray(good)
    forged[len(forged) // 2] ^= 0xFF
    assert reason_of(bytes(forged)) == "bad_signature"
    # a header that claims another app id (re-signing needs the key)
    head = good.replace(b'"app_id":"app"', b'"app_id":"apq"', 1)
    assert reason_of(head, app_id="apq") == "bad_signature"
    # another format version, properly signed
    v3 = good.replace(b'"format":2', b'"format":3', 1)
    assert reason_of(v3) == "version"


def test_a_signed_checkpoint_with_bad_model_state_is_refused_naming_the_field() -> None:
    rec, _ = trained(200)
    manifest, arrays = rec.export_state()
    arrays = dict(arrays)
    arrays["cooccurrence.nbr"] = arrays["cooccurrence.nbr"].copy()
    arrays["cooccurrence.nbr"][0] = 10**6  # a neighbour row past the catalogue
    blob = seal(pack_state(manifest, arrays), keys=KEYS, app_id="app", created_ms=NOW)
    with pytest.raises(CheckpointRejected, match=r"cooccurrence\.nbr") as info:
        open_models(blob, keys=KEYS, app_id="app", now_ms=NOW)
    assert info.value.reason == "invalid_state"
    manifest["models"]["mf"]["known"] = 10**9
    blob = seal(pack_state(manifest, rec.export_state()[1]), keys=KEYS, app_id="app",
                created_ms=NOW)
    with pytest.raises(CheckpointRejected, match=r"mf\.known"):
        open_models(blob, keys=KEYS, app_id="app", now_ms=NOW)


def test_mutated_unsigned_checkpoints_are_refused_never_crash() -> None:
    """In insecure mode nothing vouches for the bytes: random corruptions of every part
    are refused with a reason (or load as a valid model), never another exception."""
    rec, _ = trained(150)
    blob = seal_models(rec, keys=KeySet(), app_id="app", created_ms=NOW)
    rng = random.Random(7)
    outcomes: dict[str, int] = {}
    for _ in range(300):
        data = bytearray(blob)
        for _ in range(rng.choice((1, 2, 8))):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.2:
            data = data[: rng.randrange(len(data))]
        try:
            open_models(bytes(data), keys=KeySet(), insecure=True, app_id="app", now_ms=NOW)
            outcomes["loaded"] = outcomes.get("loaded", 0) + 1
        except CheckpointRejected as exc:
            outcomes[exc.reason] = outcomes.get(exc.reason, 0) + 1
    assert set(outcomes) <= {"loaded", *REJECT_REASONS}
    assert outcomes.get("invalid_state", 0) + outcomes.get("malformed", 0) > 50


def test_state_container_reads_only_numeric_arrays() -> None:
    data = pack_state({"a": [1, "x"]}, {"w": np.arange(5, dtype=np.float32),
                                         "m": np.zeros((2, 3), dtype=np.int64),
                                         "e": np.zeros((0, 4), dtype=np.float32)})
    manifest, arrays = unpack_state(data)
    assert manifest == {"a": [1, "x"]}
    assert arrays["w"].tolist() == [0, 1, 2, 3, 4] and arrays["m"].shape == (2, 3)
    assert arrays["e"].shape == (0, 4)
    assert not arrays["w"].flags.writeable  # views of the blob: import_state copies
    with pytest.raises(Exception, match="dtype"):
        pack_state({}, {"o": np.array([object()], dtype=object)})
    # an index entry naming an object dtype is refused before any array is built
    text = json.dumps({}).encode()
    table = json.dumps([["o", "|O", [1], 0]]).encode()
    forged = (b"SRSTATE1" + struct.pack(">I", len(text)) + text + struct.pack(">I", len(table))
              + table + bytes(8))
    with pytest.raises(CheckpointRejected, match="known dtype"):
        unpack_state(forged)


def test_checkpoint_settings_fail_at_start_naming_the_setting() -> None:
    keys = "new:0123456789abcdef0,old:abcdef0123456789x"
    s = load_settings(env={"STREAM_CHECKPOINT_KEYS": keys}, file=None)
    assert s.masked()["checkpoint_keys"] == "new:***,old:***"
    twice = "k1:0123456789abcdef,k1:0123456789abcdefg"
    for bad in ("nokid", "k1:short", twice, "b@d:0123456789abcdef"):
        with pytest.raises(ConfigError, match="checkpoint_keys"):
            load_settings(env={"STREAM_CHECKPOINT_KEYS": bad}, file=None)
    with pytest.raises(ConfigError, match="checkpoint_secret"):
        load_settings(env={"STREAM_CHECKPOINT_SECRET": "short"}, file=None)
    legacy = load_settings(env={"STREAM_CHECKPOINT_SECRET": "0123456789abcdef"}, file=None)
    assert legacy.masked()["checkpoint_secret"] == "***"
    assert KeySet.parse(legacy.checkpoint_keys, legacy.checkpoint_secret).ids == ["default"]
    with pytest.raises(ConfigError, match="checkpoint_insecure"):
        load_settings(env={"STREAM_CHECKPOINT_INSECURE": "maybe"}, file=None)
    with pytest.raises(ConfigError, match="forget_tombstone_ttl_s"):
        load_settings(env={"STREAM_FORGET_TOMBSTONE_TTL_S": "60"}, file=None)


def _envelope(header: dict[str, object] | bytes, payload: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return MAGIC + struct.pack(">I", len(raw)) + raw + payload


def test_hostile_headers_and_indexes_are_refused_not_raised() -> None:
    """Inputs chosen to hit corners the random fuzz rarely reaches."""
    base = {"format": 2, "app_id": "app", "created_ms": NOW, "payload_bytes": 0}
    cases = {
        "non-ASCII key id": _envelope({**base, "kid": "clé"}) + bytes(32),
        "key id of another type": _envelope({**base, "kid": 7}) + bytes(32),
        "deeply nested header": _envelope(b"[" * 3000 + b"]" * 3000),
        "header with NaN": _envelope(b'{"format": NaN}'),
        "bool as size": _envelope({**base, "kid": None, "payload_bytes": True}),
    }
    for what, blob in cases.items():
        with pytest.raises(CheckpointRejected) as info:
            open_models(blob, keys=KEYS, app_id="app", now_ms=NOW, insecure=True)
        assert info.value.reason in ("malformed", "unsigned"), what
    text = json.dumps({}).encode()
    for index in ([["a", "<f8", [0] * 40, 0]], [["a", "<f8", [2**50, 0], 0]],
                  [["a", "<f8", [3], 10**6]], [["a", 5, [1], 0]], {"a": 1}):
        table = json.dumps(index).encode()
        state = (b"SRSTATE1" + struct.pack(">I", len(text)) + text
                 + struct.pack(">I", len(table)) + table + bytes(16))
        blob = seal(state, keys=KeySet(), app_id="app", created_ms=NOW)
        with pytest.raises(CheckpointRejected) as info:
            open_models(blob, keys=KeySet(), insecure=True, app_id="app", now_ms=NOW)
        assert info.value.reason == "malformed", index


def test_out_of_range_numbers_in_a_manifest_are_invalid_state() -> None:
    rec, _ = trained(100)
    manifest, arrays = rec.export_state()
    for path, value in ((("models", "popularity", "ref_ms"), 10**400),
                        (("models", "skip", "intercept"), 1e400),
                        (("n_learned",), -1),
                        (("models", "mf", "rng", "state"), 2**128)):
        broken = json.loads(json.dumps(manifest))
        node = broken
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
        try:
            state = pack_state(broken, arrays)
        except ValueError:  # json refuses to write inf: splice in 1.00e4000 (same length)
            node[path[-1]] = 12345.678
            state = pack_state(broken, arrays).replace(b"12345.678", b"1.00e4000", 1)
        blob = seal(state, keys=KEYS, app_id="app", created_ms=NOW)
        with pytest.raises(CheckpointRejected, match=path[-1]) as info:
            open_models(blob, keys=KEYS, app_id="app", now_ms=NOW)
        assert info.value.reason == "invalid_state"


def test_no_pickle_anywhere_in_the_package_sources() -> None:
    """Issue 15's 'grep -rn pickle stream/' over the sources (numba's own cache files,
    git-ignored under __pycache__, are not sources)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "stream"
    sources = [p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert sources
    hits = [str(p) for p in sources if b"pickle" in p.read_bytes().lower()]
    assert hits == []


def test_every_stateful_part_of_the_recommender_is_in_its_checkpoint() -> None:
    """A model added to the Recommender but not to its checkpoint would silently start
    from scratch after every restart: every attribute that can export state must be one
    of the checkpointed components (or the shared vocabulary)."""
    from stream.core.recommender import _COMPONENTS

    rec, _ = trained(50)
    stateful = {name for name, value in vars(rec).items() if hasattr(value, "export_state")}
    assert stateful == set(_COMPONENTS) | {"vocabulary"}
    manifest, _ = rec.export_state()
    assert set(manifest["models"]) == set(_COMPONENTS)
