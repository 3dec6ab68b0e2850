"""The denoise stage: the transformer over each batch's rows, with the LoRAs they name loaded (least
recently used ones evicted, kept on the host)."""

from __future__ import annotations

import json

from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from fluxray.editing import edit_task
from fluxray.embeds import PromptEmbeds
from fluxray.lora import MAX_LORAS_PER_ROW, AdapterLoader, LoraRegistry, LoraSlots
from fluxray.runtime import stage_runtime
from fluxray.sampling import denoise, denoise_task, group_by_size
from fluxray.speed import SpeedOptions
from fluxray.transformer import load_transformer
from jobs.prompts import params_of
from jobs.stages.base import Stage, by_size
from jobs.stages.edit_inputs import unpack_edit
from jobs.stages.schema import DENOISED_SCHEMA

# Host memory per denoise actor for LoRAs evicted from the device (fluxray.lora.residency.HostCache).
LORA_HOST_CACHE_BYTES = 2 << 30


class DenoiseStage(Stage):
    """Embeddings (and an edit's latent distributions) to latents through the transformer, rows of one size
    (and one Kontext reference size) in one call, each row with its own LoRAs."""

    name, schema = "denoise", DENOISED_SCHEMA

    def __init__(
        self,
        model: str,
        device: str,
        dtype: str | None,
        threads: int | None,
        output_format: str,
        speed: SpeedOptions | None = None,
        lora_root: str | None = None,
        max_lora_rank: int = 64,
        max_resident_loras: int = 8,
        endpoint_url: str | None = None,
    ):
        self.source, self.device, self.dtype = stage_runtime(model, device, dtype, threads)
        registry = LoraRegistry(lora_root, endpoint_url=endpoint_url) if lora_root else None
        slots = LoraSlots(MAX_LORAS_PER_ROW, max_lora_rank, max_resident_loras) if lora_root else None
        self.transformer = load_transformer(self.source, self.device, self.dtype, speed, slots)
        self.output_format = output_format
        self.loras = AdapterLoader(self.transformer, registry, max_lora_rank, max_resident_loras, LORA_HOST_CACHE_BYTES)

    def _load_loras(self, rows: list[dict]) -> None:
        """The adapters these rows name, loaded (least recently used ones evicted, never one of these rows');
        a file that cannot be used raises LoraError, which fails the rows that name it."""
        self.loras.ensure({lora["name"] for row in rows for lora in json.loads(row["loras"] or "[]")})

    def _task(self, row: dict):
        tensors = load_tensors(row["embeds"])
        embeds = PromptEmbeds(tensors["pooled"][None], tensors["sequence"][None])
        negative = None
        if "neg_pooled" in tensors:
            negative = PromptEmbeds(tensors["neg_pooled"][None], tensors["neg_sequence"][None])
        params = params_of(row, self.output_format)
        if row["edit"] is not None:
            edit = unpack_edit(row["edit"], row["edit_method"])
            return edit_task(params, embeds, negative, edit, self.source.spec, self.device, self.dtype)
        return denoise_task(params, embeds, negative, self.source.spec, self.device, self.dtype)

    def work(self, rows: list[dict]) -> None:
        self._load_loras(rows)
        for (height, width), group in by_size(rows):
            tasks = [self._task(row) for row in group]
            # Kontext's reference tokens join every row: one transformer call per reference size.
            for _, same in group_by_size(tasks, _reference_shape):
                denoise(self.transformer, same, height, width)
            for row, task in zip(group, tasks):
                row["latents"] = save_tensors({"latents": task.latents.to("cpu", self.dtype).contiguous()})


def _reference_shape(task) -> tuple[int, ...]:
    return () if task.reference_ids is None else tuple(task.reference_ids.shape)
