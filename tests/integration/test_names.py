"""Track names end to end, the CLI's promises, the JSON Schema and the short-list top-up,
against a real worker, Kafka and Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest

from stream.adapters.redis_store import RecoReader
from stream.config import Settings
from stream.core.events import PlayEvent
from stream.tools.datasets import load_events

from .conftest import WorkerProcess, produce, settings_env, wait_subscribed, wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "configs/schemas/recommendations.schema.json").read_text())


def validate(doc: dict[str, Any], kind: str) -> None:
    """Against the published schema, and as the kind it must be (list or similar)."""
    jsonschema.validate(doc, SCHEMA)
    jsonschema.validate(doc, {"$defs": SCHEMA["$defs"], "$ref": f"#/$defs/{kind}"})


def cli(settings: Settings, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = settings_env(settings) | {"PATH": os.environ["PATH"]}
    if "STREAM_STATE_DIR" in os.environ:  # where `stream stack` keeps its PID files
        env["STREAM_STATE_DIR"] = os.environ["STREAM_STATE_DIR"]
    out = subprocess.run([sys.executable, "-m", "stream.tools.cli", *argv], env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"stream {' '.join(argv)}: {out.stdout[-2000:]}{out.stderr[-2000:]}"
    return out


@pytest.fixture
def named_run(
    settings: Settings, worker_factory, reader: RecoReader, datasets_dir: Path
) -> tuple[Settings, WorkerProcess, list[PlayEvent]]:
    """A worker that has applied 1,500 real Last.fm plays (with their names)."""
    settings = settings.replace(catalog_flush_s=1.0)
    events = load_events(datasets_dir / "lastfm-1k-sample", "lastfm")[:1500]
    worker = worker_factory(settings)
    produce(settings, events)
    wait_until(lambda: worker.metric_value("stream_events_total") >= len(events), 90,
               what="every play applied")
    return settings, worker, events


def test_names_reach_lists_reasons_and_the_catalogue(
    named_run: tuple[Settings, WorkerProcess, list[PlayEvent]], reader: RecoReader
) -> None:
    settings, _, events = named_run
    users = sorted({e.user_id for e in events})
    for user in users:
        doc = wait_until(lambda u=user: reader.get_raw(u), 30, what=f"list of {user}")
        validate(orjson.loads(doc), "list")
    doc = orjson.loads(reader.get_raw(users[0]) or b"{}")
    items = doc["items"]
    assert len(items) == settings.top_k
    assert all(i.get("name") and i.get("artist") for i in items), items
    played = [i for i in items if i["reason_code"] == "played"]
    assert played, "co-occurrence should explain some items"
    for item in played:
        anchor = reader.tracks([item["reason_track_id"]])[item["reason_track_id"]]
        assert item["reason"] == f"because you played {anchor['name']} by {anchor['artist']}"
    # the catalogue: names, first/last seen and coalesced play counts
    top_track, plays = Counter(e.track_id for e in events).most_common(1)[0]
    first = next(e for e in events if e.track_id == top_track)
    info = wait_until(
        lambda: (h := reader.tracks([top_track]).get(top_track, {})).get("plays") == str(plays)
        and h, 30, what="the play count of the most played track")
    assert info["name"] == first.track_name and info["artist"] == first.artist_name
    times = [e.ts_ms for e in events if e.track_id == top_track]
    assert min(times) <= int(info["first_seen"]) <= max(times)  # the first one applied
    assert min(times) <= int(info["last_seen"]) <= max(times)
    assert reader.client.ttl(f"{settings.catalog_prefix}{top_track}") > 0
    # "more like this" documents carry names too
    similar = wait_until(lambda: reader.similar(top_track), 60, what="similar list")
    validate(similar, "similar")
    assert all(i.get("name") for i in similar["items"])
    assert all(i["reason_track_id"] == top_track for i in similar["items"])


def test_cli_documented_flags_against_the_real_stack(
    named_run: tuple[Settings, WorkerProcess, list[PlayEvent]],
    reader: RecoReader,
    datasets_dir: Path,
    tmp_path: Path,
) -> None:
    settings, worker, events = named_run
    user = events[-1].user_id
    track = Counter(e.track_id for e in events).most_common(1)[0][0]
    wait_until(lambda: reader.similar_raw(track), 60, what="similar list")
    # recs / similar: --json prints exactly the stored document (byte for byte: the one
    # stored before or after the command, should the worker rewrite it meanwhile)
    for argv, read in ((("recs", user), reader.get_raw), (("similar", track), reader.similar_raw)):
        before = read(argv[1])
        out = cli(settings, argv[0], argv[1], "--json").stdout
        after = read(argv[1])
        assert before is not None and after is not None
        assert out in (before.decode() + "\n", after.decode() + "\n")
        validate(json.loads(out), "list" if argv[0] == "recs" else "similar")
    doc = json.loads(reader.get_raw(user) or b"{}")
    pretty = cli(settings, "recs", user).stdout
    first = doc["items"][0]
    assert f"{first['name']} by {first['artist']}" in pretty and first["track_id"] not in pretty
    assert "more like" in cli(settings, "similar", track).stdout
    # catalog load: CSV and JSON lines, then the names are in Redis and in `stream similar`
    csv_file = tmp_path / "names.csv"
    csv_file.write_text("track_id,name,artist,album\nzz-1,Airbag,Radiohead,OK Computer\n")
    jsonl = tmp_path / "names.jsonl"
    jsonl.write_text('{"track_id": "zz-2", "track_name": "Let Down", "artist_name": "Radiohead"}\n')
    assert "upserted 1 tracks" in cli(settings, "catalog", "load", str(csv_file)).stdout
    assert "upserted 1 tracks" in cli(settings, "catalog", "load", str(jsonl)).stdout
    got = reader.tracks(["zz-1", "zz-2"])
    assert got["zz-1"] == {"name": "Airbag", "artist": "Radiohead", "album": "OK Computer"}
    assert got["zz-2"] == {"name": "Let Down", "artist": "Radiohead"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"track_id": "ok"}\n{"track_id": ""}\n')
    env = settings_env(settings) | {"PATH": os.environ["PATH"]}
    failed = subprocess.run([sys.executable, "-m", "stream.tools.cli", "catalog", "load", str(bad)],
                            env=env, capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and "bad.jsonl:2" in failed.stderr
    # produce with every documented flag (a CSV of named plays), then the names show
    plays = tmp_path / "plays.csv"
    plays.write_text("user_id,item_id,timestamp,track_name,artist_name\n"
                     + "".join(f"cli-u,zz-{i % 3},{1_700_000_000 + i},Song {i % 3},Band\n"
                               for i in range(6)))
    out = cli(settings, "produce", "--source", "csv", "--path", str(plays), "--count", "6",
              "--rate", "100", "--seconds", "30", "--time-mode", "now", "--quiet",
              "--kafka-bootstrap", settings.kafka_bootstrap, "--plays-topic",
              settings.plays_topic)
    assert "produced 6 csv events" in out.stdout
    doc = wait_until(lambda: json.loads(reader.get_raw("cli-u") or b"null"), 60,
                     what="the CLI listener's list")
    validate(doc, "list")
    assert doc["session"]["plays_total"] <= 6
    # the common flags override the environment
    out = cli(settings, "recs", "cli-u", "--json", "--redis-url", settings.redis_url,
              "--app-id", settings.app_id)
    assert json.loads(out.stdout)["user_id"] == "cli-u"
    # config, stack up (idempotent: the stack is running) and status, top without a terminal
    assert json.loads(cli(settings, "config").stdout)["catalog_prefix"] == settings.catalog_prefix
    assert "stack is up" in cli(settings, "stack", "up", "--no-prometheus").stdout
    assert "redis" in cli(settings, "stack", "status").stdout
    frames = cli(settings, "top", "--url", worker.metrics_url, "--iterations", "2",
                 "--interval", "0.2", "--no-clear").stdout
    assert frames.count(f"worker {settings.app_id}") == 2
    # forget: the list is gone
    cli(settings, "forget", "cli-u")
    wait_until(lambda: reader.get_raw("cli-u") is None, 60, what="forgotten list deleted")
    # replay with its flags on a small slice
    report = tmp_path / "r.json"
    cli(settings, "replay", str(datasets_dir / "movielens-100k"), "--format", "movielens",
        "--k", "10", "--limit", "2000", "--report", str(report), "--seed", "1",
        "--variants", "popularity,blend", "--exclude-seen", "all", "--max-recent", "20",
        "--no-progress", "--plot", str(tmp_path / "hr.png"))
    assert json.loads(report.read_text())
    assert (tmp_path / "hr.png").read_bytes()[:4] == b"\x89PNG"
    assert worker.proc is not None and worker.proc.poll() is None


def test_short_lists_are_topped_up_and_refreshed(
    settings: Settings, worker_factory, reader: RecoReader
) -> None:
    """A listener whose list came out short (a near-empty catalogue) gets a full list once
    others have played enough, without playing again; and never an empty one."""
    settings = settings.replace(short_refresh_s=1.0)
    worker_factory(settings)
    now = int(time.time() * 1000)
    produce(settings, [PlayEvent("early", "only-track", now, 200_000, "e0")])
    first = wait_until(lambda: json.loads(reader.get_raw("early") or b"null"), 60,
                       what="the first listener's list")
    validate(first, "list")
    assert [i["track_id"] for i in first["items"]] == ["only-track"]  # not empty
    assert first["items"][0]["reason_code"] == "trending_topup"
    others = [PlayEvent(f"o{i % 4}", f"t{i}", now + 1 + i, 200_000, f"e{i + 1}")
              for i in range(3 * settings.top_k)]
    produce(settings, others)
    full = wait_until(
        lambda: (d := json.loads(reader.get_raw("early") or b"null"))
        and len(d["items"]) == settings.top_k and d, 60, what="the short list topped up")
    validate(full, "list")
    assert full["seq"] == first["seq"]  # no new play: the same play's list, re-ranked
    assert "only-track" not in {i["track_id"] for i in full["items"]}  # just played


def test_reader_example_renders_names_from_updates(
    settings: Settings, worker_factory, reader: RecoReader
) -> None:
    """examples/reader.py subscribes to the updates and prints lists with names."""
    import threading

    worker_factory()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples/reader.py"), "--redis-url", settings.redis_url,
         "--prefix", settings.redis_prefix, "--channel", settings.notify_channel,
         "--catalog-prefix", settings.catalog_prefix, "--seconds", "120"],
        stdout=subprocess.PIPE, text=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),  # type: ignore[union-attr]
                     daemon=True).start()
    try:
        # its subscription counted by the server (pub/sub keeps no history)
        wait_subscribed(reader.client, settings.notify_channel, timeout=60)
        now = int(time.time() * 1000)
        songs = [("kp", "Karma Police"), ("ns", "No Surprises"), ("ab", "Airbag")]
        plays = [PlayEvent(f"fan{i % 3}", songs[i % 3][0], now + i, 200_000, f"r{i}",
                           track_name=songs[i % 3][1], artist_name="Radiohead")
                 for i in range(12)]
        produce(settings, plays)
        wait_until(lambda: any("by Radiohead" in line for line in lines), 60,
                   what="the reader printing a named list")
        assert any(line.startswith("fan") and "(list #" in line for line in lines)
    finally:
        proc.terminate()
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()


def test_play_counts_are_coalesced_and_written_at_a_clean_stop(
    settings: Settings, worker_factory, reader: RecoReader
) -> None:
    """With an hour between count flushes, the names arrive with the first flush (first
    sighting) but the play counts only when the worker stops cleanly."""
    settings = settings.replace(catalog_flush_s=3600.0)
    worker = worker_factory(settings)
    now = int(time.time() * 1000)
    plays = [PlayEvent(f"c{i % 5}", "hit", now + i, 200_000, f"c{i}", track_name="Hit",
                       artist_name="Band") for i in range(40)]
    produce(settings, plays)
    wait_until(lambda: worker.metric_value("stream_events_total") >= len(plays), 60,
               what="plays applied")
    info = wait_until(lambda: reader.tracks(["hit"]).get("hit"), 30, what="first sighting")
    # the first one applied (the 4 partitions are not applied in event-time order)
    assert info["name"] == "Hit" and now <= int(info["first_seen"]) <= now + 39
    assert "plays" not in info  # coalesced: not written per play
    assert worker.stop() == 0
    info = reader.tracks(["hit"])["hit"]
    assert info["plays"] == "40" and info["last_seen"] == str(now + 39)
