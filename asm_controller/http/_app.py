"""The app factory and the in-loop uvicorn server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn
from fastapi import APIRouter, FastAPI

from asm_controller.http import _console, _fleet, _runs
from asm_controller.http._errors import install_error_handlers
from asm_controller.http._limits import MAX_BODY_BYTES, BodyLimit
from asm_wire import ConfigError, __version__, parse_address
from asm_wire._principal import TokenTable

if TYPE_CHECKING:
    from asm_controller.service import FleetApi

log = logging.getLogger("asm_controller.http")


def create_app(api: FleetApi, *, tokens: TokenTable | None = None, routers: Sequence[APIRouter] = (),
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The controller's HTTP API over ``api``, authenticated by ``tokens`` (None: every caller is the admin
    ``anonymous``, as on gRPC without auth). ``routers`` are mounted too (they may use the
    :func:`~asm_controller.http.authenticate` and :func:`~asm_controller.http.fleet_api` dependencies); more
    can be added later with ``app.include_router``."""
    app = FastAPI(title="asm controller", version=__version__, docs_url=None, redoc_url=None,
                  description="asm's fleet over HTTP: runs (REST + Server-Sent Events), nodes, sessions. "
                              "Errors are `{\"error\": {kind, domain, reason, message}}`.")
    app.state.asm_api = api
    app.state.asm_tokens = tokens
    app.state.asm_closing = asyncio.Event()
    app.state.asm_run_tasks = _runs.RunTasks()
    install_error_handlers(app)
    app.include_router(_fleet.build_probes())
    app.include_router(_runs.build_router())
    app.include_router(_fleet.build_router())
    app.include_router(_console.build_console())
    for router in routers:
        app.include_router(router)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    return app


class _InLoopServer(uvicorn.Server):
    """uvicorn in the controller's loop: the controller keeps its own signal handling."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class HttpServer:
    """The HTTP API served by uvicorn as a task of the running loop; :meth:`stop` ends it (streams too)."""

    def __init__(self, app: FastAPI, server: uvicorn.Server, sock: socket.socket, task: asyncio.Task[None]) -> None:
        self.app, self._server, self._sock, self._task = app, server, sock, task
        self.port: int = sock.getsockname()[1]

    @classmethod
    async def start(cls, app: FastAPI, listen: str, *, tls_cert: Path | None = None, tls_key: Path | None = None,
                    tls_ca: Path | None = None) -> HttpServer:
        host, port = parse_address(listen)
        if (tls_cert is None) != (tls_key is None):
            raise ConfigError("HTTP TLS needs both a certificate and its key")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = socket.create_server((host, port), family=family, reuse_port=False)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {listen} (HTTP): {exc.strerror or exc}") from None
        # Accepted connections inherit TCP_NODELAY (Linux). asyncio sets it only on a socket made with
        # proto=IPPROTO_TCP, which create_server's is not: without it every response written in two parts
        # (headers, body) waited ~40 ms for the client's delayed ACK (Nagle).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        config = uvicorn.Config(
            app, lifespan="off", log_config=None, log_level="warning", access_log=False, server_header=False,
            timeout_keep_alive=30, timeout_graceful_shutdown=2, h11_max_incomplete_event_size=64 * 1024,
            ssl_certfile=str(tls_cert) if tls_cert else None, ssl_keyfile=str(tls_key) if tls_key else None,
            ssl_ca_certs=str(tls_ca) if tls_ca and tls_cert else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls_ca and tls_cert else ssl.CERT_NONE)
        server = _InLoopServer(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                sock.close()
                task.result()
                raise ConfigError(f"the HTTP server on {listen} did not start")
            await asyncio.sleep(0.01)
        return cls(app, server, sock, task)

    async def stop(self) -> None:
        """Refuse new requests, end event streams, cancel the relays of runs started here (the runs go on)."""
        self.app.state.asm_closing.set()
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), 3.0)
        except (TimeoutError, asyncio.CancelledError):
            self._server.force_exit = True
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._task, 2.0)
        except Exception as exc:  # stopping: logged, not raised
            log.warning("HTTP server stopped with %r", exc)
        await self.app.state.asm_run_tasks.close()
        with contextlib.suppress(OSError):
            self._sock.close()
