"""How the ingress runs one request's graph (encode -> denoise -> decode), for the synchronous routes
and for async jobs alike: admission, the timeout, re-runs when a stage replica dies under it, how a
stage's failure is answered, and cancelling upstream work. A plain class with its rules in one place,
tested without a cluster; the Ingress deployment and deployments.async_jobs.jobs drive it, over the stage
calls that deployments.http.graph builds.
"""

import asyncio
import logging
from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from deployments.http.errors import APIError
from deployments.stages.request_scheduler import OverTokenBudget, QueueFull, retry_after
from fluxray.lora import LoraError

logger = logging.getLogger("ray.serve")
# A stage replica that died (or is being replaced) under a request: the request is safe to run again.
REPLICA_LOST = (RayActorError, ActorUnavailableError)
# A stage that cannot take more work now (its queue is full, or it has no replica yet).
AT_CAPACITY = (BackPressureError, DeploymentUnavailableError)


def _causes(error: BaseException | None):
    """The error and what caused it: a stage's failure reaches the ingress wrapped (Ray raises
    RayTaskError whose cause is the stage's own error, also when it failed as the next stage's
    input; Serve's router may wrap that in a RayServeException whose __cause__ it is)."""
    seen = 0
    while error is not None and seen < 8:
        yield error
        error = error.cause if isinstance(error, RayTaskError) else error.__cause__
        seen += 1


def replica_lost(error: BaseException) -> bool:
    """Whether a stage failed because a replica died."""
    return any(isinstance(e, REPLICA_LOST) for e in _causes(error))


def at_capacity(error: BaseException) -> bool:
    """Whether a stage refused the call for now (its queue full, or no replica yet)."""
    return any(isinstance(e, AT_CAPACITY) for e in _causes(error))


def _innermost(error: BaseException, kind: type[BaseException]):
    """The innermost of the error and its causes that is a `kind`, if any. Ray raises a stage's error as
    an instance of both RayTaskError and the error's own class, whose str is Ray's traceback (naming
    processes, addresses and actors: never for a client); its `cause` is the stage's error itself."""
    found = None
    for e in _causes(error):
        if isinstance(e, kind):
            found = e
    return found


def lora_error(error: BaseException) -> LoraError | None:
    """A LoRA the Denoiser could not use (a broken file, keys that do not fit), if that is what this is."""
    return _innermost(error, LoraError)


def over_token_budget(error: BaseException) -> OverTokenBudget | None:
    """A request whose one image is over the Denoiser's token budget (the ingress refuses these first), if
    that is what this is."""
    return _innermost(error, OverTokenBudget)


def queue_full(error: BaseException) -> QueueFull | None:
    """The Denoiser's refusal of a request that would wait too long, if that is what this is."""
    return _innermost(error, QueueFull)


class Response(Protocol):
    """What a stage call returns (a Serve DeploymentResponse): awaitable, cancellable."""

    def __await__(self): ...

    def cancel(self) -> None: ...


# Starts one attempt of the graph: the stages' responses in order, the last one's result the files.
Launch = Callable[[], Sequence[Response]]


@dataclass
class Streamed:
    """One attempt of a streamed graph (an async job's): `responses`, the stage calls started so far
    (the Denoiser's stream among them; every one is cancelled when the attempt ends), `events`, the
    Denoiser's events ("queued", "started", "progress", then "done" with its `result`), and `then`,
    which starts the stages after the Denoiser from that result (the decode): its result is the
    attempt's."""

    responses: list[Response]
    events: AsyncIterable[dict]
    then: Callable[[Any], Response]


# Starts one attempt of a streamed graph.
StreamLaunch = Callable[[], Streamed]
# Gets each of the Denoiser's events but "done", in order, before the stream goes on.
OnEvent = Callable[[dict], Awaitable[None]]


class GraphRunner:
    """Runs attempts of a request's graph under the ingress's rules (`run`: the synchronous routes;
    `stream`: async jobs, the same rules but the three marked "sync only"):

    - more than `max_pending` requests in flight: 429 (Retry-After), nothing started (sync only: a
      job is bounded by max_queued_jobs when it is submitted);
    - a stage at capacity: 503 (Retry-After) (sync only: a job waits `retry_after_s` and runs again,
      as often as it takes);
    - the Denoiser estimates the request would wait over max_queue_wait_s: 429, Retry-After that
      estimate (seconds, rounded up);
    - a stage replica lost: the graph runs again (the seed fixes the image), `retries` times at
      most, then 503;
    - a LoRA the Denoiser cannot use (a broken file, keys that fit no module): 422, code
      lora_unusable, naming `loras`;
    - past `timeout_s`: 504 (sync only);
    - one image over the Denoiser's token budget (OverTokenBudget; the ingress refuses these
      first): 422 naming `size`;
    - any other failure: raised as it is.
    Whatever ends an attempt (success, failure, timeout, or the caller cancelled because the
    client went away), every stage response of it is cancelled, so nothing upstream keeps working.
    """

    def __init__(
        self,
        max_pending: int,
        timeout_s: float,
        retries: int,
        retry_after_s: int,
        on_retry: Callable[[BaseException], None] | None = None,
        on_in_flight: Callable[[int], None] | None = None,
    ):
        self.max_pending, self.timeout_s, self.retries = max_pending, timeout_s, retries
        self.retry_after_s = retry_after_s
        self.retry_after = {"Retry-After": str(retry_after_s)}
        self.on_retry, self.on_in_flight = on_retry, on_in_flight
        self.in_flight = 0
        self.retried = 0

    def _count(self, delta: int) -> None:
        self.in_flight += delta
        if self.on_in_flight:
            self.on_in_flight(self.in_flight)

    async def run(self, launch: Launch) -> Any:
        """A synchronous request's graph: the last stage's result, or an APIError to answer."""
        if self.in_flight >= self.max_pending:
            raise APIError(
                429, "too many requests in flight; retry later", kind="rate_limit_error", headers=self.retry_after
            )
        self._count(+1)
        try:
            return await asyncio.wait_for(self._attempts(lambda: _last(launch), wait=False), timeout=self.timeout_s)
        except asyncio.TimeoutError:
            raise APIError(504, f"request ran past the {self.timeout_s:g} s timeout", kind="timeout_error") from None
        finally:
            self._count(-1)

    async def stream(self, launch: StreamLaunch, on_event: OnEvent) -> Any:
        """An async job's graph, through the Denoiser's streaming call: each of its events goes to
        `on_event`; the last stage's result, or an APIError for the job's record. Not counted in
        `in_flight`, no timeout, and a stage at capacity makes it wait instead of failing."""
        return await self._attempts(lambda: _follow(launch, on_event), wait=True)

    async def _attempts(self, attempt: Callable[[], Awaitable[Any]], wait: bool) -> Any:
        """Runs `attempt` until it returns; each failure answered by the rules above."""
        lost = 0
        while True:
            try:
                return await attempt()
            except Exception as error:  # Ray and Serve wrap a stage's failure in several ways
                if at_capacity(error):
                    if not wait:
                        message = "the service is at capacity; retry later"
                        raise APIError(503, message, kind="overloaded_error", headers=self.retry_after) from None
                    await asyncio.sleep(self.retry_after_s)  # a full stage: a job waits, it does not fail
                    continue
                if full := queue_full(error):
                    message = f"{full}; retry later"
                    headers = {"Retry-After": str(retry_after(full.wait_s))}
                    raise APIError(429, message, kind="rate_limit_error", headers=headers) from None
                if bad := lora_error(error):
                    raise APIError(422, f"loras: {bad}", "loras", code="lora_unusable") from None
                if over := over_token_budget(error):
                    message = f"size: {over}; ask for a smaller image"
                    raise APIError(422, message, "size", code="batch_token_budget_exceeded") from None
                if not replica_lost(error):
                    raise
                if lost == self.retries:
                    message = "a stage replica failed; retry later"
                    raise APIError(503, message, kind="overloaded_error", headers=self.retry_after) from None
                lost += 1
                self.retried += 1
                if self.on_retry:
                    self.on_retry(error)
                logger.warning("stage replica lost (%s); running the request again", type(error).__name__)


async def _last(launch: Launch) -> Any:
    """One attempt of a synchronous graph: its last stage's result."""
    responses = launch()
    try:
        return await responses[-1]
    finally:
        _cancel(responses)


async def _follow(launch: StreamLaunch, on_event: OnEvent) -> Any:
    """One attempt of a streamed graph: the Denoiser's events to `on_event`, then the stages after it."""
    attempt = launch()
    try:
        async for event in attempt.events:
            if event.get("event") == "done":
                attempt.responses.append(last := attempt.then(event["result"]))
                return await last
            await on_event(event)
        raise RuntimeError("the denoiser's stream ended without a result")
    finally:
        _cancel(attempt.responses)


def _cancel(responses: Sequence[Response]) -> None:
    for response in reversed(responses):
        try:
            response.cancel()  # a no-op on a finished response
        except Exception:  # noqa: BLE001 - cancel() may re-raise a response's own failure
            pass
