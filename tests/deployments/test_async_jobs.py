"""Async generation jobs over the real Serve graph (the in-memory job store of the local config): the
202 and its links, SSE events in order and resumed with Last-Event-ID, previews, the result equal to
the synchronous route's image, queue positions from the Denoiser, cancel while queued and while
running, expiry, unknown ids, and bad bodies."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from image_checks import max_pixel_diff
from local_cluster import wait_until
from PIL import Image

JOBS = "/v1/images/jobs"


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def create(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}{JOBS}", json={"prompt": "a red circle on the left, blue background", **body}, timeout=60)


def events(url: str, job_id: str, last_event_id: int | None = None, timeout: float = 120) -> list[dict]:
    """Every SSE event of the job until its terminal one: id, event and data, in order."""
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    out, current = [], {}
    with httpx.stream("GET", f"{url}{JOBS}/{job_id}/events", headers=headers, timeout=timeout) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                if current:
                    out.append(current)
                    current = {}
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(": ")
            current[field] = int(value) if field == "id" else json.loads(value) if field == "data" else value
    return out


def test_a_job_answers_202_then_streams_its_steps_and_ends_with_the_synchronous_image(cluster):
    body = {"size": "64x64", "num_inference_steps": 6, "seed": 4242, "preview": True}
    created = create(cluster.url, **body)
    assert created.status_code == 202, created.text
    job = created.json()
    assert created.headers["location"] == f"{JOBS}/{job['id']}" == job["links"]["self"]
    assert job["status"] in ("queued", "running") and job["links"]["events"] == f"{JOBS}/{job['id']}/events"
    assert isinstance(job["queue_position"], int) and job["queue_position"] >= 0  # the Denoiser placed it
    assert job["progress"]["steps"] == 6 and job["request"]["seed"] == 4242

    stream = events(cluster.url, job["id"])
    names = [e["event"] for e in stream]
    assert [e["id"] for e in stream] == list(range(1, len(stream) + 1))
    first_started = names.index("started")
    assert set(names[:first_started]) == {"queued"} and names[-1] == "succeeded", names
    progress = [e["data"] for e in stream if e["event"] == "progress"]
    assert [p["step"] for p in progress] == [1, 2, 3, 4, 5, 6] and all(p["steps"] == 6 for p in progress)
    assert all(p["eta_s"] >= 0 for p in progress) and progress[-1]["eta_s"] <= progress[0]["eta_s"]
    # Previews every 4 steps (the default) and at the last: 64x64 images preview at 8x8, from the latents.
    previews = {p["step"]: p["preview"] for p in progress if "preview" in p}
    assert sorted(previews) == [4, 6]
    header, _, data = previews[6].partition(",")
    assert header == "data:image/jpeg;base64" and Image.open(io.BytesIO(base64.b64decode(data))).size == (8, 8)

    done = httpx.get(f"{cluster.url}{JOBS}/{job['id']}", timeout=30).json()
    assert done["status"] == "succeeded" and done["progress"] == {"step": 6, "steps": 6} and done["error"] is None
    assert done["created_at"] <= done["started_at"] <= done["finished_at"] and done["queue_position"] == 0
    sync = httpx.post(
        f"{cluster.url}/v1/images/generations",
        json={
            "prompt": "a red circle on the left, blue background",
            "size": "64x64",
            "num_inference_steps": 6,
            "seed": 4242,
        },
        timeout=120,
    ).json()
    (image,) = done["data"]
    assert image["seed"] == 4242
    assert (
        max_pixel_diff(
            pixels(base64.b64decode(image["b64_json"])), pixels(base64.b64decode(sync["data"][0]["b64_json"]))
        )
        <= 2
    )
    # The preview is a rough picture of the same image (a linear map of the latents, not the VAE): closer to
    # it than to the image of another job with another background.
    other = create(cluster.url, **{**body, "prompt": "a black square on the right, yellow background"}).json()
    other_events = events(cluster.url, other["id"])
    other_preview = [e["data"]["preview"] for e in other_events if "preview" in e.get("data", {})][-1]
    other_done = httpx.get(f"{cluster.url}{JOBS}/{other['id']}", timeout=30).json()

    def small(image_b64: str) -> np.ndarray:  # the image averaged over 8x8 blocks: the preview's grid
        return pixels(base64.b64decode(image_b64)).reshape(8, 8, 8, 8, 3).mean(axis=(1, 3))

    def preview_pixels(url: str) -> np.ndarray:
        return pixels(base64.b64decode(url.partition(",")[2])).astype(float)

    finals = [small(image["b64_json"]), small(other_done["data"][0]["b64_json"])]
    for mine, preview in enumerate([preview_pixels(previews[6]), preview_pixels(other_preview)]):
        distances = [np.abs(preview - final).mean() for final in finals]
        assert distances[mine] < distances[1 - mine], distances

    # Reconnecting with Last-Event-ID resumes right after that event.
    resumed = events(cluster.url, job["id"], last_event_id=3)
    assert resumed == stream[3:]


def test_prefer_respond_async_on_the_generations_route_answers_a_job(cluster):
    response = httpx.post(
        f"{cluster.url}/v1/images/generations",
        json={"prompt": "a blue square", "size": "64x64", "num_inference_steps": 2, "seed": 7},
        headers={"Prefer": "respond-async, wait=10"},
        timeout=60,
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["object"] == "image.generation.job" and response.headers["location"] == job["links"]["self"]
    assert events(cluster.url, job["id"])[-1]["event"] == "succeeded"


def denoiser_stats(cluster) -> dict:
    return cluster.handle_call("fluxray", "Denoiser", "stats")


def test_positions_come_down_as_the_jobs_ahead_finish(cluster):
    # srpt runs the least work first and one size per transformer call: the 256x256 job waits for the two
    # smaller ones, whatever the order they came in. The Denoiser orders by step costs it has measured: a
    # step of each size first (the ingress's warm-up measured only the default size's), so the order is
    # the work's, not that of what it has seen so far. The smaller jobs must still be running when the
    # last POST queues its job (30, then 80 steps of 128x128 sent one POST after another ended before it
    # on CI): they are sent together and take the most steps a request may (100), the last sent once both
    # are placed; the records' times say so if that premise fails again.
    for side in (128, 192, 256):
        body = {"prompt": "a red circle", "size": f"{side}x{side}", "num_inference_steps": 2, "seed": 1}
        assert httpx.post(f"{cluster.url}/v1/images/generations", json=body, timeout=60).status_code == 200

    def submit(side: int) -> dict:
        created = create(cluster.url, size=f"{side}x{side}", num_inference_steps=100, seed=side)
        assert created.status_code == 202, created.text
        return created.json()

    with ThreadPoolExecutor(2) as pool:
        jobs = [*pool.map(submit, (128, 192)), submit(256)]
    stream = events(cluster.url, jobs[2]["id"])
    positions = [e["data"]["position"] for e in stream if e["event"] == "queued"]
    records = [httpx.get(f"{cluster.url}{JOBS}/{job['id']}", timeout=30).json() for job in jobs]
    ended_before = [(r["finished_at"] or float("inf")) < records[2]["created_at"] for r in records[:2]]
    assert not any(ended_before), f"a smaller job ended before the last was queued: {ended_before}"
    assert positions[0] == 2 and positions == sorted(positions, reverse=True) and positions[-1] <= 1, positions
    assert stream[-1]["event"] == "succeeded"
    for job in jobs[:2]:
        assert events(cluster.url, job["id"])[-1]["event"] == "succeeded"


def test_a_job_cancelled_while_it_runs_stops_stepping(cluster):
    job = create(cluster.url, size="512x512", num_inference_steps=100, seed=1).json()  # ~25 s alone
    wait_until(
        lambda: httpx.get(f"{cluster.url}{JOBS}/{job['id']}", timeout=10).json()["progress"]["step"] >= 3,
        60,
        "the job to step",
        0.2,
    )
    before = denoiser_stats(cluster)
    cancelled = httpx.delete(f"{cluster.url}{JOBS}/{job['id']}", timeout=30)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text

    def settled():  # idle, and the step that ran when the cancel came has ended (its count no longer moves)
        first = denoiser_stats(cluster)
        time.sleep(0.5)
        return first["active"] == 0 and denoiser_stats(cluster)["steps"] == first["steps"] and first

    stats = wait_until(settled, 30, "the denoiser to go idle", 0.2)
    assert stats["cancelled"] > before["cancelled"]
    time.sleep(1)
    # Its slot was freed: the step count stopped short of the 100 steps, and stays there.
    assert denoiser_stats(cluster)["steps"] == stats["steps"] < before["steps"] + 90
    stream = events(cluster.url, job["id"])
    assert stream[-1]["event"] == "cancelled" and "succeeded" not in [e["event"] for e in stream]
    record = httpx.get(f"{cluster.url}{JOBS}/{job['id']}", timeout=10).json()
    assert record["status"] == "cancelled" and record["data"] is None and record["progress"]["step"] < 100
    # Cancelling again changes nothing.
    assert httpx.delete(f"{cluster.url}{JOBS}/{job['id']}", timeout=30).json()["status"] == "cancelled"


def test_a_job_cancelled_while_queued_never_runs(cluster):
    blocker = create(cluster.url, size="512x512", num_inference_steps=100, seed=2).json()
    wait_until(
        lambda: httpx.get(f"{cluster.url}{JOBS}/{blocker['id']}", timeout=10).json()["status"] == "running",
        60,
        "the first job to run",
        0.2,
    )
    # Larger, so srpt keeps it behind the blocker.
    queued = create(cluster.url, size="768x768", num_inference_steps=100, seed=3).json()
    assert queued["status"] == "queued" and queued["queue_position"] >= 1, queued
    cancelled = httpx.delete(f"{cluster.url}{JOBS}/{queued['id']}", timeout=30).json()
    assert cancelled["status"] == "cancelled" and cancelled["started_at"] is None
    names = [e["event"] for e in events(cluster.url, queued["id"])]
    assert names[-1] == "cancelled" and not {"started", "progress"} & set(names), names
    httpx.delete(f"{cluster.url}{JOBS}/{blocker['id']}", timeout=30)


def test_unknown_and_malformed_job_ids_are_404_and_bad_bodies_name_the_field(cluster):
    for job_id in ("imgjob_" + "0" * 24, "nope", "imgjob_../../etc"):
        for method, path in (("GET", ""), ("DELETE", ""), ("GET", "/events")):
            r = httpx.request(method, f"{cluster.url}{JOBS}/{job_id}{path}", timeout=10)
            assert r.status_code == 404, (method, path, r.text)
            assert r.json()["error"]["code"] == "job_not_found" if job_id.startswith("imgjob_0") else True
    bad = create(cluster.url, preview="often")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "preview"
    bad = create(cluster.url, num_inference_steps=0)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "num_inference_steps"


def test_a_finished_job_expires_after_its_ttl(cluster):
    # The "tight" application keeps job records for job_ttl_s = 3.
    job = create(cluster.tight_url, size="64x64", num_inference_steps=2, seed=5).json()
    assert events(cluster.tight_url, job["id"])[-1]["event"] == "succeeded"
    assert httpx.get(f"{cluster.tight_url}{JOBS}/{job['id']}", timeout=10).status_code == 200
    time.sleep(3.5)
    gone = httpx.get(f"{cluster.tight_url}{JOBS}/{job['id']}", timeout=10)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "job_not_found"


def test_many_clients_can_follow_one_job(cluster):
    job = create(cluster.url, size="64x64", num_inference_steps=8, seed=11).json()
    results: list[list[dict]] = []

    def follow():
        results.append(events(cluster.url, job["id"]))

    threads = [threading.Thread(target=follow) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and all(r == results[0] for r in results) and results[0][-1]["event"] == "succeeded"
