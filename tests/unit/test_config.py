"""Settings: precedence, validation errors naming the setting, secret masking."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream.config import load_settings, mask_url
from stream.errors import ConfigError


def test_defaults_file_env_precedence(tmp_path: Path) -> None:
    f = tmp_path / "s.toml"
    f.write_text('[stream]\ntop_k = 7\nplays_topic = "from-file"\n')
    s = load_settings(env={"STREAM_TOP_K": "12"}, file=f)
    assert s.top_k == 12 and s.plays_topic == "from-file" and s.dlq_topic == "plays-dlq"


def test_env_config_path(tmp_path: Path) -> None:
    f = tmp_path / "s.toml"
    f.write_text("session_gap_s = 60\n")
    assert load_settings(env={"STREAM_CONFIG": str(f)}).session_gap_s == 60


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"STREAM_TOP_K": "0"}, "'top_k'"),
        ({"STREAM_TOP_K": "ten"}, "'top_k' (env STREAM_TOP_K): expected an integer"),
        ({"STREAM_PLAYS_TOPIC": "bad topic!"}, "'plays_topic'"),
        ({"STREAM_DLQ_TOPIC": "plays"}, "'dlq_topic'"),
        ({"STREAM_REDIS_URL": "http://x"}, "'redis_url'"),
        ({"STREAM_KAFKA_BOOTSTRAP": "nohostport"}, "'kafka_bootstrap'"),
        ({"STREAM_METRICS_PORT": "70000"}, "'metrics_port'"),
        ({"STREAM_TABLE_STORE": "s3://x"}, "'table_store'"),
        ({"STREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "'kafka_sasl_mechanism'"),
        ({"STREAM_LOG_LEVEL": "loud"}, "'log_level'"),
        ({"STREAM_CATCH_UP_RANK_MS": "-1"}, "'catch_up_rank_ms'"),
        ({"STREAM_KAFKA_FETCH_MIN_BYTES": "0"}, "'kafka_fetch_min_bytes'"),
        (
            {"STREAM_KAFKA_CONSUMER_THREAD": "maybe"},
            "'kafka_consumer_thread' (env STREAM_KAFKA_CONSUMER_THREAD): expected true/false",
        ),
        ({"STREAM_CONFIG": "/nonexistent.toml"}, "STREAM_CONFIG"),
    ],
)
def test_bad_config_fails_naming_the_setting(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(env=env, file=True if "STREAM_CONFIG" in env else None)
    assert needle in str(err.value)


def test_unknown_key_in_file_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "s.toml"
    f.write_text("topk = 3\n")
    with pytest.raises(ConfigError, match="unknown setting 'topk'"):
        load_settings(env={}, file=f)


def test_secrets_are_masked() -> None:
    s = load_settings(
        env={
            "STREAM_REDIS_URL": "redis://app:hunter2@127.0.0.1:6379/0",
            "STREAM_REDIS_PASSWORD": "s3cret",
            "STREAM_KAFKA_SASL_PASSWORD": "k-pass",
        },
        file=None,
    )
    shown = str(s.masked())
    for secret in ("hunter2", "s3cret", "k-pass"):
        assert secret not in shown
    assert s.masked()["redis_url"] == "redis://app:***@127.0.0.1:6379/0"
    assert mask_url("redis://127.0.0.1") == "redis://127.0.0.1"
