"""What the LoRA modules share: the bounds, the error, a request's choice of an adapter, an adapter's pairs,
and how a transformer is made ready for them (LoraSlots)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_LORAS_PER_ROW = 4
MAX_RANK = 128
MAX_FILE_BYTES = 2 << 30


@dataclass(frozen=True)
class LoraSlots:
    """How a transformer is made ready for LoRAs when it loads (fluxray.transformer.load_transformer): adapters
    per row, their highest rank, and how many stay resident before the bank grows."""

    max_per_row: int = MAX_LORAS_PER_ROW
    max_rank: int = MAX_RANK
    resident: int = 8


class LoraError(ValueError):
    """A LoRA that cannot be used; the message names the file or adapter and why."""


@dataclass(frozen=True)
class LoraChoice:
    """One adapter a request asks for, and how strongly."""

    name: str
    scale: float = 1.0


@dataclass
class LoraAdapter:
    """An adapter's low-rank pairs by target module path (diffusers' names, e.g.
    transformer_blocks.0.attn.to_q): A (r, in) and B (out, r), PEFT's alpha / r folded into B."""

    name: str
    rank: int
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.pairs.values())
