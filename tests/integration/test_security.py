"""Security on real services: Redis with an ACL user, a password and (mutual) TLS; Kafka with a
SASL_PLAINTEXT/PLAIN listener; secrets never in logs, metrics, error messages or ``stream
config``; input limits that keep hostile input from exhausting memory.

Redis and Kafka are PRIVATE instances (free ports, tmp state) so the shared stack stays open.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from aiokafka.errors import KafkaConnectionError

from stream.adapters.kafka import KafkaUnavailable, client_kwargs
from stream.adapters.redis_store import RecoReader, connect_async
from stream.config import Settings
from stream.core.events import PlayEvent
from stream.tools import stack
from stream.tools.datasets import load_events
from stream.tools.producer import retime

from .conftest import TlsFiles, free_port, produce, settings_env, wait_until

pytestmark = pytest.mark.integration

REDIS_ADMIN_PW = "adm1n-Redis-s3cret"
REDIS_USER, REDIS_PW = "stream", "str3am-Redis-s3cret"
KAFKA_ADMIN_PW = "adm1n-Kafka-s3cret"
KAFKA_USER, KAFKA_PW = "stream", "str3am-Kafka-s3cret"
SECRETS = (REDIS_ADMIN_PW, REDIS_PW, KAFKA_ADMIN_PW, KAFKA_PW)


@pytest.fixture
def secure_redis(private_redis: Callable[..., stack.RedisServer], tls_files: TlsFiles) -> int:
    """TLS-only redis-server (clients must present a certificate from our CA), the default
    user behind ``requirepass``, and an ACL user ``stream``. Returns the TLS port."""
    tls_port = free_port()
    private_redis(
        "--port", "0",
        "--tls-port", str(tls_port),
        "--tls-cert-file", str(tls_files.server_cert),
        "--tls-key-file", str(tls_files.server_key),
        "--tls-ca-cert-file", str(tls_files.ca),
        "--tls-auth-clients", "yes",
        "--requirepass", REDIS_ADMIN_PW,
        "--user", REDIS_USER, "on", f">{REDIS_PW}", "~*", "&*", "+@all",
    )
    return tls_port


def tls_settings(t: TlsFiles) -> dict[str, str]:
    return {f"redis_{k}": v for k, v in tls_kwargs(t).items()}


def tls_kwargs(t: TlsFiles) -> dict[str, str]:
    return {
        "tls_ca_file": str(t.ca),
        "tls_cert_file": str(t.client_cert),
        "tls_key_file": str(t.client_key),
    }


def test_redis_acl_user_password_and_mutual_tls(secure_redis: int, tls_files: TlsFiles) -> None:
    url = f"redis://127.0.0.1:{secure_redis}/0"
    good = RecoReader(url, username=REDIS_USER, password=REDIS_PW, **tls_kwargs(tls_files))
    try:
        assert good.client.ping()
        assert good.client.acl_whoami() == REDIS_USER
    finally:
        good.close()

    async def async_ping() -> str:
        client = connect_async(url, REDIS_PW, username=REDIS_USER, **tls_kwargs(tls_files))
        try:
            await client.ping()
            return str(await client.acl_whoami())
        finally:
            await client.aclose()

    assert asyncio.run(async_ping()) == REDIS_USER

    wrong_pw = RecoReader(url, username=REDIS_USER, password="nope", **tls_kwargs(tls_files))
    with pytest.raises(redis.AuthenticationError) as err:
        wrong_pw.client.ping()
    wrong_pw.close()
    assert "nope" not in str(err.value)
    no_client_cert = RecoReader(url, username=REDIS_USER, password=REDIS_PW,
                                tls_ca_file=str(tls_files.ca))
    with pytest.raises(redis.ConnectionError):
        no_client_cert.client.ping()
    no_client_cert.close()
    plaintext = redis.Redis(port=secure_redis, username=REDIS_USER, password=REDIS_PW,
                            socket_timeout=3)
    with pytest.raises(redis.ConnectionError) as err2:
        plaintext.ping()
    plaintext.close()
    assert REDIS_PW not in str(err2.value)


@pytest.fixture(scope="module")
def sasl_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stack.StackConfig]:
    """A private KRaft broker whose client listener requires SASL_PLAINTEXT / PLAIN (one per
    module: it takes ~10-20 s to start)."""
    cfg = stack.private_config(
        tmp_path_factory.mktemp("kafka-sasl"), kafka_port=free_port(), controller_port=free_port()
    )
    try:
        stack.start_sasl_kafka(cfg, {"admin": KAFKA_ADMIN_PW, KAFKA_USER: KAFKA_PW})
        yield cfg
    finally:
        stack.stop_kafka(cfg)


def test_worker_over_sasl_kafka_and_tls_redis_leaks_no_secret(
    settings: Settings,
    sasl_kafka: stack.StackConfig,
    secure_redis: int,
    tls_files: TlsFiles,
    worker_factory: Callable[..., object],  # after the services: stopped before them
    datasets_dir: Path,
) -> None:
    # Redis identity and TLS: settings (store clients) and, for the worker's writer, the URL
    # form redis-py understands (rediss://user@host/db?ssl_ca_certs=...), see
    # docs/reliability.md "Security settings".
    query = (
        f"ssl_ca_certs={tls_files.ca}&ssl_certfile={tls_files.client_cert}"
        f"&ssl_keyfile={tls_files.client_key}"
    )
    s = settings.replace(
        kafka_bootstrap=f"127.0.0.1:{sasl_kafka.kafka_port}",
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_username=KAFKA_USER,
        kafka_sasl_password=KAFKA_PW,
        redis_url=f"rediss://{REDIS_USER}@127.0.0.1:{secure_redis}/0?{query}",
        redis_password=REDIS_PW,
        redis_username=REDIS_USER,
        **tls_settings(tls_files),
        log_level="debug",  # aiokafka.conn is capped at INFO by `stream worker` (SASL bytes)
    )
    assert client_kwargs(s)["sasl_plain_password"] == KAFKA_PW
    events = retime(load_events(datasets_dir / "spotify-mssd-sample", "spotify")[:200], None)
    events = list(events)
    worker = worker_factory(s)
    assert produce(s, events) == len(events)
    reader = RecoReader(
        s.redis_url, password=s.redis_password, prefix=s.redis_prefix,
        username=REDIS_USER, **tls_kwargs(tls_files),
    )
    expected: dict[str, int] = {}
    for e in events:
        expected[e.user_id] = expected.get(e.user_id, 0) + 1
    try:
        wait_until(
            lambda: all((d := reader.get(u)) is not None and d.seq == n
                        for u, n in expected.items()),
            90,
            what="every listener's recommendations via SASL Kafka -> TLS Redis",
        )
    finally:
        reader.close()
    assert worker.metric_value("stream_events_total", outcome="processed") == len(events)

    # secrets: not in the worker's (debug) log, its metrics, or `stream config`
    log_text = worker.log_text()
    metrics_text = worker.metrics()
    config_out = subprocess.run(
        [sys.executable, "-m", "stream.tools.cli", "config"], env=settings_env(s),
        capture_output=True, text=True, timeout=60,
    )
    assert config_out.returncode == 0, config_out.stderr
    assert "***" in config_out.stdout
    for secret in SECRETS:
        assert secret not in log_text, "a secret leaked into the worker log"
        assert secret not in metrics_text, "a secret leaked into /metrics"
        assert secret not in config_out.stdout + config_out.stderr
    assert worker.stop() == 0
    log_after = worker.log_text()
    for secret in SECRETS:
        assert secret not in log_after


def test_wrong_kafka_password_is_refused_without_echoing_it(
    settings: Settings, sasl_kafka: stack.StackConfig, caplog: pytest.LogCaptureFixture
) -> None:
    # the broker answers the right credentials: what follows is a refusal, not an outage
    assert stack.kafka_sasl_ready(sasl_kafka.kafka_port, KAFKA_USER, KAFKA_PW)
    wrong = "wr0ng-Kafka-pw"
    caplog.set_level(logging.WARNING, logger="aiokafka")  # not DEBUG: that logs the SASL bytes
    with pytest.raises(KafkaConnectionError) as err:
        stack.kafka_sasl_ready(sasl_kafka.kafka_port, KAFKA_USER, wrong)
    assert wrong not in str(err.value) and wrong not in repr(err.value)
    # aiokafka's bootstrap reports every failure as KafkaConnectionError; the broker's
    # answer (SASL error 58) is in its log
    refusals = [r.getMessage() for r in caplog.records if "SaslAuthenticationFailed" in
                r.getMessage()]
    assert refusals, [r.getMessage() for r in caplog.records]
    assert not any(wrong in r.getMessage() for r in caplog.records)
    # and the plaintext protocol is not accepted on the SASL listener: the broker closes
    # the connection at the first request, and the producer cannot bootstrap
    s = settings.replace(kafka_bootstrap=f"127.0.0.1:{sasl_kafka.kafka_port}")
    with pytest.raises(KafkaUnavailable) as refused:
        produce(s, [PlayEvent("u1", "t1", 1_800_000_000_000, 1000, "e1")])
    assert isinstance(refused.value.__cause__, KafkaConnectionError)
