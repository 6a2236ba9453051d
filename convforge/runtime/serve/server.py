"""``convforge serve``: the models loaded, an HTTP and a gRPC server, and a clean stop.

    config = ServeConfig(models={"digits": "digits.onnx"}, port=8000, grpc_port=8001)
    asyncio.run(serve(config))

Order of events: both servers listen at once (``/v2/health/live`` answers
while models load), every model is loaded and warmed up at each batch size
it will run, and only then does the server report ready. SIGTERM or SIGINT
marks it not ready, stops taking connections, lets requests in flight and in
the queues finish (up to ``drain_s``), and closes the backends. It binds
127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import uvicorn

from convforge.errors import UserError
from convforge.runtime.serve.batcher import BatchingConfig
from convforge.runtime.serve.grpc_server import build_server
from convforge.runtime.serve.http_app import build_app, new_dataplane
from convforge.runtime.serve.metrics import ServerMetrics
from convforge.runtime.serve.model import ServedModel, load_all
from convforge.settings import setting

log = logging.getLogger("convforge.serve")


@dataclass
class ServeConfig:
    models: dict[str, str] = setting(factory=dict, help="name -> .onnx path", cli=False)
    backend: str = setting("auto", "backend of every model (see `convforge backends`)")
    host: str = setting("127.0.0.1", "address to bind; 0.0.0.0 serves every interface")
    port: int = setting(8000, "HTTP port (0: a free one)")
    grpc_port: int = setting(8001, "gRPC port (0: a free one; -1: no gRPC)")
    max_body_mb: float = setting(64.0, "largest request body; beyond: 413")
    drain_s: float = setting(30.0, "on SIGTERM/SIGINT, how long requests in flight may finish")
    options: dict = setting(factory=dict, help="backend options", cli=False)
    batching: BatchingConfig = field(default_factory=BatchingConfig)


@dataclass
class Running:
    """What :func:`serve` reports once it is ready (to its ``on_ready`` callback)."""

    http_url: str
    grpc_address: str | None
    models: list[ServedModel]
    stop: Callable[[], None]  # asks the server to drain and exit


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        # convforge handles the signals itself: it drains gRPC and the queues too, and
        # uvicorn would re-raise them after its own shutdown, cutting that short.
        yield


async def serve(config: ServeConfig, on_ready: Callable[[Running], None] | None = None) -> None:
    """Run until SIGTERM/SIGINT (or ``Running.stop()``), then drain and return."""
    metrics = ServerMetrics()
    dataplane, extension = new_dataplane()
    models = [
        ServedModel(name, path, config.backend, config.options, config.batching, metrics)
        for name, path in config.models.items()
    ]
    for model in models:
        dataplane.model_registry.update(model)
    max_body = int(config.max_body_mb * 2**20)
    app = build_app(dataplane, extension, metrics, max_body)
    http = _Uvicorn(
        uvicorn.Config(app, host=config.host, port=config.port, log_config=None,
                       access_log=False, lifespan="off", timeout_graceful_shutdown=config.drain_s)
    )  # fmt: skip
    sock = _bind(config.host, config.port)
    grpc_server, grpc_address = None, None
    if config.grpc_port >= 0:
        grpc_server = build_server(
            dataplane, extension, metrics, f"{config.host}:{config.grpc_port}", max_body
        )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    def stop() -> None:
        loop.call_soon_threadsafe(stopping.set)

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stopping.set)
    http_task = asyncio.create_task(http.serve(sockets=[sock]), name="http")
    try:
        if grpc_server is not None:
            await grpc_server.start()
        while not http.started and not http_task.done():
            await asyncio.sleep(0.01)
        port = sock.getsockname()[1]
        if grpc_server is not None:
            grpc_address = f"{config.host}:{_grpc_port(grpc_server, config.grpc_port)}"
        load = asyncio.create_task(load_all(models))
        await asyncio.wait([load, asyncio.create_task(stopping.wait())],
                           return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        if load.done():
            load.result()
            if on_ready is not None:
                on_ready(Running(f"http://{config.host}:{port}", grpc_address, models, stop))
            await stopping.wait()
        else:
            load.cancel()
    finally:
        dataplane.draining = True
        http.should_exit = True
        if grpc_server is not None:
            await grpc_server.stop(config.drain_s)
        await asyncio.gather(http_task, return_exceptions=True)
        for model in models:
            await model.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)


def _bind(host: str, port: int) -> socket.socket:
    """The HTTP listening socket, bound here so that a taken port is a one-line error
    (uvicorn would exit the process from inside its task)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise UserError(
            f"cannot serve HTTP on {host}:{port}: {e.strerror or e} (--port 0 takes a free one)"
        ) from None
    sock.set_inheritable(True)
    return sock


def _grpc_port(server, asked: int) -> int:
    """The bound gRPC port (add_insecure_port returned it; kept on the server object)."""
    return getattr(server, "convforge_port", asked)
