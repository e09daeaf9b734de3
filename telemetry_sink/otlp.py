"""OTLP/HTTP logs: decode an ExportLogsServiceRequest (protobuf, or OTLP's JSON encoding) and map
each log record to one stored record (docs/otlp.md), plus the success bodies OTLP expects.

Protobuf needs the optional `opentelemetry-proto` package (`pip install 'telemetry-sink[otlp]'`),
the maintained generated classes of the OTLP schema; the JSON encoding is decoded with orjson
alone, following the OTLP/HTTP JSON rules (lowerCamelCase keys, 64-bit integers as strings,
trace and span ids in hex, enums as numbers).
"""

from __future__ import annotations

import base64
from typing import Any

import orjson

from .errors import IngestError, invalid_record

try:
    from google.protobuf.message import DecodeError
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue

    PROTOBUF_AVAILABLE = True
except ImportError:  # the [otlp] extra is not installed: JSON still works
    PROTOBUF_AVAILABLE = False

PROTO, JSON = "otlp-proto", "otlp-json"
FORMATS = (PROTO, JSON)
MEDIA_TYPES = {b"application/x-protobuf": PROTO, b"application/json": JSON}
MEDIA_TYPE_DETAIL = "Content-Type must be application/x-protobuf or application/json (OTLP/HTTP)"
NO_PROTOBUF_DETAIL = ("OTLP protobuf needs the optional dependency opentelemetry-proto (pip install "
                      "'telemetry-sink[otlp]'); or send OTLP JSON (Content-Type: application/json)")
FALLBACK_NODE_ATTRIBUTE = "host.name"
# An empty ExportLogsServiceResponse (partial_success is never set: a request is all or nothing).
SUCCESS_BODIES = {PROTO: (b"application/x-protobuf", b""), JSON: (b"application/json", b"{}")}


def _invalid(where: str, detail: str) -> IngestError:
    return IngestError(400, "invalid_otlp", f"{where}: {detail}")


def log_records(body: bytes, fmt: str, node_attribute: str) -> list[dict[str, Any]]:
    """One record per OTLP log record, in request order; 400 for a malformed request, 422 (with the
    log record's index) for one whose resource names no node."""
    rows = _from_proto(body) if fmt == PROTO else _from_json(body)
    records: list[dict[str, Any]] = []
    for resource, scope, fields in rows:
        node_id = _node_id(resource, node_attribute)
        if node_id is None:
            raise invalid_record(len(records), f"log record {len(records)}: its resource has no string attribute "
                                 f"{node_attribute!r} or {FALLBACK_NODE_ATTRIBUTE!r} to take node_id from (set "
                                 f"one, e.g. OTEL_RESOURCE_ATTRIBUTES={node_attribute}=sensor-7)")
        record: dict[str, Any] = {"node_id": node_id}
        record.update(fields)
        if scope:
            record["scope"] = scope
        record["resource"] = resource
        records.append(record)
    if not records:
        raise invalid_record(0, "the request holds no log records")
    return records


def _node_id(resource: dict[str, Any], attribute: str) -> str | None:
    for name in (attribute, FALLBACK_NODE_ATTRIBUTE):
        value = resource.get(name)
        if type(value) is str and value:
            return value
    return None


def _record_fields(ts_ns: int, observed_ns: int, severity_number: int, severity_text: str, body: Any,
                   attributes: dict[str, Any], trace_id: str, span_id: str, event_name: str) -> dict[str, Any]:
    """The stored fields of one log record, in the documented order (unset ones left out)."""
    out: dict[str, Any] = {}
    if ts_ns or observed_ns:  # neither: the server adds the receive time, as for /telemetry
        out["ts"] = (ts_ns or observed_ns) / 1e9
    if severity_number:
        out["severity_number"] = severity_number
    if severity_text:
        out["severity"] = severity_text
    out["body"] = body
    out["attributes"] = attributes
    if event_name:
        out["event_name"] = event_name
    if trace_id:
        out["trace_id"] = trace_id
    if span_id:
        out["span_id"] = span_id
    return out


Row = tuple[dict[str, Any], dict[str, Any], dict[str, Any]]  # resource attributes, scope, record fields


# -- protobuf --


def _from_proto(body: bytes) -> list[Row]:
    if not PROTOBUF_AVAILABLE:
        raise IngestError(415, "unsupported_media_type", NO_PROTOBUF_DETAIL)
    try:
        request = ExportLogsServiceRequest.FromString(body)
    except DecodeError as exc:
        raise _invalid("the body", f"not an ExportLogsServiceRequest in protobuf ({exc})") from None
    rows: list[Row] = []
    for resource_logs in request.resource_logs:
        resource = _proto_attributes(resource_logs.resource.attributes)
        for scope_logs in resource_logs.scope_logs:
            s = scope_logs.scope
            scope = {k: v for k, v in (("name", s.name), ("version", s.version)) if v}
            for r in scope_logs.log_records:
                rows.append((resource, scope, _record_fields(
                    r.time_unix_nano, r.observed_time_unix_nano, r.severity_number, r.severity_text,
                    _proto_value(r.body), _proto_attributes(r.attributes), r.trace_id.hex(), r.span_id.hex(),
                    r.event_name)))
    return rows


def _proto_attributes(attributes: Any) -> dict[str, Any]:
    return {kv.key: _proto_value(kv.value) for kv in attributes}


def _proto_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None or kind == "string_value_strindex":  # unset, or a profiles-only dictionary index
        return None
    if kind == "array_value":
        return [_proto_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return _proto_attributes(value.kvlist_value.values)
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode("ascii")
    return getattr(value, kind)


# -- JSON (OTLP/HTTP's JSON encoding of the same messages) --


def _from_json(body: bytes) -> list[Row]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise IngestError(400, "invalid_json", str(exc)) from None
    rows: list[Row] = []
    for i, resource_logs in enumerate(_list(_obj(doc, "the body"), "resourceLogs", "the body")):
        where = f"resourceLogs[{i}]"
        resource_logs = _obj(resource_logs, where)
        resource = _json_attributes(_obj(resource_logs.get("resource", {}), f"{where}.resource"), f"{where}.resource")
        for j, scope_logs in enumerate(_list(resource_logs, "scopeLogs", where)):
            swhere = f"{where}.scopeLogs[{j}]"
            scope_logs = _obj(scope_logs, swhere)
            s = _obj(scope_logs.get("scope", {}), f"{swhere}.scope")
            scope = {k: s[k] for k in ("name", "version") if type(s.get(k)) is str and s[k]}
            for k, r in enumerate(_list(scope_logs, "logRecords", swhere)):
                rwhere = f"{swhere}.logRecords[{k}]"
                r = _obj(r, rwhere)
                rows.append((resource, scope, _record_fields(
                    _json_int(r.get("timeUnixNano", 0), f"{rwhere}.timeUnixNano"),
                    _json_int(r.get("observedTimeUnixNano", 0), f"{rwhere}.observedTimeUnixNano"),
                    _json_int(r.get("severityNumber", 0), f"{rwhere}.severityNumber"),
                    _json_str(r.get("severityText", ""), f"{rwhere}.severityText"),
                    _json_value(r.get("body", {}), f"{rwhere}.body"), _json_attributes(r, rwhere),
                    _json_str(r.get("traceId", ""), f"{rwhere}.traceId").lower(),
                    _json_str(r.get("spanId", ""), f"{rwhere}.spanId").lower(),
                    _json_str(r.get("eventName", ""), f"{rwhere}.eventName"))))
    return rows


_NON_FINITE = ("NaN", "Infinity", "-Infinity")


def _obj(value: Any, where: str) -> dict[str, Any]:
    if type(value) is not dict:
        raise _invalid(where, "must be a JSON object")
    return value


def _list(parent: dict[str, Any], key: str, where: str) -> list[Any]:
    value = parent.get(key, [])
    if type(value) is not list:
        raise _invalid(f"{where}.{key}", "must be a JSON array")
    return value


def _json_str(value: Any, where: str) -> str:
    if type(value) is not str:
        raise _invalid(where, "must be a string")
    return value


def _json_int(value: Any, where: str) -> int:
    """64-bit integers come as decimal strings (or plain numbers)."""
    if type(value) is int:
        return value
    if type(value) is str:
        try:
            return int(value)
        except ValueError:
            pass
    raise _invalid(where, "must be an integer (or a decimal string)")


def _json_attributes(parent: dict[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, kv in enumerate(_list(parent, "attributes", where)):
        kv = _obj(kv, f"{where}.attributes[{i}]")
        out[_json_str(kv.get("key"), f"{where}.attributes[{i}].key")] = \
            _json_value(kv.get("value", {}), f"{where}.attributes[{i}].value")
    return out


def _json_value(value: Any, where: str) -> Any:
    value = _obj(value, where)
    if "stringValue" in value:
        return _json_str(value["stringValue"], where)
    if "boolValue" in value:
        if type(value["boolValue"]) is not bool:
            raise _invalid(where, "boolValue must be true or false")
        return value["boolValue"]
    if "intValue" in value:
        return _json_int(value["intValue"], where)
    if "doubleValue" in value:
        double = value["doubleValue"]
        if type(double) in (int, float):
            return float(double)
        if double in _NON_FINITE:  # protobuf's JSON spelling; JSON has no such numbers: stored as null
            return None
        raise _invalid(where, "doubleValue must be a number")
    if "arrayValue" in value:
        return [_json_value(v, f"{where}[{i}]") for i, v in enumerate(_list(_obj(value["arrayValue"], where),
                                                                               "values", where))]
    if "kvlistValue" in value:
        return _json_attributes({"attributes": _list(_obj(value["kvlistValue"], where), "values", where)}, where)
    if "bytesValue" in value:
        return _json_str(value["bytesValue"], where)  # already base64, as stored for protobuf bytes
    return None
