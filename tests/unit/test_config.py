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
        ({"STREAM_AGENT_BATCH_BUDGET_MS": "0"}, "'agent_batch_budget_ms'"),
        ({"STREAM_AGENT_BATCH_BUDGET_MS": "5000"}, "'agent_batch_budget_ms'"),
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


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://h:6379/0?password=hunter2", "redis://h:6379/0?password=***"),
        ("redis://h/0?db=1&Pass=hunter2&x=1", "redis://h/0?db=1&Pass=***&x=1"),
        ("rediss://u@h/0?access_token=hunter2", "rediss://u@h/0?access_token=***"),
        ("http://h/x?api-key=hunter2&sig=hunter2", "http://h/x?api-key=***&sig=***"),
        ("redis://h/0?client%5Fsecret=hunter2", "redis://h/0?client%5Fsecret=***"),
        ("redis://u:hunter2@h/0?pwd=hunter2#frag", "redis://u:***@h/0?pwd=***#frag"),
        # not secrets: kept byte for byte, so the URL still says what it connects to
        (
            "rediss://u@h/0?ssl_ca_certs=/a%20b/ca.pem&ssl_keyfile=/k.pem&db=2",
            "rediss://u@h/0?ssl_ca_certs=/a%20b/ca.pem&ssl_keyfile=/k.pem&db=2",
        ),
        ("unix:///run/redis.sock?db=0", "unix:///run/redis.sock?db=0"),
        ("redis://h/0?password", "redis://h/0?password"),  # a name without a value
    ],
)
def test_mask_url_masks_secrets_in_the_query_string(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    if "hunter2" in url:
        assert "hunter2" not in mask_url(url)


def test_masked_settings_hide_query_string_passwords() -> None:
    s = load_settings(env={"STREAM_REDIS_URL": "redis://127.0.0.1/0?password=hunter2"}, file=None)
    assert "hunter2" not in str(s.masked())
