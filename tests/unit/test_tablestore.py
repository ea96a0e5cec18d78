"""Table store, data dir and recovery settings (stream.faustx.tablestore, stream.config)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stream.config import load_settings, table_store_kind
from stream.errors import ConfigError
from stream.faustx.tablestore import (
    DataDirLock,
    data_dir,
    faust_app_options,
    prepare_store,
    table_options,
)


def settings(tmp_path: Path, **env: str):
    return load_settings(env={"STREAM_DATA_DIR": str(tmp_path), **env}, file=None)


@pytest.mark.parametrize(
    ("value", "kind"),
    [("memory", "memory"), ("memory://", "memory"), ("rocksdb", "rocksdb"),
     ("RocksDB://", "rocksdb"), ("s3://x", None), ("rocks", None), ("", None)],
)
def test_table_store_kinds(value: str, kind: str | None) -> None:
    assert table_store_kind(value) == kind


def test_a_bad_store_is_refused_at_start_up_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'table_store'.*memory or rocksdb"):
        settings(tmp_path, STREAM_TABLE_STORE="redis://")


@pytest.mark.parametrize(
    ("env", "name"),
    [({"STREAM_TABLE_STANDBY_REPLICAS": "-1"}, "'table_standby_replicas'"),
     ({"STREAM_KAFKA_SESSION_TIMEOUT_S": "0.5"}, "'kafka_session_timeout_s'"),
     ({"STREAM_KAFKA_GROUP_INSTANCE_ID": "w 1"}, "'kafka_group_instance_id'"),
     ({"STREAM_SHUTDOWN_TIMEOUT_S": "1"}, "'shutdown_timeout_s'")],
)
def test_recovery_settings_are_validated(tmp_path: Path, env: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        settings(tmp_path, **env)


def test_defaults_are_memory_one_standby_and_dynamic_membership() -> None:
    s = load_settings(env={}, file=None)
    assert (s.table_store, s.table_standby_replicas, s.kafka_group_instance_id) == (
        "memory", 1, "")


def test_memory_store_runs_no_standbys_rocksdb_runs_the_setting(tmp_path: Path) -> None:
    mem = faust_app_options(settings(tmp_path, STREAM_TABLE_STANDBY_REPLICAS="2"))
    assert mem["store"] == "memory://" and mem["table_standby_replicas"] == 0
    rocks = faust_app_options(settings(tmp_path, STREAM_TABLE_STORE="rocksdb",
                                       STREAM_TABLE_STANDBY_REPLICAS="2"))
    assert rocks["store"] == "rocksdb://" and rocks["table_standby_replicas"] == 2
    assert "consumer_group_instance_id" not in rocks
    assert table_options(settings(tmp_path)) == {}
    assert table_options(settings(tmp_path, STREAM_TABLE_STORE="rocksdb"))["options"][
        "block_cache_size"] <= 64 << 20


def test_session_timeout_and_static_membership_reach_faust(tmp_path: Path) -> None:
    opts = faust_app_options(settings(tmp_path, STREAM_KAFKA_SESSION_TIMEOUT_S="6",
                                      STREAM_KAFKA_GROUP_INSTANCE_ID="host-a-1"))
    assert opts["broker_session_timeout"] == 6.0
    assert opts["broker_heartbeat_interval"] == 2.0
    assert opts["consumer_group_instance_id"] == "host-a-1"


def test_data_dir_is_per_app_under_the_setting_or_the_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = settings(tmp_path, STREAM_APP_ID="my-app")
    assert data_dir(s) == tmp_path / "my-app"
    assert Path(faust_app_options(s)["datadir"]).is_dir()  # Faust makes only the last level
    monkeypatch.setenv("STREAM_STATE_DIR", str(tmp_path / "state"))
    s = load_settings(env={"STREAM_APP_ID": "my-app"}, file=None)
    assert data_dir(s) == tmp_path / "state" / "data" / "my-app"


def test_a_second_worker_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    s = settings(tmp_path, STREAM_TABLE_STORE="rocksdb")
    lock = prepare_store(s)
    assert lock is not None
    # another process (flock is per open file description: a second one in this process
    # would conflict too, but a real second worker is another process)
    code = (
        "import sys; from stream.config import load_settings; "
        "from stream.faustx.tablestore import prepare_store\n"
        f"s = load_settings(env={{'STREAM_DATA_DIR': {str(tmp_path)!r}, "
        "'STREAM_TABLE_STORE': 'rocksdb'}, file=None)\n"
        "try:\n    prepare_store(s)\nexcept Exception as exc:\n    print(exc); sys.exit(3)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 3, out.stderr
    assert "setting 'data_dir'" in out.stdout and "in use by another worker" in out.stdout
    lock.release()
    again = DataDirLock(data_dir(s)).acquire()  # released: free again
    again.release()


def test_memory_store_takes_no_lock(tmp_path: Path) -> None:
    assert prepare_store(settings(tmp_path)) is None
