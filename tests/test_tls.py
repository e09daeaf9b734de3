"""TLS and mutual TLS end to end: a real server with certificates made on the fly (trustme)."""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
import trustme
from conftest import ServerProcess, StartServer, run_cli, wait_for


@dataclass
class Pki:
    ca_pem: Path
    server_cert: Path
    server_key: Path
    client_pem: Path  # a client certificate issued by the CA, with its key
    stranger_pem: Path  # a client certificate issued by another CA
    ca: trustme.CA

    def context(self, client: Path | None = None) -> ssl.SSLContext:
        """A client context trusting the CA, optionally presenting `client`."""
        ctx = ssl.create_default_context(cafile=str(self.ca_pem))
        if client is not None:
            ctx.load_cert_chain(str(client))
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client.example")
    stranger = trustme.CA().issue_cert("client.example")
    pki = Pki(base / "ca.pem", base / "server.pem", base / "server.key", base / "client.pem",
              base / "stranger.pem", ca)
    ca.cert_pem.write_to_path(str(pki.ca_pem))
    server.cert_chain_pems[0].write_to_path(str(pki.server_cert))
    for extra in server.cert_chain_pems[1:]:
        extra.write_to_path(str(pki.server_cert), append=True)
    server.private_key_pem.write_to_path(str(pki.server_key))
    client.private_key_and_cert_chain_pem.write_to_path(str(pki.client_pem))
    stranger.private_key_and_cert_chain_pem.write_to_path(str(pki.stranger_pem))
    return pki


def https_post(server: ServerProcess, ctx: ssl.SSLContext, body: bytes) -> httpx.Response:
    with httpx.Client(verify=ctx, timeout=10.0) as client:
        return client.post(server.reported_url + "/telemetry", content=body,
                           headers={"content-type": "application/json"})


def cli_read(server: ServerProcess) -> list[bytes]:
    proc = run_cli("read", "--config", str(server.config_path))
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.splitlines()


def wait_stored(server: ServerProcess, record: dict[str, object], timeout: float = 10.0) -> None:
    want = orjson.dumps(record)
    wait_for(lambda: want in cli_read(server), timeout, f"{want!r} on disk", interval=0.05)


def test_https_post_is_accepted_and_plain_http_is_refused(start_server: StartServer, pki: Pki) -> None:
    server = start_server({"server": {"tls_certfile": str(pki.server_cert), "tls_keyfile": str(pki.server_key)}},
                          wait=False)
    server.wait_ready(verify=pki.context())
    assert "tls on" in server.log()

    record = {"node_id": "tls-node", "ts": 1.0, "via": "https"}
    response = https_post(server, pki.context(), orjson.dumps(record))
    assert (response.status_code, response.json()) == (202, {"accepted": 1})
    wait_stored(server, record)

    # Plain HTTP to the TLS port gets no HTTP answer.
    with pytest.raises(httpx.TransportError):
        httpx.post(server.url + "/telemetry", content=orjson.dumps(record),
                   headers={"content-type": "application/json"}, timeout=5.0)
    # A client that does not trust the CA refuses the server's certificate.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        https_post(server, ssl.create_default_context(), orjson.dumps(record))
    # Still serving after both.
    assert https_post(server, pki.context(), orjson.dumps(record)).status_code == 202
    assert server.proc.poll() is None


def test_mutual_tls_requires_a_client_certificate_from_the_ca(start_server: StartServer, pki: Pki) -> None:
    server = start_server({"server": {"tls_certfile": str(pki.server_cert), "tls_keyfile": str(pki.server_key),
                                      "tls_client_ca": str(pki.ca_pem)}}, wait=False)
    server.wait_ready(verify=pki.context(pki.client_pem))
    assert "tls mutual" in server.log()
    record = {"node_id": "mtls-node", "ts": 2.0}

    with pytest.raises(httpx.TransportError):
        https_post(server, pki.context(), orjson.dumps(record))
    with pytest.raises(httpx.TransportError):
        https_post(server, pki.context(pki.stranger_pem), orjson.dumps(record))
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/healthz", timeout=5.0)

    response = https_post(server, pki.context(pki.client_pem), orjson.dumps(record))
    assert (response.status_code, response.json()) == (202, {"accepted": 1})
    wait_stored(server, record)
    assert orjson.dumps(record) in cli_read(server)
    assert cli_read(server).count(orjson.dumps(record)) == 1, "a refused handshake stored nothing"


@pytest.mark.parametrize(
    ("tls", "message"),
    [
        pytest.param({"tls_certfile": "CERT"}, "tls_keyfile", id="cert-without-key"),
        pytest.param({"tls_keyfile": "KEY"}, "tls_keyfile", id="key-without-cert"),
        pytest.param({"tls_client_ca": "CA"}, "tls_client_ca", id="client-ca-without-cert"),
        pytest.param({"tls_certfile": "CERT", "tls_keyfile": "MISSING"}, "does not exist", id="missing-key-file"),
        pytest.param({"tls_certfile": "CERT", "tls_keyfile": "KEY", "tls_client_ca": "MISSING"}, "does not exist",
                     id="missing-client-ca"),
    ],
)
def test_bad_tls_config_fails_start_up_with_one_line(
    start_server: StartServer, pki: Pki, tmp_path: Path, tls: dict[str, str], message: str
) -> None:
    paths = {"CERT": str(pki.server_cert), "KEY": str(pki.server_key), "CA": str(pki.ca_pem),
             "MISSING": str(tmp_path / "missing.pem")}
    server = start_server({"server": {k: paths[v] for k, v in tls.items()}}, wait=False)
    assert server.wait(timeout=30) == 2
    lines = [line for line in server.log().splitlines() if line.startswith("telemetry-sink: error:")]
    assert len(lines) == 1, server.log()
    assert message in lines[0]
    assert "Traceback" not in server.log()


def test_the_client_speaks_mutual_tls(start_server: StartServer, pki: Pki) -> None:
    from telemetry_sink.client import Client, DeliveryTimeout, RetryPolicy

    server = start_server({"server": {"tls_certfile": str(pki.server_cert), "tls_keyfile": str(pki.server_key),
                                      "tls_client_ca": str(pki.ca_pem)}}, wait=False)
    server.wait_ready(verify=pki.context(pki.client_pem))
    with Client(server.reported_url, ca_file=pki.ca_pem, client_cert=pki.client_pem) as client:
        client.send({"node_id": "mtls-client", "ts": 3.0})
        client.flush(timeout=30)
    wait_stored(server, {"node_id": "mtls-client", "ts": 3.0})
    # Without a client certificate the handshake fails: retried (it may be a network fault), never stored.
    lacking = Client(server.reported_url, ca_file=pki.ca_pem, retry=RetryPolicy(initial_backoff_s=0.05))
    lacking.send({"node_id": "mtls-client", "ts": 4.0})
    with pytest.raises(DeliveryTimeout):
        lacking.close(timeout=1)
    assert lacking.stats.retries >= 1 and lacking.stats.records_sent == 0


def test_tls_handshakes_count_against_the_limit_and_have_the_head_deadline(start_server: StartServer,
                                                                           pki: Pki) -> None:
    """Connections that never send a ClientHello hold a slot only until header_timeout_s (not
    uvloop's 60 s), and while they hold every slot a real client is refused."""
    header_timeout = 2
    server = start_server({"server": {"tls_certfile": str(pki.server_cert), "tls_keyfile": str(pki.server_key),
                                      "max_connections": 20, "header_timeout_s": header_timeout}}, wait=False)
    server.wait_ready(verify=pki.context())
    time.sleep(0.3)  # let the readiness probe's connection go
    silent = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(20)]
    start = time.monotonic()
    try:
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):
            https_post(server, pki.context(), b'{"node_id":"refused"}')
        for sock in silent:
            sock.settimeout(max(0.1, start + header_timeout + 3 - time.monotonic()))
            assert sock.recv(1) == b"", "a silent TLS connection outlived the head deadline"
        assert time.monotonic() - start < header_timeout + 3
    finally:
        for sock in silent:
            sock.close()

    def served() -> bool:  # the slots free up with the next deadline sweep (every 0.25 s)
        try:
            return https_post(server, pki.context(), b'{"node_id":"after"}').status_code == 202
        except httpx.TransportError:
            return False

    wait_for(served, timeout=3, what="a TLS client served once the silent handshakes were cut off")
