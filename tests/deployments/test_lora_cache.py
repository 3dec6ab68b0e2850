"""The Denoiser's LoRA residency policy, without a cluster."""

from __future__ import annotations

from deployments.lora_cache import LoraResidency


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
