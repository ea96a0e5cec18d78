"""Where the session table lives, and how a worker recovers it: Faust settings for the table
store (memory or RocksDB), the data directory, standby replicas and group membership.

- ``table_store=memory``: Faust's in-memory store. A (re)started worker rebuilds its
  partitions by reading their whole changelog (issue #18: 200k records took 26 s).
- ``table_store=rocksdb``: faust-streaming's RocksDB store (rocksdict). Each partition is a
  RocksDB database under ``<data_dir>/<app_id>/tables/`` that records the highest changelog
  offset it holds, so a worker restarting on the same host reads only the changelog tail.
- ``table_standby_replicas``: another worker keeps each partition's table by reading its
  changelog, and takes the partition over from its copy. In faust-streaming 0.15.3 that copy
  is only usable with a persistent store: the memory store reports no persisted offset (a
  promoted standby replays its partition from the start) and drops standby keys at every
  rebalance (``stores/memory.py``, ``on_recovery_completed``). So with ``memory`` the worker
  asks Faust for no standbys at all (they would cost memory and changelog reads for nothing).
- ``kafka_group_instance_id``: static membership, so a restarted worker takes its old place
  in the consumer group at once instead of waiting out ``kafka_session_timeout_s``.

Everything here is plain settings plumbing, except :func:`read_in_partition` and
:func:`approx_len`, which use the RocksDB store's internals (checked against the pinned
faust-streaming version by :func:`check_store_api`).
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import Any, Final

from stream.config import Settings, table_store_kind
from stream.errors import ConfigError

logger = logging.getLogger(__name__)

#: RocksDB memory per partition database: Faust's defaults are a 2 GiB block cache and
#: 3 x 64 MiB memtables *per partition*; the session table needs far less
ROCKSDB_OPTIONS: Final = {
    "write_buffer_size": 16 << 20,
    "max_write_buffer_number": 2,
    "block_cache_size": 64 << 20,
}
#: faust-streaming's RocksDB store attributes this module relies on
_STORE_API: Final = ("_db_for_partition", "_encode_key", "_decode_value", "_dbs_for_actives")


def data_dir(settings: Settings) -> Path:
    """The worker's data directory: ``<data_dir>/<app_id>`` (see setting ``data_dir``)."""
    if settings.data_dir:
        base = Path(settings.data_dir).expanduser()
    else:
        state = os.environ.get("STREAM_STATE_DIR")
        base = Path(state) / "data" if state else Path.home() / ".local/state/stream-reco/data"
    return base / settings.app_id


def faust_app_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``faust.App`` that decide the table store and recovery."""
    kind = table_store_kind(settings.table_store)
    standbys = settings.table_standby_replicas if kind == "rocksdb" else 0
    if kind == "memory" and settings.table_standby_replicas:
        logger.info("table_standby_replicas=%d is not used with table_store=memory (a promoted "
                    "standby would replay its whole partition anyway): no standbys",
                    settings.table_standby_replicas)
    path = data_dir(settings)
    path.mkdir(parents=True, exist_ok=True)  # Faust creates only the last level
    options: dict[str, Any] = {
        "store": f"{kind}://",
        "datadir": str(path),
        "table_standby_replicas": standbys,
        "broker_session_timeout": settings.kafka_session_timeout_s,
        # at least three heartbeats per session timeout (Kafka's own guidance)
        "broker_heartbeat_interval": min(2.0, settings.kafka_session_timeout_s / 3),
    }
    if settings.kafka_group_instance_id:
        options["consumer_group_instance_id"] = settings.kafka_group_instance_id
    logger.info("table store: %s, data dir %s, standby replicas %d, session timeout %.1f s%s",
                kind, options["datadir"], standbys, settings.kafka_session_timeout_s,
                f", static member {settings.kafka_group_instance_id}"
                if settings.kafka_group_instance_id else "")
    return options


def table_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for the session table (RocksDB memory bounds)."""
    if table_store_kind(settings.table_store) == "rocksdb":
        return {"options": dict(ROCKSDB_OPTIONS)}
    return {}


class DataDirLock:
    """An exclusive lock on the worker's data directory for the life of the process.

    RocksDB itself refuses a second opener of a partition, but Faust retries that for 30 s
    and then crashes mid-recovery; two workers sharing a directory is a configuration error,
    so it is reported at start-up, naming the setting."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> DataDirLock:
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".worker.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(
                f"setting 'data_dir' (env STREAM_DATA_DIR): {self.path} is in use by another "
                f"worker (pid {holder}); give each worker on a host its own data_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def prepare_store(settings: Settings) -> DataDirLock | None:
    """At start-up, with ``table_store=rocksdb``: check faust-streaming's RocksDB store still
    has what this module uses, and lock the data directory (returned: keep it for the life
    of the process). None with the memory store, which keeps nothing on disk."""
    if table_store_kind(settings.table_store) != "rocksdb":
        return None
    from faust.stores.rocksdb import Store

    check_store_api(Store)
    return DataDirLock(data_dir(settings)).acquire()


_ROCKSDB: Final = "faust.stores.rocksdb"


def is_persistent(store: Any) -> bool:
    """Whether a Faust store keeps its data (and changelog offsets) across restarts."""
    return type(store).__module__ == _ROCKSDB


def check_store_api(store: Any) -> None:
    """Fail loudly (at start-up) if the RocksDB store (class) lacks what this module uses."""
    if is_persistent(store) or (isinstance(store, type) and store.__module__ == _ROCKSDB):
        missing = [name for name in _STORE_API if not hasattr(store, name)]
        if missing:
            raise RuntimeError(
                f"faust-streaming's RocksDB store has no {', '.join(missing)}: this worker "
                "was tested with faust-streaming 0.15.3 (stream/faustx/tablestore.py)"
            )


def read_in_partition(store: Any, key: Any, partition: int) -> Any:
    """The value of ``key`` in ``partition`` (None if absent), whatever event is current.

    The RocksDB store routes a lookup to the partition of Faust's *current event*, which in a
    commit or a timer is some other record's: use the partition the key was written to."""
    if not is_persistent(store):
        return store.get(key)
    raw = store._db_for_partition(partition).get(store._encode_key(key))
    return None if raw is None else store._decode_value(raw)


def approx_len(store: Any) -> int:
    """Keys in the store's active partitions: exact for memory; RocksDB's own estimate
    (``rocksdb.estimate-num-keys``) for RocksDB, where ``len`` reads every key."""
    if not is_persistent(store):
        return len(store)
    return sum(int(db.property_int_value("rocksdb.estimate-num-keys") or 0)
               for db in store._dbs_for_actives())
