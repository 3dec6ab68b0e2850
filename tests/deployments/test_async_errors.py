"""An async job fails as the synchronous route answers: every error the sync route maps, driven through
both routes, gets the same HTTP status, type, code and param: refused at submit time for what the
ingress checks first (unknown LoRA, token and pixel budgets, prompt length), in the failed job's
`error` for what the graph meets (a LoRA the Denoiser cannot use). A full queue is a 429 on both, though
not the same bound: the Denoiser refuses a sync request that would wait too long and admits a job however
long it waits (jobs are bounded per ingress by max_queued_jobs instead). A replica lost on every re-run
(503) is tests/deployments/test_graph_runner.py's (the same runner for both routes): it takes a replica
killed stage_retries + 1 times under one request."""

from __future__ import annotations

import time

import httpx
import pytest
from local_cluster import GUARDED_AUTH, GUARDED_PIXEL_STEPS, wait_until

JOBS = "/v1/images/jobs"
GENERATIONS = "/v1/images/generations"
PROMPT = "a red circle on the left, blue background"
SMALL = {"size": "64x64", "num_inference_steps": 2}


def answer(response: httpx.Response) -> tuple:
    error = response.json()["error"]
    return response.status_code, error["type"], error["code"], error["param"]


def job_answer(record: dict) -> tuple:
    error = record["error"]
    return error["status"], error["type"], error["code"], error["param"]


def finished(url: str, job_id: str, headers: dict | None = None, timeout: float = 120) -> dict:
    def done():
        record = httpx.get(f"{url}{JOBS}/{job_id}", headers=headers, timeout=10).json()
        return record if record["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_until(done, timeout, f"job {job_id} to end", 0.2)


def both_routes(url: str, body: dict, headers: dict | None = None) -> dict[str, httpx.Response]:
    """The sync route's answer, and the async ones': POST /v1/images/jobs and `Prefer: respond-async`."""
    prefer = {**(headers or {}), "Prefer": "respond-async"}
    return {
        "sync": httpx.post(f"{url}{GENERATIONS}", json=body, headers=headers, timeout=120),
        "jobs": httpx.post(f"{url}{JOBS}", json=body, headers=headers, timeout=60),
        "prefer": httpx.post(f"{url}{GENERATIONS}", json=body, headers=prefer, timeout=60),
    }


REFUSED_AT_SUBMIT = {
    "unknown lora": ("url", {"loras": [{"name": "nope", "scale": 1.0}]}, (404, "not_found_error", "lora_not_found")),
    "token budget": ("url", {"size": "2048x2048"}, (422, "invalid_request_error", "batch_token_budget_exceeded")),
    "pixel budget": (
        "guarded_url",
        {"size": "256x256", "num_inference_steps": 2 * GUARDED_PIXEL_STEPS // (256 * 256)},
        (422, "invalid_request_error", "pixel_budget_exceeded"),
    ),
    "prompt length": ("guarded_url", {"prompt": "x" * 301}, (422, "invalid_request_error", "too_long")),
}


@pytest.mark.parametrize("case", list(REFUSED_AT_SUBMIT))
def test_what_the_ingress_checks_first_is_refused_the_same_on_both_routes(cluster, case):
    where, fields, (status, kind, code) = REFUSED_AT_SUBMIT[case]
    headers = GUARDED_AUTH if where == "guarded_url" else None
    answers = both_routes(getattr(cluster, where), {"prompt": PROMPT, **SMALL, **fields}, headers)
    sync = answer(answers["sync"])
    assert sync[:3] == (status, kind, code), answers["sync"].text
    for route in ("jobs", "prefer"):
        assert answer(answers[route]) == sync, (route, answers[route].text)


def test_an_unusable_lora_fails_the_job_as_the_sync_route_answers(cluster):
    body = {"prompt": PROMPT, "loras": [{"name": "misfit", "scale": 1.0}], **SMALL}
    answers = both_routes(cluster.url, body)
    sync = answers["sync"]
    assert answer(sync) == (422, "invalid_request_error", "lora_unusable", "loras"), sync.text
    for route in ("jobs", "prefer"):
        assert answers[route].status_code == 202, answers[route].text
        record = finished(cluster.url, answers[route].json()["id"])
        assert record["status"] == "failed" and job_answer(record) == answer(sync), record["error"]
        assert record["error"]["message"] == sync.json()["error"]["message"]  # names the keys that do not fit
        assert record["error"]["retryable"] is False
    # The job's events end with the same error.
    with httpx.stream("GET", f"{cluster.url}{JOBS}/{answers['jobs'].json()['id']}/events", timeout=30) as events:
        assert '"code": "lora_unusable"' in events.read().decode().strip().splitlines()[-1]


def test_a_full_queue_is_a_429_on_both_routes(cluster):
    # Sync: a request the Denoiser estimates would wait over max_queue_wait_s (30 s in local.yaml) is refused
    # 429. Four 1024x1024 images of 50 steps are ~80 s of work here: one runs (as a job), the next is refused.
    heavy = {"prompt": "a heavy one", "size": "1024x1024", "n": 4, "num_inference_steps": 50}
    first = httpx.post(f"{cluster.url}{JOBS}", json={**heavy, "seed": 1}, timeout=60).json()
    jobs = [first["id"]]
    try:
        wait_until(
            lambda: httpx.get(f"{cluster.url}{JOBS}/{first['id']}", timeout=10).json()["status"] == "running",
            90,
            "the heavy job to run",
            0.2,
        )
        time.sleep(2)  # a few steps measured
        refused = httpx.post(f"{cluster.url}{GENERATIONS}", json={**heavy, "seed": 2}, timeout=30)
        assert answer(refused) == (429, "rate_limit_error", None, None), refused.text
        assert int(refused.headers["retry-after"]) > 30
        # The same body as a job is admitted however long it will wait: it queues instead.
        queued = httpx.post(f"{cluster.url}{JOBS}", json={**heavy, "seed": 2}, timeout=60)
        assert queued.status_code == 202, queued.text
        jobs.append(queued.json()["id"])
        assert queued.json()["status"] == "queued"
    finally:
        for job_id in jobs:
            httpx.delete(f"{cluster.url}{JOBS}/{job_id}", timeout=60)
    wait_until(lambda: cluster.handle_call("fluxray", "Denoiser", "stats")["active"] == 0, 60, "the denoiser to drain")

    # Async: the "tight" application holds max_queued_jobs = 2 unfinished jobs; the third is refused 429.
    slow = {"prompt": "a slow one", "size": "512x512", "num_inference_steps": 100}
    held = [httpx.post(f"{cluster.tight_url}{JOBS}", json={**slow, "seed": i}, timeout=60) for i in range(2)]
    try:
        assert [r.status_code for r in held] == [202, 202], [r.text for r in held]
        body = {"prompt": PROMPT, **SMALL}
        for refused in (
            httpx.post(f"{cluster.tight_url}{JOBS}", json=body, timeout=60),
            httpx.post(f"{cluster.tight_url}{GENERATIONS}", json=body, headers={"Prefer": "respond-async"}, timeout=60),
        ):
            assert answer(refused) == (429, "rate_limit_error", None, None), refused.text
            assert refused.headers["retry-after"] == "7"  # as the sync route's 429 for max_pending_requests
    finally:
        for r in held:
            if r.status_code == 202:
                httpx.delete(f"{cluster.tight_url}{JOBS}/{r.json()['id']}", timeout=60)
