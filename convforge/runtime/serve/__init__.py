"""``convforge serve``: the Open Inference Protocol (KServe v2) over HTTP and gRPC.

:mod:`.server` runs it; :mod:`.model` is the served ``kserve.Model``, :mod:`.batcher`
its dynamic batcher; :mod:`.http_app` and :mod:`.grpc_server` compose kserve's
protocol pieces; :mod:`.metrics` the Prometheus metrics. Needs the ``serve`` extra.
"""
