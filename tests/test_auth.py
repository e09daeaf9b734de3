"""Bearer-token auth: the tokens file (TokenTable, Principal, add_token, hash_token) in-process, and
end to end against a real server: 401/403/202, `token add`, SIGHUP reload, start-up failures."""

from __future__ import annotations

import hashlib
import logging
import signal
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import ServerProcess, StartServer, run_cli, shared_server, wait_for, write_config

from telemetry_sink import auth
from telemetry_sink.auth import AuthConfigError, Principal, TokenTable, add_token, hash_token
from telemetry_sink.testing import best_of

TOKEN_A = "token-for-node-a-0123456789"
TOKEN_GH = "token-for-greenhouses-abcdef"
TOKEN_MULTI = "token-for-two-exact-ids-xyz"


# -- helpers --


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def cli_read(config_path: Path) -> list[dict[str, Any]]:
    """`telemetry-sink read --config CONFIG`, parsed."""
    proc = run_cli("read", "--config", str(config_path))
    assert proc.returncode == 0, proc.stderr.decode()
    return [orjson.loads(line) for line in proc.stdout.splitlines()]


def assert_error(response: httpx.Response, status: int, error: str) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert body["error"] == error
    assert isinstance(body["detail"], str) and body["detail"]
    return body


def tokens_file(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


# -- hash_token / Principal --


def test_hash_token_is_hex_sha256_of_utf8() -> None:
    assert hash_token("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert hash_token("é") == hashlib.sha256("é".encode()).hexdigest()


@pytest.mark.parametrize(
    ("patterns", "node_id", "allowed"),
    [
        pytest.param(("node-1",), "node-1", True, id="exact-match"),
        pytest.param(("node-1",), "node-10", False, id="exact-is-not-a-prefix"),
        pytest.param(("node-1",), "xnode-1", False, id="exact-is-not-a-suffix"),
        pytest.param(("node-1",), "NODE-1", False, id="exact-is-case-sensitive"),
        pytest.param(("greenhouse-*",), "greenhouse-7", True, id="glob-star"),
        pytest.param(("greenhouse-*",), "greenhouse-", True, id="glob-star-empty"),
        pytest.param(("greenhouse-*",), "Greenhouse-7", False, id="glob-is-case-sensitive"),
        pytest.param(("greenhouse-*",), "barn-7", False, id="glob-no-match"),
        pytest.param(("greenhouse-*",), "x-greenhouse-7", False, id="glob-anchored-at-start"),
        pytest.param(("sensor-?",), "sensor-9", True, id="glob-question-mark"),
        pytest.param(("sensor-?",), "sensor-10", False, id="glob-question-mark-one-char"),
        pytest.param(("rack-[ab]",), "rack-b", True, id="glob-class"),
        pytest.param(("rack-[ab]",), "rack-c", False, id="glob-class-no-match"),
        pytest.param(("a", "b-*"), "b-2", True, id="second-pattern"),
        pytest.param(("a", "b-*"), "c", False, id="no-pattern"),
        pytest.param(("*",), "anything", True, id="star-allows-all"),
    ],
)
def test_principal_may_write(patterns: tuple[str, ...], node_id: str, allowed: bool) -> None:
    assert Principal("k" * 64, patterns).may_write(node_id) is allowed


# -- TokenTable --


def test_table_loads_exact_and_glob_tokens_and_skips_comments(tmp_path: Path) -> None:
    path = tokens_file(tmp_path / "tokens", [
        "# a comment",
        "",
        f"node-a {hash_token(TOKEN_A)}",
        "   ",
        f"  greenhouse-*   {hash_token(TOKEN_GH).upper()}  ",  # spacing and upper-case hex are fine
        f"node-m1 {hash_token(TOKEN_MULTI)}",
        f"node-m2 {hash_token(TOKEN_MULTI)}",  # the same token on two lines: both patterns
    ])
    table = TokenTable(path)
    assert len(table) == 3
    a = table.authenticate(b"Bearer " + TOKEN_A.encode())
    assert a is not None and a.patterns == ("node-a",)
    assert a.key == hash_token(TOKEN_A)
    gh = table.authenticate(b"Bearer " + TOKEN_GH.encode())
    assert gh is not None and gh.may_write("greenhouse-12") and not gh.may_write("node-a")
    multi = table.authenticate(b"Bearer " + TOKEN_MULTI.encode())
    assert multi is not None and multi.patterns == ("node-m1", "node-m2")


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        pytest.param(None, False, id="no-header"),
        pytest.param(b"", False, id="empty"),
        pytest.param(b"Bearer", False, id="scheme-only"),
        pytest.param(b"Bearer    ", False, id="scheme-and-blanks"),
        pytest.param(b"Basic " + TOKEN_A.encode(), False, id="basic-scheme"),
        pytest.param(TOKEN_A.encode(), False, id="token-without-scheme"),
        pytest.param(b"Bearer not-a-known-token", False, id="unknown-token"),
        pytest.param(b"Bearer " + TOKEN_A.encode() + b"x", False, id="token-plus-a-char"),
        pytest.param(b"Bearer " + TOKEN_A.encode()[:-1], False, id="token-minus-a-char"),
        pytest.param(b"Bearer " + TOKEN_A.encode(), True, id="good"),
        pytest.param(b"bearer " + TOKEN_A.encode(), True, id="scheme-lower-case"),
        pytest.param(b"BEARER " + TOKEN_A.encode(), True, id="scheme-upper-case"),
        pytest.param(b"Bearer  " + TOKEN_A.encode() + b" ", True, id="surrounding-blanks"),
    ],
)
def test_authenticate(tmp_path: Path, header: bytes | None, ok: bool) -> None:
    table = TokenTable(tokens_file(tmp_path / "tokens", [f"node-a {hash_token(TOKEN_A)}"]))
    principal = table.authenticate(header)
    assert (principal is not None) is ok
    if principal is not None:
        assert principal.patterns == ("node-a",)


def test_only_the_exact_hash_of_the_whole_token_authenticates(tmp_path: Path) -> None:
    """By behaviour: a token passes against its own SHA-256 (in either case in the file), and a stored hash
    one hex digit off, in any position, refuses it."""
    bearer, digest = b"Bearer " + TOKEN_A.encode(), hash_token(TOKEN_A)
    assert TokenTable(tokens_file(tmp_path / "upper", [f"node-a {digest.upper()}"])).authenticate(bearer) is not None
    for i in (0, 1, 31, 62, 63):
        near = digest[:i] + ("0" if digest[i] != "0" else "1") + digest[i + 1 :]
        table = TokenTable(tokens_file(tmp_path / f"near-{i}", [f"node-a {near}"]))
        assert table.authenticate(bearer) is None, f"a stored hash differing at digit {i} let the token in"


def test_authentication_costs_the_same_whatever_the_tokens_file_holds(tmp_path: Path) -> None:
    """No work per stored token (whose timing would depend on the stored values): checking a token against
    20001 stored hashes costs what it costs against one. A same-run ratio of best-of times, interleaved; a scan
    comparing with each stored hash would be thousands of times slower."""
    lines = [f"node-a {hash_token(TOKEN_A)}"]
    small = TokenTable(tokens_file(tmp_path / "small", lines))
    big = TokenTable(tokens_file(tmp_path / "big", lines + [f"n{i} {hash_token(f'token-{i}')}" for i in range(20000)]))
    headers = [b"Bearer " + TOKEN_A.encode(), b"Bearer not-a-known-token"]

    def check(table: TokenTable) -> None:
        for _ in range(500):
            for header in headers:
                table.authenticate(header)

    small_s = big_s = float("inf")
    for _ in range(5):
        small_s = min(small_s, best_of(lambda: check(small), 3))
        big_s = min(big_s, best_of(lambda: check(big), 3))
    assert big_s < 3 * small_s, f"{big_s / small_s:.1f}x slower against 20001 stored hashes"


@pytest.mark.parametrize(
    "bad_line",
    [
        pytest.param("node-a", id="pattern-only"),
        pytest.param(hash_token(TOKEN_A), id="hash-only"),
        pytest.param(f"node-a {hash_token(TOKEN_A)} extra", id="three-fields"),
        pytest.param(f"node-a {hash_token(TOKEN_A)[:-1]}", id="hash-too-short"),
        pytest.param(f"node-a {hash_token(TOKEN_A)}0", id="hash-too-long"),
        pytest.param(f"node-a {'g' * 64}", id="hash-not-hex"),
        pytest.param(f"node-a {TOKEN_A}", id="a-plain-token-instead-of-its-hash"),
    ],
)
def test_malformed_line_names_file_and_line_and_never_echoes_it(tmp_path: Path, bad_line: str) -> None:
    path = tokens_file(tmp_path / "tokens", ["# header", f"node-b {hash_token(TOKEN_GH)}", bad_line])
    with pytest.raises(AuthConfigError) as info:
        TokenTable(path)
    message = str(info.value)
    assert str(path) in message
    assert "line 3" in message
    assert "\n" not in message
    for field in bad_line.split():
        if field != "node-a":
            assert field not in message, f"the error echoes {field!r}: {message}"
    assert TOKEN_A not in message


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(AuthConfigError, match="cannot read"):
        TokenTable(tmp_path / "nope")


def test_reload_picks_up_new_tokens_and_drops_removed_ones(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tokens_file(tmp_path / "tokens", [f"node-a {hash_token(TOKEN_A)}"])
    table = TokenTable(path)
    tokens_file(path, [f"greenhouse-* {hash_token(TOKEN_GH)}"])
    with caplog.at_level(logging.INFO, logger="telemetry_sink.auth"):
        assert table.reload() is True
    assert table.authenticate(b"Bearer " + TOKEN_A.encode()) is None
    assert table.authenticate(b"Bearer " + TOKEN_GH.encode()) is not None
    assert "reloaded" in caplog.text


@pytest.mark.parametrize("breakage", ["malformed", "deleted"])
def test_reload_of_a_broken_file_keeps_the_old_tokens_and_logs_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, breakage: str
) -> None:
    path = tokens_file(tmp_path / "tokens", [f"node-a {hash_token(TOKEN_A)}"])
    table = TokenTable(path)
    if breakage == "malformed":
        tokens_file(path, [f"greenhouse-* {hash_token(TOKEN_GH)}", f"oops {TOKEN_GH}"])
    else:
        path.unlink()
    with caplog.at_level(logging.INFO, logger="telemetry_sink.auth"):
        assert table.reload() is False
    assert table.authenticate(b"Bearer " + TOKEN_A.encode()) is not None
    assert table.authenticate(b"Bearer " + TOKEN_GH.encode()) is None
    assert len(table) == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "keeping 1 tokens" in errors[0].getMessage()
    assert TOKEN_GH not in caplog.text


# -- add_token --


def test_add_token_appends_only_the_hash_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "tokens"
    first = add_token(path, "node-a")
    second = add_token(path, "greenhouse-*")
    assert first != second
    assert len(first) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == f"node-a {hash_token(first)}\ngreenhouse-* {hash_token(second)}\n"
    table = TokenTable(path)
    p1 = table.authenticate(b"Bearer " + first.encode())
    p2 = table.authenticate(b"Bearer " + second.encode())
    assert p1 is not None and p1.patterns == ("node-a",)
    assert p2 is not None and p2.may_write("greenhouse-3")


def test_add_token_to_a_hand_written_file_without_a_final_newline(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"node-a {hash_token(TOKEN_A)}")  # as an editor may leave it
    new = add_token(path, "node-b")
    table = TokenTable(path)  # the two entries stay on separate lines
    assert table.authenticate(b"Bearer " + TOKEN_A.encode()) is not None
    assert table.authenticate(b"Bearer " + new.encode()) is not None


@pytest.mark.parametrize("pattern", ["", "node a", "node\ta", " "])
def test_add_token_refuses_a_pattern_with_white_space(tmp_path: Path, pattern: str) -> None:
    path = tmp_path / "tokens"
    with pytest.raises(AuthConfigError):
        add_token(path, pattern)
    assert not path.exists()


# -- end to end --


class AuthSink:
    def __init__(self, server: ServerProcess) -> None:
        self.server = server

    def post(self, records: Any, token: str | None, **headers: str) -> httpx.Response:
        all_headers = {**(bearer(token) if token is not None else {}), **headers}
        return self.server.post(orjson.dumps(records), headers=all_headers)


@pytest.fixture(scope="module")
def auth_sink(tmp_path_factory: pytest.TempPathFactory, lane: str) -> Iterator[AuthSink]:
    tokens_dir = tmp_path_factory.mktemp("auth-tokens")
    tokens = tokens_file(tokens_dir / "tokens", [
        f"node-a {hash_token(TOKEN_A)}",
        f"greenhouse-* {hash_token(TOKEN_GH)}",
    ])
    with shared_server(tmp_path_factory, "auth-sink", {"auth": {"tokens_file": str(tokens)}}, lane) as (server, _, _):
        yield AuthSink(server)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-header"),
        pytest.param({"authorization": f"Basic {TOKEN_A}"}, id="basic-scheme"),
        pytest.param({"authorization": TOKEN_A}, id="no-scheme"),
        pytest.param({"authorization": "Bearer"}, id="scheme-without-token"),
        pytest.param({"authorization": "Bearer wrong-token"}, id="unknown-token"),
        pytest.param({"authorization": f"Bearer {hash_token(TOKEN_A)}"}, id="the-stored-hash-as-token"),
    ],
)
def test_e2e_missing_or_unknown_token_is_401_with_www_authenticate(
    auth_sink: AuthSink, headers: dict[str, str]
) -> None:
    response = auth_sink.server.post(orjson.dumps({"node_id": "node-a", "ts": 1}), headers=headers)
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_e2e_401_comes_before_the_body_is_looked_at(auth_sink: AuthSink) -> None:
    response = auth_sink.server.post(b"not json at all", content_type="application/json")
    assert_error(response, 401, "unauthorized")


def test_e2e_good_token_is_accepted_and_stored(auth_sink: AuthSink) -> None:
    record = {"node_id": "node-a", "ts": 1.0, "probe": "good-token"}
    response = auth_sink.post(record, TOKEN_A)
    assert (response.status_code, response.json()) == (202, {"accepted": 1})
    wait_for(lambda: record in cli_read(auth_sink.server.config_path), what="the record on disk")


def test_e2e_glob_token_writes_matching_node_ids(auth_sink: AuthSink) -> None:
    records = [{"node_id": f"greenhouse-{i}", "ts": 2.0, "probe": "glob"} for i in range(3)]
    response = auth_sink.post(records, TOKEN_GH)
    assert (response.status_code, response.json()) == (202, {"accepted": 3})
    response = auth_sink.post({"node_id": "node-a", "ts": 2.0}, TOKEN_GH)
    body = assert_error(response, 403, "forbidden")
    assert body["index"] == 0


def test_e2e_forbidden_record_is_403_naming_its_index_and_nothing_is_stored(auth_sink: AuthSink) -> None:
    records = [
        {"node_id": "node-a", "ts": 3.0, "probe": "forbidden-batch"},
        {"node_id": "node-a", "ts": 3.0, "probe": "forbidden-batch"},
        {"node_id": "node-b", "ts": 3.0, "probe": "forbidden-batch"},
        {"node_id": "node-a", "ts": 3.0, "probe": "forbidden-batch"},
    ]
    response = auth_sink.post(records, TOKEN_A)
    body = assert_error(response, 403, "forbidden")
    assert body["index"] == 2
    assert "node-b" in body["detail"]
    assert TOKEN_A not in response.text
    # The buffer is written in order: once a later sentinel is on disk, the refused batch
    # would be too had any of it been stored.
    sentinel = {"node_id": "node-a", "ts": 3.5, "probe": "sentinel-after-403"}
    assert auth_sink.post(sentinel, TOKEN_A).status_code == 202
    def stored_with_sentinel() -> list[dict[str, Any]] | None:
        stored = cli_read(auth_sink.server.config_path)
        return stored if sentinel in stored else None

    stored = wait_for(stored_with_sentinel, what="the sentinel on disk")
    assert [r for r in stored if r.get("probe") == "forbidden-batch"] == []


def cli_token_add(config: Path, pattern: str) -> str:
    """`telemetry-sink token add --config CONFIG PATTERN`: the token it printed (checked: once, alone)."""
    proc = run_cli("token", "add", "--config", str(config), pattern)
    assert proc.returncode == 0, proc.stderr.decode()
    stdout_lines = proc.stdout.decode().splitlines()
    assert len(stdout_lines) == 1, "the token is printed once, alone, on stdout"
    token = stdout_lines[0].strip()
    assert len(token) >= 32
    assert token not in proc.stderr.decode()
    return token


def test_e2e_token_add_then_sighup_loads_it_without_restart(
    start_server: StartServer, tmp_path: Path, key_file: Path
) -> None:
    tokens = tmp_path / "secrets" / "tokens"
    cli_config = write_config(tmp_path / "cli.ini", {"crypto": {"key_file": str(key_file)},
                                                     "auth": {"tokens_file": str(tokens)}})
    first_token = cli_token_add(cli_config, "node-a")  # creates the file
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
    server = start_server({"auth": {"tokens_file": str(tokens)}})
    pid = server.proc.pid
    assert server.post(orjson.dumps({"node_id": "node-a", "ts": 4.0}), headers=bearer(first_token)).status_code == 202

    new_token = cli_token_add(server.config_path, "sensor-*")
    assert new_token != first_token
    content = tokens.read_text()
    assert new_token not in content and first_token not in content
    assert content.splitlines() == [f"node-a {hash_token(first_token)}", f"sensor-* {hash_token(new_token)}"]
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600

    record = {"node_id": "sensor-1", "ts": 4.0}
    assert server.post(orjson.dumps(record), headers=bearer(new_token)).status_code == 401  # not loaded yet
    server.signal(signal.SIGHUP)
    wait_for(lambda: server.post(orjson.dumps(record), headers=bearer(new_token)).status_code == 202,
             what="the new token to be accepted after SIGHUP")
    assert server.proc.poll() is None and server.proc.pid == pid
    assert server.post(orjson.dumps({"node_id": "node-a", "ts": 4.0}), headers=bearer(first_token)).status_code == 202
    assert new_token not in server.log()

    # A broken file on the next SIGHUP: the old tokens stay, the log says why.
    tokens_file(tokens, [f"node-a {hash_token(first_token)}", f"garbage-line {TOKEN_GH}"])
    server.signal(signal.SIGHUP)
    wait_for(lambda: "not reloaded" in server.log(), what="the reload failure in the server log")
    assert server.post(orjson.dumps(record), headers=bearer(new_token)).status_code == 202
    assert server.post(orjson.dumps({"node_id": "node-a", "ts": 5.0}), headers=bearer(first_token)).status_code == 202
    log = server.log()
    assert "keeping 2 tokens" in log
    assert "line 2" in log
    assert TOKEN_GH not in log and new_token not in log and first_token not in log
    assert server.proc.poll() is None


def test_e2e_token_add_without_a_tokens_file_is_an_error(tmp_path: Path, key_file: Path) -> None:
    config = write_config(tmp_path / "config.ini", {"crypto": {"key_file": str(key_file)}})
    proc = run_cli("token", "add", "--config", str(config), "node-a")
    assert proc.returncode == 2
    assert proc.stdout == b""
    assert proc.stderr.decode().startswith("telemetry-sink: error:")


def test_e2e_missing_tokens_file_fails_start_up_with_one_line(start_server: StartServer, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-tokens"
    server = start_server({"auth": {"tokens_file": str(missing)}}, wait=False)
    assert server.wait(timeout=30) == 2
    errors = [line for line in server.log().splitlines() if "error" in line.lower()]
    assert len(errors) == 1, server.log()
    assert errors[0].startswith("telemetry-sink: error:")
    assert str(missing) in errors[0]
    assert "Traceback" not in server.log()


def test_e2e_malformed_tokens_file_fails_start_up_without_echoing_it(
    start_server: StartServer, tmp_path: Path
) -> None:
    tokens = tokens_file(tmp_path / "tokens", [f"node-a {TOKEN_A}"])
    server = start_server({"auth": {"tokens_file": str(tokens)}}, wait=False)
    assert server.wait(timeout=30) == 2
    log = server.log()
    assert "line 1" in log
    assert TOKEN_A not in log
    assert "Traceback" not in log


def test_reload_of_an_emptied_file_is_refused_unless_it_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tokens_file(tmp_path / "tokens", [f"node-a {hash_token(TOKEN_A)}"])
    table = TokenTable(path)
    tokens_file(path, ["# everyone was removed by mistake"])
    with caplog.at_level(logging.INFO, logger="telemetry_sink.auth"):
        assert table.reload() is False
    assert table.authenticate(b"Bearer " + TOKEN_A.encode()) is not None  # nobody was locked out
    assert "holds no tokens" in caplog.text and auth.ALLOW_EMPTY in caplog.text
    tokens_file(path, [auth.ALLOW_EMPTY])
    assert table.reload() is True
    assert len(table) == 0 and table.authenticate(b"Bearer " + TOKEN_A.encode()) is None


def test_non_utf8_tokens_file_is_one_line_at_start_and_keeps_old_tokens_on_reload(
    start_server: StartServer, tmp_path: Path
) -> None:
    path = tokens_file(tmp_path / "tokens", [f"node-a {hash_token(TOKEN_A)}"])
    server = start_server({"auth": {"tokens_file": str(path)}})
    path.write_bytes(b"caf\xe9-* " + hash_token(TOKEN_GH).encode() + b"\n")
    server.signal(signal.SIGHUP)
    wait_for(lambda: "not UTF-8" in server.log(), what="the reload to be refused")
    ok = httpx.post(server.url + "/telemetry", content=b'{"node_id": "node-a"}',
                    headers={"content-type": "application/json", "authorization": f"Bearer {TOKEN_A}"})
    assert ok.status_code == 202
    server.stop()
    again = start_server({"auth": {"tokens_file": str(path)}}, wait=False)
    assert again.wait(timeout=30) == 2
    errors = [line for line in again.log().splitlines() if "error" in line.lower()]
    assert errors == [f"telemetry-sink: error: tokens file {path}: not UTF-8 text (byte 3); write it as UTF-8"]
