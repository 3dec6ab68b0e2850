"""TextEncoder deployment: CLIP-L + T5-XXL, batched across requests, with a prompt cache bounded in bytes."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from deployments.config import AppConfig
from deployments.metrics import StageMetrics
from deployments.stages.messages import EncodedPrompt
from deployments.warmup import timed, warm_text_encoder
from fluxray.embeds import PromptEmbeds
from fluxray.runtime import stage_runtime
from fluxray.text_encoding import TextEncoder

Key = tuple[str, str | None]  # (prompt, prompt_2), or (negative_prompt, None)


class PromptCache:
    """An LRU of prompt embeddings whose budget is the bytes of their tensors, not a count of entries.

    A FLUX.1-dev entry is ~4 MiB (T5: 512 tokens x 4096 in bf16) and a tiny-model one 64 KiB, so a
    count would mean a different amount of memory for every model; bytes mean the same everywhere.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[Key, PromptEmbeds] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: Key) -> bool:
        return key in self.entries

    def get(self, key: Key) -> PromptEmbeds | None:
        """The entry (and mark it as just used), or None."""
        embeds = self.entries.get(key)
        if embeds is not None:
            self.entries.move_to_end(key)
        return embeds

    def put(self, key: Key, embeds: PromptEmbeds) -> None:
        """Add or replace an entry as the most recently used one, then evict down to the budget."""
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= old.nbytes
        self.entries[key] = embeds
        self.bytes += embeds.nbytes
        self.evict()

    def evict(self) -> None:
        """Drop least recently used entries until the cached tensors fit in max_bytes."""
        while self.bytes > self.max_bytes and self.entries:
            _, embeds = self.entries.popitem(last=False)
            self.bytes -= embeds.nbytes

    def stats(self) -> dict:
        return {"cache_entries": len(self.entries), "cache_bytes": self.bytes, "cache_max_bytes": self.max_bytes}


def lookup_or_encode(
    cache: PromptCache, keys: Iterable[Key], encode: Callable[[list[Key]], PromptEmbeds]
) -> tuple[dict[Key, PromptEmbeds], int]:
    """Each key's embeddings, from the cache or from one `encode` call over the missing keys; and the hits.

    The batch's own embeddings are returned here, not read back from the cache afterwards, so an
    eviction (this batch's new entries can push out older ones, or each other when they alone exceed
    the budget) never takes one from under the batch that needs it.
    """
    keys = list(dict.fromkeys(keys))
    found = {key: e for key in keys if (e := cache.get(key)) is not None}
    missing = [key for key in keys if key not in found]
    if missing:
        embeds = encode(missing)
        for i, key in enumerate(missing):
            found[key] = embeds.select([i])
            cache.put(key, found[key])
    return found, len(keys) - len(missing)


@serve.deployment(name="TextEncoder")
class TextEncoderDeployment:
    def __init__(self, config: dict):
        self.config = AppConfig.model_validate(config)
        source, device, dtype = stage_runtime(*self.config.runtime)
        self.encoder = TextEncoder.load(source, device, dtype, self.config.speed)
        if self.config.warm_up:
            timed("TextEncoder", lambda: warm_text_encoder(self.encoder))
        self.cache = PromptCache(self.config.prompt_cache_bytes)
        # One thread runs the models, so the event loop stays free to collect the next batch.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")
        self.encode_batch.set_max_batch_size(self.config.encoder_max_batch_size)
        self.encode_batch.set_batch_wait_timeout_s(self.config.encoder_batch_wait_s)
        self.hits = self.misses = 0
        self.metrics = StageMetrics("encode")

    def _encode(self, keys: list[Key]) -> PromptEmbeds:
        self.metrics.batch.observe(len(keys))
        return self.encoder.encode([p for p, _ in keys], [p2 for _, p2 in keys]).to("cpu")

    def _lookup(self, requests: list[tuple[str, str | None, str | None]]) -> dict[Key, PromptEmbeds]:
        keys = [(p, p2) for p, p2, _ in requests] + [(neg, None) for _, _, neg in requests if neg]
        found, hits = lookup_or_encode(self.cache, keys, self._encode)
        self.hits += hits
        self.misses += len(found) - hits
        return found

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def encode_batch(self, requests: list[tuple[str, str | None, str | None]]) -> list[EncodedPrompt]:
        found = await asyncio.get_running_loop().run_in_executor(self.executor, self._lookup, requests)
        return [EncodedPrompt(found[(p, p2)], found[(neg, None)] if neg else None) for p, p2, neg in requests]

    async def encode(self, prompt: str, prompt_2: str | None = None, negative_prompt: str | None = None):
        """EncodedPrompt of one request (negative_prompt only when the request uses true CFG)."""
        started = time.monotonic()
        with self.metrics.timed():
            encoded = await self.encode_batch((prompt, prompt_2, negative_prompt))
        return dataclasses.replace(encoded, encode_s=time.monotonic() - started)

    def stats(self) -> dict:
        return {**self.cache.stats(), "cache_hits": self.hits, "cache_misses": self.misses}
