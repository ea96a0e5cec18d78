"""A secured single-node KRaft broker for least-privilege deployments and their tests:
clients connect over SASL_SSL (a certificate from the stack's own CA) with SCRAM-SHA-512,
KRaft's ``StandardAuthorizer`` denies whatever no ACL allows, and each principal of
``configs/kafka/secure/acls.json`` is its own SCRAM user.

Started by ``stream stack up kafka-secure`` (ports ``$STREAM_STACK_KAFKA_SECURE_PORT``, default
9094, and ``$STREAM_STACK_KAFKA_SECURE_CONTROLLER_PORT``, default 9095;
``STREAM_STACK_KAFKA_SECURE_TLS=0`` for SASL_PLAINTEXT) or by :func:`start` with a private
:class:`stream.tools.stack.StackConfig`. It runs from the same Maven jars as the plain broker, in
its own directory ``<state dir>/kafka-secure``: ``credentials.json`` (mode 0600) holds the
generated passwords, ``tls/ca.pem`` the CA clients verify the broker with. ``stream stack
down`` stops it.

Passwords never appear on a command line: SCRAM users are written into the cluster metadata
at format time as salted hashes (``kafka-storage format --add-scram
'SCRAM-SHA-512=[name=..,iterations=..,salt=..,saltedpassword=..]'``). ACLs are applied through
the Admin API as the admin principal (``CreateAcls`` request, as ``kafka-acls`` sends it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import subprocess
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import for_code
from aiokafka.protocol.admin import (
    CreateAclsRequestStruct,
    DescribeAclsRequest,
)
from aiokafka.protocol.api import Request

from stream.adapters.kafka import client_kwargs, ensure_topics
from stream.config import Settings, load_settings
from stream.errors import StackError
from stream.faustx.kafka_client import send_admin_request
from stream.tools import stack

SECURE_CONFIGS: Final = stack.CONFIGS / "kafka" / "secure"
ACLS_FILE: Final = SECURE_CONFIGS / "acls.json"
MECHANISM: Final = "SCRAM-SHA-512"
#: SCRAM iteration count for the stored credentials (Kafka's minimum is 4096)
SCRAM_ITERATIONS: Final = 8192
#: the substring of the broker's command line that identifies it (its properties path)
MARKER: Final = "kafka-secure/server.properties"
SERVICE: Final = "kafka-secure"

# Kafka protocol enum values (org.apache.kafka.common.resource / acl)
RESOURCE_TYPES: Final = {"topic": 2, "group": 3, "cluster": 4, "transactional_id": 5}
PATTERN_TYPES: Final = {"literal": 3, "prefixed": 4}
OPERATIONS: Final = {
    "all": 2, "read": 3, "write": 4, "create": 5, "delete": 6, "alter": 7, "describe": 8,
    "cluster_action": 9, "describe_configs": 10, "alter_configs": 11, "idempotent_write": 12,
}
_ALLOW: Final = 3
_ANY: Final = 1
_PLACEHOLDER: Final = re.compile(r"\$\{(\w+)\}")


@dataclass(frozen=True)
class SecureKafka:
    """Where the secured broker lives: the stack's state dir and jar cache, its own ports."""

    cfg: stack.StackConfig
    port: int
    controller_port: int
    #: client listener SASL_SSL (certificate from the stack's own CA) instead of SASL_PLAINTEXT
    tls: bool = True

    @classmethod
    def from_stack(
        cls,
        cfg: stack.StackConfig,
        port: int | None = None,
        controller_port: int | None = None,
        tls: bool | None = None,
    ) -> SecureKafka:
        if tls is None:
            raw = os.environ.get("STREAM_STACK_KAFKA_SECURE_TLS", "1").strip().lower()
            if raw not in ("1", "true", "yes", "0", "false", "no"):
                raise StackError(f"STREAM_STACK_KAFKA_SECURE_TLS must be 1 or 0, got {raw!r}")
            tls = raw in ("1", "true", "yes")
        return cls(
            cfg,
            port if port is not None else stack._env_int("STREAM_STACK_KAFKA_SECURE_PORT", 9094),
            controller_port
            if controller_port is not None
            else stack._env_int("STREAM_STACK_KAFKA_SECURE_CONTROLLER_PORT", 9095),
            tls,
        )

    @property
    def protocol(self) -> str:
        return "SASL_SSL" if self.tls else "SASL_PLAINTEXT"

    @property
    def ca_file(self) -> Path:
        """The CA that signed the broker's certificate (clients verify the broker with it)."""
        return self.home / "tls" / "ca.pem"

    @property
    def home(self) -> Path:
        return self.cfg.state_dir / SERVICE

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


# --------------------------------------------------------------------------- ACL config


@dataclass(frozen=True, order=True)
class AclBinding:
    """One ALLOW rule for any host: ``principal`` may ``operation`` on the resource."""

    principal: str
    resource: str
    pattern: str
    name: str
    operation: str

    def __str__(self) -> str:
        return (
            f"User:{self.principal} {self.operation.upper()} "
            f"{self.resource}:{self.pattern}:{self.name}"
        )


@dataclass(frozen=True)
class AclConfig:
    super_users: tuple[str, ...]
    principals: tuple[str, ...]
    rules: Mapping[str, tuple[Mapping[str, Any], ...]]


def load_acl_config(path: Path = ACLS_FILE) -> AclConfig:
    """Read and validate ``acls.json`` (unknown resource, pattern or operation names fail)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StackError(f"cannot read the ACL config {path}: {exc}") from exc
    principals = data.get("principals")
    if not isinstance(principals, dict) or not principals:
        raise StackError(f"{path}: 'principals' must be a non-empty object")
    rules: dict[str, tuple[Mapping[str, Any], ...]] = {}
    for name, spec in principals.items():
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,31}", name):
            raise StackError(f"{path}: principal name {name!r} must match [a-z][a-z0-9-]*")
        acls = spec.get("acls", [])
        for rule in acls:
            where = f"{path}: principal {name!r}, rule {rule!r}"
            if rule.get("resource") not in RESOURCE_TYPES:
                raise StackError(f"{where}: resource must be one of {sorted(RESOURCE_TYPES)}")
            if rule.get("pattern") not in PATTERN_TYPES:
                raise StackError(f"{where}: pattern must be one of {sorted(PATTERN_TYPES)}")
            ops = rule.get("operations")
            if not ops or any(op not in OPERATIONS for op in ops):
                raise StackError(f"{where}: operations must be among {sorted(OPERATIONS)}")
            if not isinstance(rule.get("name"), str) or not rule["name"]:
                raise StackError(f"{where}: name must be a non-empty string")
        rules[name] = tuple(acls)
    supers = tuple(data.get("super_users", ()))
    missing = [u for u in supers if u not in principals]
    if "broker" not in supers or "admin" not in supers or missing:
        raise StackError(
            f"{path}: super_users must name the principals 'broker' and 'admin' (unknown: "
            f"{missing})"
        )
    return AclConfig(supers, tuple(principals), rules)


def acl_names(settings: Settings) -> dict[str, str]:
    """The placeholder values acls.json may use, from the worker's settings."""
    return {
        "app_id": settings.app_id,
        "plays_topic": settings.plays_topic,
        "dlq_topic": settings.dlq_topic,
        "control_topic": settings.control_topic,
    }


def render_acls(config: AclConfig, names: Mapping[str, str]) -> list[AclBinding]:
    """Every (principal, resource, operation) binding of ``config`` for these names."""

    def fill(text: str) -> str:
        def sub(m: re.Match[str]) -> str:
            if m.group(1) not in names:
                raise StackError(f"acls.json uses an unknown placeholder ${{{m.group(1)}}}")
            return names[m.group(1)]

        return _PLACEHOLDER.sub(sub, text)

    out = {
        AclBinding(principal, rule["resource"], rule["pattern"], fill(rule["name"]), op)
        for principal, rules in config.rules.items()
        for rule in rules
        for op in rule["operations"]
    }
    return sorted(out)


# --------------------------------------------------------------------------- credentials


def credentials(kafka: SecureKafka, config: AclConfig | None = None) -> dict[str, str]:
    """Principal -> password, generated once per broker directory (``credentials.json``,
    mode 0600, next to its data). Random 32-byte tokens; never logged."""
    config = config or load_acl_config()
    path = kafka.home / "credentials.json"
    creds: dict[str, str] = {}
    if path.exists():
        creds = json.loads(path.read_text())
    missing = [p for p in config.principals if p not in creds]
    if missing and (kafka.home / "data" / "meta.properties").exists():
        # SCRAM users are written at format time only
        raise StackError(
            f"principals {missing} were added to acls.json after {kafka.home} was formatted; "
            f"stop the broker and remove {kafka.home} to re-create it with them"
        )
    if missing:
        creds.update({p: secrets.token_urlsafe(24) for p in missing})
        kafka.home.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(creds, f, indent=1)
    return creds


def scram_credential(user: str, password: str, iterations: int = SCRAM_ITERATIONS) -> str:
    """The ``--add-scram`` argument for ``user`` as a salted hash (RFC 5802 SaltedPassword =
    PBKDF2-HMAC-SHA-512), so the password itself is never on a command line."""
    salt = secrets.token_bytes(32)
    salted = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return (
        f"{MECHANISM}=[name={user},iterations={iterations},"
        f'salt="{base64.b64encode(salt).decode()}",'
        f'saltedpassword="{base64.b64encode(salted).decode()}"]'
    )


def client_settings(kafka: SecureKafka, principal: str, base: Settings) -> Settings:
    """``base`` pointed at the secured broker, authenticated as ``principal``."""
    return base.replace(
        kafka_bootstrap=kafka.bootstrap,
        kafka_security_protocol=kafka.protocol,
        kafka_ssl_cafile=str(kafka.ca_file) if kafka.tls else "",
        kafka_sasl_mechanism=MECHANISM,
        kafka_sasl_username=principal,
        kafka_sasl_password=credentials(kafka)[principal],
    )


# --------------------------------------------------------------------------- broker


def _openssl(cwd: Path, *argv: str) -> None:
    openssl = stack._require("openssl", "install OpenSSL (apt-get install openssl)")
    proc = subprocess.run([openssl, *argv], cwd=cwd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise StackError(f"openssl {argv[0]} failed: {proc.stderr[-1000:]}")


def _tls_files(kafka: SecureKafka) -> Path:
    """A CA of this broker's own and a certificate for 127.0.0.1 signed by it (made once);
    returns the broker's PEM keystore (unencrypted PKCS#8 key + certificate, mode 0600)."""
    d = kafka.home / "tls"
    keystore = d / "keystore.pem"
    if keystore.exists() and kafka.ca_file.exists():
        return keystore
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    _openssl(d, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "365",
             "-subj", "/CN=stream-reco kafka-secure CA", "-keyout", "ca.key", "-out", "ca.pem")
    _openssl(d, "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", "server.key", "-out", "server.csr")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(d, "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "365", "-extfile", "san.ext", "-out", "server.pem")
    fd = os.open(keystore, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write((d / "server.key").read_text() + (d / "server.pem").read_text())
    return keystore


def _properties(kafka: SecureKafka, creds: Mapping[str, str], config: AclConfig) -> Path:
    data = kafka.home / "data"
    data.mkdir(parents=True, exist_ok=True)
    tls = "# client listener without TLS (STREAM_STACK_KAFKA_SECURE_TLS=0): loopback only"
    if kafka.tls:
        prefix = "listener.name.client.ssl"
        tls = "\n".join([
            f"{prefix}.keystore.type=PEM",
            f"{prefix}.keystore.location={_tls_files(kafka)}",
            f"{prefix}.truststore.type=PEM",
            f"{prefix}.truststore.location={kafka.ca_file}",
        ])
    values = {
        "client_protocol": kafka.protocol,
        "tls_settings": tls,
        "broker_port": str(kafka.port),
        "controller_port": str(kafka.controller_port),
        "log_dir": str(data),
        "broker_user": "broker",
        "broker_password": creds["broker"],
        "super_users": ";".join(f"User:{u}" for u in config.super_users),
    }
    text = (SECURE_CONFIGS / "server.properties").read_text()
    text = _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)
    out = kafka.home / "server.properties"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds a password
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return out


def _format(kafka: SecureKafka, libs: Path, props: Path, creds: Mapping[str, str]) -> None:
    if (kafka.home / "data" / "meta.properties").exists():
        return
    cid = "-"
    while cid.startswith("-"):  # as Kafka's Uuid.randomUuid: "-..." reads as an option
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    argv = [*_java(kafka, libs), "kafka.tools.StorageTool", "format", "-t", cid, "-c", str(props)]
    for user, password in creds.items():
        argv += ["--add-scram", scram_credential(user, password)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise StackError(f"kafka storage format failed:\n{proc.stdout}\n{proc.stderr}")
    stack.log(f"formatted secured KRaft storage in {kafka.home / 'data'} ({len(creds)} users)")


def _java(kafka: SecureKafka, libs: Path) -> list[str]:
    return stack._java_base(kafka.cfg, libs, logs=kafka.home / "logs")


def ready(kafka: SecureKafka, principal: str = "admin") -> bool:
    """True when the broker answers a metadata request authenticated as ``principal``."""

    async def probe() -> bool:
        admin = await _admin(kafka, principal)
        try:
            cluster = await asyncio.wait_for(admin.describe_cluster(), 5)
            return bool(cluster.get("brokers"))
        finally:
            await admin.close()

    return asyncio.run(probe())


def running(kafka: SecureKafka) -> int | None:
    return stack._running_pid(kafka.cfg, SERVICE, MARKER)


def start(kafka: SecureKafka, timeout: float = 120.0) -> dict[str, str]:
    """Start (idempotent) the secured broker and wait until the admin principal can use it.
    Returns the principals' passwords."""
    config = load_acl_config()
    creds = credentials(kafka, config)
    if running(kafka) is not None:
        with contextlib.suppress(Exception):
            if ready(kafka):
                stack.log(f"kafka-secure already running on {kafka.bootstrap}")
                return creds
    else:
        for port in (kafka.port, kafka.controller_port):
            if stack._port_open(port):
                raise StackError(
                    f"port {port} is already in use by a process this stack did not start; "
                    "set STREAM_STACK_KAFKA_SECURE_PORT / STREAM_STACK_KAFKA_SECURE_CONTROLLER_PORT"
                )
        libs = stack.ensure_kafka_jars(kafka.cfg)
        props = _properties(kafka, creds, config)
        _format(kafka, libs, props, creds)
        stack._spawn(kafka.cfg, SERVICE, [*_java(kafka, libs), "kafka.Kafka", str(props)])
    stack._wait(
        SERVICE,
        lambda: stack._port_open(kafka.port) and ready(kafka),
        timeout,
        lambda: stack._alive(kafka.cfg, SERVICE),
    )
    stack.log(f"kafka-secure ({kafka.protocol}/{MECHANISM}, ACLs) ready on {kafka.bootstrap}")
    return creds


def stop(kafka: SecureKafka) -> bool:
    return stack._stop(kafka.cfg, SERVICE, MARKER)


# --------------------------------------------------------------------------- ACLs


class _CreateAcls(Request[CreateAclsRequestStruct]):  # type: ignore[misc]
    """CreateAcls (v1, Kafka 4's baseline) carrying many bindings in one request (aiokafka's
    own CreateAclsRequest builds one)."""

    API_KEY = 30

    def __init__(self, creations: list[tuple[int, str, int, str, str, int, int]]) -> None:
        self._creations = creations

    def build(self, request_struct_class: type[CreateAclsRequestStruct]) -> CreateAclsRequestStruct:
        if request_struct_class.API_VERSION < 1:
            raise StackError("the broker does not support CreateAcls v1 (pattern types)")
        return request_struct_class(self._creations)


def _wire(b: AclBinding) -> tuple[int, str, int, str, str, int, int]:
    return (
        RESOURCE_TYPES[b.resource], b.name, PATTERN_TYPES[b.pattern], f"User:{b.principal}",
        "*", OPERATIONS[b.operation], _ALLOW,
    )


async def _admin(kafka: SecureKafka, principal: str = "admin") -> AIOKafkaAdminClient:
    s = client_settings(kafka, principal, load_settings(env={}, file=None))
    admin = AIOKafkaAdminClient(**client_kwargs(s), request_timeout_ms=10_000)
    try:
        await asyncio.wait_for(admin.start(), 15)
    except BaseException:
        await admin.close()
        raise
    return admin


async def create_acls(kafka: SecureKafka, bindings: Iterable[AclBinding]) -> None:
    """Apply ``bindings`` (idempotent: an existing binding is left as it is)."""
    creations = [_wire(b) for b in bindings]
    if not creations:
        return
    admin = await _admin(kafka)
    try:
        resp = await asyncio.wait_for(send_admin_request(admin, _CreateAcls(creations)), 15)
    finally:
        await admin.close()
    for (code, message), wire in zip(resp.creation_responses, creations, strict=True):
        if code != 0:
            raise StackError(f"CreateAcls {wire}: {for_code(code).__name__}: {message}")


async def describe_acls(kafka: SecureKafka, principal: str) -> set[AclBinding]:
    """The ALLOW bindings the broker holds for ``principal`` (as the admin sees them)."""
    names = {v: k for k, v in RESOURCE_TYPES.items()}
    patterns = {v: k for k, v in PATTERN_TYPES.items()}
    ops = {v: k for k, v in OPERATIONS.items()}
    admin = await _admin(kafka)
    try:
        request = DescribeAclsRequest(_ANY, None, _ANY, f"User:{principal}", None, _ANY, _ALLOW)
        resp = await asyncio.wait_for(send_admin_request(admin, request), 15)
    finally:
        await admin.close()
    if resp.error_code:
        error = for_code(resp.error_code).__name__
        raise StackError(f"DescribeAcls: {error}: {resp.error_message}")
    out: set[AclBinding] = set()
    for rtype, rname, ptype, acls in resp.resources:
        for acl_principal, _host, op, _perm in acls:
            user = acl_principal.removeprefix("User:")
            out.add(AclBinding(user, names[rtype], patterns[ptype], rname, ops[op]))
    return out


def grant(
    kafka: SecureKafka, settings: Settings, timeout_s: float = 30.0
) -> list[AclBinding]:
    """Create the app's shared topics as the admin (plays, dead letters, control: the worker
    may not create them) and apply acls.json for its names. Returns the bindings applied."""
    bindings = render_acls(load_acl_config(), acl_names(settings))

    async def run() -> None:
        await ensure_topics(client_settings(kafka, "admin", settings), timeout_s=30)
        await create_acls(kafka, bindings)
        # ACLs take effect once the broker has applied the metadata record: wait (bounded)
        # until it lists them, so a caller's next request already runs under them
        deadline = time.monotonic() + timeout_s
        for principal in sorted({b.principal for b in bindings}):
            want = {b for b in bindings if b.principal == principal}
            while not want <= await describe_acls(kafka, principal):
                if time.monotonic() > deadline:
                    raise StackError(f"ACLs for {principal!r} not visible after {timeout_s:.0f}s")
                await asyncio.sleep(0.1)

    asyncio.run(run())
    stack.log(f"kafka-secure: {len(bindings)} ACLs applied for app {settings.app_id!r}")
    return bindings


def up(cfg: stack.StackConfig) -> None:
    """``stream stack up kafka-secure``: start the broker, grant the ACLs for the settings
    in the environment (STREAM_APP_ID, STREAM_PLAYS_TOPIC, ...), say where the passwords are."""
    kafka = SecureKafka.from_stack(cfg)
    start(kafka)
    grant(kafka, load_settings())
    stack.log(
        f"kafka-secure principals {', '.join(load_acl_config().principals)}; passwords in "
        f"{kafka.home / 'credentials.json'}"
    )
