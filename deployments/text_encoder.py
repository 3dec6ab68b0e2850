"""TextEncoder deployment: CLIP-L + T5-XXL, batched across requests, with a bounded prompt cache."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ray import serve

from deployments.config import AppConfig
from deployments.metrics import StageMetrics
from fluxray.embeds import PromptEmbeds
from fluxray.runtime import stage_runtime
from fluxray.text_encoding import TextEncoder


@dataclass
class EncodedPrompt:
    """What the denoiser needs of a request's text: its embeddings and, for true CFG, the negative's."""

    embeds: PromptEmbeds  # one row, on the CPU
    negative: PromptEmbeds | None = None
    encode_s: float = 0.0  # seconds this request spent in the encoder (batch wait included)


@serve.deployment(name="TextEncoder")
class TextEncoderDeployment:
    def __init__(self, config: dict):
        self.config = AppConfig.model_validate(config)
        source, device, dtype = stage_runtime(*self.config.runtime)
        self.encoder = TextEncoder.load(source, device, dtype, self.config.speed)
        self.cache: OrderedDict[tuple[str, str | None], PromptEmbeds] = OrderedDict()
        # One thread runs the models, so the event loop stays free to collect the next batch.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")
        self.encode_batch.set_max_batch_size(self.config.encoder_max_batch_size)
        self.encode_batch.set_batch_wait_timeout_s(self.config.encoder_batch_wait_s)
        self.hits = self.misses = 0
        self.metrics = StageMetrics("encode")

    def _encode_missing(self, keys: list[tuple[str, str | None]]) -> None:
        missing = list(dict.fromkeys(k for k in keys if k not in self.cache))
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            self.metrics.batch.observe(len(missing))
            embeds = self.encoder.encode([p for p, _ in missing], [p2 for _, p2 in missing]).to("cpu")
            for i, key in enumerate(missing):
                self.cache[key] = embeds.select([i])
        for key in keys:
            self.cache.move_to_end(key)
        while len(self.cache) > max(self.config.prompt_cache_size, len(keys)):
            self.cache.popitem(last=False)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def encode_batch(self, requests: list[tuple[str, str | None, str | None]]) -> list[EncodedPrompt]:
        keys = [(p, p2) for p, p2, _ in requests] + [(neg, None) for _, _, neg in requests if neg]
        await asyncio.get_running_loop().run_in_executor(self.executor, self._encode_missing, keys)
        return [EncodedPrompt(self.cache[(p, p2)], self.cache[(neg, None)] if neg else None) for p, p2, neg in requests]

    async def encode(self, prompt: str, prompt_2: str | None = None, negative_prompt: str | None = None):
        """EncodedPrompt of one request (negative_prompt only when the request uses true CFG)."""
        started = time.monotonic()
        with self.metrics.timed():
            encoded = await self.encode_batch((prompt, prompt_2, negative_prompt))
        return dataclasses.replace(encoded, encode_s=time.monotonic() - started)

    def stats(self) -> dict:
        return {"cache_entries": len(self.cache), "cache_hits": self.hits, "cache_misses": self.misses}
