"""Prompt encoding: CLIP-L's pooled vector and T5-XXL's token sequence, as FluxPipeline makes them."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fluxray.embeds import PromptEmbeds
from fluxray.models.sources import ModelSource, load_text_encoders, load_tokenizers
from fluxray.speed import SpeedOptions, resolve


class PromptLength:
    """Counts a prompt's tokens as the encoders will, to tell which of them cut it short: CLIP reads
    77 tokens, T5 the spec's max_sequence_length (512 for dev); the rest is silently dropped, as
    in FluxPipeline (which only logs a warning). Needs the tokenizers only, not the models."""

    def __init__(self, clip_tokenizer, t5_tokenizer, max_sequence_length: int):
        self.clip_tokenizer, self.t5_tokenizer = clip_tokenizer, t5_tokenizer
        self.max_sequence_length = max_sequence_length

    @classmethod
    def load(cls, source: ModelSource) -> PromptLength:
        return cls(*load_tokenizers(source), source.spec.max_sequence_length)

    def truncated(self, prompt: str, prompt_2: str | None = None) -> list[str]:
        """The encoders ("clip", "t5") that will not see the whole prompt (T5 reads prompt_2 if given)."""
        cut = []
        if len(self.clip_tokenizer(prompt, verbose=False).input_ids) > self.clip_tokenizer.model_max_length:
            cut.append("clip")
        t5_text = prompt_2 if prompt_2 is not None else prompt
        if len(self.t5_tokenizer(t5_text, verbose=False).input_ids) > self.max_sequence_length:
            cut.append("t5")
        return cut


class TextEncoder:
    """CLIP + T5 with their tokenizers; `encode` turns prompts into PromptEmbeds."""

    def __init__(self, clip_tokenizer, clip, t5_tokenizer, t5, max_sequence_length: int):
        self.clip_tokenizer, self.clip = clip_tokenizer, clip
        self.t5_tokenizer, self.t5 = t5_tokenizer, t5
        self.max_sequence_length = max_sequence_length
        self.length = PromptLength(clip_tokenizer, t5_tokenizer, max_sequence_length)

    @classmethod
    def load(
        cls,
        source: ModelSource,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        speed: SpeedOptions | None = None,
    ) -> TextEncoder:
        """CLIP on device; T5 there too unless speed.t5_device places it elsewhere."""
        t5_device = resolve(speed, device, "text").t5_device
        return cls(*load_text_encoders(source, device, dtype, t5_device), source.spec.max_sequence_length)

    @property
    def device(self) -> torch.device:
        return self.t5.device

    @torch.inference_mode()
    def encode(self, prompts: Sequence[str], prompts_2: Sequence[str | None] | None = None) -> PromptEmbeds:
        """Encode prompts; prompts_2[i] (if given and not None) replaces prompts[i] for T5."""
        prompts = list(prompts)
        t5_prompts = [p2 if p2 is not None else p for p, p2 in zip(prompts, prompts_2 or [None] * len(prompts))]
        # Both tokenizers pad to a fixed length and the encoders get no attention mask,
        # exactly as FluxPipeline does: FLUX was trained on such padded sequences.
        clip_ids = self.clip_tokenizer(
            prompts,
            padding="max_length",
            max_length=self.clip_tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        pooled = self.clip(clip_ids.to(self.clip.device), output_hidden_states=False).pooler_output
        t5_ids = self.t5_tokenizer(
            t5_prompts,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        sequence = self.t5(t5_ids.to(self.t5.device), output_hidden_states=False)[0]
        return PromptEmbeds(pooled=pooled.to(self.clip.dtype), sequence=sequence.to(self.t5.dtype))
