"""Checkpoints in Redis are untrusted: a forged, foreign, garbage or wrong-typed one is
refused (one log line, a metric) and the worker starts fresh and serves; without a key the
worker neither restores nor writes one; a forget is not undone by a crash and a restore."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from stream.adapters.redis_store import RecoReader, checkpoint_key, tombstone_member, tombstones_key
from stream.config import Settings
from stream.core.checkpoint import KeySet, open_models, pack_state, seal, seal_models, settings_keys
from stream.core.recommender import Recommender
from stream.tools.datasets import load_events

from .conftest import produce, settings_env, wait_until
from .test_forget import send_forget

pytestmark = pytest.mark.integration


def _now_ms() -> int:
    return int(time.time() * 1000)


def _planted(settings: Settings, case: str) -> tuple[bytes | None, str]:
    """The blob an attacker with Redis write access plants, and the reason it must get."""
    small = Recommender(seed=1)
    if case == "forged":  # the worker's key id, a guessed secret
        kid = settings_keys(settings).ids[0]
        guess = KeySet.parse(f"{kid}:not-the-real-secret-000")
        return seal_models(small, keys=guess, app_id=settings.app_id,
                           created_ms=_now_ms()), "bad_signature"
    if case == "foreign_app":  # a genuine checkpoint, signed with the real key, of another app
        return seal_models(small, keys=settings_keys(settings), app_id="some-other-app",
                           created_ms=_now_ms()), "foreign_app"
    if case == "garbage":
        return b"\x80\x05" + uuid.uuid4().bytes * 1000, "malformed"
    if case == "bad_state":  # signed with the real key, but the state fails its checks
        manifest, arrays = small.export_state()
        manifest["models"]["mf"]["known"] = 10**12
        return seal(pack_state(manifest, arrays), keys=settings_keys(settings),
                    app_id=settings.app_id, created_ms=_now_ms()), "invalid_state"
    assert case == "wrongtype"  # a hash where the checkpoint string should be
    return None, "malformed"


@pytest.mark.parametrize("case", ["forged", "foreign_app", "garbage", "bad_state", "wrongtype"])
def test_a_poisoned_checkpoint_is_rejected_and_the_worker_serves_fresh(
    case: str, settings: Settings, worker_factory, reader: RecoReader, datasets_dir: Path
) -> None:
    key = checkpoint_key(settings.app_id)
    blob, reason = _planted(settings, case)
    if blob is None:
        reader.client.hset(key, mapping={"a": "b"})
    else:
        reader.client.set(key, blob)
    w = worker_factory()  # it starts: no crash, no crash loop
    assert w.metric_value("stream_checkpoints_rejected_total", reason=reason) == 1
    assert w.metric_value("stream_checkpoints_rejected_total") == 1  # that reason only
    assert w.metric_value("stream_checkpoint_restored") == 0
    rejected = [line for line in w.log_text().splitlines() if "rejected model checkpoint" in line]
    assert len(rejected) == 1 and f"({reason})" in rejected[0], rejected
    # it learns from scratch and serves fresh lists
    events = load_events(datasets_dir / "spotify-mssd-sample", "spotify")
    users = sorted({e.user_id for e in events})
    produce(settings, events)
    wait_until(lambda: all(reader.get(u) for u in users), 60, what="fresh lists for everyone")
    assert w.proc is not None and w.proc.poll() is None
    if case == "wrongtype":
        reader.client.delete(key)  # the hash would only fail the final checkpoint's RENAME
    assert w.stop() == 0


def test_without_a_key_the_worker_neither_restores_nor_writes_checkpoints(
    settings: Settings, worker_factory, reader: RecoReader, datasets_dir: Path
) -> None:
    keyless = settings.replace(checkpoint_keys="")
    key = checkpoint_key(settings.app_id)
    unsigned = seal_models(Recommender(seed=1), keys=KeySet(), app_id=settings.app_id,
                           created_ms=_now_ms())
    reader.client.set(key, unsigned)
    w = worker_factory(keyless)
    assert "model checkpoints DISABLED" in w.log_text()
    assert w.metric_value("stream_checkpoint_restored") == 0
    events = load_events(datasets_dir / "spotify-mssd-sample", "spotify")
    produce(keyless, events)
    wait_until(lambda: w.metric_value("stream_events_total", outcome="processed") == len(events),
               60, what="plays processed")
    assert w.stop() == 0
    assert reader.client.get(key) == unsigned  # no checkpoint written over it
    # checkpoint_insecure=true: the same unsigned checkpoint is restored, with a warning
    w2 = worker_factory(keyless.replace(checkpoint_insecure=True))
    assert w2.metric_value("stream_checkpoint_restored") == 1
    assert "model checkpoints are UNSIGNED" in w2.log_text()


def test_a_forget_is_not_undone_by_a_crash_and_a_restore(
    settings: Settings, worker_factory, reader: RecoReader, datasets_dir: Path
) -> None:
    """The model checkpoint holds item-side state only: a listener's factors live in their
    session (the changelog-backed table, which the forget tombstones), so neither a stale
    checkpoint nor a restore can bring them back; the tombstone still guards restores of
    older checkpoints that held listeners."""
    events = load_events(datasets_dir / "spotify-mssd-sample", "spotify")
    users = sorted({e.user_id for e in events})
    victim, other = users[0], users[1]
    key = checkpoint_key(settings.app_id)

    def checkpoint_users() -> set[str]:
        rec, _ = open_models(reader.client.get(key), keys=settings_keys(settings),
                             app_id=settings.app_id, now_ms=_now_ms())
        return set(rec.mf.user_factors)

    w1 = worker_factory()
    produce(settings, events)
    wait_until(lambda: all(reader.get(u) for u in users), 60, what="docs for every user")
    assert w1.stop() == 0
    assert checkpoint_users() == set()  # no listener in the item-state checkpoint

    # no periodic checkpoint in this run: only the old one is in Redis when it dies
    w2 = worker_factory(settings.replace(checkpoint_interval_s=3600))
    assert w2.metric_value("stream_checkpoint_restored") == 1
    send_forget(settings, victim)
    wait_until(lambda: reader.get(victim) is None, 30, what="victim's recommendations deleted")
    tombstones = reader.client.zrange(tombstones_key(settings.app_id), 0, -1)
    assert tombstones == [tombstone_member(victim).encode()]  # a digest, not the id
    w2.kill()  # SIGKILL: no final checkpoint
    assert victim not in checkpoint_users()

    w3 = worker_factory(settings.replace(checkpoint_interval_s=1.0))
    assert w3.metric_value("stream_checkpoint_restored") == 1
    assert "1 forget tombstone(s), 0 listener(s) dropped" in w3.log_text()
    wait_until(lambda: w3.metric_value("stream_checkpoints_total", result="written") >= 1, 30,
               what="a checkpoint written after the restore")
    restored = checkpoint_users()
    assert restored == set()
    assert reader.get(victim) is None and reader.get(other) is not None
    # the operator's view: `stream checkpoint` verifies it as the worker does
    out = subprocess.run(
        [sys.executable, "-m", "stream.tools.cli", "checkpoint", "--user", victim, "--json"],
        env=settings_env(settings), capture_output=True, text=True, timeout=120, check=True,
    )
    info = json.loads(out.stdout)
    assert info["valid"] and info["kid"] == settings_keys(settings).ids[0]
    assert info["user_has_factors"] is False and info["listeners"] == len(restored)
    forged = subprocess.run(
        [sys.executable, "-m", "stream.tools.cli", "checkpoint", "--json"],
        env=settings_env(settings.replace(checkpoint_keys=f"{info['kid']}:{'x' * 32}")),
        capture_output=True, text=True, timeout=120,
    )
    assert forged.returncode == 1 and json.loads(forged.stdout)["reason"] == "bad_signature"


def test_a_returning_listener_keeps_their_new_state_across_a_restart(
    settings: Settings, worker_factory, reader: RecoReader, datasets_dir: Path
) -> None:
    """Review finding 5: the tombstone carries the forget time; a checkpoint written more
    than ``forget_grace_s`` after the forget holds only what the listener did since (they
    came back), and a restore keeps it while the tombstone lives."""
    settings = settings.replace(forget_grace_s=1.0)
    events = load_events(datasets_dir / "spotify-mssd-sample", "spotify")
    users = sorted({e.user_id for e in events})
    victim = users[0]
    key = checkpoint_key(settings.app_id)

    def checkpoint_users() -> set[str]:
        rec, _ = open_models(reader.client.get(key), keys=settings_keys(settings),
                             app_id=settings.app_id, now_ms=_now_ms())
        return set(rec.mf.user_factors)

    w1 = worker_factory(settings)
    produce(settings, events)
    wait_until(lambda: all(reader.get(u) for u in users), 60, what="docs for every user")
    send_forget(settings, victim)
    wait_until(lambda: reader.get(victim) is None, 30, what="victim forgotten")
    time.sleep(1.5)  # past the grace: what comes now was learned after the forget
    base = max(e.ts_ms for e in events) + 60_000
    produce(settings, [
        type(events[0])(victim, f"back-{i}", base + i * 1000, 200_000, f"back-{i}")
        for i in range(3)
    ])
    wait_until(lambda: reader.get(victim), 30, what="the returning listener's list")
    assert w1.stop() == 0
    # since #17 the returning listener's state lives in their session (the changelog); the
    # checkpoint is item-side only
    assert checkpoint_users() == set()

    w2 = worker_factory(settings)
    assert w2.metric_value("stream_checkpoint_restored") == 1
    assert "1 forget tombstone(s), 0 listener(s) dropped" in w2.log_text()
    produce(settings, [type(events[0])(victim, "back-3", base + 3000, 200_000, "back-3")])
    doc = wait_until(lambda: (d := reader.get(victim)) and d.seq == 4 and d, 60,
                     what="the returning listener's next list")
    assert doc.session["plays_total"] == 4, "the restart dropped state learned after the forget"
    assert w2.stop() == 0


def test_a_forget_reaches_every_worker_that_holds_the_listeners_model_state(
    settings: Settings, worker_factory, reader: RecoReader, datasets_dir: Path
) -> None:
    """Review finding 1: two workers of one app both restore the shared checkpoint; the
    forget is applied by the owner and broadcast on the signals topic, and the other worker
    applies the broadcast. Since #17 the checkpoint is item-side only (a listener's model
    state lives in their session), so the final checkpoint holds no listener at all."""
    from .conftest import free_port

    events = load_events(datasets_dir / "spotify-mssd-sample", "spotify")
    users = sorted({e.user_id for e in events})
    victim = users[0]
    key = checkpoint_key(settings.app_id)

    def checkpoint_users() -> set[str]:
        rec, _ = open_models(reader.client.get(key), keys=settings_keys(settings),
                             app_id=settings.app_id, now_ms=_now_ms())
        return set(rec.mf.user_factors)

    w1 = worker_factory(settings)
    produce(settings, events)
    wait_until(lambda: all(reader.get(u) for u in users), 60, what="docs for every user")
    assert w1.stop() == 0
    assert checkpoint_users() == set()  # since #17 item-side only: no listener in it

    quiet = settings.replace(checkpoint_interval_s=3600.0)  # checkpoints only at a stop
    a = worker_factory(quiet)
    b = worker_factory(quiet.replace(metrics_port=free_port()))
    for w in (a, b):
        assert w.metric_value("stream_checkpoint_restored") == 1
    wait_until(lambda: all(w.metric_value("stream_assigned_partitions") > 0 for w in (a, b)),
               90, what="both workers own partitions")
    send_forget(settings, victim)
    wait_until(lambda: reader.get(victim) is None, 30, what="victim forgotten")
    owner, other = (a, b) if a.metric_value(
        "stream_control_commands_total", result="forgotten") else (b, a)
    # the other worker holds no model state of the victim (it lives in the session, on the
    # owner's partition), so it applies the broadcast as "forgotten_remote_unknown"
    wait_until(lambda: sum(other.metric_value("stream_control_commands_total", result=r)
                           for r in ("forgotten_remote", "forgotten_remote_unknown")) == 1, 30,
               what="the forget's broadcast applied by the other worker")
    assert owner.stop() == 0
    assert other.stop() == 0  # its final checkpoint is the one left in Redis
    assert checkpoint_users() == set(), "a listener's state reached the item-side checkpoint"
