"""The Denoiser's LoRA residency policy, without a cluster."""

from __future__ import annotations

from fluxray.lora.residency import LoraResidency


def test_room_is_made_least_recently_used_first():
    policy = LoraResidency(max_resident=3)
    policy.touch(["a"], 1.0)
    policy.touch(["b"], 2.0)
    policy.touch(["c"], 3.0)
    assert policy.to_evict(["a", "b"], held=set()) == []  # a third fits
    assert policy.to_evict(["a", "b", "c"], held=set()) == ["a"]
    policy.touch(["a"], 4.0)
    assert policy.to_evict(["a", "b", "c"], held=set()) == ["b"]


def test_an_adapter_a_queued_request_holds_is_never_evicted():
    policy = LoraResidency(max_resident=2)
    policy.touch(["a", "b"], 1.0)
    assert policy.to_evict(["a", "b"], held={"a"}) == ["b"]
    assert policy.to_evict(["a", "b"], held={"a", "b"}) == []  # all held: hold one more for now


def test_a_smaller_bound_evicts_down_to_it():
    policy = LoraResidency(max_resident=1)
    policy.touch(["x", "y", "z"], 1.0)
    policy.touch(["z"], 2.0)
    assert policy.to_evict(["x", "y", "z"], held=set()) == ["x", "y", "z"]  # the least recent first


def test_the_host_cache_keeps_evicted_adapters_within_its_bytes():
    from dataclasses import dataclass

    from fluxray.lora.residency import HostCache

    @dataclass
    class Adapter:
        name: str
        nbytes: int

    cache = HostCache(max_bytes=100)
    for name, size in (("a", 40), ("b", 40), ("c", 40)):
        cache.put(Adapter(name, size))
    assert list(cache.items) == ["b", "c"] and cache.nbytes == 80  # "a" left to make room
    cache.put(Adapter("huge", 101))
    assert "huge" not in cache.items  # over the whole budget: not kept
    assert cache.take("b").name == "b" and cache.take("b") is None  # taken back to the device
    assert cache.take("a") is None
