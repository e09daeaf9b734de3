"""Structured logs: `serve --log-format json` writes one JSON object a line on stderr (start-up with
the effective config, segment roll-over, retention, shutdown); text format writes none; the
JsonFormatter on its own."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import orjson
from conftest import ServerProcess, StartServer, wait_for

from telemetry_sink.logging_setup import TEXT_FORMAT, JsonFormatter

GRACEFUL_EXIT = (0, -signal.SIGTERM)


def logged_server(start_server: StartServer, log_format: str,
                  overrides: dict[str, dict[str, Any]] | None = None) -> ServerProcess:
    """`serve --log-format FMT`, with stdout and stderr captured apart (stdout: `.log()`)."""
    return start_server(overrides, args=("--log-format", log_format), separate_stderr=True)


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line must be a JSON object with ts, level, logger and msg."""
    out = []
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
        assert isinstance(obj, dict), line
        assert {"ts", "level", "logger", "msg"} <= set(obj), line
        assert isinstance(obj["msg"], str) and obj["level"] in {"debug", "info", "warning", "error", "critical"}
        out.append(obj)
    return out


def test_json_logs_are_one_object_a_line(tmp_path: Path, key_file: Path,
                                         start_server: StartServer) -> None:
    server = logged_server(start_server, "json", {
        "writer": {"max_segment_bytes": 600, "retention_bytes": 1500, "batch_size": 1},
        "buffer": {"high_water_percent": 77},
    })
    for i in range(12):
        body = orjson.dumps({"node_id": "log-node", "i": i, "pad": "y" * 100})
        assert server.post(body).status_code == 202
    assert server.post(b"nope", content_type="text/plain").status_code == 415
    wait_for(lambda: "retention: deleted segment" in server.stderr(), what="a retention deletion")
    rc = server.stop()
    assert rc in GRACEFUL_EXIT, server.stderr()
    assert server.log() == ""  # stdout
    lines = json_lines(server.stderr())
    assert len(lines) >= 6

    # ts is an ISO-8601 UTC time with milliseconds.
    assert all(line["ts"].endswith("+00:00") and "T" in line["ts"] for line in lines)

    startup = [line for line in lines if line.get("event") == "startup"]
    assert len(startup) == 1, lines
    config = startup[0]["config"]
    assert config["server"]["port"] == 0  # as configured: the system picked the port, the "listening" line says it
    listening = [line for line in lines if line.get("event") == "listening"]
    assert len(listening) == 1, lines
    assert (listening[0]["host"], listening[0]["port"]) == ("127.0.0.1", server.port)
    assert lines.index(listening[0]) < lines.index(next(line for line in lines if line.get("event") == "ready"))
    assert config["buffer"]["high_water_percent"] == 77
    assert config["writer"]["max_segment_bytes"] == 600
    assert config["writer"]["directory"] == str(tmp_path / "data")
    assert config["crypto"]["key_file"] == str(key_file)
    assert startup[0]["implementation"] in {"compiled", "pure-python"}
    # The twin is announced at WARNING (tests/test_speedups.py checks its text).
    level = "info" if startup[0]["implementation"] == "compiled" else "warning"
    assert startup[0]["logger"] == "telemetry_sink" and startup[0]["level"] == level

    messages = [line["msg"] for line in lines]
    assert any(m.startswith("opened segment") for m in messages), messages
    assert any(m.startswith("sealed segment") for m in messages), messages
    assert any(m.startswith("retention: deleted segment") for m in messages), messages
    assert any(line.get("event") == "ready" for line in lines)
    shutdown = [line for line in lines if line["msg"].startswith("shutdown complete")]
    assert len(shutdown) == 1 and "12 records" in shutdown[0]["msg"], messages
    assert lines.index(shutdown[0]) > lines.index(startup[0])
    # uvicorn's own lines go through the same formatter.
    assert any(line["logger"].startswith("uvicorn") for line in lines), {line["logger"] for line in lines}

    # No key material anywhere in the output.
    key = key_file.read_text().strip()
    assert key not in server.stderr()
    assert key[:22] not in server.stderr() and key[22:] not in server.stderr()


def test_text_logs_are_not_json(key_file: Path, start_server: StartServer) -> None:
    server = logged_server(start_server, "text")
    assert server.post(b'{"node_id":"t"}').status_code == 202
    rc = server.stop()
    assert rc in GRACEFUL_EXIT, server.stderr()
    text = server.stderr()
    assert "starting: speedups" in text and "shutdown complete" in text
    assert f"telemetry-sink listening on http://127.0.0.1:{server.port}\n" in text
    for line in text.splitlines():
        assert not line.lstrip().startswith("{"), line
    assert key_file.read_text().strip() not in text


# -- JsonFormatter on its own --


def _record(msg: str, *args: object, extra: dict[str, Any] | None = None,
            exc_info: Any = None, level: int = logging.WARNING) -> logging.LogRecord:
    logger = logging.getLogger("telemetry_sink.test")
    return logger.makeRecord(logger.name, level, __file__, 1, msg, args, exc_info, extra=extra)


def test_json_formatter_fields_and_extras() -> None:
    record = _record("hello %s", "world", extra={"event": "demo", "count": 3, "path": Path("/x/y"),
                                                  "nested": {"a": [1, 2]}})
    obj = json.loads(JsonFormatter().format(record))
    assert obj["msg"] == "hello world"
    assert obj["level"] == "warning"
    assert obj["logger"] == "telemetry_sink.test"
    assert obj["event"] == "demo" and obj["count"] == 3 and obj["nested"] == {"a": [1, 2]}
    assert obj["path"] == "/x/y"  # not JSON: stringified, never an exception
    assert "exc_info" not in obj
    # Standard LogRecord attributes stay out.
    for attr in ("args", "levelno", "pathname", "lineno", "funcName", "created", "thread", "process"):
        assert attr not in obj
    assert set(obj) == {"ts", "level", "logger", "msg", "event", "count", "path", "nested"}


def test_json_formatter_exc_info() -> None:
    try:
        raise ValueError("boom \"quoted\"\nsecond line")
    except ValueError:
        record = _record("failed", exc_info=sys.exc_info(), level=logging.ERROR)
    line = JsonFormatter().format(record)
    assert "\n" not in line  # one line, even with a multi-line traceback
    obj = json.loads(line)
    assert obj["level"] == "error"
    assert obj["exc_info"].startswith("Traceback (most recent call last):")
    assert 'ValueError: boom "quoted"\nsecond line' in obj["exc_info"]


def test_json_formatter_survives_odd_messages() -> None:
    record = _record("%s", b"\xff\x00bytes", extra={"obj": object(), "u": "\u2603"})
    obj = json.loads(JsonFormatter().format(record))
    assert obj["msg"] == str(b"\xff\x00bytes")
    assert obj["u"] == "\u2603"
    assert obj["obj"].startswith("<object object")


def test_text_format_constant() -> None:
    formatter = logging.Formatter(TEXT_FORMAT)
    out = formatter.format(_record("x=%d", 5))
    assert out.endswith("WARNING telemetry_sink.test: x=5")
