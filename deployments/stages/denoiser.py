"""Denoiser deployment: the transformer, stepping the requests in flight in the order the scheduler
decides (deployments.stages.request_scheduler: srpt or fifo, budgets in tokens).

Requests join whenever they arrive and leave when their last step is done (continuous batching):
each keeps its own seed, schedule, step index, guidance and true-CFG scale, because the engine's
`denoise_step` works per request. At every step boundary the scheduler picks the next batch (one
image size per call), so a short request can run between two steps of a long one, which waits with
its latents intact. A request whose caller went away (client disconnect, timeout) is dropped at the
next step, so its remaining steps cost nothing.

Admission: a request the scheduler estimates would wait more than `max_queue_wait_s` is refused
(QueueFull, answered 429 with that estimate as Retry-After). Failures: when a batched step raises,
each of its requests is retried alone once, so one bad request fails alone; an error that sticks to
the device, `unhealthy_after_failed_steps` failed steps in a row, or no step for `stuck_after_s`
while work waits, makes the health check fail so Serve replaces the replica.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from ray import serve

from deployments.config import DENOISER_TUNABLE, AppConfig, tuned
from deployments.metrics import DenoiserMetrics
from deployments.stages.messages import DenoisedLatents, EncodedPrompt
from deployments.stages.request_scheduler import Job, QueueFull, Scheduler, request_shape
from deployments.warmup import timed, warm_denoiser
from fluxray.editing import EncodedEdit, edit_task
from fluxray.lora import AdapterLoader, LoraError, LoraRegistry, LoraSlots
from fluxray.params import GenerationParams, parse_size
from fluxray.preview import preview_latents
from fluxray.runtime import stage_runtime
from fluxray.sampling import DenoiseTask, denoise_step, denoise_task, image_ids, text_ids
from fluxray.transformer import load_transformer

# Errors after which a CUDA context is unusable: every later call on it fails too.
STICKY_ERRORS = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "misaligned address",
    "CUDA error: an illegal instruction",
    "CUBLAS_STATUS_EXECUTION_FAILED",
)


@dataclass(eq=False)
class _Work:
    """A Job's payload: the engine's state of its images and the future its request awaits; for a
    streamed request (denoise_stream), the queue its step loop reports to."""

    task: DenoiseTask  # the engine's state of the request's images (latents, schedule, step)
    future: asyncio.Future
    cancelled: bool = False
    watch: asyncio.Queue | None = None  # gets None after every step that may change what it reports


# Adapter sets a replica reports to Serve's router as held (model multiplexing, see `routed`).
MULTIPLEXED_ADAPTER_SETS = 32


@serve.deployment(name="Denoiser")
class DenoiserDeployment:
    def __init__(self, config: dict):
        self.base_config = AppConfig.model_validate(config)  # the app's args, as deployed
        self.config = self.base_config  # with the user_config's settings over it (reconfigure)
        self.source, self.device, self.dtype = stage_runtime(*self.config.runtime)
        # LoRAs: loaded on first use in a thread of their own (the step loop goes on meanwhile), kept up to
        # max_resident_loras, least recently used evicted once no request holds it.
        registry = LoraRegistry(self.config.lora_root, self.config.loras)
        options, slots = self.config, None
        if registry:
            slots = LoraSlots(options.max_loras_per_request, options.max_lora_rank, options.max_resident_loras)
        self.transformer = load_transformer(self.source, self.device, self.dtype, self.config.speed, slots)
        self.loras = AdapterLoader(
            self.transformer, registry, options.max_lora_rank, options.max_resident_loras, options.lora_host_cache_bytes
        )
        if self.config.warm_up:
            width, height = parse_size(self.config.default_size)
            spec = self.source.spec
            timed("Denoiser", lambda: warm_denoiser(self.transformer, spec, height, width, self.device, self.dtype))
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="denoise")
        self.lora_loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-load")
        self.lora_loading: dict[str, asyncio.Future] = {}  # reads in flight, one per adapter
        self.scheduler = Scheduler(
            policy=self.config.scheduler,
            max_batch_tokens=self.config.denoiser_max_batch_tokens,
            max_batch_images=self.config.denoiser_max_batch_images,
            max_slowdown=self.config.max_slowdown,
        )
        self.wakeup: asyncio.Event | None = None
        self.loop_task: asyncio.Task | None = None
        self.ids: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.counts = {
            "completed": 0,
            "cancelled": 0,
            "steps": 0,
            "max_rows": 0,
            "batched_steps": 0,
            "rejected": 0,
            "failed_steps": 0,
            "retried_alone": 0,
        }
        self.failed_in_a_row = 0
        self.unhealthy: str | None = None
        self.last_progress = time.monotonic()
        self.metrics = DenoiserMetrics()
        self._preemptions_seen = 0  # the scheduler's preemption count already added to the metric

    def reconfigure(self, user_config: dict | None) -> None:
        """Serve's user_config, applied in place (at start and on every change of it in the serve
        config): the scheduling policy, its aging bound, the admission bound and the images per
        transformer call (deployments.config.DENOISER_TUNABLE). Requests in flight keep their latents;
        the next step boundary already follows the new settings."""
        self.config = tuned(self.base_config, user_config)
        self.scheduler.policy = self.config.scheduler
        self.scheduler.max_slowdown = self.config.max_slowdown
        self.scheduler.max_batch_images = self.config.denoiser_max_batch_images

    # --- requests ------------------------------------------------------------------------------

    async def denoise(
        self, encoded: EncodedPrompt, params: GenerationParams, edit: EncodedEdit | None = None
    ) -> DenoisedLatents:
        """Denoise a resolved request's n images; returns their packed latents on the CPU. An edit
        (fluxray.editing.EditParams) comes with its input from the VAEEncoder."""
        await self._load_loras(params)
        jobs = self._submit(encoded, params, edit=edit)
        return await self._finish(jobs, encoded, edit)

    async def denoise_stream(
        self,
        encoded: EncodedPrompt,
        params: GenerationParams,
        preview_every: int = 0,
        queue: bool = False,
        edit: EncodedEdit | None = None,
    ):
        """The same denoising as `denoise`, streamed (a Serve streaming call) for async jobs: dicts with
        an "event" key, from this replica's step loop:

        - "queued": `position` (waiting requests the policy now runs first) and `eta_s`, at once and
          whenever they change;
        - "started", at the request's first step;
        - "progress": `step` of `steps` and `eta_s` after each step, and every `preview_every` steps
          (0: never) `preview`, the first image's latents pooled small (fluxray.preview);
        - "done", last: `result`, the DenoisedLatents that `denoise` returns.
        Closing the stream (the caller cancelled) drops the request at the next step boundary.
        `queue`: admit the request however long it would wait (async jobs wait by design; their
        number is bounded at the ingress), instead of refusing it past max_queue_wait_s."""
        watch: asyncio.Queue = asyncio.Queue()
        await self._load_loras(params)
        jobs = self._submit(encoded, params, watch, queue, edit)
        finished = asyncio.ensure_future(self._finish(jobs, encoded, edit))
        position, eta = self._ahead(jobs)
        last_position, started, last_step = position, False, 0
        try:
            yield {"event": "queued", "position": position, "eta_s": round(eta, 2)}
            while True:
                getter = asyncio.ensure_future(watch.get())
                await asyncio.wait([getter, finished], return_when=asyncio.FIRST_COMPLETED)
                getter.cancel()
                while not watch.empty():  # several steps may have ended meanwhile: report the latest
                    watch.get_nowait()
                step = min(job.done_steps for job in jobs)
                if step == 0 and not any(job.first_step is not None for job in jobs):
                    position, eta = self._ahead(jobs)
                    if position != last_position:
                        last_position = position
                        yield {"event": "queued", "position": position, "eta_s": round(eta, 2)}
                elif not started:
                    started = True
                    yield {"event": "started"}
                if step > last_step:
                    last_step = step
                    event = {"event": "progress", "step": step, "steps": jobs[0].steps}
                    event["eta_s"] = round(self._ahead(jobs)[1], 2)
                    if preview_every and (step % preview_every == 0 or step == jobs[0].steps):
                        event["preview"] = preview_latents(
                            jobs[0].payload.task.latents, params.height, params.width, self.source.spec.vae_scale_factor
                        )
                    yield event
                if finished.done():
                    yield {"event": "done", "result": finished.result()}
                    return
        finally:
            if not finished.done():
                finished.cancel()
                await asyncio.gather(finished, return_exceptions=True)

    @serve.multiplexed(max_num_models_per_replica=MULTIPLEXED_ADAPTER_SETS)
    async def _adapter_set(self, key: str) -> str:
        """What this replica tells Serve's router it holds (the adapter sets of its recent requests). The
        adapters themselves are loaded and evicted by _load_loras (fluxray.lora.residency), not by Serve's LRU."""
        return key

    async def _load_loras(self, params: GenerationParams) -> None:
        """The request's adapters in the bank: read (off the step loop, in the loader thread) if they are
        neither resident nor in host memory."""
        if not params.loras:
            return
        if self.loras.bank is None:
            raise LoraError("this server has no LoRAs")
        if serve.get_multiplexed_model_id():
            await self._adapter_set(serve.get_multiplexed_model_id())
        loop = asyncio.get_running_loop()
        self.loras.touch(lora.name for lora in params.loras)
        for lora in params.loras:
            if self.loras.resident(lora.name):
                continue
            # One read per adapter however many requests wait for it; one evicted earlier comes back
            # from host memory.
            loading = self.lora_loading.get(lora.name)
            adapter = self.loras.from_host(lora.name) if loading is None else None
            if adapter is None:
                if loading is None:
                    loading = asyncio.ensure_future(loop.run_in_executor(self.lora_loader, self.loras.read, lora.name))
                    loading.add_done_callback(lambda _, name=lora.name: self.lora_loading.pop(name, None))
                    self.lora_loading[lora.name] = loading
                adapter = await asyncio.shield(loading)
            held = {c.name for job in self.scheduler.jobs for c in job.payload.task.loras}
            self.loras.install(adapter, held | {x.name for x in params.loras})

    def _ahead(self, jobs: list[Job]) -> tuple[int, float]:
        """A request's queue position (its least, over its parts) and seconds until its last part is done."""
        ahead = [self.scheduler.ahead(job) for job in jobs]
        return min(p for p, _ in ahead), max(s for _, s in ahead)

    def _submit(
        self,
        encoded: EncodedPrompt,
        params: GenerationParams,
        watch: asyncio.Queue | None = None,
        queue: bool = False,
        edit: EncodedEdit | None = None,
    ):
        """The request's jobs, in the scheduler (QueueFull if it would wait too long)."""
        if self.unhealthy:
            raise RuntimeError(f"this denoiser replica is unhealthy ({self.unhealthy}); it is being replaced")
        loop = asyncio.get_running_loop()
        if self.loop_task is None or self.loop_task.done():
            self.wakeup = asyncio.Event()
            self.loop_task = loop.create_task(self._run())
        # The shape the ingress checked (deployments.stages.request_scheduler.request_shape): Kontext's reference tokens
        # are part of every row.
        request = request_shape(
            params,
            encoded.embeds.sequence.shape[1],
            edit.reference_shape if edit is not None else None,
            true_cfg=encoded.negative is not None and params.do_true_cfg,
        )
        shape, per_image = request.shape, request.rows_per_image
        parts = request.parts(params.n, self.config.denoiser_max_batch_tokens, self.config.denoiser_max_batch_images)
        steps = params.num_inference_steps - (params.start_step() if edit is not None else 0)
        if not self.scheduler.jobs:
            self.last_progress = time.monotonic()  # the clock of stuck_after_s starts with work
        elif not queue:
            wait = self.scheduler.estimated_wait(shape, params.n * per_image, steps)
            if wait > self.config.max_queue_wait_s:
                self.counts["rejected"] += 1
                raise QueueFull(wait)
        jobs, offset = [], 0
        for images in parts:
            part = params if len(parts) == 1 else params.model_copy(update={"n": images, "seed": params.seed + offset})
            if edit is None:
                task = denoise_task(part, encoded.embeds, encoded.negative, self.source.spec, self.device, self.dtype)
            else:
                task = edit_task(
                    part, encoded.embeds, encoded.negative, edit, self.source.spec, self.device, self.dtype
                )
            work = _Work(task, loop.create_future(), watch=watch)
            jobs.append(self.scheduler.add(Job(shape, images * per_image, images, steps, payload=work)))
            offset += images
        self.metrics.queue_depth.set(len(self.scheduler.jobs))
        self.wakeup.set()
        return jobs

    async def _finish(
        self, jobs: list[Job], encoded: EncodedPrompt, edit: EncodedEdit | None = None
    ) -> DenoisedLatents:
        """Waits for the request's jobs; their latents, in order, and its timings."""
        try:
            latents = torch.cat(await asyncio.gather(*[job.payload.future for job in jobs]))
        except asyncio.CancelledError:
            for job in jobs:
                job.payload.cancelled = True
            self.counts["cancelled"] += 1
            raise
        finally:
            self.metrics.latency.observe(time.monotonic() - jobs[0].arrival)
        first = min(job.first_step for job in jobs)
        queue, denoise = first - jobs[0].arrival, max(job.finished for job in jobs) - first
        self.metrics.queue_wait.observe(queue)
        for job in jobs:
            self.metrics.slowdown.observe(self.scheduler.slowdown(job))
        timings = {"encode": encoded.encode_s, "queue": queue, "denoise": denoise}
        if edit is not None:
            timings["encode_image"] = edit.encode_s
        return DenoisedLatents(latents, timings)

    # --- the step loop ---------------------------------------------------------------------------

    def _ids(self, height: int, width: int, text_len: int):
        key = (height, width, text_len)
        if key not in self.ids:
            self.ids[key] = (
                image_ids(height, width, self.device, self.dtype),
                text_ids(text_len, self.device, self.dtype),
            )
        return self.ids[key]

    async def _step(self, batch: list[Job]) -> float:
        """One transformer call over the batch's tasks, in the worker thread; its seconds."""
        height, width, text = batch[0].shape[:3]
        img, txt = self._ids(height, width, text)
        started = time.monotonic()
        tasks = [job.payload.task for job in batch]
        await asyncio.get_running_loop().run_in_executor(self.executor, denoise_step, self.transformer, tasks, img, txt)
        return time.monotonic() - started

    def _stepped(self, batch: list[Job], seconds: float) -> None:
        self.failed_in_a_row = 0
        self.last_progress = time.monotonic()
        rows = sum(job.rows for job in batch)
        self.metrics.batch.observe(rows)
        self.metrics.active_images.set(rows)
        self.metrics.steps.inc()
        self.counts["steps"] += 1
        self.counts["batched_steps"] += len(batch) > 1
        self.counts["max_rows"] = max(self.counts["max_rows"], rows)
        preempted = self.scheduler.preemptions
        finished = self.scheduler.stepped(batch, seconds)
        for job in self.scheduler.jobs:  # streamed requests: positions, steps and ETAs moved
            if job.payload.watch is not None:
                job.payload.watch.put_nowait(None)
        for job in finished:
            self.scheduler.remove(job)
            if not job.payload.future.done():
                job.payload.future.set_result(job.payload.task.latents.to("cpu"))
                self.counts["completed"] += 1
        if preempted > self._preemptions_seen:
            self.metrics.preemptions.inc(preempted - self._preemptions_seen)
            self._preemptions_seen = preempted

    def _fail(self, job: Job, error: BaseException) -> None:
        self.scheduler.remove(job)
        if not job.payload.future.done():
            job.payload.future.set_exception(error)

    def _failed_step(self, error: BaseException) -> None:
        self.counts["failed_steps"] += 1
        self.failed_in_a_row += 1
        if any(marker in str(error) for marker in STICKY_ERRORS):
            self.unhealthy = f"device error: {str(error).splitlines()[0][:200]}"
        elif self.failed_in_a_row >= self.config.unhealthy_after_failed_steps:
            self.unhealthy = f"{self.failed_in_a_row} denoising steps failed in a row (last: {error!r})"[:300]

    async def _isolate(self, batch: list[Job], error: BaseException) -> None:
        """A batched step raised: each of its requests runs its step alone once, so only the
        requests that fail alone fail (the engine updates a task only after the call returns)."""
        self._failed_step(error)
        if len(batch) == 1:
            self._fail(batch[0], error)
            return
        for job in batch:
            if self.unhealthy:
                self._fail(job, error)
                continue
            self.counts["retried_alone"] += 1
            try:
                seconds = await self._step([job])
            except Exception as alone:  # noqa: BLE001 - it fails its own request only
                self._failed_step(alone)
                self._fail(job, alone)
            else:
                self._stepped([job], seconds)

    async def _run(self) -> None:
        while True:
            for job in [j for j in self.scheduler.jobs if j.payload.cancelled or j.payload.future.done()]:
                self.scheduler.remove(job)
            batch = self.scheduler.next_batch()
            self.metrics.queue_depth.set(len(self.scheduler.jobs))
            if not batch:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            try:
                seconds = await self._step(batch)
            except Exception as error:  # a failed step fails its requests, not the replica
                await self._isolate(batch, error)
                continue
            self._stepped(batch, seconds)

    # --- for operators, tests and Serve ----------------------------------------------------------

    def stats(self) -> dict:
        active = sum(1 for j in self.scheduler.jobs if not j.payload.cancelled and not j.payload.future.done())
        settings = {name: getattr(self.config, name) for name in DENOISER_TUNABLE}
        return {**self.counts, "active": active, "preemptions": self.scheduler.preemptions, "settings": settings}

    def check_health(self) -> None:
        if self.unhealthy:
            raise RuntimeError(self.unhealthy)
        if self.loop_task is not None and self.loop_task.done() and not self.loop_task.cancelled():
            raise RuntimeError(f"denoising loop stopped: {self.loop_task.exception()!r}")
        waiting = [j for j in self.scheduler.jobs if j.remaining_steps > 0]
        idle = time.monotonic() - self.last_progress
        if waiting and idle > self.config.stuck_after_s:
            raise RuntimeError(f"no denoising step ended in {idle:.0f} s while {len(waiting)} requests wait")
