"""Prometheus metrics through Ray Serve's metrics API, scraped from the node's metrics endpoint."""

from __future__ import annotations

import re

import httpx
from local_cluster import wait_until

GEN = "/v1/images/generations"


def samples(text: str, name: str, **labels: str) -> list[float]:
    """Values of a metric's samples whose labels include `labels`."""
    out = []
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        tags = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.rindex("}")]))
        if all(tags.get(k) == v for k, v in labels.items()):
            out.append(float(line.rsplit(" ", 1)[1]))
    return out


def test_requests_stages_batches_and_queue_are_exported(cluster):
    def answered(text: str, code: str) -> float:
        return sum(samples(text, "ray_fluxray_requests_total", application="fluxray", route=GEN, code=code))

    before = httpx.get(cluster.metrics_url, timeout=10).text
    body = {"prompt": "a metric lighthouse", "size": "64x64", "num_inference_steps": 2, "n": 2}
    for _ in range(3):
        assert httpx.post(cluster.url + GEN, json=body, timeout=120).status_code == 200
    assert httpx.post(cluster.url + GEN, json={"prompt": "a", "n": 99}).status_code == 400

    def scraped():
        # This test's own requests counted (earlier tests' traffic is in the counters too), and the
        # denoiser's gauges exported since (a gauge shows only once its replica has exported it).
        text = httpx.get(cluster.metrics_url, timeout=10).text
        fresh = answered(text, "200") >= answered(before, "200") + 3 and answered(text, "400") > answered(before, "400")
        gauge = samples(text, "ray_fluxray_denoiser_queue_depth", application="fluxray")
        return text if fresh and gauge else None

    text = wait_until(scraped, 90, "fluxray metrics on the metrics endpoint", 3)
    assert sum(samples(text, "ray_fluxray_images_generated_total", application="fluxray")) >= 6
    for stage in ("encode", "denoise", "decode"):
        count = samples(text, "ray_fluxray_stage_latency_s_count", application="fluxray", stage=stage)
        assert count and sum(count) >= 3, stage
        assert samples(text, "ray_fluxray_batch_size_count", application="fluxray", stage=stage), stage
    assert sum(samples(text, "ray_fluxray_request_latency_s_count", application="fluxray", route=GEN)) >= 4
    assert samples(text, "ray_fluxray_denoiser_queue_depth", application="fluxray")
    assert sum(samples(text, "ray_fluxray_denoiser_steps_total", application="fluxray")) >= 6
    # The scheduler's: each request's wait for its first step and its slowdown.
    assert sum(samples(text, "ray_fluxray_denoiser_queue_wait_s_count", application="fluxray")) >= 3
    assert sum(samples(text, "ray_fluxray_denoiser_slowdown_count", application="fluxray")) >= 3
    # Serve's own metrics come alongside.
    assert "ray_serve_deployment_request_counter" in text

    # Paths nobody routes are one label, not one series per path a scanner tried: once that request
    # shows up under "other", its own path must not be there.
    def others(text: str) -> float:
        return sum(samples(text, "ray_fluxray_requests_total", application="fluxray", route="other", code="404"))

    before = others(httpx.get(cluster.metrics_url, timeout=10).text)
    assert httpx.get(cluster.url + "/no/such/path/12345").status_code == 404

    def counted():
        text = httpx.get(cluster.metrics_url, timeout=10).text
        return text if others(text) > before else None

    text = wait_until(counted, 90, "the unrouted request under route=other", 3)
    assert 'route="/no/such/path/12345"' not in text


def test_async_jobs_are_counted_by_status_with_their_queue_wait(cluster):
    def counts(text: str, status: str) -> float:
        return sum(samples(text, "ray_fluxray_jobs_total", application="fluxray", status=status))

    before = httpx.get(cluster.metrics_url, timeout=10).text
    job = httpx.post(
        cluster.url + "/v1/images/jobs", json={"prompt": "a metric job", "size": "64x64", "num_inference_steps": 2}
    ).json()
    job_path = f"/v1/images/jobs/{job['id']}"
    wait_until(lambda: httpx.get(cluster.url + job_path).json()["status"] == "succeeded", 60, "the job", 0.2)

    def scraped():
        text = httpx.get(cluster.metrics_url, timeout=10).text
        done = all(counts(text, s) > counts(before, s) for s in ("queued", "running", "succeeded"))
        return text if done else None

    text = wait_until(scraped, 90, "the job's metrics", 3)
    assert sum(samples(text, "ray_fluxray_job_queue_wait_s_count", application="fluxray")) >= 1
    # A job's routes are labelled by template, never by id.
    assert samples(text, "ray_fluxray_requests_total", application="fluxray", route="/v1/images/jobs/{id}", code="200")
    assert job["id"] not in text
