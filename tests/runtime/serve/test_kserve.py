"""The served model class runs unchanged under kserve's own ModelServer (what KServe runs
on Kubernetes), driven by the Triton HTTP client."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import tritonclient.http as httpclient

from convforge.runtime import load
from tests.runtime.serve.conftest import MODEL

# What a KServe predictor image runs (README: "Serving on KServe").
SCRIPT = """
import os
import kserve  # first: kserve parses its own command line (--http_port ...) on import

from convforge.runtime.serve.served_model import ServedModel

model = ServedModel("digits", os.environ["CONVFORGE_MODEL"], backend="ort-cpu")
model.load()
kserve.ModelServer().start([model])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_model_class_under_kserve_model_server(tmp_path):
    http, grpc = _free_port(), _free_port()
    script = tmp_path / "predictor.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), "--http_port", str(http), "--grpc_port", str(grpc)],
        env={**os.environ, "CONVFORGE_MODEL": str(MODEL)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http}")
        deadline = time.monotonic() + 90
        while True:
            try:
                if client.is_model_ready("digits"):
                    break
            except Exception:  # noqa: BLE001 (not listening yet)
                pass
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "kserve's ModelServer did not get ready"
            time.sleep(0.2)
        x = np.random.default_rng(3).standard_normal((2, 1, 16, 16)).astype(np.float32)
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        got = client.infer("digits", [inp]).as_numpy("logits")
    finally:
        proc.terminate()
        proc.wait(30)
    with load(MODEL, backend="ort-cpu") as model:
        np.testing.assert_allclose(got, model.logits(x), rtol=1e-5, atol=1e-5)
