"""Prometheus metrics for the server (one registry per app, so tests and reloads never collide).

With several server processes on one port (``serve --procs N``), each process writes its series to files in
``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode, chosen when it is imported) and /metrics, from
whichever process answers, sums them all."""
from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        labels = ["model", "version"]
        r = self.registry
        self.success = Counter("torchship_request_success", "Inference requests that succeeded", labels, registry=r)
        self.failure = Counter("torchship_request_failure", "Inference requests that failed, by reason",
                               labels + ["reason"], registry=r)
        self.inferences = Counter("torchship_inference_count", "Items inferred (sum of batch sizes)", labels, registry=r)
        self.executions = Counter("torchship_execution_count", "Model executions (batches run)", labels, registry=r)
        self.queue_time = Histogram("torchship_queue_duration_seconds", "Time a request waited in the queue", labels,
                                    buckets=_BUCKETS, registry=r)
        self.compute_time = Histogram("torchship_compute_duration_seconds", "Time to run one batch", labels,
                                      buckets=_BUCKETS, registry=r)
        self.queue_depth = Gauge("torchship_queue_depth", "Requests waiting in the queue", labels, registry=r,
                                 multiprocess_mode="livesum")
        self.tokens = Counter("torchship_tokens", "Text tokens fed to the model (bundles that take text; padding not "
                              "counted)", labels, registry=r)
        self.processing_time = Histogram("torchship_processing_duration_seconds", "Time to turn one request's raw "
                                         "input into tensors (tokenizing)", labels, buckets=_BUCKETS, registry=r)
        self.batch_tokens = Histogram("torchship_batch_tokens", "Real tokens in one batch (bundles that take an "
                                      "attention mask; padding not counted): what --max-batch-tokens bounds", labels,
                                      buckets=tuple(2.0 ** k for k in range(4, 17)), registry=r)
        self.rejected = Counter("torchship_rejected", "Requests turned away before running, by reason",
                                labels + ["reason"], registry=r)

    def exposition(self) -> bytes:
        """The text /metrics answers: this registry's, or every server process's summed."""
        where = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not where:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess
        summed = CollectorRegistry()
        multiprocess.MultiProcessCollector(summed, path=where)
        return generate_latest(summed)

    def model(self, model: str, version: str) -> "ModelMetrics":
        return ModelMetrics(self, model, version)


class ModelMetrics:
    """One model version's series, with the label lookups done once rather than on every request."""

    def __init__(self, m: Metrics, model: str, version: str):
        labels = (model, version)
        self.success, self.queue_depth = m.success.labels(*labels), m.queue_depth.labels(*labels)
        self._inferences, self._executions = m.inferences.labels(*labels), m.executions.labels(*labels)
        self._compute, self._queue = m.compute_time.labels(*labels), m.queue_time.labels(*labels)
        self._labels, self._failures, self._rejections = labels, (m.failure, {}), (m.rejected, {})
        self._tokens, self._processing = m.tokens.labels(*labels), m.processing_time.labels(*labels)
        self._batch_tokens = m.batch_tokens.labels(*labels)

    def processed(self, tokens: int, seconds: float) -> None:
        """One request's raw input turned into tensors: its tokens and the time it took."""
        self._tokens.inc(tokens)
        self._processing.observe(seconds)

    def _inc(self, series: tuple[Counter, dict], reason: str) -> None:
        counter, children = series
        if reason not in children:
            children[reason] = counter.labels(*self._labels, reason)
        children[reason].inc()

    def failure(self, reason: str) -> None:
        self._inc(self._failures, reason)

    def rejected(self, reason: str) -> None:
        self._inc(self._rejections, reason)

    def on_batch(self, size: int, requests: int, compute_s: float, queue_s: list[float],
                 tokens: int | None = None) -> None:
        if tokens is not None:
            self._batch_tokens.observe(tokens)
        self._inferences.inc(size)
        self._executions.inc()
        self._compute.observe(compute_s)
        for q in queue_s:
            self._queue.observe(q)
