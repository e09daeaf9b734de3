"""Records (JSON objects) to typed Arrow tables for Parquet and CSV export.

The columns are fixed once, from a sample (`ColumnPlan.from_sample`: the export's first records),
so every row group and every file of one export has the same schema. The rule (docs/analyse.md):

- `node_id` (string) and `ts` (UTC timestamp, microseconds; a number of seconds in years 1-9999) first;
- then each field whose sample values are all of one JSON type, nulls allowed: booleans (bool),
  integers in int64 (int64), numbers with integers and floats mixed (float64: then any integer, as
  the nearest double), strings (string);
  nested objects are flattened with dots (`env.temp_c`); keys that are empty or hold a dot are not
  flattened, so a column name always says where its value came from;
- everything else of a record (arrays, fields of mixed type, fields first seen after the sample,
  values that do not fit their column) goes into `extra`, a JSON object (null when empty).

Null and missing are the same in the export; otherwise typed columns plus `extra` give back the record.
A slice is converted in one pass by the compiled extension when every record conforms to the plan
(`compiled`: no escapes in strings, keys and types as planned), else by pyarrow's JSON reader against
the plan's schema when it conforms (`fast`, in C++), otherwise record by record in Python (`exact`);
all three give the same table, and each only ever hands a slice it cannot convert exactly to the next.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from . import speedups

EXTRA = "extra"
INT64 = (-(2**63), 2**63 - 1)
# ts a timestamp column holds: years 1 to 9999 (what Python's datetime, pandas and DuckDB all take).
TS_RANGE = (-62_135_596_800.0, 253_402_300_800.0)
_TYPES = {"bool": pa.bool_(), "int": pa.int64(), "float": pa.float64(), "str": pa.string()}
# Column kinds as speedups.json_columns numbers them (ts: seconds within TS_RANGE, as microseconds).
_KIND_CODES = {pa.bool_(): 0, pa.int64(): 1, pa.float64(): 2, pa.string(): 3}
_TS_CODE = 4
Path_ = tuple[str, ...]


def _kind(value: object) -> str:
    kind = type(value)
    if kind is bool:
        return "bool"
    if kind is int:
        return "int" if INT64[0] <= value <= INT64[1] else "bigint"  # type: ignore[operator]
    if kind is float:
        return "float"
    if kind is str:
        return "str"
    if value is None:
        return "null"
    return "object" if kind is dict else "json"


def _leaf_kind(kinds: set[str]) -> str | None:
    """The column kind for a leaf's sample kinds, or None when they do not agree on one."""
    kinds = kinds - {"null"}
    if not kinds:
        return "null"
    if kinds == {"int", "float"}:
        return "float"
    if len(kinds) == 1 and next(iter(kinds)) in _TYPES:
        return next(iter(kinds))
    return None


def _accept(kind: str) -> Callable[[object], Any]:
    """value -> value for the column, or raises TypeError when it does not fit."""
    def fits(value: object) -> Any:
        got = _kind(value)
        if got == kind:
            return value
        if kind == "float" and got in ("int", "bigint"):  # as pyarrow's reader: any integer, nearest double
            return float(value)  # type: ignore[arg-type]
        raise TypeError
    return fits


def _accept_ts(value: object) -> float:
    if _kind(value) in ("int", "float") and TS_RANGE[0] <= value < TS_RANGE[1]:  # type: ignore[operator]
        return float(value)  # type: ignore[arg-type]
    raise TypeError


# A tree mirrors the records' nesting: a key maps to a subtree (an object), to (column index, accept)
# for a typed leaf, or to None for a leaf that was only ever null (accepted as null, not a column).
Tree = dict[str, Any]


@dataclass
class ColumnPlan:
    """The columns of one export and how to fill them; see the module docstring for the rule."""

    names: list[str]  # typed columns after node_id and ts, dotted
    tree: Tree
    read_schema: pa.Schema  # nested, for pyarrow's JSON reader
    schema: pa.Schema  # what is written
    layout: tuple[list[bytes], list[int], list[tuple[int, int]], list[int]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.layout = _layout(self.tree, [3, _TS_CODE] + [_KIND_CODES[t] for t in self.schema.types[2:-1]])

    @classmethod
    def from_sample(cls, records: list[dict[str, Any]]) -> ColumnPlan:
        kinds: dict[Path_, set[str]] = {}
        for record in records:
            _collect(record, (), kinds)
        unstable = {p for p, k in kinds.items() if "object" in k and k - {"object", "null"}}
        names: list[str] = []
        leaves: dict[Path_, str] = {}
        seen = {"node_id", "ts", EXTRA}
        for path, found in kinds.items():
            if path[0] in ("node_id", "ts") or "object" in found:
                continue  # node_id and ts have their own columns, whatever the sample holds
            if any(not key or "." in key for key in path):
                continue  # so that a dotted column name always says where its value was
            if any(path[:i] in unstable for i in range(1, len(path))):
                continue
            kind = _leaf_kind(found)
            name = ".".join(path)
            if kind is None or name in seen:
                continue
            seen.add(name)
            leaves[path] = kind
            if kind != "null":
                names.append(name)
        tree: Tree = {"node_id": (0, _accept("str")), "ts": (1, _accept_ts)}
        fields: dict[str, Any] = {"node_id": pa.string(), "ts": pa.float64()}
        index = {name: i + 2 for i, name in enumerate(names)}
        for path, kind in leaves.items():
            node, spec = tree, fields
            for key in path[:-1]:
                node = node.setdefault(key, {})
                spec = spec.setdefault(key, {})
            node[path[-1]] = None if kind == "null" else (index[".".join(path)], _accept(kind))
            spec[path[-1]] = pa.null() if kind == "null" else _TYPES[kind]
        columns = [pa.field("node_id", pa.string()), pa.field("ts", pa.timestamp("us", tz="UTC"))]
        columns += [pa.field(".".join(p), _TYPES[k]) for p, k in leaves.items() if k != "null"]
        return cls(names, tree, _arrow_schema(fields), pa.schema([*columns, pa.field(EXTRA, pa.string())]))

    def table(self, lines: list[bytes]) -> pa.Table:
        """The rows of `lines` (JSON objects, one per plaintext) in this plan's schema."""
        for path in (self.compiled, self.fast):
            table = path(lines)
            if table is not None:
                return table
        return self.exact(lines)

    def compiled(self, lines: list[bytes]) -> pa.Table | None:
        """The extension's one pass over the records: None if any does not conform exactly (or the
        extension is not built); about twice as fast as pyarrow's reader on ~150-byte records."""
        parts = speedups.json_columns(lines, *self.layout, *TS_RANGE)
        if parts is None:
            return None
        n = len(lines)
        arrays = []
        for (validity, values, offsets), arrow_type in zip(parts, self.schema.types[:-1], strict=True):
            bitmap = None if validity is None else pa.py_buffer(validity)
            if offsets is None:
                array = pa.Array.from_buffers(arrow_type, n, [bitmap, pa.py_buffer(values)])
            else:
                array = pa.Array.from_buffers(arrow_type, n, [bitmap, pa.py_buffer(offsets), pa.py_buffer(values)])
                try:
                    array.validate(full=True)  # UTF-8: the one check the pass leaves to pyarrow
                except pa.ArrowInvalid:
                    return None
            arrays.append(array)
        return pa.Table.from_arrays([*arrays, pa.nulls(n, pa.string())], schema=self.schema)

    def fast(self, lines: list[bytes]) -> pa.Table | None:
        """pyarrow's JSON reader against the plan: None if any record does not conform exactly."""
        block = max(1 << 20, max(map(len, lines), default=0) + 2)
        try:
            table = pa_json.read_json(
                pa.BufferReader(b"\n".join(lines)),
                read_options=pa_json.ReadOptions(use_threads=False, block_size=block),
                parse_options=pa_json.ParseOptions(explicit_schema=self.read_schema, unexpected_field_behavior="error"),
            )
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return None  # a type change, a new field, duplicate keys, bad JSON: the exact path decides
        if table.num_rows != len(lines):  # a plaintext with a raw newline (not from this server)
            return None
        while any(pa.types.is_struct(t) for t in table.schema.types):
            table = table.flatten()
        ts = table.column("ts")
        if ts.null_count < len(ts):
            low, high = pc.min_max(ts).values()
            if low.as_py() < TS_RANGE[0] or high.as_py() >= TS_RANGE[1]:
                return None
        columns = [table.column("node_id"), _timestamps(ts), *(table.column(n) for n in self.names),
                   pa.nulls(len(lines), pa.string())]
        return pa.Table.from_arrays(columns, schema=self.schema)

    def exact(self, lines: list[bytes]) -> pa.Table:
        """Record by record in Python; what the fast path must agree with (and does, by test)."""
        width = 2 + len(self.names)
        rows: list[list[Any]] = [[] for _ in range(width)]
        extra: list[str | None] = []
        for line in lines:
            values: list[Any] = [None] * width
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:  # not from this server: kept whole, as text
                record = line.decode("utf-8", "replace")
            rest = _split(record, self.tree, values) if type(record) is dict else {"value": record}
            for column, value in zip(rows, values, strict=True):
                column.append(value)
            extra.append(orjson.dumps(rest).decode() if rest else None)
        arrays = [pa.array(rows[0], pa.string()), _timestamps(pa.array(rows[1], pa.float64()))]
        arrays += [pa.array(col, self.schema.field(i + 2).type) for i, col in enumerate(rows[2:])]
        return pa.Table.from_arrays([*arrays, pa.array(extra, pa.string())], schema=self.schema)


def _collect(obj: dict[str, Any], prefix: Path_, kinds: dict[Path_, set[str]]) -> None:
    for key, value in obj.items():
        path = (*prefix, key)
        kind = _kind(value)
        kinds.setdefault(path, set()).add(kind)
        if kind == "object":
            _collect(value, path, kinds)


def _split(obj: dict[str, Any], tree: Tree, values: list[Any]) -> dict[str, Any] | None:
    """Put the values of `obj` that fit `tree` into `values`; return the rest (None if nothing is left)."""
    rest: dict[str, Any] | None = None
    for key, value in obj.items():
        if key not in tree:
            rest = rest or {}
            rest[key] = value
            continue
        spec = tree[key]
        if value is None:
            continue  # null fits every column, and every object (all of its leaves null)
        if type(spec) is dict:
            left = _split(value, spec, values) if type(value) is dict else value
        elif spec is None:  # a field only ever null in the sample
            left = value
        else:
            try:
                values[spec[0]] = spec[1](value)
                continue
            except TypeError:
                left = value
        if left is not None:
            rest = rest or {}
            rest[key] = left
    return rest


def _layout(tree: Tree, kinds: list[int]) -> tuple[list[bytes], list[int], list[tuple[int, int]], list[int]]:
    """The tree flattened for speedups.json_columns: (keys, targets, nodes, kinds)."""
    keys: list[bytes] = []
    targets: list[int] = []
    nodes: list[tuple[int, int]] = []
    pending = [tree]  # node i's entries are laid out in order, its children after it
    while len(nodes) < len(pending):
        node = pending[len(nodes)]
        nodes.append((len(keys), len(node)))
        for key, spec in node.items():
            keys.append(key.encode())
            if type(spec) is dict:
                targets.append(-2 - len(pending))
                pending.append(spec)
            else:
                targets.append(-1 if spec is None else spec[0])
    return keys, targets, nodes, kinds


def _arrow_schema(fields: dict[str, Any]) -> pa.Schema:
    def to_type(spec: Any) -> pa.DataType:
        return pa.struct([pa.field(k, to_type(v)) for k, v in spec.items()]) if isinstance(spec, dict) else spec
    return pa.schema([pa.field(k, to_type(v)) for k, v in fields.items()])


def _timestamps(seconds: pa.ChunkedArray | pa.Array) -> pa.Array | pa.ChunkedArray:
    """Unix seconds (float64) to UTC microsecond timestamps, rounded to the nearest microsecond."""
    micros = pc.round(pc.multiply(seconds, 1e6))
    return pc.cast(pc.cast(micros, pa.int64()), pa.timestamp("us", tz="UTC"))
