"""Run as a script: drive a server with the real tritonclient.grpc, print what it saw as JSON.

    python grpc_client.py HOST:PORT MODEL INPUT.npy

A separate process, because tritonclient.grpc and kserve both define the v2 protocol's
protobuf messages and protobuf refuses two definitions in one process."""

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def main() -> None:
    address, model, path = sys.argv[1:4]
    x = np.load(path)
    client = grpcclient.InferenceServerClient(address)
    meta = client.get_model_metadata(model, as_json=True)
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput("logits")])
    errors = {}
    for case, (name, shape, datatype) in {
        "unknown_model": ("nope", list(x.shape), "FP32"),
        "wrong_shape": (model, [len(x), x.shape[1], 2, 2], "FP32"),
    }.items():
        bad = grpcclient.InferInput("input", shape, datatype)
        bad.set_data_from_numpy(np.zeros(shape, np.float32))
        try:
            client.infer(name, [bad])
        except InferenceServerException as e:
            errors[case] = [e.status(), e.message()]
    print(json.dumps({
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "metadata": meta,
        "logits": result.as_numpy("logits").tolist(),
        "errors": errors,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
