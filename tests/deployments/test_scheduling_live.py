"""The scheduler through the live Serve graph (local config, srpt): a short request overtakes long
ones, every answer carries Server-Timing, and a request the denoiser would keep waiting too long
gets 429 with a Retry-After that is the estimated wait, not the constant."""

from __future__ import annotations

import base64
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from local_cluster import wait_until

TIMING = re.compile(r"^queue;dur=[\d.]+, encode;dur=[\d.]+, denoise;dur=[\d.]+, decode;dur=[\d.]+, total;dur=[\d.]+$")


def post(url: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json=body, timeout=timeout)


def test_server_timing_on_both_routes(cluster):
    body = {"prompt": "a teapot", "size": "64x64", "num_inference_steps": 3, "seed": 4}
    response = post(cluster.url, body)
    assert response.status_code == 200, response.text
    assert TIMING.match(response.headers["server-timing"]), response.headers["server-timing"]
    timings = response.json()["timings"]
    assert list(timings) == ["queue", "encode", "denoise", "decode", "total"]
    assert timings["total"] >= timings["queue"] + timings["denoise"] + timings["decode"] > 0
    raw = httpx.post(f"{cluster.url}/generate", json=body, timeout=120)
    assert raw.status_code == 200 and raw.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert TIMING.match(raw.headers["server-timing"]), raw.headers["server-timing"]


def test_a_short_request_sent_after_long_ones_finishes_first(cluster):
    # Four 100-step requests of two images fill the local Denoiser's batch (8 images); a 2-step
    # request sent after them runs at the next step boundary under srpt (under fifo it would wait
    # for the batch to finish) and is answered before any of them.
    finished: dict[str, float] = {}
    lock = threading.Lock()

    def run(name: str, body: dict) -> int:
        response = post(cluster.url, {"prompt": name, "size": "256x256", **body})
        with lock:
            finished[name] = time.monotonic()
        return response.status_code

    before = cluster.handle_call("fluxray", "Denoiser", "stats")
    with ThreadPoolExecutor(5) as pool:
        longs = [pool.submit(run, f"long {i}", {"n": 2, "num_inference_steps": 100, "seed": i}) for i in range(4)]
        time.sleep(2)  # the long ones are stepping (100 steps of 8 images take ~10 s here)
        short = pool.submit(run, "short", {"num_inference_steps": 2, "seed": 9})
        codes = [f.result() for f in [*longs, short]]
    assert codes == [200] * 5
    assert finished["short"] < min(t for name, t in finished.items() if name.startswith("long")), finished
    after = cluster.handle_call("fluxray", "Denoiser", "stats")
    assert after["preemptions"] > before["preemptions"]


def test_a_request_that_would_wait_too_long_gets_429_with_the_estimate(cluster):
    # Four 1024x1024 images of 50 steps are ~80 s of work for the tiny model on one CPU thread,
    # over local.yaml's max_queue_wait_s of 30: a second such request is refused at once.
    heavy = {"prompt": "a heavy one", "size": "1024x1024", "n": 4, "num_inference_steps": 50}
    first = threading.Thread(target=lambda: _post_and_give_up(cluster.url, heavy, after_s=8))
    first.start()
    wait_until(lambda: cluster.handle_call("fluxray", "Denoiser", "stats")["active"] >= 1, 60, "the first request")
    time.sleep(2)  # a few steps measured
    started = time.monotonic()
    refused = post(cluster.url, {**heavy, "seed": 2})
    assert refused.status_code == 429, refused.text
    assert time.monotonic() - started < 5  # refused up front, not after waiting
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and "queue" in error["message"]
    assert int(refused.headers["retry-after"]) > 30  # the estimate, not retry_after_s (1 here)
    first.join()
    wait_until(lambda: cluster.handle_call("fluxray", "Denoiser", "stats")["active"] == 0, 60, "the queue to drain")
    small = post(cluster.url, {"prompt": "after", "size": "64x64", "num_inference_steps": 2})
    assert small.status_code == 200 and base64.b64decode(small.json()["data"][0]["b64_json"])[:4] == b"\x89PNG"


def _post_and_give_up(url: str, body: dict, after_s: float) -> None:
    try:
        post(url, body, timeout=after_s)
    except httpx.TimeoutException:
        pass  # the client leaves; its denoising is dropped at the next step
