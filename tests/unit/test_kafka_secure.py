"""The secured broker's configuration (configs/kafka/secure): ACL rendering and validation,
SCRAM credentials, rendered server properties. No broker is started here (see
tests/integration/test_kafka_acl.py)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
from pathlib import Path

import pytest

from stream.config import load_settings
from stream.errors import StackError
from stream.tools import stack
from stream.tools import stack_secure as ks

NAMES = {"app_id": "app1", "plays_topic": "p", "dlq_topic": "d", "control_topic": "c"}


def bindings_of(principal: str) -> set[tuple[str, str, str, str]]:
    return {
        (b.resource, b.pattern, b.name, b.operation)
        for b in ks.render_acls(ks.load_acl_config(), NAMES)
        if b.principal == principal
    }


def test_shipped_policy_is_least_privilege() -> None:
    config = ks.load_acl_config()
    assert set(config.super_users) == {"broker", "admin"}
    assert bindings_of("producer") == {("topic", "literal", "p", "write")}
    assert bindings_of("worker") == {
        ("topic", "literal", "p", "read"),
        ("topic", "literal", "c", "read"),
        ("topic", "literal", "d", "write"),
        ("topic", "prefixed", "app1-", "read"),
        ("topic", "prefixed", "app1-", "write"),
        ("topic", "prefixed", "app1-", "create"),
        ("group", "literal", "app1", "read"),
    }
    assert bindings_of("reader") == {
        ("topic", "literal", "d", "read"),
        ("group", "prefixed", "app1-dlq-reader", "read"),
    }
    # nobody but the super users may write the control topic; no cluster-wide rights
    rendered = ks.render_acls(config, NAMES)
    assert not [b for b in rendered if b.name == "c" and b.operation != "read"]
    assert not [b for b in rendered if b.resource == "cluster" or b.operation == "all"]


def test_names_come_from_the_worker_settings() -> None:
    s = load_settings(env={}, file=None, app_id="x", plays_topic="x-in", dlq_topic="x-dead",
                      control_topic="x-ctl")
    assert ks.acl_names(s) == {"app_id": "x", "plays_topic": "x-in", "dlq_topic": "x-dead",
                               "control_topic": "x-ctl"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["principals"]["worker"]["acls"][0].update(operations=["rule"]), "operations"),
        (lambda d: d["principals"]["worker"]["acls"][0].update(resource="user"), "resource"),
        (lambda d: d["principals"]["worker"]["acls"][0].update(pattern="match"), "pattern"),
        (lambda d: d.update(super_users=["broker"]), "super_users"),
        (lambda d: d["principals"].update({"Bad Name": {"acls": []}}), "principal name"),
    ],
)
def test_bad_acl_config_is_refused(tmp_path: Path, change, message: str) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(ks.ACLS_FILE.read_text())
    change(data)
    path = tmp_path / "acls.json"
    path.write_text(json.dumps(data))
    with pytest.raises(StackError, match=message):
        ks.load_acl_config(path)


def test_unknown_placeholder_is_refused() -> None:
    with pytest.raises(StackError, match=r"\$\{plays_topic\}"):
        ks.render_acls(ks.load_acl_config(), {"app_id": "a"})


def test_scram_credential_is_a_salted_hash_not_the_password() -> None:
    arg = ks.scram_credential("worker", "s3cret-pw")
    assert "s3cret-pw" not in arg
    m = re.fullmatch(
        r'SCRAM-SHA-512=\[name=worker,iterations=(\d+),salt="([^"]+)",saltedpassword="([^"]+)"\]',
        arg,
    )
    assert m is not None
    iterations, salt, salted = int(m[1]), base64.b64decode(m[2]), base64.b64decode(m[3])
    assert iterations >= 4096  # Kafka's minimum for SCRAM
    assert salted == hashlib.pbkdf2_hmac("sha512", b"s3cret-pw", salt, iterations)
    assert ks.scram_credential("worker", "s3cret-pw") != arg  # a fresh salt each time


def test_credentials_are_private_and_stable(tmp_path: Path) -> None:
    kafka = ks.SecureKafka.from_stack(stack.private_config(tmp_path), 1, 2)
    first = ks.credentials(kafka)
    assert set(first) == {"broker", "admin", "worker", "producer", "reader"}
    assert len(set(first.values())) == len(first)
    assert ((kafka.home / "credentials.json").stat().st_mode & 0o777) == 0o600
    assert ks.credentials(kafka) == first
    # a principal added to acls.json after format time has no SCRAM user: said, not ignored
    (kafka.home / "data").mkdir()
    (kafka.home / "data" / "meta.properties").write_text("")
    (kafka.home / "credentials.json").write_text(json.dumps({"admin": "x"}))
    with pytest.raises(StackError, match="after .* was formatted"):
        ks.credentials(kafka)


@pytest.mark.parametrize("tls", [True, False])
def test_rendered_properties_lock_down_every_listener(tmp_path: Path, tls: bool) -> None:
    kafka = ks.SecureKafka.from_stack(stack.private_config(tmp_path), 19092, 19093, tls=tls)
    config = ks.load_acl_config()
    creds = ks.credentials(kafka, config)
    props = ks._properties(kafka, creds, config)
    text = props.read_text()
    assert not [ln for ln in text.splitlines() if "${" in ln and not ln.startswith("#")]
    assert (props.stat().st_mode & 0o777) == 0o600
    conf = dict(
        line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    assert conf["authorizer.class.name"] == (
        "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
    )
    assert conf["allow.everyone.if.no.acl.found"] == "false"
    assert conf["super.users"] == "User:broker;User:admin"
    assert conf["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert conf["listeners"] == "CLIENT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    # no listener maps to PLAINTEXT/SSL: no request can run as User:ANONYMOUS
    protocols = dict(p.split(":") for p in conf["listener.security.protocol.map"].split(","))
    assert protocols == {
        "CLIENT": "SASL_SSL" if tls else "SASL_PLAINTEXT",
        "CONTROLLER": "SASL_PLAINTEXT",
    }
    assert creds["broker"] in text and creds["worker"] not in text
    if tls:
        keystore = Path(conf["listener.name.client.ssl.keystore.location"])
        assert conf["listener.name.client.ssl.keystore.type"] == "PEM"
        assert (keystore.stat().st_mode & 0o777) == 0o600
        assert "PRIVATE KEY" in keystore.read_text()
        assert conf["listener.name.client.ssl.truststore.location"] == str(kafka.ca_file)
        s = ks.client_settings(kafka, "worker", load_settings(env={}, file=None))
        assert (s.kafka_security_protocol, s.kafka_ssl_cafile) == ("SASL_SSL", str(kafka.ca_file))
    else:
        assert "ssl.keystore" not in text


def test_stack_down_knows_the_secure_broker() -> None:
    assert "kafka-secure" in stack.OPTIONAL_SERVICES
    assert stack.OPTIONAL_SERVICES["kafka-secure"][0] == ks.MARKER


def test_a_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        kafka = ks.SecureKafka.from_stack(stack.private_config(tmp_path), port, 2)
        with pytest.raises(StackError, match=f"port {port} is already in use.*SECURE_PORT"):
            ks.start(kafka)
    assert ks.running(kafka) is None
