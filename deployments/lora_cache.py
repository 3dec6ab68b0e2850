"""Which LoRA adapters a Denoiser replica keeps loaded: a plain policy, driven by the Denoiser.

At most `max_resident` adapters stay resident; to make room for one more, the least recently used go
first, but never one that a request in the replica's queue holds (its rows would lose their deltas
mid-way). When every resident adapter is held, nothing is evicted and the replica holds one more for
a while: a request is never refused for want of a slot.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


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
