"""Step caching decided row by row inside one batched transformer call: first-block caching (FBCache, as
diffusers' `FirstBlockCacheConfig` hooks do it), each row with its own state and its own decision.

At every step the first transformer block runs for every row. A row with a cache compares its first block's
residual (output - input, the image stream) with the one of its last fully computed step: when the relative
change, mean(|r - r_prev|) / mean(|r_prev|), is at most the threshold, the row skips the remaining blocks and
takes its first block's output plus the remaining blocks' residual cached at that last full step; otherwise
it runs them (as a sub-batch of the rows that compute) and caches their residual anew. Rows without a cache
always compute and keep no state, so a request that asks for no cache gets exactly the transformer's own
forward whatever its neighbours do.

diffusers decides once per call, over the whole batch (`.abs().mean().item()` of the batch's residuals), so
a batched image would depend on its neighbours; here a row's decision reads that row only: an image is the
same cached alone or in any batch, and at batch 1 the arithmetic is diffusers' (tested against
`FluxPipeline` with `transformer.enable_cache(FirstBlockCacheConfig(threshold))`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

CacheMethod = Literal["first_block"]


@dataclass(frozen=True)
class StepCache:
    """A request's step cache: the method and its threshold (the relative change of the first block's
    residual under which a step reuses the rest of the transformer's)."""

    method: CacheMethod = "first_block"
    threshold: float = 0.08


@dataclass(eq=False)
class RowCacheState:
    """One row's cache (one image, one branch of true CFG): its first block's residual and the remaining
    blocks' residual at its last fully computed step, and how many steps it computed and skipped."""

    head_residual: torch.Tensor | None = None
    tail_residual: torch.Tensor | None = None
    computed: int = 0
    skipped: int = 0


@dataclass(eq=False)
class CachedRows:
    """The rows of one transformer call: each row's threshold and state (None: no cache, always computed)."""

    thresholds: list[float | None]
    states: list[RowCacheState | None] = field(default_factory=list)


def relative_change(residual: torch.Tensor, previous: torch.Tensor) -> float:
    """mean(|residual - previous|) / mean(|previous|), in the tensors' dtype (diffusers' FBCache rule)."""
    return ((residual - previous).abs().mean() / previous.abs().mean()).item()


def cached_forward(
    transformer,
    rows: CachedRows,
    hidden_states: torch.Tensor,
    timestep: torch.Tensor,
    guidance: torch.Tensor | None,
    pooled_projections: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    txt_ids: torch.Tensor,
    img_ids: torch.Tensor,
    select_rows: Callable[[Sequence[int] | None], None] | None = None,
) -> torch.Tensor:
    """FluxTransformer2DModel's forward (diffusers 0.42's, step for step) with each cached row deciding
    after the first block whether to run the rest. `select_rows(indices)` tells the transformer's LoRA bank
    which rows a sub-batch holds (None: all of them again)."""
    t = transformer
    hidden = t.x_embedder(hidden_states)
    timestep = timestep.to(hidden.dtype) * 1000
    if guidance is not None:
        guidance = guidance.to(hidden.dtype) * 1000
    temb = (
        t.time_text_embed(timestep, pooled_projections)
        if guidance is None
        else t.time_text_embed(timestep, guidance, pooled_projections)
    )
    encoder = t.context_embedder(encoder_hidden_states)
    rotary = t.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
    blocks = [*t.transformer_blocks, *t.single_transformer_blocks]

    def run(block, hidden, encoder, temb):
        encoder, hidden = block(hidden_states=hidden, encoder_hidden_states=encoder, temb=temb, image_rotary_emb=rotary)
        return hidden, encoder

    head_in = hidden
    hidden, encoder = run(blocks[0], hidden, encoder, temb)
    residual = hidden - head_in
    compute = []
    for row, (threshold, state) in enumerate(zip(rows.thresholds, rows.states)):
        if state is None or state.head_residual is None or state.tail_residual is None:
            compute.append(row)
        elif relative_change(residual[row], state.head_residual) > threshold:
            compute.append(row)
    out = hidden.clone()
    if compute:
        index = torch.tensor(compute, device=hidden.device)
        everyone = len(compute) == hidden.shape[0]
        sub_hidden = hidden if everyone else hidden.index_select(0, index)
        sub_encoder = encoder if everyone else encoder.index_select(0, index)
        sub_temb = temb if everyone else temb.index_select(0, index)
        if select_rows is not None and not everyone:
            select_rows(compute)
        head_out = sub_hidden
        for block in blocks[1:]:
            sub_hidden, sub_encoder = run(block, sub_hidden, sub_encoder, sub_temb)
        if select_rows is not None and not everyone:
            select_rows(None)
        tail = sub_hidden - head_out
        out[index] = sub_hidden
        for k, row in enumerate(compute):
            state = rows.states[row]
            if state is not None:
                state.head_residual, state.tail_residual = residual[row], tail[k]
                state.computed += 1
    for row, state in enumerate(rows.states):
        if state is not None and row not in compute:
            out[row] = hidden[row] + state.tail_residual
            state.skipped += 1
    return t.proj_out(t.norm_out(out, temb))
