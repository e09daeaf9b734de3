"""The ceiling: a bare ASGI app on the product's stack (uvicorn + uvloop + httptools).

It reads the whole request body and answers 202 with a small JSON body; nothing else (no
parsing, validation, rate limit, buffering, encryption or disk). Any path, any method.

    python benchmarks/raw_asgi.py --port 8081     (port 0, the default: one the system picks, printed at start)
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from telemetry_sink.testing import serve_reporting_port

Message = MutableMapping[str, Any]
_START = {"type": "http.response.start", "status": 202, "headers": [(b"content-type", b"application/json")]}
_BODY = {"type": "http.response.body", "body": b'{"accepted":1}'}


async def app(scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Message]],
              send: Callable[[Message], Awaitable[None]]) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        more = message.get("more_body", False)
    await send(_START)
    await send(_BODY)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    serve_reporting_port(app, "raw-asgi", args.host, args.port, loop="uvloop", http="httptools", lifespan="off",
                         access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
