"""The parts of ``speclora serve`` (the app itself is :mod:`speclora.server`).

- :mod:`speclora.serving.protocol`: the OpenAI request bodies (validated in one
  place) and the response and error shapes.
- :mod:`speclora.serving.worker`: the one thread that owns the system, its
  bounded queue, cancellation and stop strings.
- :mod:`speclora.serving.metrics`: the Prometheus metrics.
"""
