"""The slot bank on the transformer: resident adapters in fixed slots, the Linears they target wrapped in
LoraLinear, each row of a call adding its own low-rank delta (see the package's docstring)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fluxray.lora.adapters import MAX_LORAS_PER_ROW, MAX_RANK, LoraAdapter, LoraChoice, LoraError

BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")  # attach_loras(wrap_all=True) wraps these


def linear_like(module: nn.Module | None) -> bool:
    """An nn.Linear, or a layer that stands in for one (fluxray.speed.quantization's fp8 and int8 Linears): what an
    adapter's pair can sit on, its delta added to the layer's output in the activations' dtype."""
    if isinstance(module, nn.Linear):
        return True
    sizes = (getattr(module, "in_features", None), getattr(module, "out_features", None))
    return module is not None and not isinstance(module, LoraLinear) and all(isinstance(n, int) for n in sizes)


class LoraBank:
    """The adapters resident on the transformer, in fixed slots, and the current call's rows.

    Every wrapped Linear (LoraLinear) holds one tensor per side for all slots, A (slots + 1, max_rank, in) and
    B (slots + 1, out, max_rank); slot 0 stays zero (rows without an adapter, unused positions). Adding an
    adapter copies its pairs into a free slot (zeros where it does not touch a module) and removing one frees
    the slot; neither changes a shape. `select(rows)` turns each row's adapters into slot indices and scales
    (rows, max_per_row); each wrapped Linear gathers its rows' slots, so the per-row weights exist only for
    the Linear running. With `fixed_shapes` (torch.compile) every call uses all max_per_row positions and
    max_rank columns, so neither a new adapter nor a new mix changes a shape the graphs were compiled for;
    without it a call uses just the positions and rank its rows need.
    """

    def __init__(
        self,
        max_per_row: int = MAX_LORAS_PER_ROW,
        max_rank: int = MAX_RANK,
        slots: int = 8,
        transformer: nn.Module | None = None,
        fixed_shapes: bool = False,
        dtype: torch.dtype | None = None,
    ):
        self.max_per_row, self.max_rank, self.slots = max_per_row, max_rank, slots
        self.transformer, self.fixed_shapes = transformer, fixed_shapes
        self.dtype = dtype  # of the slots: the activations' (a quantized layer's weight is not)
        self.adapters: dict[str, LoraAdapter] = {}  # the resident ones (their float32 pairs on the host)
        self.slot_of: dict[str, int] = {}
        self.modules: dict[str, LoraLinear] = {}
        self.rows: tuple[tuple[LoraChoice, ...], ...] = ()
        self.active = False  # whether the current call's rows use any adapter
        self.index: torch.Tensor | None = None  # (rows, positions) slot of each row's adapters
        self.scale: torch.Tensor | None = None  # (rows, positions * rank) each column's scale
        self.rank = max_rank  # columns per position this call
        self.shared = False  # every row of this call has the same adapters (eager only: one pair, no gather)

    def dry(self, rows: int) -> None:
        """The adapter path with every row on the zero slot at full width (torch.compile's warm-up)."""
        self.rows, self.active, self.rank, self.shared = (), True, self.max_rank, False
        device = next(iter(self.modules.values())).lora_a.device
        self.index = torch.zeros(rows, self.max_per_row, dtype=torch.long, device=device)
        self.scale = torch.zeros(rows, self.max_per_row * self.max_rank, device=device)

    def add(self, adapter: LoraAdapter) -> None:
        """Load the adapter into a free slot (growing the slots when none is free); the Linears it targets are
        wrapped now if they are not yet."""
        if adapter.rank > self.max_rank:
            raise LoraError(f"{adapter.name}: rank {adapter.rank}, over max_lora_rank {self.max_rank}")
        if self.transformer is not None:
            wrap_targets(self.transformer, adapter)
        if adapter.name in self.slot_of:
            self.remove(adapter.name)
        free = sorted(set(range(1, self.slots + 1)) - set(self.slot_of.values()))
        if not free:
            self._grow(self.slots * 2)
            free = [len(self.slot_of) + 1]
        slot = free[0]
        for name, module in self.modules.items():
            module.load_slot(slot, adapter.pairs.get(name))
        self.adapters[adapter.name], self.slot_of[adapter.name] = adapter, slot
        self.rows = ()  # the next select() rebuilds its indices

    def remove(self, name: str) -> None:
        """Free the adapter's slot (its values stay until another adapter takes it; no row points there)."""
        self.adapters.pop(name, None)
        self.slot_of.pop(name, None)
        self.rows = ()

    def _grow(self, slots: int) -> None:
        for module in self.modules.values():
            module.grow(slots)
        self.slots = slots

    def register(self, module: LoraLinear) -> None:
        """A newly wrapped Linear: its slots, filled from the resident adapters that target it."""
        self.modules[module.module_name] = module
        for name, slot in self.slot_of.items():
            module.load_slot(slot, self.adapters[name].pairs.get(module.module_name))

    def select(self, rows: Sequence[Sequence[LoraChoice]]) -> None:
        """The adapters of each row of the next call (in the order of its batch)."""
        rows = tuple(tuple(r) for r in rows)
        for choices in rows:
            if len(choices) > self.max_per_row:
                raise LoraError(f"{len(choices)} LoRAs on one image, over max_loras_per_request {self.max_per_row}")
            for choice in choices:
                if choice.name not in self.adapters:
                    raise LoraError(f"LoRA {choice.name!r} is not loaded")
        if rows == self.rows and self.index is not None and self.index.shape[0] == len(rows):
            return
        self.rows = rows
        self.active = any(choice.scale != 0 for choices in rows for choice in choices)
        if not self.active:
            return
        self.shared = not self.fixed_shapes and len(set(rows)) == 1
        if self.fixed_shapes:
            positions, self.rank = self.max_per_row, self.max_rank
        else:
            positions = max(len(choices) for choices in rows)
            self.rank = max(self.adapters[c.name].rank for choices in rows for c in choices)
        index = torch.zeros(len(rows), positions, dtype=torch.long)
        scale = torch.zeros(len(rows), positions)
        for i, choices in enumerate(rows):
            for j, choice in enumerate(choices):
                index[i, j], scale[i, j] = self.slot_of[choice.name], choice.scale
        device = next(iter(self.modules.values())).lora_a.device
        self.index = index.to(device)
        self.scale = scale.repeat_interleave(self.rank, dim=1).to(device)


class LoraLinear(nn.Module):
    """A Linear plus the current rows' low-rank deltas (see LoraBank); the base weights are untouched."""

    def __init__(self, base: nn.Module, module: str, bank: LoraBank):
        super().__init__()
        self.base, self.module_name, self.bank = base, module, bank
        weight = base.weight
        dtype = bank.dtype or (weight.dtype if weight.is_floating_point() else torch.float32)
        self.lora_a = torch.zeros(bank.slots + 1, bank.max_rank, base.in_features, device=weight.device, dtype=dtype)
        self.lora_b = torch.zeros(bank.slots + 1, base.out_features, bank.max_rank, device=weight.device, dtype=dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def load_slot(self, slot: int, pair: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        if pair is not None:
            a, b = pair
            self.lora_a[slot, : a.shape[0]] = a.to(self.lora_a.dtype)
            self.lora_b[slot, :, : b.shape[1]] = b.to(self.lora_b.dtype)

    def grow(self, slots: int) -> None:
        a = self.lora_a.new_zeros(slots + 1, *self.lora_a.shape[1:])
        b = self.lora_b.new_zeros(slots + 1, *self.lora_b.shape[1:])
        a[: self.lora_a.shape[0]], b[: self.lora_b.shape[0]] = self.lora_a, self.lora_b
        self.lora_a, self.lora_b = a, b

    def _apply(self, fn, recurse=True):  # .to(device/dtype) moves the slots with the weights
        super()._apply(fn, recurse)
        self.lora_a, self.lora_b = fn(self.lora_a), fn(self.lora_b)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        bank = self.bank
        if not bank.active:
            return out
        rows, positions = bank.index.shape
        rank = bank.rank
        if bank.shared:  # every row the same adapters: one low-rank pair for the whole call, no gather
            a = self.lora_a[bank.index[0]][:, :rank].reshape(positions * rank, self.base.in_features)
            b = self.lora_b[bank.index[0]][..., :rank].permute(1, 0, 2).reshape(self.base.out_features, -1)
            low = (x @ a.transpose(0, 1)) * bank.scale[0].to(x.dtype)
            return out + low @ b.transpose(0, 1)
        a = self.lora_a[bank.index][:, :, :rank].reshape(rows, positions * rank, self.base.in_features)
        b = self.lora_b[bank.index][..., :rank].permute(0, 2, 1, 3).reshape(rows, self.base.out_features, -1)
        flat = x.reshape(rows, -1, x.shape[-1])
        low = torch.bmm(flat, a.transpose(1, 2)) * bank.scale.to(flat.dtype)[:, None, :]
        delta = torch.bmm(low, b.transpose(1, 2))
        return out + delta.reshape(out.shape)


def attach_loras(
    transformer: nn.Module,
    max_per_row: int = MAX_LORAS_PER_ROW,
    max_rank: int = MAX_RANK,
    slots: int = 8,
    wrap_all: bool = False,
) -> LoraBank:
    """The transformer's bank (made once) with `slots` adapters resident at most before it grows. Without
    `wrap_all`, no Linear is wrapped until an adapter that targets it is added (`wrap_targets`), so a
    transformer whose requests use no LoRA runs exactly as before; with it (for torch.compile, before
    compiling) every Linear of the transformer's blocks is wrapped now and calls use fixed shapes, so no later
    adapter or mix changes the module tree or a shape."""
    existing = getattr(transformer, "fluxray_loras", None)
    if existing is not None:
        return existing
    dtype = getattr(transformer, "dtype", None)
    bank = LoraBank(max_per_row, max_rank, slots, transformer=transformer, fixed_shapes=wrap_all, dtype=dtype)
    transformer.fluxray_loras = bank
    if wrap_all:
        for name, module in list(transformer.named_modules()):
            if linear_like(module) and name.startswith(BLOCK_PREFIXES):
                _wrap(transformer, name, module, bank)
    return bank


def _wrap(transformer: nn.Module, path: str, target: nn.Module, bank: LoraBank) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = transformer.get_submodule(parent_path) if parent_path else transformer
    wrapped = LoraLinear(target, path, bank)
    setattr(parent, child, wrapped)
    bank.register(wrapped)


def wrap_targets(transformer: nn.Module, adapter: LoraAdapter) -> None:
    """Wrap the Linears the adapter targets (once each) around the transformer's bank."""
    bank = transformer.fluxray_loras
    modules = dict(transformer.named_modules())
    for path in adapter.pairs:
        target = modules[path]
        if not isinstance(target, LoraLinear):
            _wrap(transformer, path, target, bank)
