"""The kserve SDK's protocol pieces, imported without its command line.

``import kserve`` imports ``kserve.model_server``, which parses ``sys.argv``
at import time (with prefix matching: ``--grpc`` or ``--max`` end the process
as "ambiguous", ``--model x`` silently becomes its ``--model_name``) and
builds a FastAPI app convforge does not use. convforge owns its command line,
so the import runs with ``sys.argv`` reduced to the program name. Nothing
else of the stock ``ModelServer`` is used: it binds 0.0.0.0.
"""

from __future__ import annotations

import sys

_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    import kserve
    from kserve import errors
    from kserve.model_repository import ModelRepository
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
    from kserve.protocol.grpc.servicer import InferenceServicer
    from kserve.protocol.infer_type import (
        InferInput,
        InferOutput,
        InferRequest,
        InferResponse,
        RequestedOutput,
    )
    from kserve.protocol.model_repository_extension import ModelRepositoryExtension
    from kserve.protocol.rest.v2_datamodels import InferenceRequest as InferenceRequestSchema
    from kserve.protocol.rest.v2_endpoints import register_v2_endpoints
    from kserve.utils.numpy_codec import to_np_dtype
finally:
    sys.argv = _argv

__all__ = [
    "DataPlane",
    "InferInput",
    "InferOutput",
    "InferRequest",
    "InferResponse",
    "InferenceRequestSchema",
    "InferenceServicer",
    "ModelRepository",
    "ModelRepositoryExtension",
    "RequestedOutput",
    "errors",
    "grpc_predict_v2_pb2_grpc",
    "kserve",
    "register_v2_endpoints",
    "to_np_dtype",
]
