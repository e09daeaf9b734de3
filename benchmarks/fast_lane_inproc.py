#!/usr/bin/env python3
"""Event-loop time of one fast-lane request, in process: no sockets, no wrk, no writer thread.

    .venv/bin/python benchmarks/fast_lane_inproc.py [--payload single] [--requests 200000] [--stub-service]

Builds the app as `serve` does (benchmark config, a temporary log directory), makes one
FastLaneProtocol on a transport that only keeps what is written, and feeds it the same POST
/telemetry request again and again; the buffer is emptied every 1,000 requests (as if written).
Prints µs per request for five slices, and a trivial call's ns to show how fast the machine is
at that moment. `--stub-service` answers every request with a fixed 202 instead of ingesting it:
what the protocol itself costs. Noisy like any timing on a shared machine: compare two checkouts
in the same minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness


class _Transport:
    """Enough of an asyncio transport for the protocol: writes are counted, the last one kept."""

    def __init__(self) -> None:
        self.writes = 0
        self.last = b""

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.last = data

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8080)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--payload", default="single", help="single, array100 or ndjson100 (harness.payload)")
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--stub-service", action="store_true", help="answer a fixed 202: the protocol's share only")
    args = parser.parse_args()

    import uvicorn
    import uvloop
    from uvicorn.server import ServerState

    from telemetry_sink.config import load_config
    from telemetry_sink.crypto import write_key_file
    from telemetry_sink.fast_lane import FastLaneProtocol
    from telemetry_sink.ingest_http import telemetry_accepted
    from telemetry_sink.serve import build_app

    work = Path(tempfile.mkdtemp(prefix="fast-lane-inproc-"))
    write_key_file(work / "sink.key")
    values = harness.merge_config(harness.bench_config(0, work / "data", work / "sink.key"),
                                  {"buffer": {"max_records": 10_000_000, "max_bytes": 4_000_000_000}})
    app = build_app(load_config(harness.write_config(work / "config.ini", values)))
    if args.stub_service:
        answer = telemetry_accepted("json", 1)
        app.handler.answer_now = lambda head, wire, client: answer
    body = harness.payload(args.payload)
    request = (b"POST /telemetry HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Length: %d\r\nContent-Type: %s\r\n\r\n"
               % (len(body.body), body.content_type.encode())) + body.body
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    config = uvicorn.Config(app, http=FastLaneProtocol, lifespan="off", access_log=False, log_level="warning")
    config.load()
    buffer = app.handler.service.buffer
    per_slice = max(1000, args.requests // 5 // 1000 * 1000)

    async def run() -> list[float]:
        protocol = FastLaneProtocol(config, ServerState(), {}, loop)
        transport = _Transport()
        protocol.connection_made(transport)  # type: ignore[arg-type]
        feed = protocol.data_received
        out = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(per_slice // 1000):
                for _ in range(1000):
                    feed(request)
                while buffer.queued:
                    buffer.stored(buffer._take(1_000_000))
            out.append((time.perf_counter() - start) / per_slice * 1e6)
        if not transport.last.startswith(b"HTTP/1.1 202 "):
            raise SystemExit(f"unexpected answer: {transport.last[:200]!r}")
        return out

    try:
        slices = loop.run_until_complete(run())
    finally:
        app.handler.service.writer.close()
    call_ns = min(timeit.repeat("f(1)", "def f(x): return x", number=1_000_000, repeat=3)) * 1e3
    print(f"{args.payload}{' (service stubbed)' if args.stub_service else ''}: "
          f"{' '.join(f'{x:.2f}' for x in slices)} µs/request over {per_slice} requests each "
          f"(min {min(slices):.2f}); a trivial call {call_ns:.0f} ns")
    return 0


if __name__ == "__main__":
    sys.exit(main())
