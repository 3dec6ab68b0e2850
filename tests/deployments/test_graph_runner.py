"""The ingress's graph runner, with no cluster: admission, timeout, re-runs on a lost replica,
capacity, and that every attempt's stage work is cancelled however it ends; for the synchronous
routes (`run`) and for async jobs' streamed graph (`stream`), which answers every failure the same. The stages are
stand-ins with the DeploymentResponse surface (await, cancel); the rules under test are real."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorDiedError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from deployments.http.errors import APIError
from deployments.http.graph_runner import GraphRunner, Streamed, replica_lost
from deployments.stages.messages import DecodedImages
from deployments.stages.request_scheduler import OverTokenBudget, QueueFull
from fluxray.lora import LoraError


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


# --- the streamed graph of async jobs (GraphRunner.stream) -----------------------------------------------


class Stream:
    """The Denoiser's streaming call: yields `events` (then "done" with `result`, unless `error` or
    `hang` ends it first), and records whether it was cancelled."""

    def __init__(self, events=(), result=None, error: BaseException | None = None, hang: bool = False):
        self.events, self.result, self.error, self.hang = list(events), result, error, hang
        self.cancelled = False

    async def __aiter__(self):
        for event in self.events:
            yield event
        if self.hang:
            await asyncio.Event().wait()
        if self.error is not None:
            raise self.error
        yield {"event": "done", "result": self.result}

    def cancel(self) -> None:
        self.cancelled = True


QUEUED = {"event": "queued", "position": 0, "eta_s": 1.0}
STEPS = [
    {"event": "started"},
    {"event": "progress", "step": 1, "steps": 2, "eta_s": 1.0},
    {"event": "progress", "step": 2, "steps": 2, "eta_s": 0.0},
]


class StreamGraph:
    """launch() for GraphRunner.stream: each attempt takes the next stream (its encode a Stage), and its
    decode the next decode outcome (files from the latents by default)."""

    def __init__(
        self, *streams: Stream, decodes: list[Stage] | None = None, decoded=lambda latents: [b"png:" + latents]
    ):
        self.streams, self.decodes, self.decoded, self.attempts = list(streams), list(decodes or []), decoded, []

    def __call__(self) -> Streamed:
        stages = [Stage(), self.streams.pop(0)]
        self.attempts.append(stages)

        def then(latents):
            decode = self.decodes.pop(0) if self.decodes else Stage(result=self.decoded(latents))
            stages.append(decode)
            return decode

        return Streamed(list(stages), stages[1], then)

    def all_cancelled(self) -> bool:
        return all(stage.cancelled for attempt in self.attempts for stage in attempt)


def follow(r: GraphRunner, graph: StreamGraph):
    """Runs the streamed graph; its result and the events the job got."""
    got = []

    async def on_event(event):
        got.append(event)

    return run(r.stream(graph, on_event)), got


def caught(r: GraphRunner, graph) -> APIError:
    """The APIError the runner answers, by `run` for a Graph and by `stream` for a StreamGraph."""
    with pytest.raises(APIError) as error:
        if isinstance(graph, StreamGraph):
            follow(r, graph)
        else:
            run(r.run(graph))
    return error.value


def test_a_streamed_graph_delivers_every_event_then_decodes_and_leaves_nothing_running():
    graph, r = StreamGraph(Stream([QUEUED, *STEPS], result=b"latents")), runner()
    result, got = follow(r, graph)
    assert result == [b"png:latents"] and got == [QUEUED, *STEPS]  # "done" is the runner's, not the job's
    assert len(graph.attempts) == 1 and len(graph.attempts[0]) == 3 and graph.all_cancelled()
    assert r.in_flight == 0  # a job is not counted against max_pending


def test_a_streamed_graph_runs_again_when_a_replica_is_lost_in_the_stream_or_the_decode():
    lost = ActorDiedError()
    graph = StreamGraph(
        Stream([QUEUED, STEPS[0]], error=RayTaskError("denoise_stream", "tb", lost)),
        Stream([QUEUED], result=b"a"),
        Stream([QUEUED], result=b"b"),
        decodes=[Stage(error=ActorDiedError())],
    )
    r, retried = runner(retries=2), []
    r.on_retry = retried.append
    result, got = follow(r, graph)
    assert result == [b"png:b"] and len(graph.attempts) == 3 and r.retried == 2 and len(retried) == 2
    assert got == [QUEUED, STEPS[0], QUEUED, QUEUED] and graph.all_cancelled()


def test_a_streamed_graph_waits_at_capacity_instead_of_failing():
    full = BackPressureError(num_queued_requests=1, max_queued_requests=1)
    unavailable = RuntimeError("router")
    unavailable.__cause__ = DeploymentUnavailableError("Denoiser")
    graph = StreamGraph(Stream(error=full), Stream(error=unavailable), Stream([QUEUED], result=b"x"))
    r = runner(retries=0, retry_after_s=0.01)  # waits at capacity are not retries
    result, got = follow(r, graph)
    assert result == [b"png:x"] and got == [QUEUED] and len(graph.attempts) == 3 and r.retried == 0
    assert graph.all_cancelled()
    # The synchronous route answers the same refusals 503 at once, even wrapped.
    sync = Graph(Stage(error=unavailable), Stage(result=[b"png"]))
    error = caught(runner(), sync)
    assert (error.status, error.kind, error.headers) == (503, "overloaded_error", {"Retry-After": "7"})
    assert len(sync.attempts) == 1


def test_a_streamed_graph_is_not_bound_by_the_timeout_or_the_pending_bound():
    class Slow(Stream):  # a stream slower than the synchronous timeout
        async def __aiter__(self):
            for event in [QUEUED, *STEPS]:
                await asyncio.sleep(0.03)
                yield event
            yield {"event": "done", "result": b"late"}

    async def ignore(_):
        pass

    async def scenario():
        r = runner(max_pending=1, timeout_s=0.05)
        graph = StreamGraph(Slow())
        assert await r.stream(graph, ignore) == [b"png:late"] and len(graph.attempts) == 1
        r.timeout_s = 5.0
        held = asyncio.create_task(r.run(Graph(Stage(hang=True))))  # the one synchronous slot taken
        await asyncio.sleep(0.01)
        with pytest.raises(APIError):  # a synchronous request is refused ...
            await r.run(Graph(Stage(result=[b"png"])))
        assert await r.stream(StreamGraph(Stream(result=b"x")), ignore) == [b"png:x"]  # ... a job is not
        assert r.in_flight == 1  # only the synchronous request
        held.cancel()
        await asyncio.gather(held, return_exceptions=True)

    run(scenario())


def test_a_cancelled_job_cancels_its_streamed_attempt():
    async def scenario():
        graph, r = StreamGraph(Stream([QUEUED], hang=True)), runner()

        async def ignore(_):
            pass

        job = asyncio.create_task(r.stream(graph, ignore))
        await asyncio.sleep(0.05)
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)
        assert graph.all_cancelled() and len(graph.attempts) == 1

    run(scenario())


def test_a_stream_that_ends_without_a_result_is_an_error_and_is_cancelled():
    class Truncated(Stream):
        async def __aiter__(self):
            yield QUEUED

    graph = StreamGraph(Truncated())
    with pytest.raises(RuntimeError, match="without a result"):
        follow(runner(), graph)
    assert graph.all_cancelled()


def _failures():
    """Each failure a stage can meet, as it reaches the ingress (wrapped by Ray), with the answer both
    paths give it."""
    wrapped = lambda e: RayTaskError("denoise", "traceback", e)  # noqa: E731
    return {
        "queue full": (wrapped(QueueFull(12.2)), 429, "rate_limit_error", None, None, {"Retry-After": "13"}),
        "lora unusable": (
            wrapped(LoraError("misfit.safetensors: no module for transformer.x")),
            422,
            "invalid_request_error",
            "lora_unusable",
            "loras",
            None,
        ),
        "over token budget": (
            wrapped(OverTokenBudget(9000, 6144)),
            422,
            "invalid_request_error",
            "batch_token_budget_exceeded",
            "size",
            None,
        ),
        "replica lost every time": (ActorDiedError(), 503, "overloaded_error", None, None, {"Retry-After": "7"}),
    }


@pytest.mark.parametrize("name", list(_failures()))
def test_every_failure_is_answered_the_same_by_run_and_by_stream(name):
    error, status, kind, code, param, headers = _failures()[name]
    sync_graph = Graph(*[Stage(error=error) for _ in range(3)])
    stream_graph = StreamGraph(*[Stream([QUEUED], error=error) for _ in range(3)])
    answers = [caught(runner(retries=2), sync_graph), caught(runner(retries=2), stream_graph)]
    for answer in answers:
        assert (answer.status, answer.kind, answer.code, answer.param, answer.headers) == (
            status,
            kind,
            code,
            param,
            headers,
        ), name
    assert answers[0].message == answers[1].message
    attempts = 3 if name == "replica lost every time" else 1
    assert len(sync_graph.attempts) == len(stream_graph.attempts) == attempts
    assert sync_graph.all_cancelled() and stream_graph.all_cancelled()


def test_any_other_failure_of_a_stream_is_raised_as_it_is_and_not_retried():
    graph = StreamGraph(Stream(error=ValueError("bad latents")), Stream(result=b"x"))
    with pytest.raises(ValueError, match="bad latents"):
        follow(runner(), graph)
    assert len(graph.attempts) == 1 and graph.all_cancelled()


# --- an async job over the runner (deployments.async_jobs.jobs, its graph faked) -------------------------------


class FakeGraph:
    """deployments.http.graph.Graph's surface for AsyncJobs: launch_stream over StreamGraph's streams."""

    def __init__(self, *streams: Stream):
        self.streams = StreamGraph(
            *streams, decoded=lambda latents: DecodedImages([b"png:" + latents], {"decode": 0.01})
        )
        self.vae = None

    def launch_stream(self, params, model, preview_every=0, extra=None):
        return self.streams


def job_of(*streams: Stream, retries: int = 2) -> dict:
    """Submits one job over these streams and returns its record once it ended."""
    from deployments.async_jobs.jobs import AsyncJobs
    from deployments.async_jobs.store import MemoryJobStore
    from fluxray.params import GenerationParams

    async def finish(params, files, response_format):
        return [{"b64_json": f.decode(), "seed": params.seed} for f in files]

    async def scenario():
        jobs = AsyncJobs(
            MemoryJobStore(60),
            FakeGraph(*streams),
            runner(retries=retries, retry_after_s=0.01),
            model_name="tiny",
            retry_after_s=7,
            max_queued_jobs=4,
            preview_every=0,
            result_max_bytes=2**20,
            lost_after_s=30,
            finish=finish,
        )
        params = GenerationParams(prompt="a red circle", width=64, height=64, num_inference_steps=2, seed=3)
        record = await jobs.submit(params, {"prompt": "a red circle"}, preview=False)
        await asyncio.gather(*jobs.tasks.values(), return_exceptions=True)
        record = await jobs.get(record["id"])
        record["events"] = [e["event"] for e in await jobs.store.events(record["id"], 0)]
        return record

    return run(scenario())


def test_an_async_job_consumes_the_runners_events_and_re_runs_a_lost_replica():
    lost = RayTaskError("denoise_stream", "tb", ActorDiedError())
    record = job_of(Stream([QUEUED, STEPS[0]], error=lost), Stream([QUEUED, *STEPS], result=b"latents"))
    assert record["status"] == "succeeded" and record["data"] == [{"b64_json": "png:latents", "seed": 3}]
    assert record["progress"] == {"step": 2, "steps": 2} and record["error"] is None
    assert record["events"] == ["queued", "started", "queued", "started", "progress", "progress", "succeeded"]


@pytest.mark.parametrize("name", list(_failures()))
def test_an_async_jobs_error_is_the_sync_routes_answer(name):
    error, status, kind, code, param, _ = _failures()[name]
    record = job_of(*[Stream([QUEUED], error=error) for _ in range(3)])
    assert record["status"] == "failed" and record["events"][-1] == "failed"
    sync = caught(runner(retries=2), Graph(*[Stage(error=error) for _ in range(3)]))
    assert record["error"] == {
        "message": sync.message,
        "type": kind,
        "code": code,
        "param": param,
        "status": status,
        "retryable": status in (429, 503),
    }


def test_an_async_job_that_fails_unexpectedly_is_a_500_server_error():
    record = job_of(Stream(error=ValueError("bad latents")))
    assert record["error"] == {
        "message": "generation failed: ValueError",
        "type": "server_error",
        "code": None,
        "param": None,
        "status": 500,
        "retryable": False,
    }


def test_a_stage_error_raised_as_rays_dual_class_is_answered_with_its_own_message():
    # Ray raises a stage's LoraError as a class that is both RayTaskError and LoraError, whose str is Ray's
    # traceback (pids, addresses, actor ids); reaching the decode as its input, it is wrapped once more.
    dual = RayTaskError(
        "denoise", "Traceback pid=123 actor_id=abc", LoraError("misfit: no module fits")
    ).as_instanceof_cause()
    assert isinstance(dual, LoraError) and "pid=" in str(dual)
    wrapped = RayTaskError("decode", "could not be computed pid=456", dual)
    for graph in (Graph(Stage(error=wrapped)), StreamGraph(Stream(error=wrapped))):
        answer = caught(runner(), graph)
        assert (answer.status, answer.code, answer.message) == (422, "lora_unusable", "loras: misfit: no module fits")
