"""Async jobs in a real redis-server, shared by two ingress replicas (the "shared" application): a job
made through one replica is read and cancelled through the other; a Redis restart mid-job answers 503
with Retry-After meanwhile, and the job and the service carry on; webhooks reach a receiver on loopback,
signed as Standard Webhooks verifies."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from local_cluster import JOB_STORE_PASSWORD, WEBHOOK_SECRET, free_port, wait_until
from standardwebhooks import Webhook

JOBS = "/v1/images/jobs"
PROMPT = "a green triangle at the top, black background"


class Redis:
    """A redis-server of this module's own on loopback, with the password the cluster's replicas hold."""

    def __init__(self, directory):
        self.port, self.directory = free_port(), directory
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--requirepass",
                JOB_STORE_PASSWORD,
                "--dir",
                str(self.directory),
                "--save",
                "1 1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: self.ping(), 30, "redis-server", 0.1)

    def ping(self) -> bool:
        done = subprocess.run(
            ["redis-cli", "-p", str(self.port), "--no-auth-warning", "-a", JOB_STORE_PASSWORD, "ping"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return done.stdout.strip() == "PONG"

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: Redis saves its data, then exits
            self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def shared(cluster, tmp_path_factory):
    redis = Redis(tmp_path_factory.mktemp("redis"))
    redis.start()
    base = cluster.config()
    try:
        cluster.deploy({**base, "applications": [*base["applications"], cluster.shared_app(redis.port)]})
        yield f"{cluster.url}/shared", redis
    finally:
        cluster.deploy(base)  # the shared application goes; the others stay as they were
        redis.stop()


def create(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}{JOBS}", json={"prompt": PROMPT, "size": "64x64", **body}, timeout=60)


def through_another_replica(method: str, url: str, not_replica: str, attempts: int = 40) -> httpx.Response:
    """The same request until a replica other than `not_replica` answers it (Serve spreads requests)."""
    for _ in range(attempts):
        response = httpx.request(method, url, timeout=60)
        if response.headers.get("x-replica") != not_replica:
            return response
    raise AssertionError(f"every answer came from {not_replica}")


def test_a_job_made_on_one_ingress_replica_is_read_and_cancelled_through_the_other(shared):
    url, _ = shared
    created = create(url, size="512x512", num_inference_steps=100, seed=21)
    assert created.status_code == 202, created.text
    owner, job = created.headers["x-replica"], created.json()
    read = through_another_replica("GET", f"{url}{JOBS}/{job['id']}", owner)
    assert read.status_code == 200 and read.json()["id"] == job["id"] and read.json()["status"] in ("queued", "running")
    wait_until(lambda: httpx.get(f"{url}{JOBS}/{job['id']}", timeout=10).json()["progress"]["step"] >= 2, 60, "steps")
    cancelled = through_another_replica("DELETE", f"{url}{JOBS}/{job['id']}", owner)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
    # The owner saw the request and stopped: its progress stays where it was.
    step = httpx.get(f"{url}{JOBS}/{job['id']}", timeout=10).json()["progress"]["step"]
    time.sleep(1.5)
    after = httpx.get(f"{url}{JOBS}/{job['id']}", timeout=10).json()
    assert after["status"] == "cancelled" and after["progress"]["step"] == step < 100


def test_a_redis_restart_mid_job_answers_503_meanwhile_and_the_job_still_finishes(shared):
    url, redis = shared
    job = create(url, num_inference_steps=60, seed=22).json()
    wait_until(lambda: httpx.get(f"{url}{JOBS}/{job['id']}", timeout=10).json()["progress"]["step"] >= 1, 60, "steps")
    redis.stop()
    try:
        down = httpx.get(f"{url}{JOBS}/{job['id']}", timeout=30)
        assert down.status_code == 503 and int(down.headers["retry-after"]) >= 1, down.text
        assert down.json()["error"]["type"] == "overloaded_error" and "job store" in down.json()["error"]["message"]
        assert create(url, num_inference_steps=2).status_code == 503
        time.sleep(1)
    finally:
        redis.start()
    done = wait_until(
        lambda: (r := httpx.get(f"{url}{JOBS}/{job['id']}", timeout=10).json())["status"] == "succeeded" and r,
        120,
        "the job to finish after Redis came back",
        0.5,
    )
    assert done["progress"] == {"step": 60, "steps": 60} and len(done["data"]) == 1
    again = create(url, num_inference_steps=2, seed=23)
    assert again.status_code == 202


class Receiver:
    def __init__(self):
        self.received: list[tuple[dict, str]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"])).decode()
                receiver.received.append((dict(self.headers), body))
                self.send_response(500 if len(receiver.received) == 1 else 204)  # the first attempt fails
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/fluxray"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_a_jobs_webhook_reaches_an_allowed_receiver_signed_and_retried(shared):
    url, _ = shared
    receiver = Receiver()
    try:
        job = create(url, num_inference_steps=4, seed=24, webhook=receiver.url, webhook_events=["started", "succeeded"])
        assert job.status_code == 202, job.text
        job = job.json()
        assert job["webhook"] == receiver.url and job["webhook_events"] == ["started", "succeeded"]

        def delivered():
            payloads = [Webhook(WEBHOOK_SECRET).verify(body, headers) for headers, body in receiver.received]
            types = sorted(p["type"].rsplit(".", 1)[1] for p in payloads)
            return payloads if types == ["started", "started", "succeeded"] else None

        payloads = wait_until(delivered, 60, "both events, the first one twice", 0.2)
    finally:
        receiver.server.shutdown()
    # The first delivery (of "started") got a 500 and was sent again with the same webhook-id; deliveries
    # are independent, so "succeeded" may come in between.
    started = [headers for (headers, _), p in zip(receiver.received, payloads) if p["type"].endswith("started")]
    assert receiver.received[0][0]["webhook-id"] == started[0]["webhook-id"] == started[1]["webhook-id"]
    payloads = [p for p in payloads if p["type"].endswith("succeeded")]
    assert payloads[-1]["data"]["id"] == job["id"] and payloads[-1]["data"]["status"] == "succeeded"
    assert len(payloads[-1]["data"]["data"]) == 1 and "_heartbeat" not in payloads[-1]["data"]
    # Hosts not listed, and loopback addresses not listed themselves, are refused up front.
    for target in ("http://127.0.0.2:9/hook", "http://localhost:9/hook", "http://169.254.169.254/latest"):
        refused = create(url, num_inference_steps=2, webhook=target)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "webhook", refused.text
    # The main application has no webhook hosts: webhooks are off there.
    main = httpx.post(
        url.removesuffix("/shared") + JOBS, json={"prompt": PROMPT, "webhook": receiver.url}, timeout=30
    ).json()
    assert main["error"]["param"] == "webhook" and "sends no webhooks" in main["error"]["message"]
    assert json.loads(receiver.received[-1][1])["data"]["id"] == job["id"]


def test_a_job_whose_ingress_replica_died_is_failed_and_retryable(shared, cluster):
    url, _ = shared
    created = create(url, size="512x512", num_inference_steps=100, seed=25)
    owner, job = created.headers["x-replica"], created.json()
    wait_until(lambda: httpx.get(f"{url}{JOBS}/{job['id']}", timeout=10).json()["progress"]["step"] >= 1, 60, "steps")
    cluster.driver(
        f"ray.kill(ray.get_actor('SERVE_REPLICA::shared#Ingress#{owner}', namespace='serve'), no_restart=True)\n"
        "print(json.dumps(True))\n"
    )
    # Nobody writes its heartbeat any more: once it is job_lost_after_s (10 s) old, the next reader (the
    # other replica) fails the job, retryable; it is never run twice.
    record = wait_until(
        lambda: (r := httpx.get(f"{url}{JOBS}/{job['id']}", timeout=10).json()).get("status") == "failed" and r,
        90,
        "the lost job to be failed",
        1,
    )
    assert record["error"]["code"] == "job_lost" and record["error"]["retryable"] is True
    assert record["progress"]["step"] < 100 and record["data"] is None
    last = httpx.get(f"{url}{JOBS}/{job['id']}", timeout=10).json()
    assert last["status"] == "failed"  # and it stays so
    # Serve replaces the killed replica; the application serves jobs again.
    shared_status = lambda: cluster.serve_status()["applications"]["shared"]["status"]  # noqa: E731
    wait_until(lambda: shared_status() == "RUNNING", 120, "the shared app", 2)
    again = create(url, num_inference_steps=2, seed=26)
    assert again.status_code == 202, again.text
