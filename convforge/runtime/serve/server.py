"""``convforge serve``: the models loaded, an HTTP and a gRPC server, and a clean stop.

    config = ServeConfig(models={"digits": "digits.onnx"}, port=8000, grpc_port=8001)
    asyncio.run(serve(config))

Order of events: the HTTP server listens at once (``/v2/health/live``
answers while models load; ready does not), every model is loaded and warmed
up at each batch size it will run, then gRPC starts (its port is bound, so
taken, from the beginning) and the server reports ready. SIGTERM or SIGINT
marks it not ready at once, keeps serving for ``drain_delay_s`` (so load
balancers see it and stop sending), then stops taking connections, lets
requests in flight and in the queues finish (up to ``drain_s``), and closes
the backends; a second signal exits at once. It binds 127.0.0.1 unless told
otherwise.

Every limit a hostile client could test is a setting here or in
:class:`BatchingConfig`, range-checked before anything starts: the size of a
request's head (16 KiB) and body (``max_body_mb``, ``max_json_mb`` for JSON),
the time to send them (``request_timeout_s``), connections, requests worked on
at once, body bytes held at once, rows queued, and image pixels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import uvicorn

from convforge.errors import UserError
from convforge.overrides import ModelOverrides
from convforge.runtime.serve.batcher import BatchingConfig
from convforge.runtime.serve.grpc_server import build_server
from convforge.runtime.serve.http_app import build_app, new_dataplane
from convforge.runtime.serve.metrics import ServerMetrics
from convforge.runtime.serve.served_model import ServedModel, load_all
from convforge.runtime.serve.transport import deadlined_h11
from convforge.settings import check_ranges, setting

log = logging.getLogger("convforge.serve")


@dataclass
class ServeConfig:
    models: dict[str, str] = setting(factory=dict, help="name -> .onnx path", cli=False)
    backend: str = setting("auto", "backend of every model (see `convforge backends`)")
    host: str = setting("127.0.0.1", "address to bind; 0.0.0.0 serves every interface")
    port: int = setting(8000, "HTTP port (0: a free one)", minimum=0, maximum=65535)
    grpc_port: int = setting(
        8001, "gRPC port (0: a free one; -1: no gRPC)", minimum=-1, maximum=65535
    )
    max_body_mb: float = setting(
        64.0, "largest request body (binary tensors, images); beyond: 413", minimum=0.001,
        maximum=4096,
    )  # fmt: skip
    max_json_mb: float = setting(
        8.0, "largest JSON request body (parsing costs ~10x its size); beyond: 413",
        minimum=0.001, maximum=4096,
    )  # fmt: skip
    max_image_mp: float = setting(
        40.0, "largest image to classify, in megapixels (checked before decoding); beyond: 400",
        minimum=0.001, maximum=1000,
    )  # fmt: skip
    request_timeout_s: float = setting(
        30.0, "a client must send a request's head, then its body, within this; else the "
        "connection is closed (head) or answered 408 (body)", minimum=0.1, maximum=3600,
    )  # fmt: skip
    max_connections: int = setting(
        1000, "open HTTP connections at most; a request beyond: 503", minimum=1, maximum=100_000
    )
    max_concurrent: int = setting(
        64, "requests worked on at once, per protocol (HTTP, gRPC); beyond: 503 / "
        "RESOURCE_EXHAUSTED", minimum=1, maximum=10_000,
    )  # fmt: skip
    max_buffered_mb: float = setting(
        1024.0, "request bodies held in memory at once, all clients together; beyond: 503",
        minimum=1, maximum=1_000_000,
    )  # fmt: skip
    drain_s: float = setting(
        30.0, "on SIGTERM/SIGINT, how long requests in flight may finish", minimum=0,
        maximum=3600,
    )  # fmt: skip
    drain_delay_s: float = setting(
        5.0, "on SIGTERM/SIGINT, how long to keep serving while not ready (for load "
        "balancers to notice) before closing the listeners", minimum=0, maximum=3600,
    )  # fmt: skip
    options: dict = setting(factory=dict, help="backend options", cli=False)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    overrides: ModelOverrides | None = setting(
        None, "metadata every model is read with (--mean, --labels, ...)", cli=False
    )

    def check(self) -> ServeConfig:
        """This config if every number is in range (one line naming the first that is not)."""
        check_ranges(self)
        self.batching.check()
        if self.max_buffered_mb < self.max_body_mb:
            raise UserError(
                f"--max-buffered-mb ({self.max_buffered_mb:g}) must be at least --max-body-mb "
                f"({self.max_body_mb:g}): a largest body could never be held"
            )
        return self


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
    config.check()
    metrics = ServerMetrics()
    dataplane, extension = new_dataplane()
    models = [
        ServedModel(
            name,
            path,
            config.backend,
            config.options,
            config.batching,
            metrics,
            max_image_pixels=int(config.max_image_mp * 1e6),
            overrides=config.overrides,
        )  # fmt: skip
        for name, path in config.models.items()
    ]
    for model in models:
        dataplane.model_registry.update(model)
    app = build_app(dataplane, extension, metrics, config)
    http = _Uvicorn(
        uvicorn.Config(app, host=config.host, port=config.port, log_config=None,
                       access_log=False, lifespan="off", timeout_graceful_shutdown=config.drain_s,
                       http=deadlined_h11(config.request_timeout_s),
                       limit_concurrency=config.max_connections)
    )  # fmt: skip
    sock = _bind(config.host, config.port)
    grpc_server, grpc_address = None, None
    if config.grpc_port >= 0:
        grpc_server = build_server(
            dataplane, extension, metrics, f"{config.host}:{config.grpc_port}",
            int(config.max_body_mb * 2**20), config.max_concurrent,
        )  # fmt: skip
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    def stop() -> None:
        loop.call_soon_threadsafe(stopping.set)

    def on_signal() -> None:
        if stopping.is_set():  # the second Ctrl-C: the user will not wait for the drain
            log.warning("convforge serve: stopped at once (second signal)")
            os._exit(130)
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, on_signal)
    http_task = asyncio.create_task(http.serve(sockets=[sock]), name="http")
    try:
        while not http.started and not http_task.done():
            await asyncio.sleep(0.01)
        port = sock.getsockname()[1]
        load = asyncio.create_task(load_all(models))
        await asyncio.wait([load, asyncio.create_task(stopping.wait())],
                           return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        if load.done():
            load.result()
            if grpc_server is not None:  # only now: an early call would find no model ready
                await grpc_server.start()
                grpc_address = f"{config.host}:{_grpc_port(grpc_server, config.grpc_port)}"
            if on_ready is not None:
                on_ready(Running(f"http://{config.host}:{port}", grpc_address, models, stop))
            await stopping.wait()
            dataplane.draining = True  # not ready from now on, still serving
            await asyncio.sleep(config.drain_delay_s)
        else:
            load.cancel()
    finally:
        dataplane.draining = True
        http.should_exit = True
        if grpc_server is not None:
            await grpc_server.stop(config.drain_s)
        await asyncio.gather(http_task, return_exceptions=True)
        for model in models:
            await model.stop(config.drain_s)
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
