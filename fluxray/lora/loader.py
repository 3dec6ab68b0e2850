"""Adapters brought into a transformer's bank on demand: from the host cache when evicted earlier, else read
from the registry's file; room made first (fluxray.lora.residency), never by evicting an adapter that rows
in flight hold. What the Denoiser deployment (its reads off the step loop, one per adapter however many
requests wait) and the offline job's denoise stage (synchronously, per batch) share."""

from __future__ import annotations

import time
from collections.abc import Iterable

from torch import nn

from fluxray.lora.adapters import LoraAdapter, LoraError
from fluxray.lora.files import read_lora
from fluxray.lora.registry import LoraRegistry
from fluxray.lora.residency import HostCache, LoraResidency, make_room


class AdapterLoader:
    """The adapters of `transformer`'s bank (fluxray.lora.attach_loras): at most `max_resident` kept on
    the device (least recently used evicted to host memory, up to `host_cache_bytes`)."""

    def __init__(
        self,
        transformer: nn.Module,
        registry: LoraRegistry | None,
        max_rank: int,
        max_resident: int,
        host_cache_bytes: int,
    ):
        self.transformer, self.registry, self.max_rank = transformer, registry, max_rank
        self.bank = getattr(transformer, "fluxray_loras", None)
        self.residency = LoraResidency(max_resident)
        self.host = HostCache(host_cache_bytes)

    def resident(self, name: str) -> bool:
        return self.bank is not None and name in self.bank.adapters

    def touch(self, names: Iterable[str]) -> None:
        """These adapters were just asked for (least recently used goes first)."""
        self.residency.touch(list(names), time.monotonic())

    def read(self, name: str) -> LoraAdapter:
        """The adapter's file (fetched first when it is on S3), read against the transformer: call it off
        an event loop."""
        if self.registry is None or self.bank is None:
            raise LoraError("this server has no LoRAs")
        return read_lora(self.registry.path(name), self.transformer, name, self.max_rank)

    def from_host(self, name: str) -> LoraAdapter | None:
        """The adapter if it was evicted to host memory (taken out of it), else None."""
        return self.host.take(name)

    def install(self, adapter: LoraAdapter, held: set[str]) -> None:
        """The adapter into the bank, room made first without evicting any of `held`."""
        if adapter.name in self.bank.adapters:
            return
        make_room(self.bank, self.residency, self.host, held)
        self.bank.add(adapter)

    def ensure(self, names: set[str]) -> None:
        """Every one of `names` in the bank, now (what a batch of rows names: none of them is evicted for
        another); LoraError for a file that cannot be used."""
        if not names:
            return
        self.touch(names)
        for name in sorted(names - set(self.bank.adapters)):
            self.install(self.from_host(name) or self.read(name), held=names)
