"""fluxray's Prometheus metrics, through Ray Serve's metrics API (`ray.serve.metrics`).

Every metric carries Serve's own tags (application, deployment, replica) as well as its own. Ray
exports them from each node's metrics agent (`ray start --metrics-export-port=...`, scraped at
`/metrics`) with a `ray_` prefix, e.g. `ray_fluxray_requests_total`. Serve's built-in metrics
(`ray_serve_*`: per-deployment request counts, latencies, queue lengths, replica health) come
alongside. Metric objects are made inside each replica, where Serve's context tags exist.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from ray.serve.metrics import Counter, Gauge, Histogram

LATENCY_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300]
BATCH_BOUNDARIES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64]
SLOWDOWN_BOUNDARIES = [1, 1.25, 1.5, 2, 3, 4, 6, 8, 12, 16, 32]


class IngressMetrics:
    """Requests by route and status code, end-to-end latency, images made, in flight, retries."""

    def __init__(self):
        self.requests = Counter(
            "fluxray_requests_total", "HTTP requests answered, by route and status code.", tag_keys=("route", "code")
        )
        self.latency = Histogram(
            "fluxray_request_latency_s",
            "Seconds from request to answer, by route and status code.",
            boundaries=LATENCY_BOUNDARIES,
            tag_keys=("route", "code"),
        )
        self.images = Counter("fluxray_images_generated_total", "Images returned to clients.")
        self.in_flight = Gauge("fluxray_requests_in_flight", "Generations in flight in this ingress replica.")
        self.retries = Counter(
            "fluxray_stage_retries_total", "Generations re-run because a stage replica died under them."
        )
        self.jobs = Counter(
            "fluxray_jobs_total",
            "Async jobs reaching a status (queued, running, succeeded, failed, cancelled).",
            tag_keys=("status",),
        )
        self.job_queue_wait = Histogram(
            "fluxray_job_queue_wait_s",
            "Seconds from an async job's creation to its first denoising step.",
            boundaries=LATENCY_BOUNDARIES,
        )
        self.webhooks = Counter(
            "fluxray_webhook_deliveries_total",
            "Webhook deliveries, by result: delivered, or failed after every attempt (or refused).",
            tag_keys=("result",),
        )

    def answered(self, route: str, code: int, seconds: float) -> None:
        tags = {"route": route, "code": str(code)}
        self.requests.inc(tags=tags)
        self.latency.observe(seconds, tags=tags)


class StageMetrics:
    """Per stage (encode, denoise, decode): seconds a request spends in it, and batch sizes."""

    def __init__(self, stage: str):
        self.latency = Histogram(
            "fluxray_stage_latency_s",
            "Seconds a request spends in a stage (queueing included).",
            boundaries=LATENCY_BOUNDARIES,
            tag_keys=("stage",),
        )
        self.batch = Histogram(
            "fluxray_batch_size",
            "Items processed by one call of a stage's model: prompts, images per step, latents decoded.",
            boundaries=BATCH_BOUNDARIES,
            tag_keys=("stage",),
        )
        self.latency.set_default_tags({"stage": stage})
        self.batch.set_default_tags({"stage": stage})

    @contextmanager
    def timed(self) -> Iterator[None]:
        """Observe the stage latency of the block, however it ends."""
        started = time.monotonic()
        try:
            yield
        finally:
            self.latency.observe(time.monotonic() - started)


class DenoiserMetrics(StageMetrics):
    """The denoise stage's metrics plus its queue: requests waiting and images being stepped."""

    def __init__(self):
        super().__init__("denoise")
        self.queue_depth = Gauge("fluxray_denoiser_queue_depth", "Requests in the denoiser, waiting or stepping.")
        self.active_images = Gauge("fluxray_denoiser_batch_images", "Images advanced by the latest transformer call.")
        self.steps = Counter("fluxray_denoiser_steps_total", "Transformer calls (batched denoising steps).")
        self.queue_wait = Histogram(
            "fluxray_denoiser_queue_wait_s",
            "Seconds from a request's arrival at the denoiser to its first step.",
            boundaries=LATENCY_BOUNDARIES,
        )
        self.slowdown = Histogram(
            "fluxray_denoiser_slowdown",
            "A request's time in the denoiser over its estimated standalone time.",
            boundaries=SLOWDOWN_BOUNDARIES,
        )
        self.preemptions = Counter(
            "fluxray_denoiser_preemptions_total", "Times a request's steps were paused for another request's."
        )
