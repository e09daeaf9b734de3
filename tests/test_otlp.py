"""POST /v1/logs (OTLP/HTTP logs): protobuf and JSON, gzip, auth, the all-or-nothing 422 with an
index, the mapping of docs/otlp.md, and the real OpenTelemetry Python SDK exporting to a real server."""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import ServerProcess, shared_server, wait_for
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from test_http_server import cli_read

from telemetry_sink.auth import hash_token

StartServer = Callable[..., ServerProcess]
PROTO = "application/x-protobuf"
T0 = 1_700_000_000_123_456_789  # ns


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with shared_server(tmp_path_factory, "otlp") as (server, _, _):
        yield server


def attr(key: str, value: str) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(string_value=value))


def proto_request(*resources: tuple[dict[str, str], list[LogRecord]]) -> bytes:
    request = ExportLogsServiceRequest(resource_logs=[
        ResourceLogs(resource=Resource(attributes=[attr(k, v) for k, v in attrs.items()]),
                     scope_logs=[ScopeLogs(scope=InstrumentationScope(name="app", version="1.2"), log_records=records)])
        for attrs, records in resources])
    return request.SerializeToString()


def post(server: ServerProcess, data: bytes, content_type: str = PROTO, **headers: str) -> httpx.Response:
    return httpx.post(server.url + "/v1/logs", content=data, headers={"content-type": content_type, **headers},
                      timeout=10.0)


def stored(server: ServerProcess, node: str, expect: int = 0) -> list[dict[str, Any]]:
    """The records of `node` in the shared server's log, once at least `expect` are written (buffered acks)."""

    def enough() -> list[dict[str, Any]] | None:
        found = cli_read(server.config_path, "--node", node)
        return found if len(found) >= expect else None

    return wait_for(enough, what=f"{expect} records of {node}") if expect else cli_read(server.config_path, "--node",
                                                                                         node)


def test_protobuf_records_are_stored_one_each_with_the_documented_mapping(sink: ServerProcess) -> None:
    rich = LogRecord(time_unix_nano=T0, observed_time_unix_nano=T0 + 5, severity_number=9, severity_text="INFO",
                     body=AnyValue(kvlist_value=KeyValueList(values=[
                         KeyValue(key="n", value=AnyValue(int_value=-7)),
                         KeyValue(key="list", value=AnyValue(array_value=ArrayValue(values=[
                             AnyValue(double_value=1.5), AnyValue(bool_value=True), AnyValue(bytes_value=b"\x00\xff"),
                         ])))])),
                     attributes=[attr("http.method", "GET")], trace_id=bytes(range(16)), span_id=bytes(range(8)),
                     event_name="app.started")
    plain = LogRecord(observed_time_unix_nano=T0, body=AnyValue(string_value="only observed"))
    response = post(sink, proto_request(({"service.instance.id": "proto-1", "service.name": "svc"}, [rich, plain])))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == PROTO
    assert ExportLogsServiceResponse.FromString(response.content) == ExportLogsServiceResponse()  # no partial success
    first, second = stored(sink, "proto-1", 2)
    assert first == {
        "node_id": "proto-1", "ts": T0 / 1e9, "severity_number": 9, "severity": "INFO",
        "body": {"n": -7, "list": [1.5, True, "AP8="]}, "attributes": {"http.method": "GET"},
        "event_name": "app.started", "trace_id": bytes(range(16)).hex(), "span_id": bytes(range(8)).hex(),
        "scope": {"name": "app", "version": "1.2"},
        "resource": {"service.instance.id": "proto-1", "service.name": "svc"},
    }
    assert second["ts"] == T0 / 1e9 and second["body"] == "only observed" and "severity" not in second


def test_json_encoding_maps_the_same_way(sink: ServerProcess) -> None:
    doc = {"resourceLogs": [{
        "resource": {"attributes": [{"key": "host.name", "value": {"stringValue": "json-host"}}]},
        "scopeLogs": [{"scope": {"name": "app", "version": "1.2"}, "logRecords": [{
            "timeUnixNano": str(T0), "severityNumber": 17, "severityText": "ERROR",
            "body": {"stringValue": "disk on fire"},
            "attributes": [{"key": "count", "value": {"intValue": "3"}},
                           {"key": "ratio", "value": {"doubleValue": 0.5}}],
            "traceId": "000102030405060708090A0B0C0D0E0F", "spanId": "0001020304050607",
            "unknownField": "ignored",
        }, {"body": {}}]}],
    }]}
    response = post(sink, orjson.dumps(doc), "application/json")
    assert response.status_code == 200 and response.json() == {}
    assert response.headers["content-type"] == "application/json"
    first, second = stored(sink, "json-host", 2)  # host.name: no service.instance.id here
    assert first == {
        "node_id": "json-host", "ts": T0 / 1e9, "severity_number": 17, "severity": "ERROR", "body": "disk on fire",
        "attributes": {"count": 3, "ratio": 0.5}, "trace_id": bytes(range(16)).hex(),
        "span_id": bytes(range(8)).hex(), "scope": {"name": "app", "version": "1.2"},
        "resource": {"host.name": "json-host"},
    }
    assert second["body"] is None and isinstance(second["ts"], float)  # no time at all: the receive time


@pytest.mark.parametrize("content_type", [PROTO, "application/json"])
def test_gzip_bodies_are_accepted(sink: ServerProcess, content_type: str) -> None:
    node = f"gz-{content_type.rsplit('/', 1)[1]}"
    if content_type == PROTO:
        data = proto_request(({"service.instance.id": node}, [LogRecord(body=AnyValue(string_value="z"))]))
    else:
        data = orjson.dumps({"resourceLogs": [{"resource": {"attributes": [
            {"key": "service.instance.id", "value": {"stringValue": node}}]},
            "scopeLogs": [{"logRecords": [{"body": {"stringValue": "z"}}]}]}]})
    response = post(sink, gzip.compress(data), content_type, **{"content-encoding": "gzip"})
    assert response.status_code == 200, response.text
    assert [r["body"] for r in stored(sink, node, 1)] == ["z"]


def test_a_record_without_the_node_attribute_refuses_the_whole_request_naming_its_index(sink: ServerProcess) -> None:
    ok = ({"service.instance.id": "named"}, [LogRecord(), LogRecord()])
    nameless = ({"service.name": "svc"}, [LogRecord(body=AnyValue(string_value="x"))])
    response = post(sink, proto_request(ok, nameless))
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "invalid_record" and body["index"] == 2
    assert "service.instance.id" in body["detail"] and "host.name" in body["detail"]
    assert stored(sink, "named") == []  # all or nothing


_HOST_H = b'{"resourceLogs": [{"resource": {"attributes": [{"key": "host.name", "value": {"stringValue": "h"}}]}, '


@pytest.mark.parametrize(("data", "content_type", "status", "error"), [
    pytest.param(b"\xff\xff\xff", PROTO, 400, "invalid_otlp", id="not-protobuf"),
    pytest.param(b"{", "application/json", 400, "invalid_json", id="not-json"),
    pytest.param(b'{"resourceLogs": {}}', "application/json", 400, "invalid_otlp", id="json-shape"),
    pytest.param(b'{"resourceLogs": [{"scopeLogs": [{"logRecords": [{"timeUnixNano": "soon"}]}]}]}',
                 "application/json", 400, "invalid_otlp", id="json-time"),
    pytest.param(b"{}", "application/json", 422, "invalid_record", id="no-records"),
    pytest.param(b'{"resourceLogs": [{"resource": {"attributes": [{"key": 1}]}}]}', "application/json", 400,
                 "invalid_otlp", id="attribute-key-type"),
    pytest.param(_HOST_H + b'"scopeLogs": [{"logRecords": [{"body": {"intValue": "' + b"9" * 40 + b'"}}]}]}]}',
                 "application/json", 422, "invalid_record", id="int-beyond-64-bits"),
    pytest.param(_HOST_H + b'"scopeLogs": [{"logRecords": [{"body": ' + b'{"arrayValue": {"values": [' * 300 + b"{}" +
                 b"]}}" * 300 + b"}]}]}]}", "application/json", 422, "invalid_record", id="nested-too-deep"),
    pytest.param(b"x", "application/x-ndjson", 415, "unsupported_media_type", id="media-type"),
])
def test_malformed_requests_get_a_clear_4xx(sink: ServerProcess, data: bytes, content_type: str, status: int,
                                            error: str) -> None:
    response = post(sink, data, content_type)
    assert response.status_code == status, response.text
    assert response.json()["error"] == error and response.json()["detail"]


def test_auth_and_node_permissions_apply(start_server: StartServer, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"sensor-* {hash_token('otlp-token')}\n")
    server = start_server({"auth": {"tokens_file": str(tokens)}})
    data = proto_request(({"service.instance.id": "sensor-1"}, [LogRecord()]))
    assert post(server, data).status_code == 401
    assert post(server, data, authorization="Bearer otlp-token").status_code == 200
    other = proto_request(({"service.instance.id": "boiler-1"}, [LogRecord()]))
    refused = post(server, other, authorization="Bearer otlp-token")
    assert refused.status_code == 403 and refused.json()["index"] == 0
    server.stop()
    assert [r["node_id"] for r in cli_read(server.config_path)] == ["sensor-1"]


def test_node_attribute_is_configurable(start_server: StartServer) -> None:
    server = start_server({"otlp": {"node_id_attribute": "device.id"}})
    data = proto_request(({"device.id": "dev-9", "service.instance.id": "ignored"}, [LogRecord()]))
    assert post(server, data).status_code == 200
    server.stop()
    assert [r["node_id"] for r in cli_read(server.config_path)] == ["dev-9"]


def test_the_opentelemetry_sdk_exports_through_a_batch_processor(start_server: StartServer) -> None:
    from opentelemetry._logs import SeverityNumber
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
    from opentelemetry.sdk.resources import Resource as SdkResource

    server = start_server({"ingest": {"ack": "durable"}})
    provider = LoggerProvider(resource=SdkResource.create({"service.instance.id": "sdk-node",
                                                            "service.name": "greenhouse"}))
    exporter = OTLPLogExporter(endpoint=server.url + "/v1/logs", timeout=10)
    provider.add_log_record_processor(BatchLogRecordProcessor(exporter, max_export_batch_size=50))
    logger = provider.get_logger("otlp-sdk-test", "0.1")
    try:
        for i in range(120):
            logger.emit(body=f"reading {i}", severity_number=SeverityNumber.WARN, severity_text="WARN",
                        attributes={"sensor.reading": i}, timestamp=T0 + i)
        assert provider.force_flush(10_000)
    finally:
        provider.shutdown()
    server.stop()
    records = cli_read(server.config_path)
    assert [r["body"] for r in records] == [f"reading {i}" for i in range(120)]
    assert {r["node_id"] for r in records} == {"sdk-node"}
    assert records[7]["attributes"] == {"sensor.reading": 7} and records[7]["severity"] == "WARN"
    assert records[7]["severity_number"] == SeverityNumber.WARN.value and records[7]["ts"] == (T0 + 7) / 1e9
    assert records[7]["resource"]["service.name"] == "greenhouse"
    assert records[0]["scope"] == {"name": "otlp-sdk-test", "version": "0.1"}
    assert len({r["resource"]["telemetry.sdk.version"] for r in records}) == 1  # the SDK's own resource attributes


def test_without_the_otlp_extra_protobuf_gets_one_line_saying_what_to_install(start_server: StartServer,
                                                                             tmp_path: Path) -> None:
    # A package shadowing opentelemetry.proto that fails to import, as on an install without [otlp].
    shadow = tmp_path / "shadow" / "opentelemetry" / "proto"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('opentelemetry-proto is not installed')\n")
    server = start_server(env={"PYTHONPATH": str(tmp_path / "shadow")})
    refused = post(server, proto_request(({"service.instance.id": "n"}, [LogRecord()])))
    assert refused.status_code == 415
    assert "telemetry-sink[otlp]" in refused.json()["detail"] and "\n" not in refused.json()["detail"]
    doc = {"resourceLogs": [{"resource": {"attributes": [{"key": "host.name", "value": {"stringValue": "n"}}]},
                             "scopeLogs": [{"logRecords": [{"body": {"stringValue": "json still works"}}]}]}]}
    assert post(server, orjson.dumps(doc), "application/json").status_code == 200


def test_an_idempotency_key_makes_a_repeated_export_a_replay(sink: ServerProcess) -> None:
    data = proto_request(({"service.instance.id": "otlp-keyed"}, [LogRecord(body=AnyValue(string_value="once"))]))
    first = post(sink, data, **{"idempotency-key": '"export-1"'})
    again = post(sink, data, **{"idempotency-key": '"export-1"'})
    assert first.status_code == again.status_code == 200 and again.content == first.content == b""
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert [r["body"] for r in stored(sink, "otlp-keyed", 1)] == ["once"]
