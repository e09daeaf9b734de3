"""Key material never leaks: not in server logs (text or JSON), HTTP responses (/metrics,
/healthz, /readyz, /openapi.json, errors), CLI output or error messages, nor CryptoService's
repr and exceptions. Every output is grepped for the key and for its halves in several encodings."""

from __future__ import annotations

import base64
import signal
import traceback
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from conftest import ServerProcess, StartServer, run_cli, write_config

from telemetry_sink.crypto import CryptoService, InvalidToken, KeyConfigError, generate_key, write_key_file

GRACEFUL_EXIT = (0, -signal.SIGTERM)


def secret_forms(key: str) -> list[str]:
    """The key and every form of its two halves (signing and encryption keys) worth grepping for."""
    raw = base64.urlsafe_b64decode(key)
    forms = [key, key[:22], key[22:43]]
    for half in (raw[:16], raw[16:]):
        forms += [
            base64.urlsafe_b64encode(half).decode().rstrip("="),
            base64.b64encode(half).decode().rstrip("="),
            half.hex(),
            repr(half)[2:-1],
        ]
    return forms


def assert_no_secret(key: str, what: str, output: str | bytes) -> None:
    text = output.decode(errors="replace") if isinstance(output, bytes) else output
    for form in secret_forms(key):
        assert form not in text, f"key material ({form[:6]}...) found in {what}"


@pytest.fixture
def key(key_file: Path) -> str:
    return key_file.read_text().strip()


def test_secret_forms_are_found_when_present(key: str) -> None:
    """The grep itself works: each form is detected."""
    raw = base64.urlsafe_b64decode(key)
    for leaked in (f"x{key}y", f"k={raw[16:].hex()}", repr(raw[:16]), base64.b64encode(raw[16:]).decode()):
        with pytest.raises(AssertionError, match="key material"):
            assert_no_secret(key, "probe", leaked)


def exercise(url: str, key: str) -> None:
    """Traffic of every kind; each response is checked for key material."""
    responses = [
        httpx.post(url + "/telemetry", content=b'{"node_id":"s","v":1}', headers={"content-type": "application/json"},
                   timeout=10),
        httpx.post(url + "/telemetry", content=b"{bad", headers={"content-type": "application/json"}, timeout=10),
        httpx.post(url + "/telemetry", content=b'{"x":1}', headers={"content-type": "application/json"}, timeout=10),
        httpx.post(url + "/telemetry", content=b"x", headers={"content-type": "text/plain"}, timeout=10),
        httpx.post(url + "/telemetry", content=key.encode(), headers={"content-type": "application/json"},
                   timeout=10),
        httpx.post(url + "/telemetry", content=b"A" * 9000, headers={"content-type": "application/json"},
                   timeout=10),
        httpx.post(url + "/telemetry", content=b"\x1f\x8bnot gzip",
                   headers={"content-type": "application/json", "content-encoding": "gzip"}, timeout=10),
        httpx.get(url + "/nope", timeout=10),
    ]
    statuses = [r.status_code for r in responses]
    # The key sent as a body is echoed in no error (it is not valid JSON: 400).
    assert statuses == [202, 400, 422, 415, 400, 413, 400, 404], statuses
    for path in ("/metrics", "/healthz", "/readyz", "/openapi.json", "/docs"):
        response = httpx.get(url + path, timeout=10)
        assert response.status_code == 200, (path, response.status_code)
        responses.append(response)
    for response in responses:
        assert_no_secret(key, f"{response.request.method} {response.request.url.path} response",
                         bytes(str(response.headers), "utf-8") + response.content)


def test_text_log_server(start_server: StartServer, key_file: Path, key: str, tmp_path: Path) -> None:
    key_file.chmod(0o644)  # provoke the permissions warning, which names the file
    server = start_server({"ingest": {"max_body_bytes": 8192}})
    exercise(server.url, key)
    assert server.stop() in GRACEFUL_EXIT
    log = server.log()
    assert "accessible by group or others" in log and str(key_file) in log
    assert "shutdown complete" in log
    assert_no_secret(key, "the text server log", log)


def test_json_log_server_with_key_from_the_environment(tmp_path: Path, key: str) -> None:
    # No key file at all: the key comes from TELEMETRY_SINK_KEY, which the start-up config must not show.
    config = write_config(tmp_path / "env-key.ini", {
        "server": {"host": "127.0.0.1", "port": 0, "shutdown_timeout_s": 10},
        "ingest": {"max_body_bytes": 8192},
        "writer": {"directory": str(tmp_path / "data-env"), "flush_interval_ms": 20},
        "crypto": {"key_file": str(tmp_path / "absent.key")},
    })
    out_path, err_path = tmp_path / "json.out", tmp_path / "json.err"
    server = ServerProcess.serve(config, out_path, args=("--log-format", "json", "--access-log"),
                                 env={"TELEMETRY_SINK_KEY": key}, stderr_path=err_path)
    try:
        server.wait_ready()
        exercise(server.url, key)
        assert server.stop() in GRACEFUL_EXIT
    finally:
        server.close()
    stderr = err_path.read_text()
    lines = [orjson.loads(line) for line in stderr.splitlines()]
    assert any(line.get("event") == "startup" for line in lines)
    assert any("shutdown complete" in line["msg"] for line in lines)
    assert_no_secret(key, "the JSON server log", stderr)
    assert_no_secret(key, "the server's stdout", out_path.read_bytes())
    # The data was written under the key, so it was really in use.
    proc_read = run_cli("read", "--config", str(config), env={"TELEMETRY_SINK_KEY": key})
    assert proc_read.returncode == 0 and b'"node_id":"s"' in proc_read.stdout


@pytest.fixture
def written_log(start_server: StartServer, tmp_path: Path) -> Iterator[ServerProcess]:
    server = start_server()
    for i in range(3):
        assert server.post(orjson.dumps({"node_id": "cli", "i": i})).status_code == 202
    assert server.stop() in GRACEFUL_EXIT
    yield server


def test_cli_outputs(written_log: ServerProcess, key_file: Path, key: str, tmp_path: Path) -> None:
    config = str(written_log.config_path)
    data = str(tmp_path / "data")
    other_key = tmp_path / "other.key"
    runs = {
        "info": run_cli("info", "--config", config),
        "verify": run_cli("verify", "--config", config, "--key-file", str(key_file)),
        "read": run_cli("read", "--config", config),
        "read --strict": run_cli("read", "--config", config, "--strict", data),
        "keygen --out existing": run_cli("keygen", "--out", str(key_file)),
        "keygen --out new": run_cli("keygen", "--out", str(other_key)),
    }
    runs["read with the wrong key"] = run_cli("read", "--key-file", str(other_key), data)
    runs["verify with the wrong key"] = run_cli("verify", "--key-file", str(other_key), data)
    assert runs["info"].returncode == 0 and b"implementation:" in runs["info"].stdout
    assert runs["verify"].returncode == 0 and b"every token authenticated" in runs["verify"].stdout
    assert runs["read"].returncode == 0 and runs["read"].stdout.count(b'"node_id":"cli"') == 3
    assert runs["keygen --out existing"].returncode == 2
    assert b"already exists" in runs["keygen --out existing"].stderr
    assert runs["keygen --out new"].returncode == 0
    assert runs["read with the wrong key"].returncode == 1
    assert runs["verify with the wrong key"].returncode == 1
    new_key = other_key.read_text().strip()
    for name, proc in runs.items():
        assert_no_secret(key, f"`{name}` output", proc.stdout + proc.stderr)
        assert_no_secret(new_key, f"`{name}` output", proc.stdout + proc.stderr)


def _broken(key: str) -> dict[str, str]:
    """Invalid keys derived from the real one (a leak of these leaks most of the key)."""
    return {
        "truncated": key[:-2],
        "extended": key.rstrip("=") + "AAAA",
        "bad character": key[:10] + "*" + key[11:],
    }


@pytest.mark.parametrize("how", ["truncated", "extended", "bad character"])
def test_invalid_key_error_messages(written_log: ServerProcess, key: str, tmp_path: Path, how: str) -> None:
    bad = _broken(key)[how]
    config = str(written_log.config_path)
    env_runs = [
        run_cli("read", "--config", config, env={"TELEMETRY_SINK_KEY": bad}),
        run_cli("read", "--config", config, env={"TELEMETRY_SINK_KEY": f"{key},{bad}"}),
        run_cli("serve", "--config", config, env={"TELEMETRY_SINK_KEY": bad}),
        run_cli("serve", "--config", config, "--log-format", "json", env={"TELEMETRY_SINK_KEY": bad}),
    ]
    bad_file = tmp_path / f"bad-{how.replace(' ', '-')}.key"
    bad_file.write_text(f"{key}\n{bad}\n")
    bad_file.chmod(0o600)
    file_runs = [run_cli("read", "--key-file", str(bad_file), str(tmp_path / "data")),
                 run_cli("verify", "--key-file", str(bad_file), str(tmp_path / "data"))]
    for proc in env_runs + file_runs:
        assert proc.returncode == 2, proc.stderr
        assert b"not a Fernet key" in proc.stderr, proc.stderr
        assert b"Traceback" not in proc.stderr
        assert_no_secret(key, "an invalid-key error", proc.stdout + proc.stderr)
        assert bad.encode() not in proc.stdout + proc.stderr
    assert b"TELEMETRY_SINK_KEY, key 2" in env_runs[1].stderr
    assert b"key 2" in file_runs[0].stderr


def test_crypto_service_repr_and_exceptions(key: str, key_file: Path) -> None:
    crypto = CryptoService.from_key_file(key_file)
    other = CryptoService([generate_key().decode(), key], "test")
    outputs = [repr(crypto), str(crypto), f"{crypto!r}", repr(other), repr(crypto.new_framer())]
    token = other.encrypt(b"payload")
    stranger = CryptoService([generate_key().decode()], "stranger")
    try:
        stranger.decrypt(token)
    except InvalidToken as exc:
        outputs += [repr(exc), str(exc), "".join(traceback.format_exception(exc))]
    else:
        raise AssertionError("a foreign key decrypted the token")
    for bad in _broken(key).values():
        with pytest.raises(KeyConfigError) as info:
            CryptoService([key, bad], "env")
        outputs += [str(info.value), repr(info.value), "".join(traceback.format_exception(info.value))]
        assert "key 2" in str(info.value)
    outputs.append(repr(vars(KeyConfigError("x"))))
    for output in outputs:
        assert_no_secret(key, "a CryptoService repr or exception", output)
    assert "keys=2" in repr(other)


def test_key_file_written_by_keygen_is_private(tmp_path: Path) -> None:
    path = tmp_path / "k" / "new.key"
    write_key_file(path)
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        write_key_file(path)
