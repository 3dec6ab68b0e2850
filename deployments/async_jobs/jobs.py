"""Async generation jobs, run by the ingress replica that took them: the record and events in the job
store (deployments.async_jobs.store), the graph through the Denoiser's streaming call, so that queue position,
step progress, ETA and previews come from the Denoiser's own step loop. The graph is the synchronous
routes' own (deployments.http.graph builds it), run by the same GraphRunner (`stream`), so a job fails as
the synchronous request would have been answered: its `error` has that answer's `status`, `type`,
`code` and `param`.

A job's life: `queued` (its record made, 202 answered) -> `running` (its first denoising step) ->
`succeeded` | `failed` | `cancelled`. Its events, in order: `queued` (position, ETA; again whenever the
position changes), `started`, `progress` (step, steps, ETA, and a preview every few steps when asked
for), then one terminal event.

- Cancel (`DELETE`): the store gets a cancel request, which the owning replica sees within
  CANCEL_POLL_S (it may be another replica) and turns into cancelling the job's task: a job still
  waiting never reaches a step, a running one leaves the Denoiser at its next step boundary.
- Capacity: a job waits for a stage that is full (Serve's queue bound) instead of failing, and the
  Denoiser admits it however long it will wait; what bounds them is `max_queued_jobs` per ingress
  replica (429 beyond it). Neither the ingress's max_pending_requests nor its request_timeout_s
  applies to a job.
- A stage replica lost under a job: the graph runs again (`stage_retries`; the seed fixes the image),
  then the job fails with status 503, as the synchronous request would.
- The owner lost (its ingress replica died): its heartbeat (HEARTBEAT_S) stops, and whoever reads the
  job after `job_lost_after_s` marks it failed with `code: job_lost, retryable: true`; the client
  submits it again. (Re-running it elsewhere would need a lease on the job; marking it failed is
  what keeps it from ever running twice.)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from deployments.async_jobs.store import JobStore, Patient
from deployments.async_jobs.webhooks import DEFAULT_EVENTS, WebhookSender
from deployments.http.errors import APIError
from deployments.http.graph import Graph
from deployments.http.graph_runner import GraphRunner
from fluxray.params import GenerationParams
from fluxray.preview import preview_image

logger = logging.getLogger("ray.serve")
TERMINAL = ("succeeded", "failed", "cancelled")
CANCEL_POLL_S = 0.25
HEARTBEAT_S = 2.0
FIRST_POSITION_WAIT_S = 2.0  # how long a POST waits for the Denoiser's first queue position
RETRYABLE = (429, 503, 504)  # a job that failed with these may succeed when submitted again


def new_job_id() -> str:
    return "imgjob_" + secrets.token_hex(12)


def links(job_id: str) -> dict[str, str]:
    base = f"/v1/images/jobs/{job_id}"
    return {"self": base, "events": f"{base}/events"}


def public(record: dict[str, Any]) -> dict[str, Any]:
    """What a client sees of a record."""
    return {k: v for k, v in record.items() if not k.startswith("_")}


def job_error(error: APIError) -> dict[str, Any]:
    """A failed job's `error`: what the synchronous route would have answered (its status, and the body's
    message, type, param and code), and whether submitting the job again may succeed."""
    return {
        "message": error.message,
        "type": error.kind,
        "code": error.code,
        "param": error.param,
        "status": error.status,
        "retryable": error.status in RETRYABLE,
    }


class AsyncJobs:
    def __init__(
        self,
        store: JobStore,
        graph: Graph,
        runner: GraphRunner,
        *,
        model_name: str,
        retry_after_s: int,
        max_queued_jobs: int,
        preview_every: int,
        result_max_bytes: int,
        lost_after_s: float,
        finish: Callable[[GenerationParams, list[bytes], str], Awaitable[list[dict[str, Any]]]],
        webhooks: WebhookSender | None = None,
        on_status: Callable[[str], None] | None = None,
        on_queue_wait: Callable[[float], None] | None = None,
    ):
        self.store, self.graph, self.runner = store, graph, runner  # the sync routes' graph and runner
        self.writer = Patient(store, lost_after_s / 2)  # a running job's own writes wait out a store restart
        self.model_name, self.retry_after_s = model_name, retry_after_s
        self.max_queued_jobs, self.preview_every = max_queued_jobs, preview_every
        self.result_max_bytes, self.lost_after_s = result_max_bytes, lost_after_s
        self.finish = finish  # the images' `data` entries (b64 or object-store URLs), as the sync route's
        self.webhooks = webhooks
        self.on_status = on_status or (lambda _: None)
        self.on_queue_wait = on_queue_wait or (lambda _: None)
        self.targets: dict[str, tuple[str, tuple[str, ...]]] = {}  # job id -> webhook URL and its events
        self.tasks: dict[str, asyncio.Task] = {}
        self.projection = None  # the VAE's latent -> RGB map, fetched for the first preview

    # --- the API -------------------------------------------------------------------------------

    async def submit(
        self,
        params: GenerationParams,
        request: dict[str, Any],
        preview: bool,
        webhook: str | None = None,
        webhook_events: list[str] | None = None,
        model: str | None = None,
    ) -> dict[str, Any]:
        """Makes the job's record, starts it, and returns its record once the Denoiser has placed it
        in its queue (or after FIRST_POSITION_WAIT_S, with no position yet). The webhook, if any, was
        checked against the server's policy by the caller (deployments.async_jobs.webhooks.validate_webhook)."""
        if len(self.tasks) >= self.max_queued_jobs:
            raise APIError(
                429,
                f"this server holds {self.max_queued_jobs} unfinished jobs per replica; retry later",
                kind="rate_limit_error",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        job_id = new_job_id()
        now = time.time()
        record = {
            "id": job_id,
            "object": "image.generation.job",
            "status": "queued",
            "model": model or self.model_name,
            "created_at": now,
            "started_at": None,
            "finished_at": None,
            "queue_position": None,
            "eta_s": None,
            "progress": {"step": 0, "steps": params.num_inference_steps},
            "request": request,
            "preview": preview,
            "webhook": webhook,
            "webhook_events": list(webhook_events or DEFAULT_EVENTS) if webhook else None,
            "links": links(job_id),
            "data": None,
            "timings": None,
            "error": None,
            "_heartbeat": now,
        }
        await self.store.create(record)
        if webhook and self.webhooks is not None:
            self.targets[job_id] = (webhook, tuple(record["webhook_events"]))
        self.on_status("queued")
        placed = asyncio.Event()
        run = self._run(job_id, params, request, preview, placed, model or self.model_name)
        self.tasks[job_id] = asyncio.create_task(run)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(placed.wait(), FIRST_POSITION_WAIT_S)
        return public(await self.get(job_id))

    async def get(self, job_id: str) -> dict[str, Any]:
        """The job's record (404 for an unknown or expired id); a job whose owner stopped beating is
        marked failed and retryable here."""
        record = await self.store.get(job_id)
        if record is None:
            message = f"no job {job_id!r} (unknown, or expired)"
            raise APIError(404, message, "id", "not_found_error", code="job_not_found")
        if record["status"] not in TERMINAL and time.time() - record["_heartbeat"] > self.lost_after_s:
            error = {
                "message": "the server replica running this job stopped; submit it again",
                "type": "server_error",
                "code": "job_lost",
                "param": None,
                "status": 503,
                "retryable": True,
            }
            record = await self._end(job_id, "failed", error=error)
        return record

    async def cancel(self, job_id: str) -> dict[str, Any]:
        record = await self.get(job_id)
        if record["status"] in TERMINAL:
            return public(record)
        await self.store.request_cancel(job_id)
        if task := self.tasks.get(job_id):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        else:  # another replica runs it: it sees the request within CANCEL_POLL_S
            deadline = time.monotonic() + 10 * CANCEL_POLL_S + 5
            while time.monotonic() < deadline and (await self.get(job_id))["status"] not in TERMINAL:
                await asyncio.sleep(CANCEL_POLL_S)
        return public(await self.get(job_id))

    # --- running a job ------------------------------------------------------------------------------

    async def _end(self, job_id: str, status: str, **fields: Any) -> dict[str, Any]:
        record = await self.writer.update(job_id, status=status, finished_at=time.time(), eta_s=0, **fields)
        data = {"status": status}
        if fields.get("error"):
            data["error"] = fields["error"]
        await self._emit(job_id, status, data)
        self.on_status(status)
        self.targets.pop(job_id, None)
        return record

    async def _emit(self, job_id: str, event: str, data: dict[str, Any]) -> None:
        """Appends an event to the job's log, and sends it to the job's webhook if it asked for it."""
        event_id = await self.writer.append(job_id, event, data)
        target = self.targets.get(job_id)
        if target and event in target[1]:
            record = await self.writer.get(job_id)
            self.webhooks.send(target[0], job_id, event_id, event, public(record))

    async def _run(
        self, job_id: str, params: GenerationParams, request: dict, preview: bool, placed: asyncio.Event, model: str
    ) -> None:
        work = asyncio.create_task(self._work(job_id, params, request, preview, placed, model))
        watcher = asyncio.create_task(self._watch(job_id, work))
        try:
            await work
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self._end(job_id, "cancelled")
        except APIError as error:
            await self._end(job_id, "failed", error=job_error(error))
        except Exception as error:  # noqa: BLE001 - a job's failure is its record's, not the server's
            logger.exception("async job %s failed", job_id)
            # As the synchronous route answers an unexpected failure (deployments.http.errors), but naming its kind.
            failure = APIError(500, f"generation failed: {type(error).__name__}", kind="server_error")
            await self._end(job_id, "failed", error=job_error(failure))
        finally:
            placed.set()
            watcher.cancel()
            self.tasks.pop(job_id, None)

    async def _watch(self, job_id: str, work: asyncio.Task) -> None:
        """The owner's heartbeat, and cancel requests from any replica."""
        beat = 0.0
        while not work.done():
            if await self.writer.cancel_requested(job_id):
                work.cancel()
                return
            if time.monotonic() - beat >= HEARTBEAT_S:
                beat = time.monotonic()
                await self.writer.update(job_id, _heartbeat=time.time())
            await asyncio.sleep(CANCEL_POLL_S)

    async def _work(
        self, job_id: str, params: GenerationParams, request: dict, preview: bool, placed: asyncio.Event, model: str
    ) -> None:
        every = self.preview_every if preview else 0
        launch = self.graph.launch_stream(params, model, every)
        decoded = await self.runner.stream(launch, lambda event: self._on_event(job_id, event, placed))
        size = sum(len(f) for f in decoded.files) * 4 // 3
        if size > self.result_max_bytes:
            raise APIError(
                413,
                f"the job's images are {size} bytes in base64, over this server's job_result_max_bytes of "
                f"{self.result_max_bytes}; ask for fewer or smaller images, or response_format=url",
                code="result_too_large",
            )
        data = await self.finish(params, decoded.files, request.get("response_format", "b64_json"))
        timings = {k: round(v * 1000, 1) for k, v in decoded.timings.items()}
        await self._end(job_id, "succeeded", data=data, timings=timings)

    async def _on_event(self, job_id: str, event: dict, placed: asyncio.Event) -> None:
        """One of the Denoiser's events (GraphRunner.stream): into the job's record and its event log."""
        kind = event["event"]
        if kind == "queued":
            await self.writer.update(job_id, queue_position=event["position"], eta_s=event["eta_s"])
            await self._emit(job_id, "queued", {"position": event["position"], "eta_s": event["eta_s"]})
            placed.set()
        elif kind == "started":
            record = await self.writer.update(job_id, status="running", started_at=time.time(), queue_position=0)
            self.on_queue_wait(record["started_at"] - record["created_at"])
            await self._emit(job_id, "started", {})
            self.on_status("running")
        elif kind == "progress":
            progress = {"step": event["step"], "steps": event["steps"]}
            await self.writer.update(job_id, progress=progress, eta_s=event["eta_s"])
            data = {**progress, "eta_s": event["eta_s"]}
            if "preview" in event:
                data["preview"] = await self._preview(event["preview"])
            await self._emit(job_id, "progress", data)

    async def _preview(self, latents) -> str:
        """A data URL of a small JPEG of the first image, from its latents (fluxray.preview)."""
        if self.projection is None:
            self.projection = await self.graph.vae.preview_projection.remote()
        jpeg = await asyncio.get_running_loop().run_in_executor(None, preview_image, latents, self.projection)
        return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
