"""Settings: one frozen, validated object.

Precedence: built-in defaults < a TOML file (``$STREAM_CONFIG``, else ``configs/stream.toml``
when run from a checkout) < environment variables ``STREAM_<NAME>`` (upper-case field name).
Bad values fail at start-up with a :class:`ConfigError` naming the setting.

>>> s = load_settings(env={"STREAM_TOP_K": "5"}, file=None)
>>> s.top_k
5
>>> load_settings(env={"STREAM_TOP_K": "zero"}, file=None)
Traceback (most recent call last):
...
stream.errors.ConfigError: setting 'top_k' (env STREAM_TOP_K): expected an integer, got 'zero'
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote_plus, urlsplit, urlunsplit

from stream.errors import ConfigError

SECRET_FIELDS: Final = frozenset(
    {"redis_password", "kafka_sasl_password", "checkpoint_secret", "checkpoint_keys",
     "worker_keys"}
)
#: the live worker's rankers (setting ``ranker``)
RANKERS: Final = ("fixed", "learned")
#: what the start-up check of the Faust seam does on a mismatch (setting faust_compat_check)
COMPAT_CHECKS: Final = ("error", "warn", "off")
_DEFAULT_FILE: Final = Path(__file__).resolve().parents[1] / "configs" / "stream.toml"


@dataclass(frozen=True, slots=True)
class Settings:
    """Every knob of the worker, producer and stack. See README "Configuration"."""

    # Kafka
    kafka_bootstrap: str = "127.0.0.1:9092"
    app_id: str = "stream-reco"
    plays_topic: str = "plays"
    dlq_topic: str = "plays-dlq"
    control_topic: str = "plays-control"
    partitions: int = 4
    replication_factor: int = 1
    #: ``min.insync.replicas`` of the topics ensure_topics creates (0: the broker's default;
    #: ``stream stack up --brokers 3`` sets 2 on its brokers, so Faust's changelog gets it too)
    min_insync_replicas: int = 0
    #: acknowledgements every producer of the worker waits for: Faust's (changelog, DLQ,
    #: signals; faust-streaming's own default ``producer_acks=-1`` is already "all") and
    #: stream.adapters.kafka.make_producer's (aiokafka defaults to 1 unless idempotent). "all"
    #: (with min_insync_replicas=2 on 3 brokers) loses no acknowledged record when one
    #: broker dies; "1" acknowledges once the leader alone has it.
    kafka_acks: str = "all"
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str = ""
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = ""
    kafka_ssl_cafile: str = ""
    #: longest the broker may hold an empty fetch (Faust's own value is 1,500 ms; see
    #: stream.faustx.consumer)
    kafka_fetch_max_wait_ms: int = 100
    #: bytes a fetch waits for (up to kafka_fetch_max_wait_ms) before the broker answers
    kafka_fetch_min_bytes: int = 1
    #: run Faust's Kafka consumer in its own thread (Faust's default) instead of on the
    #: worker's event loop (stream.faustx.consumer: at 1,000 events/s the thread's hand-overs cost
    #: ~7 ms of freshness p50; the thread only helps an agent that blocks for seconds)
    kafka_consumer_thread: bool = False
    #: the start-up check that the Faust/mode/aiokafka code the seam (stream.faustx) copies
    #: or overrides is the code it was tested with (stream.faustx.compat): "error" stops the
    #: worker naming each changed function, "warn" logs them and starts, "off" skips it
    faust_compat_check: str = "error"
    #: where the session table lives between changelog records: "memory" (rebuilt from the
    #: Kafka changelog at every start: nothing on disk) or "rocksdb" (faust-streaming's
    #: RocksDB store via rocksdict, ``pip install 'stream-reco[rocksdb]'``: a restart on the
    #: same host reads only the changelog tail). ``memory://`` / ``rocksdb://`` also work.
    #: Memory stays the default: no native dependency or disk state to manage, and every
    #: play skips a serialise + RocksDB put (see README "Recovery: table store and standbys")
    table_store: str = "memory"
    #: the worker's local data: Faust's table files live in ``<data_dir>/<app_id>/``
    #: (empty: ``$STREAM_STATE_DIR/data``, else ``~/.local/state/stream-reco/data``). Two
    #: workers on one host need different data_dirs (the worker locks its directory)
    data_dir: str = ""
    #: Faust standby replicas per table partition: another worker keeps a copy of each
    #: partition's table by reading its changelog, and takes the partition over without
    #: replaying it. Only a persistent store keeps that copy usable (with table_store=memory
    #: a takeover replays the whole changelog partition anyway, so the worker runs none)
    table_standby_replicas: int = 1
    #: how long the group coordinator waits for a silent (killed) worker's heartbeat before
    #: moving its partitions to the others (the broker allows 6 .. 1800 s by default)
    kafka_session_timeout_s: float = 10.0
    #: Kafka static membership (``group.instance.id``, KIP-345): a worker restarted with the
    #: same id takes its old place in the group at once instead of waiting out the session
    #: timeout (empty: dynamic membership). Unique per worker process in the group
    kafka_group_instance_id: str = ""
    # Redis
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_password: str = ""
    #: ACL user (Redis 6+); empty = the default user. The password is ``redis_password``.
    redis_username: str = ""
    #: TLS (also implied by a rediss:// URL): CA bundle to verify the server, and an optional
    #: client certificate + key for servers that require mutual TLS.
    redis_tls_ca_file: str = ""
    redis_tls_cert_file: str = ""
    redis_tls_key_file: str = ""
    #: Redis Cluster (redis-py's cluster client: slots, MOVED/ASK, failovers); also implied
    #: by a ``redis+cluster://`` (or ``rediss+cluster://``) redis_url. Checked at start-up
    #: against the server's ``cluster_enabled``.
    redis_cluster: bool = False
    redis_prefix: str = "reco:"
    similar_prefix: str = "similar:"
    notify_channel: str = "reco-updates"
    reco_ttl_s: int = 7 * 24 * 3600
    similar_refresh_s: float = 10.0
    #: track catalogue: hash key prefix (``track:{track_id}``: name, artist, album,
    #: first_seen, last_seen, plays), its TTL (renewed by plays), how often the coalesced
    #: play counts are written, and the worker's bounded in-memory name map
    catalog_prefix: str = "track:"
    catalog_ttl_s: int = 30 * 24 * 3600
    catalog_flush_s: float = 5.0
    catalog_max_tracks: int = 200_000
    catalog_max_chars: int = 20_000_000
    #: how often listeners whose list came out shorter than top_k are re-ranked (0 = never)
    short_refresh_s: float = 5.0
    #: extra wait after the agent's batch before the writer ranks and flushes (0: at once;
    #: the agent's batch is the burst already -- 2 ms cost ~5 ms of p50 at 1,000 ev/s)
    redis_flush_interval_ms: float = 0.0
    redis_max_batch: int = 512
    redis_retry_max_s: float = 5.0
    #: the plays agent takes up to this many already-buffered plays, for at most
    #: ``agent_batch_ms`` since the first, and applies them stage by stage (1 = one at a time)
    agent_batch: int = 256
    agent_batch_ms: float = 10.0
    #: ... and no more than recent batches say fit in this many ms of processing (the
    #: batch is one step of the event loop: its length bounds the loop's stall)
    agent_batch_budget_ms: float = 15.0
    #: while a backlog is drained (a partition 256+ plays behind), a listener is ranked at
    #: most once per this many ms (their plays come back to back; 0 = every flush)
    catch_up_rank_ms: float = 200.0
    # Recommendations and sessions
    top_k: int = 10
    session_gap_s: int = 1800
    max_recent: int = 30
    max_seen: int = 48
    #: bounded catalogue: above this many tracks the least popular are evicted (0 = no bound)
    max_tracks: int = 500_000
    #: bounded per-listener model state: at most this many listeners keep MF factors, the
    #: most recently played (0 = no bound; see docs/benchmarks.md "Memory under hostile ids")
    max_users: int = 500_000
    #: bounded session table: above this many listeners the least recently active ones
    #: are evicted -- deleted through the table (a changelog tombstone) and their Redis
    #: list deleted, so a returning listener starts afresh (0 = no bound; see
    #: docs/reliability.md, "Session table cap")
    max_sessions: int = 500_000
    #: what ranks the live lists: "fixed" (the fixed-weight blend, compiled, batched per
    #: flush) or "learned" (the learned blend over session-kNN/STAN, SR, co-occurrence, MF
    #: and trending, which also learns those session models). "learned" measured
    #: 0.25-0.56x the fixed blend's replay events/s and freshness at 1,000 plays/s was not
    #: re-measured with it (docs/blend.md), so the worker keeps "fixed" unless asked
    ranker: str = "fixed"
    # Live quality window (events) and model checkpoints (Redis key model:{app_id})
    quality_window: int = 2000
    #: also rank each single component (popularity, mf, cooccurrence; with the learned
    #: ranker sknn, stan, sr and fixed too) on every Nth evaluated play, for the per-variant
    #: quality gauges next to the published blend (0 = off;
    #: stream.core.evaluation.ComponentQuality). 50 since session 13 (10 before): the
    #: sampled rankings cost ~20 us per play at 10 (docs/benchmarks.md, "Session 13: P1");
    #: each variant's window of quality_window events then spans 50x as many plays
    quality_components_every: int = 50
    checkpoint_interval_s: float = 30.0
    #: checkpoint signing keys, "kid1:secret1,kid2:secret2": the first signs, any verifies
    #: (rotation: put the new key first, drop the old one once it has signed nothing live)
    checkpoint_keys: str = ""
    #: a single key (older configurations): the same as checkpoint_keys "default:<secret>",
    #: listed after checkpoint_keys
    checkpoint_secret: str = ""
    #: without any key, write and restore unsigned checkpoints anyway (off: no checkpoints)
    checkpoint_insecure: bool = False
    #: a checkpoint older than this is not restored (0 = no limit)
    checkpoint_max_age_s: float = 30 * 24 * 3600
    #: a checkpoint larger than this is not read
    checkpoint_max_bytes: int = 1 << 30
    #: forget tombstones (restore drops forgotten listeners) are kept this long; at least
    #: checkpoint_max_age_s (0 = forever)
    forget_tombstone_ttl_s: float = 90 * 24 * 3600
    #: a restore drops a tombstoned listener's model state only from a checkpoint written
    #: at most this long after the forget (its broadcast reaches every running worker well
    #: within it); a later checkpoint's state for them was learned after the forget (a
    #: returning listener) and is kept
    forget_grace_s: float = 300.0
    #: keys that sign and verify track signals and control commands (stream.processing.auth):
    #: ``kid:secret[,kid:secret...]``, the first signs, any verifies. Empty: signals are
    #: neither sent nor applied and control commands are refused, unless worker_insecure
    worker_keys: str = ""
    #: accept unsigned signals and control commands (a trusted test network, or a rolling
    #: upgrade from unsigned workers); a record signed with a wrong or unknown key is
    #: still refused when worker_keys is set
    worker_insecure: bool = False
    #: a control command older (or further ahead) than this, against the broker's append
    #: time of its record, is refused as stale; nonces are remembered for this long
    control_max_age_s: int = 900
    # Input limits
    max_event_bytes: int = 16 * 1024
    max_future_s: int = 24 * 3600
    # Observability
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 8000
    log_level: str = "info"
    #: warn (once per episode, with every asyncio task's stack) when messages wait but none
    #: has been applied for this long; see stream.worker.watchdog
    stall_warning_s: float = 15.0
    #: every this many seconds, collect the young garbage and move every surviving object
    #: out of the cyclic garbage collector's full scans (gc.freeze; 0 = never after
    #: start-up): listener state grows with every listener, and a full collection over
    #: 150k listeners held the event loop ~0.4 s; freezing every 5,000 new listeners
    #: left no full collection at all (docs/benchmarks.md, "Memory under hostile ids")
    gc_freeze_interval_s: float = 5.0
    #: diagnostics: log where the event loop is held whenever it is held at least this
    #: many ms (a thread samples its stack; stream.worker.watchdog.StallSampler). 0 = off
    stall_sample_ms: float = 0.0
    #: a SIGTERMed / Ctrl-C'd worker exits within this many seconds even if Kafka is
    #: unreachable (the producer's flush gives up after a third of it; at the deadline the
    #: worker logs what it was waiting for and exits with status 70; see stream.faustx.shutdown)
    shutdown_timeout_s: float = 30.0

    def masked(self) -> dict[str, Any]:
        """The effective settings with secrets (and passwords inside URLs) masked."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "checkpoint_keys" and value:
                value = ",".join(f"{item.partition(':')[0].strip()}:***"
                                 for item in value.split(",") if item.strip())
            elif f.name in SECRET_FIELDS and value:
                value = "***"
            elif f.name.endswith("_url"):
                value = mask_url(value)
            out[f.name] = value
        return out

    def replace(self, **changes: Any) -> Settings:
        return validate(dataclasses.replace(self, **changes))


#: query parameters whose value is a secret (``?password=``, ``?access_token=``, ...)
_SECRET_QUERY_NAME: Final = re.compile(
    r"pass|pwd|secret|token|auth|credential|api[_-]?key|signature|^sig$|^key$", re.IGNORECASE
)


def mask_url(url: str) -> str:
    """The URL with its password and any secret query parameters masked.

    >>> mask_url("redis://user:pw@host:6379/0")
    'redis://user:***@host:6379/0'
    >>> mask_url("redis://host/0?password=pw&ssl_ca_certs=/ca.pem&access_token=t")
    'redis://host/0?password=***&ssl_ca_certs=/ca.pem&access_token=***'
    """
    parts = original = urlsplit(url)
    if parts.password is not None:
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = parts.username or ""
        parts = parts._replace(netloc=f"{user}:***@{netloc}")
    if parts.query:
        # piece by piece, so everything that is not a secret stays byte for byte as given
        pieces = []
        for piece in parts.query.split("&"):
            name, sep, _ = piece.partition("=")
            if sep and _SECRET_QUERY_NAME.search(unquote_plus(name)):
                piece = f"{name}=***"
            pieces.append(piece)
        parts = parts._replace(query="&".join(pieces))
    return url if parts == original else urlunsplit(parts)


def _coerce(name: str, source: str, raw: Any, kind: type) -> Any:
    where = f"setting '{name}' ({source})"
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {raw!r}")
    if kind is int:
        if isinstance(raw, bool):
            raise ConfigError(f"{where}: expected an integer, got {raw!r}")
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {raw!r}") from None
    if kind is float:
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {raw!r}") from None
    if not isinstance(raw, str):
        raise ConfigError(f"{where}: expected a string, got {raw!r}")
    return raw


_TYPES: Final = {"int": int, "float": float, "str": str, "bool": bool}


def load_settings(
    env: Mapping[str, str] | None = None,
    file: str | Path | None | bool = True,
    **overrides: Any,
) -> Settings:
    """Build validated settings. ``file=True`` means "$STREAM_CONFIG or the default file"."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    known = {f.name: _TYPES[str(f.type)] for f in fields(Settings)}
    path: Path | None
    if file is True:
        path = Path(env["STREAM_CONFIG"]) if env.get("STREAM_CONFIG") else None
        if path is None and _DEFAULT_FILE.exists():
            path = _DEFAULT_FILE
    elif file in (None, False):
        path = None
    else:
        path = Path(file)  # type: ignore[arg-type]
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} (STREAM_CONFIG) does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: invalid TOML: {exc}") from None
        flat = dict(data.get("stream", data))
        for key, raw in flat.items():
            if key not in known:
                raise ConfigError(f"config file {path}: unknown setting '{key}'")
            values[key] = _coerce(key, f"file {path}", raw, known[key])
    for key, kind in known.items():
        env_name = f"STREAM_{key.upper()}"
        if env_name in env:
            values[key] = _coerce(key, f"env {env_name}", env[env_name], kind)
    for key, raw in overrides.items():
        if key not in known:
            raise ConfigError(f"unknown setting '{key}'")
        if raw is not None:
            values[key] = _coerce(key, "command line", raw, known[key])
    return validate(Settings(**values))


def validate(s: Settings) -> Settings:
    """Cross-field and range checks; raise ConfigError naming the setting."""
    _check_ranges(s)
    _check_keys(s)
    _check_names(s)
    return s


def _bad(name: str, why: str) -> ConfigError:
    """The error for setting ``name`` (with its environment variable)."""
    return ConfigError(f"setting '{name}' (env STREAM_{name.upper()}): {why}")


def _check_ranges(s: Settings) -> None:
    """Numbers within their ranges, choices among their values."""
    positive = (
        "partitions",
        "replication_factor",
        "reco_ttl_s",
        "redis_max_batch",
        "agent_batch",
        "kafka_fetch_max_wait_ms",
        "kafka_fetch_min_bytes",
        "top_k",
        "session_gap_s",
        "max_recent",
        "max_seen",
        "quality_window",
        "max_event_bytes",
        "max_future_s",
        "stall_warning_s",
        "catalog_ttl_s",
        "catalog_flush_s",
        "catalog_max_tracks",
        "catalog_max_chars",
        "control_max_age_s",
    )
    for name in positive:
        if getattr(s, name) <= 0:
            raise _bad(name, f"must be > 0, got {getattr(s, name)}")
    if s.top_k > 500:
        raise _bad("top_k", f"must be <= 500, got {s.top_k}")
    if s.max_tracks < 0:
        raise _bad("max_tracks", "must be >= 0 (0 = unbounded)")
    if s.max_users < 0:
        raise _bad("max_users", f"must be >= 0 (0 = unbounded), got {s.max_users}")
    if s.quality_components_every < 0:
        raise _bad("quality_components_every",
                   f"must be >= 0 (0 = off), got {s.quality_components_every}")
    if s.faust_compat_check not in COMPAT_CHECKS:
        raise _bad("faust_compat_check",
                  f"must be one of {', '.join(COMPAT_CHECKS)}, got {s.faust_compat_check!r}")
    if s.ranker not in RANKERS:
        raise _bad("ranker", f"must be one of {', '.join(RANKERS)}, got {s.ranker!r}")
    if s.forget_grace_s < 0:
        raise _bad("forget_grace_s", f"must be >= 0, got {s.forget_grace_s}")
    if s.max_sessions < 0:
        raise _bad("max_sessions", f"must be >= 0 (0 = unbounded), got {s.max_sessions}")
    if s.stall_sample_ms < 0:
        raise _bad("stall_sample_ms", f"must be >= 0 (0 = off), got {s.stall_sample_ms}")
    if not 3 <= s.shutdown_timeout_s <= 3600:
        raise _bad("shutdown_timeout_s",
                   f"must be between 3 and 3600 s, got {s.shutdown_timeout_s}")
    if s.gc_freeze_interval_s < 0:
        raise _bad("gc_freeze_interval_s",
                   f"must be >= 0 (0 = off), got {s.gc_freeze_interval_s}")
    if s.short_refresh_s < 0:
        raise _bad("short_refresh_s", "must be >= 0 (0 = never)")
    if s.similar_refresh_s < 0:
        raise _bad("similar_refresh_s", "must be >= 0")
    if s.redis_flush_interval_ms < 0:
        raise _bad("redis_flush_interval_ms", "must be >= 0")
    if s.agent_batch_ms < 0:
        raise _bad("agent_batch_ms", "must be >= 0")
    if not 0 < s.agent_batch_budget_ms <= 1000:
        raise _bad("agent_batch_budget_ms",
                   f"must be > 0 and <= 1000 ms, got {s.agent_batch_budget_ms}")
    if s.catch_up_rank_ms < 0:
        raise _bad("catch_up_rank_ms", "must be >= 0 (0 = rank at every flush)")
    if not 0 <= s.metrics_port <= 65535:
        raise _bad("metrics_port", f"must be a TCP port (0-65535), got {s.metrics_port}")


def _check_keys(s: Settings) -> None:
    """Checkpoint and worker keys, checkpoint and tombstone ages."""
    if s.checkpoint_interval_s < 0:
        raise _bad("checkpoint_interval_s", "must be >= 0 (0 disables checkpoints)")
    try:
        from stream.core.checkpoint import KeySet

        KeySet.parse(s.checkpoint_keys)
    except ValueError as exc:
        raise _bad("checkpoint_keys", str(exc)) from None
    try:
        KeySet.parse("", s.checkpoint_secret)
    except ValueError as exc:
        raise _bad("checkpoint_secret", str(exc)) from None
    if "default" in KeySet.parse(s.checkpoint_keys).ids and s.checkpoint_secret:
        raise _bad("checkpoint_secret", "key id 'default' is taken by checkpoint_keys")
    if s.checkpoint_max_age_s < 0:
        raise _bad("checkpoint_max_age_s", "must be >= 0 (0 = no limit)")
    if s.checkpoint_max_bytes <= 0:
        raise _bad("checkpoint_max_bytes", "must be > 0")
    if s.forget_tombstone_ttl_s < 0:
        raise _bad("forget_tombstone_ttl_s", "must be >= 0 (0 = forever)")
    if s.forget_tombstone_ttl_s and (
        not s.checkpoint_max_age_s or s.forget_tombstone_ttl_s < s.checkpoint_max_age_s
    ):
        raise _bad("forget_tombstone_ttl_s", "must be 0 (forever) or at least "
                  "checkpoint_max_age_s (a restorable checkpoint may predate a forget)")
    from stream.processing.auth import KeyRing

    try:
        KeyRing.parse(s.worker_keys)
    except ValueError as exc:
        raise _bad("worker_keys", f"{exc}; expected kid:secret[,kid:secret...]") from None


def _check_names(s: Settings) -> None:
    """Topic and group names, URLs, security protocols, files, log level."""
    for name in ("app_id", "plays_topic", "dlq_topic", "control_topic"):
        value = getattr(s, name)
        if not value or any(c not in _TOPIC_CHARS for c in value) or len(value) > 200:
            raise _bad(name, f"{value!r} is not a valid Kafka topic/group name ([a-zA-Z0-9._-]+)")
    if s.plays_topic == s.dlq_topic:
        raise _bad("dlq_topic", "must differ from plays_topic")
    if s.control_topic in (s.plays_topic, s.dlq_topic):
        raise _bad("control_topic", "must differ from plays_topic and dlq_topic")
    if not s.kafka_bootstrap or any(":" not in h for h in s.kafka_bootstrap.split(",")):
        raise _bad("kafka_bootstrap", f"expected host:port[,host:port], got {s.kafka_bootstrap!r}")
    scheme = urlsplit(s.redis_url).scheme
    if scheme not in ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster"):
        raise _bad(
            "redis_url",
            "scheme must be redis://, rediss://, unix://, redis+cluster:// or "
            f"rediss+cluster://, got {scheme!r}",
        )
    if scheme == "unix" and s.redis_cluster:
        raise _bad("redis_cluster", "a Redis Cluster is reached over TCP, not a unix:// socket")
    if s.kafka_acks not in ("all", "1"):
        raise _bad("kafka_acks", f"must be 'all' or '1', got {s.kafka_acks!r}")
    if not 0 <= s.min_insync_replicas <= s.replication_factor:
        raise _bad(
            "min_insync_replicas",
            f"must be between 0 and replication_factor ({s.replication_factor}), "
            f"got {s.min_insync_replicas}",
        )
    if bool(s.redis_tls_cert_file) != bool(s.redis_tls_key_file):
        name = "redis_tls_key_file" if s.redis_tls_cert_file else "redis_tls_cert_file"
        raise _bad(name, "redis_tls_cert_file and redis_tls_key_file must be set together")
    tls_files = ("redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file")
    for name in (*tls_files, "kafka_ssl_cafile"):
        path = getattr(s, name)
        if path and not Path(path).is_file():
            raise _bad(name, f"file {path!r} does not exist")
    if table_store_kind(s.table_store) is None:
        raise _bad("table_store", f"must be memory or rocksdb, got {s.table_store!r}")
    if table_store_kind(s.table_store) == "rocksdb" and not rocksdb_available():
        raise _bad("table_store", "rocksdb needs the rocksdict package, which is not "
                   "installed: pip install 'stream-reco[rocksdb]' (scripts/setup.sh does)")
    if s.table_standby_replicas < 0:
        raise _bad("table_standby_replicas", f"must be >= 0, got {s.table_standby_replicas}")
    if s.kafka_session_timeout_s < 1 or s.kafka_session_timeout_s > 1800:
        raise _bad("kafka_session_timeout_s",
                   f"must be between 1 and 1800 s, got {s.kafka_session_timeout_s}")
    if s.kafka_group_instance_id and (
        any(c not in _TOPIC_CHARS for c in s.kafka_group_instance_id)
        or len(s.kafka_group_instance_id) > 200
    ):
        raise _bad("kafka_group_instance_id",
                   f"{s.kafka_group_instance_id!r} is not a valid id ([a-zA-Z0-9._-]+)")
    if s.kafka_security_protocol not in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
        raise _bad("kafka_security_protocol", f"unsupported {s.kafka_security_protocol!r}")
    if s.kafka_security_protocol.startswith("SASL") and s.kafka_sasl_mechanism not in (
        "PLAIN",
        "SCRAM-SHA-256",
        "SCRAM-SHA-512",
    ):
        raise _bad("kafka_sasl_mechanism", "must be PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512")
    if s.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
        raise _bad("log_level", f"unknown level {s.log_level!r}")


def table_store_kind(value: str) -> str | None:
    """``memory`` or ``rocksdb`` for a table_store value (``rocksdb`` or ``rocksdb://``),
    None if it is neither.

    >>> table_store_kind("rocksdb://"), table_store_kind("memory"), table_store_kind("s3://x")
    ('rocksdb', 'memory', None)
    """
    kind = value.strip().lower()
    kind = kind[: -len("://")] if kind.endswith("://") else kind
    return kind if kind in ("memory", "rocksdb") else None


def rocksdb_available() -> bool:
    """Whether faust-streaming's RocksDB store can be used here (rocksdict importable)."""
    import importlib.util

    return importlib.util.find_spec("rocksdict") is not None


_TOPIC_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def redis_auth(s: Settings) -> dict[str, Any]:
    """Redis credentials and TLS files as keyword arguments for stream.adapters.redis_store
    clients."""
    return {
        "password": s.redis_password,
        "username": s.redis_username,
        "tls_ca_file": s.redis_tls_ca_file,
        "tls_cert_file": s.redis_tls_cert_file,
        "tls_key_file": s.redis_tls_key_file,
        "cluster": s.redis_cluster,
    }
