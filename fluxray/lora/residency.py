"""Which LoRA adapters a transformer keeps loaded: a plain policy, driven by the Denoiser deployment and by
the offline job's denoise stage.

At most `max_resident` adapters stay resident; to make room for one more, the least recently used go
first, but never one that a request in the replica's queue holds (its rows would lose their deltas
mid-way). When every resident adapter is held, nothing is evicted and the replica holds one more for
a while: a request is never refused for want of a slot.

Behind the device, `HostCache` keeps evicted adapters' pairs in host memory up to a byte budget, so one
that comes back costs a copy to the device, not a file read and diffusers' key conversion.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class LoraResidency:
    max_resident: int
    last_used: dict[str, float] = field(default_factory=dict)

    def touch(self, names: Iterable[str], now: float) -> None:
        for name in names:
            self.last_used[name] = now

    def to_evict(self, resident: Iterable[str], held: set[str]) -> list[str]:
        """The adapters to drop before one more is added: least recently used first, none held."""
        resident = list(resident)
        excess = len(resident) + 1 - self.max_resident
        if excess <= 0:
            return []
        idle = sorted((n for n in resident if n not in held), key=lambda n: self.last_used.get(n, float("-inf")))
        evicted = idle[:excess]
        for name in evicted:
            self.last_used.pop(name, None)
        return evicted


def make_room(bank, residency: LoraResidency, host: HostCache, held: set[str]) -> None:
    """Before one more adapter joins `bank` (a fluxray.lora.LoraBank): move the ones `residency` picks
    (none of `held`) from the bank to `host`."""
    for name in residency.to_evict(bank.adapters, held):
        host.put(bank.adapters[name])
        bank.remove(name)


class _Sized(Protocol):
    name: str

    @property
    def nbytes(self) -> int: ...


class HostCache:
    """Adapters (fluxray.lora.LoraAdapter) off the device, by name, within `max_bytes`: the least recently
    put leave first; one larger than the budget is not kept."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.items: OrderedDict[str, _Sized] = OrderedDict()

    @property
    def nbytes(self) -> int:
        return sum(item.nbytes for item in self.items.values())

    def put(self, adapter: _Sized) -> None:
        self.items.pop(adapter.name, None)
        if adapter.nbytes > self.max_bytes:
            return
        self.items[adapter.name] = adapter
        while self.nbytes > self.max_bytes:
            self.items.popitem(last=False)

    def take(self, name: str) -> _Sized | None:
        """The adapter, out of the cache (it goes back to the device), or None."""
        return self.items.pop(name, None)
