import asyncio
import threading
from pathlib import Path

import pytest

pytest.importorskip("kserve", reason="the serve extra is not installed")

from convforge.runtime.serve.batcher import BatchingConfig  # noqa: E402
from convforge.runtime.serve.server import ServeConfig, serve  # noqa: E402

FIXTURES = Path(__file__).parents[2] / "fixtures"
MODEL = FIXTURES / "digits.onnx"


class Server:
    """``serve()`` in a thread of this process, on free loopback ports."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.running = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(serve(self.config, self._on_ready))
        except BaseException as e:  # noqa: BLE001 (reported to the test)
            self.error = e
        finally:
            self._ready.set()

    def _on_ready(self, running) -> None:
        self.running = running
        self._ready.set()

    def __enter__(self) -> "Server":
        self.thread.start()
        self._ready.wait(120)
        if self.running is None:
            raise RuntimeError(f"the server did not start: {self.error!r}")
        return self

    def __exit__(self, *exc) -> None:
        self.running.stop()
        self.thread.join(60)

    @property
    def url(self) -> str:
        return self.running.http_url


def start(**overrides) -> Server:
    batching = overrides.pop("batching", BatchingConfig(max_batch_size=8, max_queue_delay_ms=2))
    settings = {"max_body_mb": 1.0, "max_json_mb": 1.0, "drain_delay_s": 0.0, **overrides}
    config = ServeConfig(
        models={"digits": str(MODEL)}, backend="ort-cpu", port=0, grpc_port=0,
        batching=batching, **settings,
    )  # fmt: skip
    return Server(config)


@pytest.fixture(scope="module")
def server():
    with start() as s:
        yield s
