"""How the ingress runs one request's graph (encode -> denoise -> decode): admission, the timeout,
re-runs when a stage replica dies under it, and cancelling upstream work. A plain class with its
rules in one place, tested without a cluster; the Ingress deployment drives it.
"""

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from deployments.errors import APIError
from deployments.scheduler import QueueFull, retry_after
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


def lora_error(error: BaseException) -> LoraError | None:
    """A LoRA the Denoiser could not use (a broken file, keys that do not fit), if that is what this is."""
    return next((e for e in _causes(error) if isinstance(e, LoraError)), None)


def queue_full(error: BaseException) -> QueueFull | None:
    """The Denoiser's refusal of a request that would wait too long, if that is what this is."""
    return next((e for e in _causes(error) if isinstance(e, QueueFull)), None)


class Response(Protocol):
    """What a stage call returns (a Serve DeploymentResponse): awaitable, cancellable."""

    def __await__(self): ...

    def cancel(self) -> None: ...


# Starts one attempt of the graph: the stages' responses in order, the last one's result the files.
Launch = Callable[[], Sequence[Response]]


class GraphRunner:
    """Runs attempts of a request's graph under the ingress's rules:

    - more than `max_pending` requests in flight: 429 (Retry-After), nothing started;
    - a stage at capacity: 503 (Retry-After);
    - the Denoiser estimates the request would wait over max_queue_wait_s: 429, Retry-After that
      estimate (seconds, rounded up);
    - a stage replica lost: the graph runs again (the seed fixes the image), `retries` times at
      most, then 503;
    - past `timeout_s`: 504;
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
        self.retry_after = {"Retry-After": str(retry_after_s)}
        self.on_retry, self.on_in_flight = on_retry, on_in_flight
        self.in_flight = 0
        self.retried = 0

    def _count(self, delta: int) -> None:
        self.in_flight += delta
        if self.on_in_flight:
            self.on_in_flight(self.in_flight)

    async def run(self, launch: Launch) -> Any:
        if self.in_flight >= self.max_pending:
            raise APIError(
                429, "too many requests in flight; retry later", kind="rate_limit_error", headers=self.retry_after
            )
        self._count(+1)
        try:
            return await asyncio.wait_for(self._attempts(launch), timeout=self.timeout_s)
        except asyncio.TimeoutError:
            raise APIError(504, f"request ran past the {self.timeout_s:g} s timeout", kind="timeout_error") from None
        except AT_CAPACITY:
            message = "the service is at capacity; retry later"
            raise APIError(503, message, kind="overloaded_error", headers=self.retry_after) from None
        finally:
            self._count(-1)

    async def _attempts(self, launch: Launch) -> Any:
        for attempt in range(self.retries + 1):
            responses = launch()
            try:
                return await responses[-1]
            except Exception as error:  # Ray and Serve wrap a lost replica in several ways
                if full := queue_full(error):
                    message = f"{full}; retry later"
                    headers = {"Retry-After": str(retry_after(full.wait_s))}
                    raise APIError(429, message, kind="rate_limit_error", headers=headers) from None
                if bad := lora_error(error):
                    raise APIError(422, f"loras: {bad}", "loras", code="lora_unusable") from None
                if not replica_lost(error):
                    raise
                if attempt == self.retries:
                    message = "a stage replica failed; retry later"
                    raise APIError(503, message, kind="overloaded_error", headers=self.retry_after) from None
                self.retried += 1
                if self.on_retry:
                    self.on_retry(error)
                logger.warning("stage replica lost (%s); running the request again", type(error).__name__)
            finally:
                _cancel(responses)
        raise AssertionError("unreachable")


def _cancel(responses: Sequence[Response]) -> None:
    for response in reversed(responses):
        try:
            response.cancel()  # a no-op on a finished response
        except Exception:  # noqa: BLE001 - cancel() may re-raise a response's own failure
            pass
