"""What the service exposes on `/metrics` for an operator to watch and scale on, beside BentoML's HTTP metrics.

Made with BentoML's metrics API (`bentoml.metrics`, which defers importing `prometheus_client` until first use,
after BentoML has put the worker in Prometheus's multiprocess mode): each metric is created on first use, in
the process that serves. Labels never carry a prompt, a request id or another value without a small bound.
docs/metrics.md says what each one answers.
"""

from __future__ import annotations

import warnings
from functools import cached_property

from sd3_service.errors import ERROR_CODES

# Generations take seconds (a tiny CPU image: 0.05 s; SD3 Medium at 1024² on a GPU: 1-10 s; four at 1536²
# on an A10: a minute); encoding and storing take milliseconds.
GENERATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 45, 60, 90, 120, 300)
STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
LEDGER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 6, 12)
DEVICE_STATES = ("loading", "ready", "failed")
STAGES = ("queue", "inputs", "generate", "encode", "store")
MODES = ("txt2img", "img2img", "inpaint")
LEDGER_OPERATIONS = ("create", "read", "replace")
WEBHOOK_OUTCOMES = ("delivered", "retried", "gave_up", "gone")


def _api():
    """`bentoml.metrics` (its attributes are `prometheus_client`'s; this BentoML marks the module deprecated in
    favour of importing `prometheus_client` late, which is what the module does for us)."""
    import bentoml.metrics

    return bentoml.metrics


def _metric(kind: str, name: str, documentation: str, labels: tuple[str, ...] = (), **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return getattr(_api(), kind)(name, documentation, labelnames=labels, **options)


class ServiceMetrics:
    """The service's metrics, each created the first time it is used."""

    @cached_property
    def requests_waiting(self):
        return _metric("Gauge", "sd3_requests_waiting", "Requests admitted and waiting for a device",
                       multiprocess_mode="livesum")

    @cached_property
    def requests_running(self):
        return _metric("Gauge", "sd3_requests_running", "Requests generating now", multiprocess_mode="livesum")

    @cached_property
    def device_state(self):
        return _metric("Gauge", "sd3_device_state", "1 for each device's current state (loading, ready, failed)",
                       ("device", "state"), multiprocess_mode="livesum")

    @cached_property
    def device_busy_seconds(self):
        return _metric("Counter", "sd3_device_busy_seconds", "Seconds each device spent generating", ("device",))

    @cached_property
    def generation_seconds(self):
        return _metric("Histogram", "sd3_generation_seconds", "One request's generation, by mode", ("mode",),
                       buckets=GENERATION_BUCKETS)

    @cached_property
    def request_seconds(self):
        return _metric("Histogram", "sd3_request_seconds", "Where a request's time goes, by stage", ("stage",),
                       buckets=STAGE_BUCKETS)

    @cached_property
    def images(self):
        return _metric("Counter", "sd3_images", "Images made, by mode", ("mode",))

    @cached_property
    def request_errors(self):
        return _metric("Counter", "sd3_request_errors", "Errors answered, by the contract's code", ("code",))

    @cached_property
    def store_failures(self):
        return _metric("Counter", "sd3_store_failures", "Writes the store refused or failed")

    @cached_property
    def spooled_images(self):
        return _metric("Gauge", "sd3_spooled_images", "Objects (images, their sidecars and request records) kept "
                                                      "on local disk, waiting for the store",
                       multiprocess_mode="livesum")

    @cached_property
    def ledger_seconds(self):
        return _metric("Histogram", "sd3_ledger_seconds", "Each request-record call, by operation", ("operation",),
                       buckets=LEDGER_BUCKETS)

    @cached_property
    def takeovers(self):
        return _metric("Counter", "sd3_takeovers", "Requests taken over from an owner that died (or failed)")

    @cached_property
    def webhook_deliveries(self):
        return _metric("Counter", "sd3_webhook_deliveries", "Webhook delivery attempts, by outcome (delivered, "
                                                            "retried, gave_up, gone)", ("outcome",))

    @cached_property
    def webhook_pending(self):
        return _metric("Gauge", "sd3_webhook_pending", "Webhook events not delivered yet", multiprocess_mode="livesum")

    # -- what the parts report

    def start(self) -> None:
        """Make every series exist at zero, each labelled one for its known values, so that `increase()` sees its
        first event (a series born at 1 has no increase); devices are added as they are found (`device`)."""
        for gauge in (self.requests_waiting, self.requests_running, self.spooled_images, self.webhook_pending):
            gauge.inc(0)
        for counter in (self.store_failures, self.takeovers):
            counter.inc(0)
        for mode in MODES:
            self.generation_seconds.labels(mode=mode)
            self.images.labels(mode=mode).inc(0)
        for stage in STAGES:
            self.request_seconds.labels(stage=stage)
        for code in ERROR_CODES:
            self.request_errors.labels(code=code).inc(0)
        for operation in LEDGER_OPERATIONS:
            self.ledger_seconds.labels(operation=operation)
        for outcome in WEBHOOK_OUTCOMES:
            self.webhook_deliveries.labels(outcome=outcome).inc(0)

    def device(self, device: str, state: str) -> None:
        """`device` is now in `state`."""
        for known in DEVICE_STATES:
            self.device_state.labels(device=device, state=known).set(1 if known == state else 0)
        self.device_busy_seconds.labels(device=device).inc(0)

    def generated(self, device: str, mode: str, images: int, seconds: float) -> None:
        self.device_busy_seconds.labels(device=device).inc(seconds)
        self.generation_seconds.labels(mode=mode).observe(seconds)
        self.images.labels(mode=mode).inc(images)

    def stages(self, seconds: dict[str, float]) -> None:
        for stage, value in seconds.items():
            self.request_seconds.labels(stage=stage).observe(value)

    def error(self, code: str) -> None:
        self.request_errors.labels(code=code).inc()


METRICS = ServiceMetrics()
