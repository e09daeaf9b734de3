"""The export column rule (telemetry_sink/columns.py): typed columns from a sample, `extra` for the rest;
pyarrow's JSON reader (the fast path) and the record-by-record path give the same table, and no
value is lost: typed columns plus `extra` give back the record."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pa = pytest.importorskip("pyarrow")
columns = pytest.importorskip("telemetry_sink.columns")


def _lines(records: list[dict[str, Any]]) -> list[bytes]:
    return [orjson.dumps(r) for r in records]


def _rebuild(row: dict[str, Any]) -> dict[str, Any]:
    """A record from one exported row: typed columns (dots back to nesting) merged with `extra`."""
    out: dict[str, Any] = {}
    for name, value in row.items():
        if name == columns.EXTRA or value is None:
            continue
        if name == "ts":
            value = value.timestamp()
        node = out
        *parents, leaf = name.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    _merge(out, orjson.loads(row[columns.EXTRA]) if row[columns.EXTRA] else {})
    return out


def _merge(into: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _normal(value: Any) -> Any:
    """What survives an export: nulls dropped (null and missing are the same), numbers compared as floats."""
    if isinstance(value, dict):
        kept = {k: _normal(v) for k, v in value.items() if v is not None}
        return {k: v for k, v in kept.items() if v != {}}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


SAMPLE = [
    {"node_id": "a", "ts": 1767225600.125, "t": 21.5, "n": 1, "ok": True, "fw": "2.4", "env": {"rh": 40, "p": 1.5},
     "tags": ["x"], "mixed": 1, "gone": None},
    {"node_id": "b", "ts": 1767225601, "t": 22, "n": 2, "ok": False, "fw": "2.5", "env": {"rh": 41, "p": 2},
     "tags": [], "mixed": "one"},
]


def test_columns_follow_the_rule() -> None:
    plan = columns.ColumnPlan.from_sample(SAMPLE)
    schema = plan.schema
    assert schema.names == ["node_id", "ts", "t", "n", "ok", "fw", "env.rh", "env.p", "extra"]
    assert schema.field("ts").type == pa.timestamp("us", tz="UTC")
    assert [schema.field(n).type for n in ("t", "n", "ok", "fw", "env.rh", "env.p")] == [
        pa.float64(), pa.int64(), pa.bool_(), pa.string(), pa.int64(), pa.float64()]
    rows = plan.table(_lines(SAMPLE)).to_pylist()
    assert rows[0]["ts"] == datetime(2026, 1, 1, 0, 0, 0, 125000, tzinfo=UTC)
    assert orjson.loads(rows[0]["extra"]) == {"tags": ["x"], "mixed": 1}
    assert orjson.loads(rows[1]["extra"]) == {"tags": [], "mixed": "one"}


def test_later_records_that_do_not_fit_go_to_extra() -> None:
    plan = columns.ColumnPlan.from_sample(SAMPLE)
    later = [{"node_id": "c", "ts": 1767225602.5, "n": 2.5, "env": {"rh": "wet", "new": 1}, "fresh": [1]},
             {"node_id": "d", "ts": "yesterday", "t": 1, "gone": 3},
             {"node_id": "e", "ts": 2e13}]
    rows = plan.table(_lines(later)).to_pylist()
    assert (rows[0]["n"], rows[0]["env.rh"], rows[1]["t"]) == (None, None, 1.0)
    assert orjson.loads(rows[0]["extra"]) == {"n": 2.5, "env": {"rh": "wet", "new": 1}, "fresh": [1]}
    assert orjson.loads(rows[1]["extra"]) == {"ts": "yesterday", "gone": 3}
    assert rows[1]["ts"] is None
    assert orjson.loads(rows[2]["extra"]) == {"ts": 2e13}  # beyond what a timestamp column holds


def test_a_plaintext_that_is_not_an_object_is_kept_whole() -> None:
    plan = columns.ColumnPlan.from_sample(SAMPLE)
    rows = plan.table([b"[1, 2]", b"not json", orjson.dumps(SAMPLE[0])]).to_pylist()
    assert [orjson.loads(r["extra"]) for r in rows[:2]] == [{"value": [1, 2]}, {"value": "not json"}]
    assert rows[2]["node_id"] == "a"


def test_fast_path_is_taken_for_conforming_records() -> None:
    plan = columns.ColumnPlan.from_sample(SAMPLE[:1])
    conforming = [{k: v for k, v in SAMPLE[0].items() if k not in ("tags", "mixed", "gone")}] * 3
    assert plan.fast(_lines(conforming)) is not None  # the path the speed depends on
    assert plan.fast(_lines(SAMPLE)) is None


def test_compiled_path_is_taken_for_conforming_records_and_gives_up_on_the_rest() -> None:
    """The one-pass converter (the export's speed) takes what the plan describes exactly, whitespace,
    key order and nulls included, and hands back everything else (None) to the next path."""
    from telemetry_sink import speedups

    plan = columns.ColumnPlan.from_sample(SAMPLE[:1])
    base = {k: v for k, v in SAMPLE[0].items() if k not in ("tags", "mixed")}
    conforming = [base, {**base, "n": None, "env": None}, dict(reversed(base.items())), {"node_id": "only"},
                  {**base, "fw": "naïve °C", "t": -0.0, "n": -(2**63), "ts": 1767225600}]
    lines = [*_lines(conforming), b' { "node_id" : "ws" , "ok" : true }  ']
    exact = plan.exact(lines)
    got = plan.compiled(lines)
    if speedups.IMPLEMENTATION == "pure-python":
        assert got is None  # the twin has no one-pass converter: pyarrow's reader takes over
        return
    assert got is not None and got.equals(exact), (got and got.to_pylist(), exact.to_pylist())
    assert plan.table(lines).equals(exact)
    for odd in ({**base, "fw": "tab\there"}, {**base, "fw": 'q"uote'}, {**base, "tags": []}, {**base, "n": 1.5},
                {**base, "n": 2**63}, {**base, "t": "warm"}, {**base, "ok": 1}, {**base, "env": {"rh": 1, "new": 2}},
                {**base, "env": 3}, {**base, "gone": 1}, {**base, "ts": 1e300}, {**base, "t": 10**19}):
        odd_lines = _lines([base, odd])
        assert plan.compiled(odd_lines) is None, odd
        assert plan.table(odd_lines).equals(plan.exact(odd_lines)), odd
    for raw in (b'{"node_id":"a","node_id":"b"}', b'{"node_id":"a"}{}', b'["node_id"]', b'{"node_id":"\xff"}',
                b'{"node_id":"a",}', b'{"node_id":"a"', b'{"node_id":"a","t":01}', b'{"node_id":"a","t":1.}',
                b'{"node_id":"a","t":-}', b'{"node_id":"a","ok":tru}', '{"node_id":"\udcff"}'.encode("utf-8",
                                                                                                "surrogatepass")):
        assert plan.compiled([raw]) is None, raw
    assert plan.compiled([b'{"node_id":"\xff"}']) is None  # not UTF-8: pyarrow's check, after the pass


NUMBER = r"-?(0|[1-9][0-9]{0,24})(\.[0-9]{1,24})?([eE][+-]?[0-9]{1,3})?"


@settings(max_examples=500, deadline=None)
@given(literals=st.lists(st.one_of(st.from_regex(NUMBER, fullmatch=True),
                                   st.floats(allow_nan=False, allow_infinity=False).map(repr),
                                   st.floats(allow_nan=False, allow_infinity=False).map(lambda f: f"{f:.17g}")),
                         min_size=1, max_size=20))
def test_compiled_numbers_are_the_nearest_double(literals: list[str]) -> None:
    """The converter's float column holds exactly float(literal) (sign of zero included) for any JSON
    number, whether its one-operation fast path or the full parser read it; infinities give up."""
    from telemetry_sink import speedups

    if speedups.IMPLEMENTATION == "pure-python":
        pytest.skip("the one-pass converter is compiled only")
    plan = columns.ColumnPlan.from_sample([{"node_id": "a", "t": 1.5}])
    lines = [b'{"node_id":"a","t":' + lit.encode() + b"}" for lit in literals]
    got = plan.compiled(lines)
    # As the exact path reads them: an integer literal is an int (so "-0" is 0), then the nearest double.
    want = [float(int(lit)) if lit.lstrip("-").isdigit() else float(lit) for lit in literals]
    if got is None:  # left to the next path: only an infinity or an integer beyond int64
        assert any(math.isinf(w) or (lit.lstrip("-").isdigit() and abs(int(lit)) >= 2**63)
                   for lit, w in zip(literals, want, strict=True)), literals
        return
    values = got.column("t").to_pylist()
    assert [(v, math.copysign(1, v)) for v in values] == [(w, math.copysign(1, w)) for w in want], literals
    assert got.equals(plan.exact(lines))


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=5))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                             st.dictionaries(st.sampled_from("abc.d"), inner,
                                                                             max_size=3)), max_leaves=6)
records = st.fixed_dictionaries(
    {"node_id": st.one_of(st.sampled_from(["n1", "n2"]), json_leaf)},
    optional={"ts": st.one_of(st.floats(0, 4e9), st.integers(0, 2**40), json_value),
              "t": st.one_of(st.floats(-50, 50), st.integers(-50, 50), st.integers(-(2**63), 2**64 - 1),
                             st.floats(allow_nan=False, allow_infinity=False)),
              "s": st.one_of(st.text(max_size=6), st.none()),
              "env": st.fixed_dictionaries({}, optional={"rh": st.integers(0, 100), "x": json_value}),
              "extra": json_value, "a.b": json_value, "a": st.dictionaries(st.sampled_from("bc"), json_value)},
)


@settings(max_examples=300, deadline=None)
@given(sample=st.lists(records, min_size=1, max_size=6), later=st.lists(records, max_size=8))
def test_fast_and_exact_paths_agree_and_lose_nothing(sample: list[dict[str, Any]],
                                                     later: list[dict[str, Any]]) -> None:
    plan = columns.ColumnPlan.from_sample(sample)
    lines = _lines(sample + later)
    exact = plan.exact(lines)
    assert exact.schema == plan.schema
    for path in (plan.fast, plan.compiled):
        table = path(lines)
        if table is not None:
            assert table.equals(exact), (path.__name__, table.to_pylist(), exact.to_pylist())
    for record, row in zip(sample + later, exact.to_pylist(), strict=True):
        got, want = _normal(_rebuild(row)), _normal(record)
        if "ts" in got and isinstance(want.get("ts"), float):  # microsecond rounding of the timestamp
            assert math.isclose(got.pop("ts"), want.pop("ts"), abs_tol=1e-6)
        assert got == want
