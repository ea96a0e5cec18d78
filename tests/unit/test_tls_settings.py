"""Redis TLS file settings are validated at load time, naming the setting (moved from
tests/integration/test_security.py: it needs no service; the TLS handshakes themselves are
tested there against a real TLS-only redis-server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream.config import load_settings
from stream.errors import ConfigError


def test_tls_file_settings_are_validated(tmp_path: Path) -> None:
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    for path in files.values():
        path.write_text("-----BEGIN CERTIFICATE-----\n")  # only existence is checked here
    settings = load_settings(env={}, file=None)
    with pytest.raises(ConfigError, match="redis_tls_key_file"):
        settings.replace(redis_tls_cert_file=str(files["cert"]))
    with pytest.raises(ConfigError, match="redis_tls_cert_file"):
        settings.replace(redis_tls_key_file=str(files["key"]))
    with pytest.raises(ConfigError, match="redis_tls_ca_file"):
        settings.replace(redis_tls_ca_file=str(tmp_path / "nonexistent-ca.pem"))
    ok = settings.replace(
        redis_tls_ca_file=str(files["ca"]),
        redis_tls_cert_file=str(files["cert"]),
        redis_tls_key_file=str(files["key"]),
        redis_username="stream",
    )
    assert ok.redis_tls_ca_file == str(files["ca"])
    assert ok.redis_tls_key_file == str(files["key"])
