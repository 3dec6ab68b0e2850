"""The ingress's graph runner, with no cluster: admission, timeout, re-runs on a lost replica,
capacity, and that every attempt's stage work is cancelled however it ends. The stages are
stand-ins with the DeploymentResponse surface (await, cancel); the rules under test are real."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorDiedError, RayTaskError
from ray.serve.exceptions import BackPressureError

from deployments.errors import APIError
from deployments.graph_runner import GraphRunner, replica_lost


class Stage:
    """One stage call's response: resolves to `result`, raises `error`, or never finishes."""

    def __init__(self, result=None, error: BaseException | None = None, hang: bool = False):
        self.result, self.error, self.hang = result, error, hang
        self.cancelled = False

    async def _wait(self):
        if self.hang:
            await asyncio.Event().wait()
        if self.error is not None:
            raise self.error
        return self.result

    def __await__(self):
        return self._wait().__await__()

    def cancel(self) -> None:
        self.cancelled = True


class Graph:
    """launch() for the runner: each attempt takes the next outcome and records its stages."""

    def __init__(self, *outcomes: Stage):
        self.outcomes, self.attempts = list(outcomes), []

    def __call__(self):
        stages = (Stage(), Stage(), self.outcomes.pop(0))
        self.attempts.append(stages)
        return stages

    def all_cancelled(self) -> bool:
        return all(stage.cancelled for attempt in self.attempts for stage in attempt)


def runner(**overrides) -> GraphRunner:
    options = {"max_pending": 2, "timeout_s": 5.0, "retries": 2, "retry_after_s": 7} | overrides
    return GraphRunner(**options)


def run(coroutine):
    return asyncio.run(coroutine)


def test_a_request_gets_its_files_and_leaves_nothing_running():
    graph, r = Graph(Stage(result=[b"png"])), runner()
    assert run(r.run(graph)) == [b"png"]
    assert len(graph.attempts) == 1 and graph.all_cancelled() and r.in_flight == 0


def test_a_lost_replica_runs_the_graph_again():
    lost = ActorDiedError()
    graph, r = Graph(Stage(error=lost), Stage(result=[b"png"])), runner()
    retried = []
    r.on_retry = retried.append
    assert run(r.run(graph)) == [b"png"]
    assert len(graph.attempts) == 2 and r.retried == 1 and retried == [lost] and graph.all_cancelled()


def test_a_replica_lost_on_every_try_is_a_503_after_the_retries():
    graph, r = Graph(*[Stage(error=ActorDiedError()) for _ in range(3)]), runner(retries=2)
    with pytest.raises(APIError) as caught:
        run(r.run(graph))
    assert caught.value.status == 503 and caught.value.headers == {"Retry-After": "7"}
    assert len(graph.attempts) == 3 and graph.all_cancelled() and r.in_flight == 0


def test_any_other_failure_is_not_retried():
    graph, r = Graph(Stage(error=ValueError("bad latents")), Stage(result=[b"png"])), runner()
    with pytest.raises(ValueError, match="bad latents"):
        run(r.run(graph))
    assert len(graph.attempts) == 1 and r.retried == 0 and graph.all_cancelled()


def test_a_stage_at_capacity_is_a_503_with_retry_after():
    graph, r = Graph(Stage(error=BackPressureError(num_queued_requests=4, max_queued_requests=4))), runner()
    with pytest.raises(APIError) as caught:
        run(r.run(graph))
    assert caught.value.status == 503 and caught.value.headers == {"Retry-After": "7"}


def test_past_the_timeout_is_a_504_and_the_stages_are_cancelled():
    graph, r = Graph(Stage(hang=True)), runner(timeout_s=0.2)
    with pytest.raises(APIError) as caught:
        run(r.run(graph))
    assert caught.value.status == 504 and graph.all_cancelled() and r.in_flight == 0


def test_over_the_pending_bound_is_a_429_and_nothing_starts():
    async def scenario():
        r, graph = runner(max_pending=2), Graph(Stage(hang=True), Stage(hang=True), Stage(result=[b"x"]))
        first, second = asyncio.create_task(r.run(graph)), asyncio.create_task(r.run(graph))
        await asyncio.sleep(0.05)
        assert r.in_flight == 2
        with pytest.raises(APIError) as caught:
            await r.run(graph)
        assert caught.value.status == 429 and caught.value.headers == {"Retry-After": "7"}
        assert len(graph.attempts) == 2  # the third never launched
        # A client that goes away cancels its request: its stages are cancelled and its slot freed.
        first.cancel()
        second.cancel()
        await asyncio.gather(first, second, return_exceptions=True)
        assert r.in_flight == 0 and graph.all_cancelled()

    run(scenario())


def test_replica_loss_is_recognised_through_ray_and_serve_wrappers():
    died = ActorDiedError()
    assert replica_lost(died)
    wrapped = RayTaskError("denoise", "traceback", died)
    assert replica_lost(wrapped)
    outer = RuntimeError("router")
    outer.__cause__ = wrapped
    assert replica_lost(outer)
    assert not replica_lost(ValueError("bad input")) and not replica_lost(RayTaskError("f", "tb", ValueError()))
