"""A job's events as Server-Sent Events: what GET /v1/images/jobs/{id}/events streams, from the job store,
resumable after any event (Last-Event-ID)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from deployments.async_jobs.jobs import TERMINAL, AsyncJobs
from deployments.async_jobs.store import JobStoreUnavailable
from deployments.http.errors import APIError


def sse(event: dict) -> str:
    """One Server-Sent Event: its id (for Last-Event-ID), its type and its JSON data."""
    return f"id: {event['id']}\nevent: {event['event']}\ndata: {json.dumps(event['data'])}\n\n"


async def event_stream(jobs: AsyncJobs, job_id: str, after: int, keepalive_s: float) -> AsyncIterator[str]:
    """The job's events after event `after`, as they come, until its terminal one; a comment line every
    `keepalive_s` the job is quiet. Ends, without an error, when the store is out of reach (the client
    reconnects with Last-Event-ID)."""
    store = jobs.store
    try:
        while True:
            for event in await store.events(job_id, after):
                yield sse(event)
                after = event["id"]
                if event["event"] in TERMINAL:
                    return
            record = await jobs.get(job_id)  # marks a job whose owner died as failed
            if record["status"] in TERMINAL and not await store.events(job_id, after):
                return
            await store.wait(job_id, after, keepalive_s)
            if not await store.events(job_id, after):
                yield ": keep-alive\n\n"
    except (JobStoreUnavailable, APIError):
        return
