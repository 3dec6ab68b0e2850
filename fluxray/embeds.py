"""Encoded prompts, the data that passes from text encoding to sampling (kept below both)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class PromptEmbeds:
    """Encoded prompts: `pooled` (B, clip_dim) from CLIP, `sequence` (B, L, t5_dim) from T5."""

    pooled: torch.Tensor
    sequence: torch.Tensor

    def __len__(self) -> int:
        return self.pooled.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the two tensors' elements (what a cache of embeddings holds per entry)."""
        return self.pooled.nbytes + self.sequence.nbytes

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PromptEmbeds:
        return PromptEmbeds(self.pooled.to(device, dtype), self.sequence.to(device, dtype))

    def select(self, rows: Sequence[int]) -> PromptEmbeds:
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.pooled.device)
        return PromptEmbeds(self.pooled.index_select(0, index), self.sequence.index_select(0, index))

    @staticmethod
    def cat(parts: Sequence[PromptEmbeds]) -> PromptEmbeds:
        return PromptEmbeds(torch.cat([p.pooled for p in parts]), torch.cat([p.sequence for p in parts]))
