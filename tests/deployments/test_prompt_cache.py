"""The TextEncoder's prompt cache is bounded in bytes of embeddings, not in entries (no cluster needed).

The deployment class runs here in-process on the tiny model: its lookup path (cache, then one
encode of what is missing) and its stats are the code a replica runs; only Serve's batching is not.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from deployments.config import AppConfig
from deployments.stages.text_encoder import PromptCache, TextEncoderDeployment, lookup_or_encode
from fluxray.embeds import PromptEmbeds

# A tiny-model entry: CLIP pooled (1, 32) + T5 (1, 64, 32), float32.
TINY_ENTRY_BYTES = (32 + 64 * 32) * 4


def embeds(tokens: int, fill: float = 0.0) -> PromptEmbeds:
    return PromptEmbeds(torch.full((1, 8), fill), torch.full((1, tokens, 8), fill))


def test_embeds_report_the_bytes_of_their_tensors():
    assert embeds(10).nbytes == (8 + 10 * 8) * 4
    bf16 = PromptEmbeds(torch.zeros(1, 768, dtype=torch.bfloat16), torch.zeros(1, 512, 4096, dtype=torch.bfloat16))
    assert bf16.nbytes == 4 * 2**20 + 1536  # FLUX.1-dev's size: the gpu config's comment counts on it


def test_cache_evicts_least_recently_used_until_within_the_byte_budget():
    entry = embeds(10).nbytes
    cache = PromptCache(max_bytes=int(2.5 * entry))
    cache.put(("a", None), embeds(10))
    cache.put(("b", None), embeds(10))
    assert cache.get(("a", None)) is not None  # a is now the most recently used
    cache.put(("c", None), embeds(10))
    assert ("b", None) not in cache and ("a", None) in cache and ("c", None) in cache
    assert cache.stats() == {"cache_entries": 2, "cache_bytes": 2 * entry, "cache_max_bytes": int(2.5 * entry)}
    # One big entry pushes out as many small ones as it takes, oldest first.
    cache.put(("big", None), embeds(19))
    assert list(cache.entries) == [("big", None)] and cache.bytes == embeds(19).nbytes <= cache.max_bytes
    # Replacing an entry counts its bytes once.
    cache.put(("big", None), embeds(19, 1.0))
    assert len(cache) == 1 and cache.bytes == embeds(19).nbytes


def test_an_entry_larger_than_the_budget_is_not_kept():
    cache = PromptCache(max_bytes=embeds(10).nbytes - 1)
    cache.put(("a", None), embeds(10))
    assert len(cache) == 0 and cache.bytes == 0


def test_a_batch_gets_all_its_embeddings_even_when_they_alone_exceed_the_budget():
    calls = []

    def encode(keys):
        calls.append(list(keys))
        return PromptEmbeds.cat([embeds(10, float(i)) for i in range(len(keys))])

    cache = PromptCache(max_bytes=2 * embeds(10).nbytes)
    keys = [("a", None), ("b", None), ("c", None), ("a", None)]
    found, hits = lookup_or_encode(cache, keys, encode)
    assert calls == [[("a", None), ("b", None), ("c", None)]] and hits == 0
    assert [found[k].pooled[0, 0].item() for k in keys] == [0.0, 1.0, 2.0, 0.0]
    assert list(cache.entries) == [("b", None), ("c", None)]  # a, the oldest of the batch, went
    found, hits = lookup_or_encode(cache, [("c", None), ("d", None)], encode)
    assert calls[-1] == [("d", None)] and hits == 1
    assert list(cache.entries) == [("c", None), ("d", None)]


@pytest.fixture(scope="module")
def encoder():
    return TextEncoderDeployment.func_or_class(
        {"model": "tiny", "device": "cpu", "torch_threads": 1, "prompt_cache_bytes": 3 * TINY_ENTRY_BYTES}
    )


def test_the_deployment_caches_real_embeddings_within_its_byte_budget(encoder, tiny_pipeline):
    requests = [(f"a prompt number {i}", None, None) for i in range(4)] + [("p", None, "blurry")]
    found = encoder._lookup(requests)
    # Cached or not, each embedding is what encoding the prompt alone gives.
    alone = tiny_pipeline.text_encoder.encode(["a prompt number 0"])
    assert torch.allclose(found[("a prompt number 0", None)].sequence, alone.sequence, atol=1e-6)
    assert found[("blurry", None)].nbytes == TINY_ENTRY_BYTES
    stats = encoder.stats()
    assert stats["cache_max_bytes"] == 3 * TINY_ENTRY_BYTES
    assert stats["cache_entries"] == 3 and stats["cache_bytes"] == 3 * TINY_ENTRY_BYTES
    assert stats["cache_misses"] == 6 and stats["cache_hits"] == 0
    # The three most recent stay: asking for them again encodes nothing.
    encoder._lookup([("p", None, "blurry")])
    encoder._lookup([("a prompt number 3", None, None)])
    stats = encoder.stats()
    assert stats["cache_hits"] == 3 and stats["cache_misses"] == 6
    # The oldest was evicted: it is encoded again, and the cache stays within its bytes.
    encoder._lookup([("a prompt number 0", None, None)])
    stats = encoder.stats()
    assert stats["cache_misses"] == 7 and stats["cache_bytes"] == 3 * TINY_ENTRY_BYTES


def test_a_zero_budget_turns_the_cache_off():
    deployment = TextEncoderDeployment.func_or_class(
        {"model": "tiny", "device": "cpu", "torch_threads": 1, "prompt_cache_bytes": 0}
    )
    deployment._lookup([("a", None, None)])
    deployment._lookup([("a", None, None)])
    stats = deployment.stats()
    assert stats["cache_entries"] == 0 and stats["cache_bytes"] == 0 and stats["cache_misses"] == 2


def test_the_old_entry_count_is_refused_by_name():
    with pytest.raises(ValidationError, match="prompt_cache_size"):
        AppConfig.model_validate({"prompt_cache_size": 256})
    assert AppConfig().prompt_cache_bytes == 256 * 2**20
