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
* every body is read here before the application sees it: a body over
  ``--max-body-mb`` (``--max-json-mb`` for JSON, which costs ~10x its size to
  parse) is a 413 before it is read in full, one not received within
  ``--request-timeout-s`` a 408, one that would take the bodies held at once
  past ``--max-buffered-mb`` a 503; a client that disconnects mid-body gets
  nothing (its partial body is never taken for the whole);
* past the bodies, at most ``--max-concurrent`` requests are worked on at
  once (beyond: 503 with Retry-After);
* the binary extension's JSON header is validated with the same schema as a
  JSON request (kserve's ``InferenceRequest``), and each tensor's size is
  computed exactly before anything is allocated;
* an image to classify is one of JPEG, PNG or WebP, at most ``--max-image-mp``
  megapixels (read from its header), decoded and resized on a bounded thread
  pool, off the event loop; a multipart form holds one file and a few fields;
* the metrics name a model only if it is served ("unknown" otherwise).
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import orjson
import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from convforge.contract import OUTPUT_NAME
from convforge.errors import UserError
from convforge.runtime.model import top_k
from convforge.runtime.preprocess import UPLOAD_FORMATS, preprocess, usable_cpus
from convforge.runtime.serve.batcher import QueueFull, RequestTimeout, ShuttingDown
from convforge.runtime.serve.kserve_sdk import (
    DataPlane,
    InferenceRequestSchema,
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
MAX_DIM = 2**31 - 1  # one tensor dimension, at most (the body bounds the product anyway)
MULTIPART_FIELDS = 8  # form fields besides the one image file
MAX_OUTPUTS = 1  # a served model has one output, OUTPUT_NAME


class ConvforgeDataPlane(DataPlane):
    """kserve's DataPlane, but ready means every model is, and undecodable bodies are 400s."""

    def __init__(self, model_registry: ModelRepository) -> None:
        super().__init__(model_registry=model_registry)
        self.draining = False

    async def get_model(self, name: str):
        """The served model; ModelNotReady while it loads (kserve's would call ``load()`` on
        the event loop, for an engine build of minutes, racing the load under way)."""
        model = self.get_model_from_registry(name)
        if not model.ready:
            raise errors.ModelNotReady(name)
        return model

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
        if isinstance(body, bytes) and BINARY_HEADER.decode() in headers:
            return binary_request(body, headers, model_name)
        if isinstance(body, bytes):
            return json_request(body, model_name)
        return super().decode_inference_request(body, headers, model_name)


def json_request(body: bytes, model_name: str) -> InferRequest:
    """A v2 JSON request, with the cheap checks before the schema's.

    _Guard hands infer bodies over as bytes, so the JSON is parsed once, by
    orjson, and a request asking for thousands of outputs is refused before
    pydantic spends 10 ms per thousand on them.
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise errors.InvalidInput(f"the request is not valid JSON: {e}") from None
    return InferRequest.from_inference_request(_validated(data), model_name)


def _validated(header) -> InferenceRequestSchema:
    """``header`` checked against kserve's request schema; InvalidInput naming the first error."""
    if not isinstance(header, dict):
        raise errors.InvalidInput("the request must be a JSON object with 'inputs'")
    outputs = header.get("outputs")
    if isinstance(outputs, list) and len(outputs) > MAX_OUTPUTS:
        raise errors.InvalidInput(
            f"the request asks for {len(outputs)} outputs; a model here has one output, "
            f"{OUTPUT_NAME!r}: ask for it once or not at all"
        )
    try:
        return InferenceRequestSchema.model_validate(header)
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise errors.InvalidInput(f"the request is invalid: {where}: {first['msg']}") from None


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
    except orjson.JSONDecodeError as e:
        raise errors.InvalidInput(f"the JSON part of the binary request is invalid: {e}") from None
    # The same schema as a JSON request's; binary inputs carry no "data" in the header.
    if isinstance(header, dict) and isinstance(header.get("inputs"), list):
        filled = [{"data": [], **i} if isinstance(i, dict) else i for i in header["inputs"]]
        header = {**header, "inputs": filled}
    checked = _validated(header)
    inputs = []
    for spec in checked.inputs:
        if any(not 0 <= d <= MAX_DIM for d in spec.shape):
            raise errors.InvalidInput(f"input {spec.name!r}: shape {spec.shape} is out of range")
        params = spec.parameters or {}
        tensor = InferInput(spec.name, spec.shape, spec.datatype, spec.data or None, params)
        if not spec.data:
            size = params.get("binary_data_size")
            dtype = to_np_dtype(spec.datatype)
            numeric = dtype is not None and np.dtype(dtype).kind in "biuf"
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not numeric:
                raise errors.InvalidInput(
                    f"input {spec.name!r} needs data or a binary_data_size, and a numeric "
                    f"datatype (got {spec.datatype})"
                )
            needed = math.prod(spec.shape) * np.dtype(dtype).itemsize  # exact: no overflow
            if size != needed or start + size > len(body):
                raise errors.InvalidInput(
                    f"input {spec.name!r}: {size} bytes given ({len(body) - start} left in "
                    f"the body), shape {spec.shape} of {spec.datatype} needs {needed}"
                )
            tensor._raw_data = body[start : start + size]
            start += size
        inputs.append(tensor)
    if start != len(body):
        raise errors.InvalidInput(f"{len(body) - start} bytes follow the last binary input")
    outputs = [RequestedOutput(o.name, o.parameters) for o in checked.outputs or []]
    return InferRequest(
        model_name=model_name,
        infer_inputs=inputs,
        request_id=checked.id,
        parameters=checked.parameters,
        request_outputs=outputs or None,
    )


def build_app(
    dataplane: ConvforgeDataPlane,
    repository_extension: ModelRepositoryExtension,
    metrics: ServerMetrics,
    limits,
):
    """The ASGI application: FastAPI with the v2 protocol, wrapped by :class:`_Guard`.

    ``limits`` is the server's :class:`~convforge.runtime.serve.server.ServeConfig`."""
    app = FastAPI(title="convforge", docs_url=None, redoc_url=None, openapi_url=None)
    register_v2_endpoints(app, dataplane, repository_extension)
    _add_error_handlers(app)
    # Decoding an image is CPU work: a few threads, never the event loop.
    decoders = ThreadPoolExecutor(min(4, usable_cpus()), thread_name_prefix="convforge-classify")

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE)

    @app.post("/v1/models/{model_name}/classify")
    async def classify(model_name: str, request: Request, topk: int = 5) -> dict:
        """One image (raw body or multipart) -> top-k labels with probabilities."""
        model = await dataplane.get_model(model_name)
        if not 1 <= topk <= MAX_TOPK:
            raise errors.InvalidInput(f"topk must be between 1 and {MAX_TOPK}, got {topk}")
        image = await _image_bytes(request)

        def decode():  # bytes, so a large JPEG decodes in draft mode
            return preprocess([image], model.info, workers=1, formats=UPLOAD_FORMATS,
                              max_pixels=model.max_image_pixels)  # fmt: skip

        try:
            rows = await asyncio.get_running_loop().run_in_executor(decoders, decode)
        except UserError as e:
            raise errors.InvalidInput(str(e)) from None
        logits = await model.infer(rows)
        try:
            (best,) = top_k(logits, model.info.classes, topk)
        except UserError as e:  # the model is not an image classifier: this is not its endpoint
            raise errors.InvalidInput(f"{model_name}: {e}") from None
        return {"model_name": model_name, "predictions": [p.__dict__ for p in best]}

    return _Guard(app, dataplane, metrics, limits)


async def _image_bytes(request: Request) -> bytes:
    """The image of a classify request: the raw body, or the one file of a multipart form."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=MULTIPART_FIELDS)
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


class _Disconnected(Exception):
    """The client went away before its body was complete."""


class _Guard:
    """ASGI wrapper: the body limits, deadline and budget, the concurrency cap, a
    Content-Type for tritonclient's requests, and the request counters and latency of
    /metrics (see the module docstring)."""

    def __init__(self, app, dataplane, metrics: ServerMetrics, limits) -> None:
        self.app, self.dataplane, self.metrics = app, dataplane, metrics
        self.max_body = int(limits.max_body_mb * 2**20)
        self.max_json = int(min(limits.max_json_mb, limits.max_body_mb) * 2**20)
        self.budget = int(limits.max_buffered_mb * 2**20)
        self.timeout_s = limits.request_timeout_s
        self.max_concurrent = limits.max_concurrent
        self.buffered = 0  # body bytes held now, all requests together
        self.working = 0  # requests past their body, not yet answered

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"].startswith(REPOSITORY_PATH):
            return await _json(send, 404, b'{"error":"this server does not load or unload models"}')
        headers = dict(scope["headers"])
        model = self._model_label(scope["path"])
        start = time.perf_counter()
        status = [500]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        held = 0
        try:
            if scope["method"] in ("POST", "PUT"):
                limit, kind = self._limit(scope["path"], headers)
                length = headers.get(b"content-length")
                if length is not None and (not length.isdigit() or int(length) > limit):
                    return await self._too_large(counting_send, limit, kind)
                try:
                    async with asyncio.timeout(self.timeout_s):
                        body, held = await self._read_body(receive, limit)
                except TimeoutError:
                    message = f"the request body did not arrive within {self.timeout_s:g} s"
                    return await _json(counting_send, 408, _message(message), close=True)
                except _Disconnected:
                    status[0] = 499  # nginx's "client closed request": nothing to answer
                    return
                if body is None:
                    return await self._too_large(counting_send, limit, kind)
                if held < 0:
                    message = "the server holds too many request bodies now; retry later"
                    return await _json(counting_send, 503, _message(message), close=True,
                                       retry_after=1)  # fmt: skip
                receive = _replay(body)
            if scope["method"] == "POST" and scope["path"].endswith("/infer"):
                # FastAPI passes a non-JSON body through as bytes: the dataplane parses it
                # once, with orjson and the cheap checks first (json_request).
                kept = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                ctype = (b"content-type", b"application/octet-stream")
                scope = {**scope, "headers": [*kept, ctype]}
            if self.working >= self.max_concurrent:
                message = f"the server works on {self.max_concurrent} requests already; retry later"
                return await _json(counting_send, 503, _message(message), retry_after=1)
            self.working += 1
            try:
                await self.app(scope, receive, counting_send)
            finally:
                self.working -= 1
        finally:
            self.buffered -= max(held, 0)
            if model is not None:
                seconds = time.perf_counter() - start
                self.metrics.answered(model, "http", str(status[0]), seconds)

    def _limit(self, path: str, headers: dict) -> tuple[int, str]:
        """The largest body this request may send, and what sets that limit: for a served
        model's infer, also the largest valid request (a bigger one is refused unread)."""
        if not path.endswith("/infer"):
            return self.max_body, "--max-body-mb"
        binary = BINARY_HEADER in headers
        limit, option = (
            (self.max_body, "--max-body-mb") if binary else (self.max_json, "--max-json-mb")
        )
        model = self.dataplane.model_registry.get_model(_model_of(path) or "")
        if model is not None and model.ready and model.largest_body(binary) < limit:
            rows = model.batching.max_request_rows
            return model.largest_body(binary), f"what {rows} rows need (--max-request-rows)"
        return limit, option

    async def _read_body(self, receive, limit: int) -> tuple[bytes | None, int]:
        """``(body, bytes held)``: ``(None, held)`` once it passes ``limit``, ``(b"", -1)`` when
        the budget of bodies held at once is spent; _Disconnected when the client leaves."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                self.buffered -= size
                raise _Disconnected
            chunk = message.get("body", b"")
            if size + len(chunk) > limit:
                self.buffered -= size
                return None, 0
            if self.buffered + len(chunk) > self.budget:
                self.buffered -= size
                return b"", -1
            size += len(chunk)
            self.buffered += len(chunk)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), size

    def _model_label(self, path: str) -> str | None:
        """The metrics label of an inference path: its model if served, else "unknown"."""
        name = _model_of(path)
        if name is None:
            return None
        return name if self.dataplane.model_registry.get_model(name) is not None else "unknown"

    async def _too_large(self, send, limit: int, option: str) -> None:
        message = f"the request body is larger than {option} ({limit / 2**20:g} MiB)"
        await _json(send, 413, _message(message), close=True)


def _message(text: str) -> bytes:
    return orjson.dumps({"error": text})


async def _json(
    send, status: int, body: bytes, close: bool = False, retry_after: int | None = None
) -> None:
    """Answer from the ASGI layer with a JSON error (the app never sees the request)."""
    headers = [(b"content-type", b"application/json")]
    if close:
        headers.append((b"connection", b"close"))
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
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
