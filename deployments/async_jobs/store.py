"""Where async generation jobs live: their records (status, progress, result) and their event logs.

Two stores with one interface:
- `MemoryJobStore` (`job_store: memory`, the default): in the ingress replica's own memory. Enough for
  one ingress replica (`make serve`); with several, a job is visible only on the replica that took it,
  and an ingress restart loses every job.
- `RedisJobStore` (`job_store: redis://...`): shared by every ingress replica and kept when one dies.
  A record is a hash (`fluxray:job:<id>`, one JSON value per field, so that an update writes only its
  own fields and two writers never undo each other's), its events a list (`...:events`), a cancel
  request a key of its own (`...:cancel`). Every key expires `ttl_s` after the job's last write.
  Waiting for events polls the list's length.

Records and events are plain JSON. Event ids count from 1 in the order of appending (SSE's
`Last-Event-ID`). A store that cannot be reached raises `JobStoreUnavailable` (the ingress answers 503
with Retry-After).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Protocol

KEY = "fluxray:job:"


class JobStoreUnavailable(Exception):
    """The job store did not answer (Redis down or unreachable)."""


class JobStore(Protocol):
    async def create(self, record: dict[str, Any]) -> None: ...

    async def get(self, job_id: str) -> dict[str, Any] | None: ...

    async def update(self, job_id: str, **fields: Any) -> dict[str, Any] | None: ...

    async def append(self, job_id: str, event: str, data: dict[str, Any]) -> int: ...

    async def events(self, job_id: str, after: int = 0) -> list[dict[str, Any]]: ...

    async def wait(self, job_id: str, after: int, timeout: float) -> None: ...

    async def request_cancel(self, job_id: str) -> None: ...

    async def cancel_requested(self, job_id: str) -> bool: ...

    async def close(self) -> None: ...


class MemoryJobStore:
    """Jobs in this process, expiring `ttl_s` after their last write."""

    def __init__(self, ttl_s: float, clock=time.monotonic):
        self.ttl_s, self.clock = ttl_s, clock
        self._records: dict[str, dict[str, Any]] = {}
        self._events: dict[str, list[dict[str, Any]]] = {}
        self._cancel: set[str] = set()
        self._expires: dict[str, float] = {}
        self._changed = asyncio.Condition()

    def _expire(self) -> None:
        now = self.clock()
        for job_id in [j for j, at in self._expires.items() if at <= now]:
            for table in (self._records, self._events, self._expires):
                table.pop(job_id, None)
            self._cancel.discard(job_id)

    def _touch(self, job_id: str) -> None:
        self._expires[job_id] = self.clock() + self.ttl_s

    async def create(self, record: dict[str, Any]) -> None:
        self._expire()
        self._records[record["id"]] = json.loads(json.dumps(record))
        self._events[record["id"]] = []
        self._touch(record["id"])

    async def get(self, job_id: str) -> dict[str, Any] | None:
        self._expire()
        record = self._records.get(job_id)
        return json.loads(json.dumps(record)) if record is not None else None

    async def update(self, job_id: str, **fields: Any) -> dict[str, Any] | None:
        self._expire()
        if job_id not in self._records:
            return None
        self._records[job_id].update(json.loads(json.dumps(fields)))
        self._touch(job_id)
        return await self.get(job_id)

    async def append(self, job_id: str, event: str, data: dict[str, Any]) -> int:
        events = self._events.setdefault(job_id, [])
        events.append({"id": len(events) + 1, "event": event, "data": json.loads(json.dumps(data))})
        self._touch(job_id)
        async with self._changed:
            self._changed.notify_all()
        return len(events)

    async def events(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        self._expire()
        return [dict(e) for e in self._events.get(job_id, [])[after:]]

    async def wait(self, job_id: str, after: int, timeout: float) -> None:
        async def more() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: len(self._events.get(job_id, [])) > after)

        try:
            await asyncio.wait_for(more(), timeout)
        except asyncio.TimeoutError:
            pass

    async def request_cancel(self, job_id: str) -> None:
        self._cancel.add(job_id)

    async def cancel_requested(self, job_id: str) -> bool:
        return job_id in self._cancel

    async def close(self) -> None:
        pass


class RedisJobStore:
    """Jobs in Redis (redis-py's asyncio client), shared by every ingress replica."""

    POLL_S = 0.1  # how often `wait` looks for new events

    def __init__(self, url: str, ttl_s: float, password: str | None = None):
        import redis.asyncio as redis  # noqa: PLC0415 - only where Redis is configured
        from redis.asyncio.retry import Retry  # noqa: PLC0415
        from redis.backoff import ExponentialBackoff  # noqa: PLC0415

        self.ttl = max(1, int(ttl_s))
        # Short timeouts: a request must not hang on a Redis that is down, it gets 503 at once. A pooled
        # connection that a Redis restart broke fails its next command: that command is retried on a
        # new connection (twice, within a second) before the store counts as unavailable.
        options = {
            "socket_timeout": 5,
            "socket_connect_timeout": 2,
            "decode_responses": True,
            "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
            "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
            "health_check_interval": 10,
        }
        if password:
            options["password"] = password
        self.redis = redis.from_url(url, **options)
        self._errors = (redis.ConnectionError, redis.TimeoutError, OSError)

    async def _call(self, coroutine):
        try:
            return await coroutine
        except self._errors as error:
            raise JobStoreUnavailable(f"the job store (Redis) did not answer: {type(error).__name__}") from None

    async def create(self, record: dict[str, Any]) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(KEY + record["id"], mapping={k: json.dumps(v) for k, v in record.items()})
            pipe.expire(KEY + record["id"], self.ttl)
            await self._call(pipe.execute())

    async def get(self, job_id: str) -> dict[str, Any] | None:
        fields = await self._call(self.redis.hgetall(KEY + job_id))
        return {k: json.loads(v) for k, v in fields.items()} if fields else None

    async def update(self, job_id: str, **fields: Any) -> dict[str, Any] | None:
        """Writes these fields only (a record that expired is not made again); the record after."""
        if not await self._call(self.redis.exists(KEY + job_id)):
            return None
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(KEY + job_id, mapping={k: json.dumps(v) for k, v in fields.items()})
            pipe.expire(KEY + job_id, self.ttl)
            pipe.hgetall(KEY + job_id)
            *_, record = await self._call(pipe.execute())
        return {k: json.loads(v) for k, v in record.items()}

    async def append(self, job_id: str, event: str, data: dict[str, Any]) -> int:
        key = KEY + job_id + ":events"
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.llen(key)
            pipe.rpush(key, json.dumps({"event": event, "data": data}))
            pipe.expire(key, self.ttl)
            pipe.expire(KEY + job_id, self.ttl)
            _, length, _, _ = await self._call(pipe.execute())
        return length

    async def events(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        values = await self._call(self.redis.lrange(KEY + job_id + ":events", after, -1))
        return [{"id": after + i + 1, **json.loads(v)} for i, v in enumerate(values)]

    async def wait(self, job_id: str, after: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self._call(self.redis.llen(KEY + job_id + ":events")) > after:
                return
            await asyncio.sleep(self.POLL_S)

    async def request_cancel(self, job_id: str) -> None:
        await self._call(self.redis.set(KEY + job_id + ":cancel", "1", ex=self.ttl))

    async def cancel_requested(self, job_id: str) -> bool:
        return bool(await self._call(self.redis.exists(KEY + job_id + ":cancel")))

    async def close(self) -> None:
        await self.redis.aclose()


def open_store(spec: str, ttl_s: float, password: str | None = None) -> JobStore:
    """`memory`, or a `redis://` / `rediss://` URL, with the password given apart (from a Secret)."""
    if spec == "memory":
        return MemoryJobStore(ttl_s)
    return RedisJobStore(spec, ttl_s, password)


class Patient:
    """A store for a job's own writes: a call the store did not answer is made again every RETRY_S for up
    to `patience_s`, so a Redis restart pauses a running job's reports instead of failing the job.
    (Requests' reads go to the store itself and fail at once, with 503.)"""

    RETRY_S = 0.5

    def __init__(self, store: JobStore, patience_s: float):
        self.store, self.patience_s = store, patience_s

    def __getattr__(self, name: str):
        method = getattr(self.store, name)

        async def patient(*args: Any, **kwargs: Any) -> Any:
            deadline = time.monotonic() + self.patience_s
            while True:
                try:
                    return await method(*args, **kwargs)
                except JobStoreUnavailable:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(self.RETRY_S)

        return patient
