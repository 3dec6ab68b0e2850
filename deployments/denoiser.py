"""Denoiser deployment: the transformer, stepping every request in flight together.

Requests join the running batch whenever they arrive and leave when their last step is done
(continuous batching): each keeps its own seed, schedule, step index, guidance and true-CFG scale,
because the engine's `denoise_step` works per request. Requests of one image size step together;
sizes take turns. A request whose caller went away (client disconnect, timeout) is dropped at the
next step, so its remaining steps cost nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from ray import serve

from deployments.config import AppConfig
from deployments.metrics import DenoiserMetrics
from deployments.text_encoder import EncodedPrompt
from fluxray.params import GenerationParams
from fluxray.runtime import stage_runtime
from fluxray.sampling import DenoiseTask, denoise_step, denoise_task, image_ids, text_ids
from fluxray.transformer import load_transformer


@dataclass(eq=False)
class _Entry:
    task: DenoiseTask
    size: tuple[int, int]  # (height, width)
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False


@serve.deployment(name="Denoiser")
class DenoiserDeployment:
    def __init__(self, config: dict):
        self.config = AppConfig.model_validate(config)
        self.source, self.device, self.dtype = stage_runtime(*self.config.runtime)
        self.transformer = load_transformer(self.source, self.device, self.dtype, self.config.speed)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="denoise")
        self.entries: deque[_Entry] = deque()
        self.wakeup: asyncio.Event | None = None
        self.loop_task: asyncio.Task | None = None
        self.ids: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.counts = {"completed": 0, "cancelled": 0, "steps": 0, "max_rows": 0, "batched_steps": 0}
        self.metrics = DenoiserMetrics()

    async def denoise(self, encoded: EncodedPrompt, params: GenerationParams) -> torch.Tensor:
        """Denoise a resolved request's n images; returns their packed latents on the CPU."""
        loop = asyncio.get_running_loop()
        if self.loop_task is None or self.loop_task.done():
            self.wakeup = asyncio.Event()
            self.loop_task = loop.create_task(self._run())
        task = denoise_task(params, encoded.embeds, encoded.negative, self.source.spec, self.device, self.dtype)
        entry = _Entry(task, (params.height, params.width), loop.create_future())
        self.entries.append(entry)
        self.metrics.queue_depth.set(len(self.entries))
        self.wakeup.set()
        try:
            return await entry.future
        except asyncio.CancelledError:
            entry.cancelled = True
            self.counts["cancelled"] += 1
            raise
        finally:
            self.metrics.latency.observe(time.monotonic() - entry.enqueued)

    def _ids(self, height: int, width: int, text_len: int):
        key = (height, width, text_len)
        if key not in self.ids:
            self.ids[key] = (
                image_ids(height, width, self.device, self.dtype),
                text_ids(text_len, self.device, self.dtype),
            )
        return self.ids[key]

    def _next_batch(self) -> list[_Entry]:
        # The size of the longest-waiting request goes next; its batch takes every waiting
        # request of that size, oldest first, up to the image budget.
        first = self.entries[0]
        batch, rows = [], 0
        for entry in self.entries:
            if entry.size != first.size:
                continue
            n = entry.task.latents.shape[0]
            if batch and rows + n > self.config.denoiser_max_batch_images:
                break
            batch.append(entry)
            rows += n
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            for entry in [e for e in self.entries if e.cancelled or e.future.done()]:
                self.entries.remove(entry)
            if not self.entries:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            batch = self._next_batch()
            height, width = batch[0].size
            img, txt = self._ids(height, width, batch[0].task.embeds.sequence.shape[1])
            tasks = [e.task for e in batch]
            try:
                await loop.run_in_executor(self.executor, denoise_step, self.transformer, tasks, img, txt)
            except Exception as error:  # a failed step fails its requests, not the replica
                for entry in batch:
                    if not entry.future.done():
                        entry.future.set_exception(error)
                continue
            rows = sum(t.latents.shape[0] for t in tasks)
            self.metrics.batch.observe(rows)
            self.metrics.active_images.set(rows)
            self.metrics.steps.inc()
            self.counts["steps"] += 1
            self.counts["batched_steps"] += len(batch) > 1
            self.counts["max_rows"] = max(self.counts["max_rows"], rows)
            for entry in batch:
                if entry.task.done and not entry.future.done():
                    entry.future.set_result(entry.task.latents.to("cpu"))
                    self.counts["completed"] += 1
            # The batch goes to the back of the line, so another image size gets the next turn.
            for entry in batch:
                self.entries.remove(entry)
                if not entry.future.done():
                    self.entries.append(entry)
            self.metrics.queue_depth.set(len(self.entries))

    def stats(self) -> dict:
        active = sum(1 for e in self.entries if not e.cancelled and not e.future.done())
        return {**self.counts, "active": active}

    def check_health(self) -> None:
        if self.loop_task is not None and self.loop_task.done() and not self.loop_task.cancelled():
            raise RuntimeError(f"denoising loop stopped: {self.loop_task.exception()!r}")
