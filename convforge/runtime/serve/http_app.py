"""The HTTP side: kserve's v2 endpoints on a FastAPI app of convforge's, plus
``/metrics`` and ``/v1/models/{name}/classify``, wrapped so that every client
mistake is a 4xx JSON error.

kserve's REST pieces are used as they are (``register_v2_endpoints``, its
DataPlane and model repository); around them:

* the repository's load/unload routes answer 404 (an unauthenticated POST
  would unload a served model);
* ``/v2/health/ready`` and gRPC's ServerReady report ready only when every
  model is loaded and warmed up, and not while the server drains;
* a request body that cannot be decoded (binary data shorter than its
  shape, a non-number in FP32 data, ...) is a 400, not kserve's 500; so are
  malformed JSON and a missing field (FastAPI's 422); the queue being full is
  a 503 with Retry-After, a request past its timeout a 504;
* tritonclient sends no Content-Type: the body is marked JSON, or binary when
  the ``Inference-Header-Content-Length`` header is there;
* a body over ``max_body_bytes`` is a 413 before it is read in full.
"""

from __future__ import annotations

import time

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from convforge.errors import UserError
from convforge.runtime.model import top_k
from convforge.runtime.preprocess import preprocess
from convforge.runtime.serve.batcher import QueueFull, RequestTimeout, ShuttingDown
from convforge.runtime.serve.kserve_sdk import (
    DataPlane,
    InferInput,
    InferRequest,
    ModelRepository,
    ModelRepositoryExtension,
    RequestedOutput,
    errors,
    register_v2_endpoints,
    to_np_dtype,
)
from convforge.runtime.serve.metrics import CONTENT_TYPE, ServerMetrics

BINARY_HEADER = b"inference-header-content-length"
REPOSITORY_PATH = "/v2/repository/"  # kserve's load/unload routes: not served
MAX_TOPK = 1000


class ConvforgeDataPlane(DataPlane):
    """kserve's DataPlane, but ready means every model is, and undecodable bodies are 400s."""

    def __init__(self, model_registry: ModelRepository) -> None:
        super().__init__(model_registry=model_registry)
        self.draining = False

    async def ready(self) -> bool:
        models = self.model_registry.get_models().values()
        return not self.draining and bool(models) and all(m.ready for m in models)

    def decode(self, body, headers, *args, **kwargs):
        try:
            return super().decode(body, headers, *args, **kwargs)
        except errors.InvalidInput:
            raise
        except (ValueError, TypeError, IndexError, KeyError) as e:
            raise errors.InvalidInput(f"cannot decode the request body: {e}") from None

    def decode_inference_request(self, body, headers, model_name):
        if isinstance(body, bytes):
            return binary_request(body, headers, model_name)
        return super().decode_inference_request(body, headers, model_name)


def binary_request(body: bytes, headers: dict, model_name: str) -> InferRequest:
    """A v2 request in the binary tensor data extension, its tensors left as raw bytes.

    kserve's own parser turns every binary tensor into a Python list and back
    (150 ms for one 3x224x224 image on this machine); this one keeps the bytes,
    as kserve's gRPC path does (``InferInput._raw_data``), and checks each
    tensor's byte count against its shape and datatype.
    """
    length = headers.get(BINARY_HEADER.decode())
    if length is None:
        raise errors.InvalidInput(f"a binary request needs the {BINARY_HEADER.decode()} header")
    if not length.isdigit() or not 0 < int(length) <= len(body):
        raise errors.InvalidInput(
            f"{BINARY_HEADER.decode()} is {length!r}, the body {len(body)} bytes"
        )
    start = int(length)
    try:
        header = orjson.loads(body[:start])
        specs = header["inputs"]
        if not isinstance(specs, list):
            raise TypeError("'inputs' is not a list")
    except (orjson.JSONDecodeError, KeyError, TypeError) as e:
        raise errors.InvalidInput(f"the JSON part of the binary request is invalid: {e}") from None
    inputs = []
    for spec in specs:
        tensor = InferInput(spec["name"], spec["shape"], spec["datatype"], spec.get("data"),
                            spec.get("parameters"))  # fmt: skip
        if tensor.data is None:
            size = (spec.get("parameters") or {}).get("binary_data_size")
            dtype = to_np_dtype(tensor.datatype)
            if not isinstance(size, int) or size < 0 or dtype is None:
                raise errors.InvalidInput(
                    f"input {tensor.name!r} needs data or a binary_data_size, and a numeric "
                    f"datatype (got {tensor.datatype})"
                )
            needed = int(np.prod(tensor.shape)) * np.dtype(dtype).itemsize
            if size != needed or start + size > len(body):
                raise errors.InvalidInput(
                    f"input {tensor.name!r}: {size} bytes given ({len(body) - start} left in "
                    f"the body), shape {tensor.shape} of {tensor.datatype} needs {needed}"
                )
            tensor._raw_data = body[start : start + size]
            start += size
        inputs.append(tensor)
    if start != len(body):
        raise errors.InvalidInput(f"{len(body) - start} bytes follow the last binary input")
    outputs = [RequestedOutput(o["name"], o.get("parameters")) for o in header.get("outputs", [])]
    return InferRequest(
        model_name=model_name,
        infer_inputs=inputs,
        request_id=header.get("id"),
        parameters=header.get("parameters"),
        request_outputs=outputs or None,
    )


def build_app(
    dataplane: ConvforgeDataPlane,
    repository_extension: ModelRepositoryExtension,
    metrics: ServerMetrics,
    max_body_bytes: int,
):
    """The ASGI application: FastAPI with the v2 protocol, wrapped by :class:`_Guard`."""
    app = FastAPI(title="convforge", docs_url=None, redoc_url=None, openapi_url=None)
    register_v2_endpoints(app, dataplane, repository_extension)
    _add_error_handlers(app)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE)

    @app.post("/v1/models/{model_name}/classify")
    async def classify(model_name: str, request: Request, topk: int = 5) -> dict:
        """One image (raw body or multipart) -> top-k labels with probabilities."""
        model = dataplane.model_registry.get_model(model_name)
        if model is None:
            raise errors.ModelNotFound(model_name)
        if not 1 <= topk <= MAX_TOPK:
            raise errors.InvalidInput(f"topk must be between 1 and {MAX_TOPK}, got {topk}")
        image = await _image_bytes(request)
        try:  # bytes, so a large JPEG decodes in draft mode (convforge.runtime.preprocess)
            rows = preprocess([image], model.info)
        except UserError as e:
            raise errors.InvalidInput(str(e)) from None
        logits = await model.infer(rows)
        try:
            (best,) = top_k(logits, model.info.classes, topk)
        except UserError as e:  # the model is not an image classifier: this is not its endpoint
            raise errors.InvalidInput(f"{model_name}: {e}") from None
        return {"model_name": model_name, "predictions": [p.__dict__ for p in best]}

    return _Guard(app, dataplane, metrics, max_body_bytes)


async def _image_bytes(request: Request) -> bytes:
    """The image of a classify request: the raw body, or the first file of a multipart form."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        files = [v for v in form.values() if hasattr(v, "read")]
        if not files:
            raise errors.InvalidInput("the multipart form holds no file")
        return await files[0].read()
    data = await request.body()
    if not data:
        raise errors.InvalidInput("the request body is empty; send one image")
    return data


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message}, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    """Client mistakes are 4xx with a message (and no traceback in the log); the rest 500."""

    def handle(kind, status: int):
        async def handler(request, exc):
            return _error(status, str(exc))

        app.add_exception_handler(kind, handler)

    for kind, status in [
        (errors.InvalidInput, 400),
        (errors.ModelNotFound, 404),
        (errors.ModelNotReady, 503),
        (errors.ServerNotReady, 503),
        (errors.ServerNotLive, 503),
        (ShuttingDown, 503),
        (RequestTimeout, 504),
        (NotImplementedError, 501),
        (errors.UnsupportedProtocol, 501),
        (errors.InferenceError, 500),
    ]:
        handle(kind, status)

    async def queue_full(request, exc: QueueFull):
        return _error(503, str(exc), {"Retry-After": str(int(exc.retry_after))})

    async def invalid_request(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return _error(400, f"the request body is not valid JSON: {first.get('msg', exc)}")
        return _error(400, f"invalid request: {where or 'body'}: {first.get('msg', exc)}")

    app.add_exception_handler(QueueFull, queue_full)
    app.add_exception_handler(RequestValidationError, invalid_request)


class _Guard:
    """ASGI wrapper: body-size limit (413), a Content-Type for tritonclient's requests,
    and the request counters and latency of /metrics."""

    def __init__(self, app, dataplane, metrics: ServerMetrics, max_body_bytes: int) -> None:
        self.app, self.dataplane = app, dataplane
        self.metrics, self.max_body_bytes = metrics, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"].startswith(REPOSITORY_PATH):
            return await _json(send, 404, b'{"error":"this server does not load or unload models"}')
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await self._too_large(send)
        if length is None and scope["method"] in ("POST", "PUT"):
            # A chunked body: read it here (up to the limit), then hand it on.
            body = await self._read_limited(receive)
            if body is None:
                return await self._too_large(send)
            receive = _replay(body)
        if scope["method"] == "POST" and b"content-type" not in headers:
            kind = b"application/octet-stream" if BINARY_HEADER in headers else b"application/json"
            scope = {**scope, "headers": [*scope["headers"], (b"content-type", kind)]}
        model = _model_of(scope["path"])
        start = time.perf_counter()
        status = [500]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            if model is not None:
                seconds = time.perf_counter() - start
                self.metrics.answered(model, "http", str(status[0]), seconds)

    async def _read_limited(self, receive) -> bytes | None:
        """The whole body, or None once it passes the limit."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, send) -> None:
        limit = f"{self.max_body_bytes / 2**20:g}".encode()
        body = b'{"error":"the request body is larger than --max-body-mb (' + limit + b' MiB)"}'
        await _json(send, 413, body, close=True)


async def _json(send, status: int, body: bytes, close: bool = False) -> None:
    """Answer from the ASGI layer with a JSON error (the app never sees the request)."""
    headers = [(b"content-type", b"application/json")]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _replay(body: bytes):
    """An ASGI ``receive`` that yields ``body`` once, then waits for the disconnect."""
    sent = [False]

    async def receive():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


def _model_of(path: str) -> str | None:
    """The model an inference path is for (/v2/models/NAME/infer, /v1/models/NAME/classify)."""
    parts = path.strip("/").split("/")
    if len(parts) == 4 and parts[1] == "models" and parts[3] in ("infer", "classify"):
        return parts[2]
    return None


def new_dataplane() -> tuple[ConvforgeDataPlane, ModelRepositoryExtension]:
    repository = ModelRepository()
    dataplane = ConvforgeDataPlane(repository)
    return dataplane, ModelRepositoryExtension(model_registry=repository)


__all__ = ["ConvforgeDataPlane", "build_app", "new_dataplane"]
