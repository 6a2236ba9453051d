"""``convforge serve``: the Open Inference Protocol (KServe v2) over HTTP and gRPC.

:mod:`.server` runs it; :mod:`.model` is the served ``kserve.Model``, :mod:`.batcher`
its dynamic batcher; :mod:`.http_app` and :mod:`.grpc_server` compose kserve's
protocol pieces; :mod:`.metrics` the Prometheus metrics; :mod:`.transport` the
HTTP/1.1 protocol with its limits. Needs the ``serve`` extra.
"""

import os

# Set before anything imports grpc (its core reads them once). The server's output is
# convforge's own: gRPC's core logs only errors, and its fork handlers (which print
# "skipping fork() handlers" whenever a library forks, as OpenVINO's CPU probe does) stay
# off: the server never forks to serve. A user's own setting wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
