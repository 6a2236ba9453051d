"""The gRPC side: kserve's v2 servicer on a ``grpc.aio`` server bound where convforge says.

Its errors map to gRPC codes as its HTTP twins map to statuses: a client
mistake is INVALID_ARGUMENT or NOT_FOUND, a full queue RESOURCE_EXHAUSTED, a
request past its timeout DEADLINE_EXCEEDED, a server that drains
UNAVAILABLE. The repository load/unload calls are refused (UNIMPLEMENTED), as
over HTTP. Each ModelInfer is counted in the metrics with its status code,
under its model's name when the model is served ("unknown" otherwise, so that
made-up names cannot grow the metrics). An unexpected error is INTERNAL with
a message that reveals nothing of the server (the log has the rest). At most
``max_concurrent`` calls run at once (beyond: RESOURCE_EXHAUSTED), and the
port is bound without SO_REUSEPORT: a port another server holds is an error,
not a port shared with it.
"""

from __future__ import annotations

import logging
import time

import grpc
from grpc_interceptor import AsyncExceptionToStatusInterceptor, AsyncServerInterceptor

from convforge.errors import UserError
from convforge.runtime.serve.batcher import QueueFull, RequestTimeout, ShuttingDown
from convforge.runtime.serve.kserve_sdk import (
    InferenceServicer,
    errors,
    grpc_predict_v2_pb2_grpc,
)
from convforge.runtime.serve.metrics import ServerMetrics

log = logging.getLogger("convforge.serve")


class _Servicer(InferenceServicer):
    async def RepositoryModelLoad(self, request, context):  # noqa: N802 (gRPC's name)
        raise NotImplementedError("this server does not load models")

    async def RepositoryModelUnload(self, request, context):  # noqa: N802
        raise NotImplementedError("this server does not unload models")


# exception -> status; client mistakes and refusals are answered without a traceback in the log
CODES = (
    (errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.UnsupportedProtocol, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (errors.ModelNotReady, grpc.StatusCode.UNAVAILABLE),
    (errors.ServerNotReady, grpc.StatusCode.UNAVAILABLE),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (RequestTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (NotImplementedError, grpc.StatusCode.UNIMPLEMENTED),
)


class _Errors(AsyncExceptionToStatusInterceptor):
    async def handle_exception(self, ex, request_or_iterator, context, method_name):
        if isinstance(ex, grpc.aio.AbortError):
            raise ex  # already answered
        for kind, code in CODES:
            if isinstance(ex, kind):
                message = getattr(ex, "reason", None) or str(ex)
                await context.abort(code, message)
        log.error("gRPC %s failed", method_name, exc_info=ex)
        await context.abort(grpc.StatusCode.INTERNAL, "internal server error (see the server log)")


class _Metrics(AsyncServerInterceptor):
    def __init__(self, metrics: ServerMetrics, served) -> None:
        self.metrics, self.served = metrics, served

    async def intercept(self, method, request_or_iterator, context, method_name):
        if not method_name.endswith("/ModelInfer"):
            return await method(request_or_iterator, context)
        start = time.perf_counter()
        code = "OK"
        try:
            return await method(request_or_iterator, context)
        except BaseException:
            status = context.code()
            code = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
            raise
        finally:
            model = getattr(request_or_iterator, "model_name", "")
            model = model if self.served(model) else "unknown"
            self.metrics.answered(model, "grpc", code, time.perf_counter() - start)


def build_server(
    dataplane,
    repository_extension,
    metrics: ServerMetrics,
    address: str,
    max_message_bytes: int,
    max_concurrent: int,
) -> grpc.aio.Server:
    """An unstarted gRPC server for the v2 protocol on ``address`` (host:port), its port bound."""
    served = lambda name: dataplane.model_registry.get_model(name) is not None  # noqa: E731
    server = grpc.aio.server(
        interceptors=(_Metrics(metrics, served), _Errors()),
        options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=max_concurrent,
    )
    grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        _Servicer(dataplane, repository_extension), server
    )
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:  # grpc's "Failed to bind to address ..."
        port = 0
    if port == 0:
        raise UserError(
            f"cannot serve gRPC on {address}: the port is in use or not allowed "
            "(--grpc-port 0 takes a free one, -1 turns gRPC off)"
        )
    server.convforge_port = port  # the bound port: a free one when asked for 0
    return server
