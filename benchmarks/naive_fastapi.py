"""What a user would write instead: FastAPI + a pydantic model, Fernet.encrypt per record and a
file append per request. Same server stack as the product (uvicorn + uvloop + httptools).

    python benchmarks/naive_fastapi.py --port 8082 --out /tmp/naive.log [--key-file KEY]

POST /telemetry takes a JSON object or a JSON array of records (node_id: str, ts: float | None,
any other fields); each record is validated by pydantic, serialised, encrypted with
`Fernet.encrypt` and appended as one line (opening the file in append mode per request, no
fsync). NDJSON is not supported (that is what a user would have to write by hand). GET /healthz
answers 200.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryptography.fernet import Fernet
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict

from telemetry_sink.testing import serve_reporting_port


class Record(BaseModel):
    model_config = ConfigDict(extra="allow")

    node_id: str
    ts: float | None = None


def create_app(out: Path, key: bytes) -> FastAPI:
    app = FastAPI()
    fernet = Fernet(key)

    @app.post("/telemetry", status_code=202)
    async def ingest(records: list[Record] | Record) -> dict[str, int]:
        batch = records if isinstance(records, list) else [records]
        lines = [fernet.encrypt(r.model_dump_json().encode()) + b"\n" for r in batch]
        with open(out, "ab") as f:
            f.writelines(lines)
        return {"accepted": len(batch)}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 (default): one the system picks, printed at start")
    parser.add_argument("--out", type=Path, default=Path("naive-telemetry.log"))
    parser.add_argument("--key-file", type=Path, help="Fernet key file (default: a new random key)")
    args = parser.parse_args()
    key = args.key_file.read_bytes().split()[0] if args.key_file else Fernet.generate_key()
    serve_reporting_port(create_app(args.out, key), "naive-fastapi", args.host, args.port, loop="uvloop",
                         http="httptools", access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
