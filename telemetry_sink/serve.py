"""Serving: wire the service and the HTTP app, bind the listening socket and run uvicorn,
in one process or as `[server] workers` processes under uvicorn's supervisor.

The early 503 on SIGTERM, the drain and the SIGHUP reload are the app's lifespan
(http_server.create_app), so both modes shut down through the same code.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

import orjson

from . import speedups
from .config import Config, load_config

log = logging.getLogger("telemetry_sink")

# The writer thread releases the GIL to encrypt and write, then waits to get it back while
# the event loop parses requests; with Python's default 5 ms switch interval that wait
# held 100-record arrays to ~300k records/s on 2 cores; 0.5 ms: ~530k, single records
# unchanged (A/B in docs/BENCHMARKS.md).
GIL_SWITCH_INTERVAL_S = 0.0005
SERVE_ENV = "TELEMETRY_SINK_SERVE_ARGS"  # how `serve` hands the config path to worker processes


class ServeError(Exception):
    """A problem that stops the server from starting; str() is one line saying what to do."""


def build_app(config: Config, *, workers: int = 1) -> Any:
    """Wire the service, open its writer (claiming a segment series) and build the ASGI app."""
    from prometheus_client import CollectorRegistry

    from .auth import TokenTable
    from .crypto import CryptoService
    from .fast_lane import configure_fast_lane
    from .guard import configure_guard
    from .http_server import create_app
    from .metrics import WriterMetrics
    from .service import TelemetryService

    crypto = CryptoService.from_config(config.crypto.key_file)
    tokens = TokenTable(config.auth.tokens_file) if config.auth.tokens_file else None
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    registry = CollectorRegistry()
    service = TelemetryService.from_config(config, crypto, workers=workers, metrics=WriterMetrics(registry))
    if config.ship.destination:
        _attach_shipper(service, config, registry)
    try:
        service.writer.open()
    except OSError as exc:  # e.g. the directory is a file, or may not be created
        raise ServeError(f"[writer] directory {config.writer.directory}: cannot use it as the log directory "
                         f"({exc.strerror}); point it at a writable directory") from None
    service.recover_keys()
    if service.shipper is not None:
        assert service.writer.series is not None
        service.shipper.start(service.writer.series)
    srv = config.server
    configure_guard(srv.header_timeout_s, srv.body_timeout_s, srv.max_connections, on_timeout=service.count_timeout,
                    max_header_bytes=srv.max_header_bytes)
    app = create_app(service, config.ingest.max_body_bytes, srv.shutdown_timeout_s, tokens=tokens,
                     registry=registry, node_id_header=config.ingest.node_id_header)
    configure_fast_lane(app.handler if srv.fast_lane == "on" else None)
    return app


def _attach_shipper(service: Any, config: Config, registry: Any) -> None:
    """Ship sealed segments to [ship] destination: hook the shipper into the writer (seals, retention)."""
    from .instance import InstanceIdError
    from .objstore import ObjectStoreError
    from .ship_metrics import ShipMetrics
    from .shipper import Shipper

    try:
        shipper = Shipper.from_config(config.ship, config.writer.directory, ShipMetrics(registry))
    except InstanceIdError as exc:  # names the key or the file already
        raise ServeError(str(exc)) from None
    except ObjectStoreError as exc:
        raise ServeError(f"[ship]: cannot set up the object store client: {exc}") from None
    except ValueError as exc:
        raise ServeError(f"[ship] destination: {exc}") from None
    writer = service.writer
    writer.reopen_tail = False  # a segment once closed is immutable: it may already be shipped
    writer.on_sealed = shipper.sealed
    writer.may_delete = shipper.is_shipped
    service.shipper = shipper
    log.info("shipping sealed segments to %s as instance %s", shipper.settings.destination,
             shipper.settings.instance_id, extra={"event": "ship_config", "destination":
                                                 str(shipper.settings.destination),
                                                 "instance_id": shipper.settings.instance_id})


def worker_app() -> Any:
    """uvicorn app factory run in each worker process when [server] workers > 1."""
    params = orjson.loads(os.environ[SERVE_ENV])
    config = load_config(Path(params["config"]) if params["config"] else None)
    return build_app(config, workers=config.server.workers)


def bind_listener(host: str, port: int) -> socket.socket:
    """Bind the listening socket before anything else starts (one line if the address is taken)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}; is another server running there? "
                         f"(set [server] host/port)") from None
    sock.set_inheritable(True)  # worker processes serve from it
    return sock


def _log_startup(config: Config, sock: socket.socket) -> None:
    srv = config.server
    host, port = sock.getsockname()[:2]
    # The twin is a warning, not news: a build without a compiler must not go unnoticed.
    twin = speedups.FALLBACK_REASON
    log.log(logging.INFO if twin is None else logging.WARNING,
            "starting: speedups %s%s, config %s, %d worker(s), auth %s, tls %s", speedups.IMPLEMENTATION,
            "" if twin is None else f" ({twin}; to get the compiled path: {speedups.HOW_TO_COMPILE})",
            config.source or "built-in defaults", srv.workers, "on" if config.auth.tokens_file else "off",
            "mutual" if srv.tls_client_ca else ("on" if srv.tls_certfile else "off"),
            extra={"event": "startup", "implementation": speedups.IMPLEMENTATION,
                   "config": config.as_dict()})
    scheme = "https" if srv.tls_certfile else "http"
    shown = f"[{host}]" if ":" in host else host
    log.info("telemetry-sink listening on %s://%s:%d", scheme, shown, port,
             extra={"event": "listening", "host": host, "port": port})


def _uvicorn_options(config: Config, access_log: bool, log_level: str, log_config: dict[str, Any]) -> dict[str, Any]:
    from .fast_lane import FastLaneProtocol

    srv = config.server
    for name in ("tls_certfile", "tls_keyfile", "tls_client_ca"):
        tls_path = getattr(srv, name)
        if tls_path is not None and not tls_path.is_file():
            raise ServeError(f"[server] {name}: {tls_path} does not exist")
    options: dict[str, Any] = dict(
        host=srv.host, port=srv.port, loop="telemetry_sink.guard:GuardedLoop", http=FastLaneProtocol, lifespan="on",
        access_log=access_log, log_level=log_level, log_config=log_config,
        timeout_graceful_shutdown=srv.shutdown_timeout_s, timeout_keep_alive=srv.keep_alive_s,
    )
    if srv.tls_certfile is not None:
        options.update(ssl_certfile=str(srv.tls_certfile), ssl_keyfile=str(srv.tls_keyfile))
        if srv.tls_client_ca is not None:
            options.update(ssl_ca_certs=str(srv.tls_client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options


def serve(config: Config, *, access_log: bool, log_level: str, log_config: dict[str, Any]) -> int:
    """Run the server until SIGTERM/SIGINT; return the exit status."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from .auth import TokenTable
    from .crypto import CryptoService
    from .segment_recovery import preflight

    options = _uvicorn_options(config, access_log, log_level, log_config)
    srv = config.server
    # Fail fast, with one line, on what every worker would fail on: the address, the key, the tokens.
    sock = bind_listener(srv.host, srv.port)
    try:
        if srv.workers == 1:
            app = build_app(config)
            _log_startup(config, sock)
            uvicorn.Server(uvicorn.Config(app, **options)).run(sockets=[sock])
            return 0
        CryptoService.from_config(config.crypto.key_file)
        if config.auth.tokens_file:
            TokenTable(config.auth.tokens_file)
        preflight(config.writer.directory)  # symlinks, names, bad headers: one line here, not per worker
        _log_startup(config, sock)
        source = config.source
        os.environ[SERVE_ENV] = orjson.dumps({"config": str(source.resolve()) if source else None}).decode()
        # uvicorn's supervisor forwards signals to the workers, each of which drains its own
        # writer on shutdown (their lifespan), and restarts workers on SIGHUP.
        uv_config = uvicorn.Config("telemetry_sink.serve:worker_app", factory=True, workers=srv.workers, **options)
        Multiprocess(uv_config, sockets=[sock]).run()
        return 0
    finally:
        sock.close()
