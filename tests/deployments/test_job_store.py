"""The async jobs' stores, without a cluster: the in-memory one and the Redis one (a real redis-server
on loopback) behave alike — records, ordered events from any id on, waiting for new ones, cancel
requests, expiry — and a Redis that is down is JobStoreUnavailable at once, while Patient waits it out."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import time

import pytest
from local_cluster import free_port, wait_until

from deployments.async_jobs.store import JobStoreUnavailable, MemoryJobStore, Patient, RedisJobStore

PASSWORD = secrets.token_hex(8)


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory):
    port = free_port()
    directory = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--requirepass",
            PASSWORD,
            "--dir",
            str(directory),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(
            lambda: asyncio.run(RedisJobStore(f"redis://127.0.0.1:{port}/0", 60, PASSWORD).get("x")) is None,
            30,
            "redis",
            0.1,
        )
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


def stores(redis_port: int, ttl_s: float):
    return [MemoryJobStore(ttl_s), RedisJobStore(f"redis://127.0.0.1:{redis_port}/0", ttl_s, PASSWORD)]


def test_records_events_waits_and_cancels_behave_alike(redis_port):
    async def scenario(store) -> None:
        job_id = "imgjob_" + secrets.token_hex(12)
        assert await store.get(job_id) is None
        await store.create({"id": job_id, "status": "queued", "progress": {"step": 0}})
        assert (await store.update(job_id, status="running", progress={"step": 1}))["status"] == "running"
        assert await store.update("imgjob_" + "f" * 24, status="running") is None  # unknown: nothing made
        ids = [await store.append(job_id, name, {"n": i}) for i, name in enumerate(["queued", "started", "progress"])]
        assert ids == [1, 2, 3]
        tail = await store.events(job_id, after=1)
        assert [(e["id"], e["event"], e["data"]) for e in tail] == [(2, "started", {"n": 1}), (3, "progress", {"n": 2})]
        started = time.monotonic()
        await store.wait(job_id, after=3, timeout=0.3)  # nothing new: returns at the timeout
        assert time.monotonic() - started >= 0.25

        async def later():
            await asyncio.sleep(0.2)
            await store.append(job_id, "succeeded", {})

        task = asyncio.ensure_future(later())
        started = time.monotonic()
        await store.wait(job_id, after=3, timeout=10)  # returns once the new event is there
        assert time.monotonic() - started < 5 and (await store.events(job_id, 3))[0]["event"] == "succeeded"
        await task
        assert not await store.cancel_requested(job_id)
        await store.request_cancel(job_id)
        assert await store.cancel_requested(job_id)
        assert (await store.get(job_id))["progress"] == {"step": 1}
        await store.close()

    for store in stores(redis_port, 60):
        asyncio.run(scenario(store))


def test_records_expire_after_their_last_write(redis_port):
    async def scenario(store) -> None:
        job_id = "imgjob_" + secrets.token_hex(12)
        await store.create({"id": job_id, "status": "queued"})
        await store.append(job_id, "queued", {})
        await asyncio.sleep(1.2)
        await store.update(job_id, status="running")  # a write: the clock starts again
        await asyncio.sleep(1.2)
        assert (await store.get(job_id))["status"] == "running"
        await asyncio.sleep(1.3)
        assert await store.get(job_id) is None and await store.events(job_id) == []
        await store.close()

    for store in stores(redis_port, 2):
        asyncio.run(scenario(store))


def test_a_redis_that_is_down_is_unavailable_at_once_and_patience_waits_for_it(redis_port):
    down = RedisJobStore(f"redis://127.0.0.1:{free_port()}/0", 60)

    async def unavailable():
        started = time.monotonic()
        with pytest.raises(JobStoreUnavailable, match="did not answer"):
            await down.get("imgjob_" + "0" * 24)
        return time.monotonic() - started

    assert asyncio.run(unavailable()) < 5

    async def patient():
        patient_store = Patient(down, patience_s=1.0)
        started = time.monotonic()
        with pytest.raises(JobStoreUnavailable):
            await patient_store.get("imgjob_" + "0" * 24)
        return time.monotonic() - started

    assert 1.0 <= asyncio.run(patient()) < 8
