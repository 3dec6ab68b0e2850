"""Flow-matching sampling for FLUX: noise from seeds, the shifted sigma schedule, and Euler steps.

The step function works on a batch of independent `DenoiseTask`s, each with its own seed,
sigma schedule, step index, guidance schedule and true-CFG scale, so a scheduler can run
requests together that joined at different times. Every formula follows diffusers'
FluxPipeline and FlowMatchEulerDiscreteScheduler so that images match it pixel for pixel.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from typing import TypeVar

import numpy as np
import torch

from fluxray.embeds import PromptEmbeds
from fluxray.lora import LoraChoice
from fluxray.models.specs import ModelSpec
from fluxray.params import GenerationParams
from fluxray.step_cache import CachedRows, RowCacheState, StepCache, cached_forward

LATENT_CHANNELS = 16
T = TypeVar("T")


def group_by_size(items: Iterable[T], size: Callable[[T], tuple[int, int]]) -> list[tuple[tuple[int, int], list[T]]]:
    """Items grouped by their image size (height, width), smallest first: the tasks of one
    transformer or VAE call must share a size."""
    ordered = sorted(items, key=size)
    return [(key, list(group)) for key, group in groupby(ordered, key=size)]


def latent_size(height: int, width: int, vae_scale_factor: int = 8) -> tuple[int, int]:
    """Latent height and width (before 2x2 packing) of an image."""
    return 2 * (height // (vae_scale_factor * 2)), 2 * (width // (vae_scale_factor * 2))


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C*4): 2x2 latent patches become tokens."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(latents: torch.Tensor, height: int, width: int, vae_scale_factor: int = 8) -> torch.Tensor:
    """Inverse of pack_latents for an image of height x width pixels."""
    b, _, channels = latents.shape
    h, w = latent_size(height, width, vae_scale_factor)
    latents = latents.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, h, w)


def initial_noise(
    seed: int, height: int, width: int, dtype: torch.dtype = torch.float32, vae_scale_factor: int = 8
) -> torch.Tensor:
    """Packed initial latents (1, seq, 64) exactly as FluxPipeline draws them with
    generator=torch.Generator("cpu").manual_seed(seed): on the CPU, in the model's dtype."""
    h, w = latent_size(height, width, vae_scale_factor)
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((1, LATENT_CHANNELS, h, w), generator=generator, device="cpu", dtype=dtype)
    return pack_latents(noise)


def image_ids(height: int, width: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Positional ids (seq, 3) of the packed image tokens: (0, row, column)."""
    h, w = latent_size(height, width)
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def text_ids(sequence_length: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Positional ids (L, 3) of the text tokens: all zeros in FLUX.1."""
    return torch.zeros(sequence_length, 3, device=device, dtype=dtype)


def calculate_shift(image_seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float):
    """mu of the resolution-dependent shift: linear in the number of image tokens."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


@functools.lru_cache(maxsize=512)
def _flow_sigmas_cached(num_steps: int, image_seq_len: int, scheduler_json: str) -> torch.Tensor:
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = json.loads(scheduler_json)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    mu = calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    # The scheduler itself applies the shift, so FLUX.1-dev (dynamic) and schnell (static)
    # schedules come out exactly as diffusers computes them.
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    return scheduler.sigmas.to(torch.float32)


def flow_sigmas(num_steps: int, image_seq_len: int, scheduler_config: dict) -> torch.Tensor:
    """The num_steps + 1 sigmas (1 -> 0) of a request, float32 on the CPU."""
    return _flow_sigmas_cached(num_steps, image_seq_len, json.dumps(scheduler_config, sort_keys=True)).clone()


@dataclass(eq=False)
class DenoiseTask:
    """The denoising state of one request: n images sharing prompt, size and schedule."""

    latents: torch.Tensor  # (n, seq, 64) packed, in the model's dtype and device
    embeds: PromptEmbeds  # n rows
    sigmas: torch.Tensor  # (steps + 1,) float32
    guidance: Sequence[float]  # one value per step
    negative: PromptEmbeds | None = None  # n rows; true CFG when set and true_cfg_scale > 1
    true_cfg_scale: float = 1.0
    step: int = 0
    # Editing (fluxray.editing): channels appended to every image token (FLUX.1 Fill's masked image and
    # mask), reference tokens appended to the sequence with their position ids (FLUX.1 Kontext), and the
    # inpainting blend that puts the re-noised input back outside the mask after every step.
    condition: torch.Tensor | None = None  # (n, seq, C)
    reference: torch.Tensor | None = None  # (n, ref_seq, 64)
    reference_ids: torch.Tensor | None = None  # (ref_seq, 3)
    blend: InpaintBlend | None = None
    loras: tuple = ()  # fluxray.lora.LoraChoice of its rows (the same for its n images and their CFG rows)
    # Step caching (fluxray.step_cache): the request's setting and each row's state, by (branch, image):
    # branch 0 the prompt, 1 true CFG's negative prompt.
    cache: StepCache | None = None
    cache_states: dict[tuple[int, int], RowCacheState] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def done(self) -> bool:
        return self.step >= self.num_steps

    @property
    def uses_cfg(self) -> bool:
        return self.negative is not None and self.true_cfg_scale > 1.0


@dataclass(eq=False)
class InpaintBlend:
    """FluxInpaintPipeline's per-step blend: after each step the latents outside the mask are replaced
    by the input image's latents noised to the next sigma with the task's own noise (all packed)."""

    image_latents: torch.Tensor  # (n, seq, 64)
    noise: torch.Tensor  # (n, seq, 64)
    mask: torch.Tensor  # (n, seq, 64): 1 where the model repaints

    def apply(self, latents: torch.Tensor, sigma_next: torch.Tensor | None) -> torch.Tensor:
        """sigma_next: the sigma the step reached, None after the last step (then the input itself)."""
        proper = self.image_latents
        if sigma_next is not None:
            s = sigma_next.to(device=proper.device, dtype=proper.dtype)
            proper = s * self.noise + (1.0 - s) * proper
        return (1 - self.mask) * proper + self.mask * latents


def model_input(task: DenoiseTask, latents: torch.Tensor) -> torch.Tensor:
    """The transformer's hidden states for a task's rows: its latents, with Fill's conditioning channels
    and Kontext's reference tokens when it has them."""
    if task.condition is not None:
        latents = torch.cat([latents, task.condition], dim=2)
    if task.reference is not None:
        latents = torch.cat([latents, task.reference], dim=1)
    return latents


@torch.inference_mode()
def denoise_step(transformer, tasks: Sequence[DenoiseTask], img_ids: torch.Tensor, txt_ids: torch.Tensor) -> None:
    """Advance every unfinished task by one Euler step with one batched transformer call.

    All tasks must share the image size (img_ids), text length (txt_ids) and reference size (Kontext).
    Rows of tasks using true CFG are evaluated twice in the same call, once with the negative prompt.
    """
    active = [t for t in tasks if not t.done]
    if not active:
        return
    dtype = active[0].latents.dtype
    device = active[0].latents.device
    latents = torch.cat([t.latents for t in active])
    counts = [t.latents.shape[0] for t in active]
    seq = latents.shape[1]
    references = {None if t.reference_ids is None else tuple(t.reference_ids.shape) for t in active}
    if len(references) > 1:
        raise ValueError(f"tasks of one step must share their reference size (got {references})")
    if active[0].reference_ids is not None:
        img_ids = torch.cat([img_ids, active[0].reference_ids.to(img_ids)])

    def per_row(values: Sequence[float], which: Sequence[DenoiseTask]) -> torch.Tensor:
        rows = [v for t, v in zip(which, values) for _ in range(t.latents.shape[0])]
        return torch.tensor(rows, dtype=torch.float32)

    sigma = per_row([float(t.sigmas[t.step]) for t in active], active)
    sigma_next = per_row([float(t.sigmas[t.step + 1]) for t in active], active)
    guidance = per_row([t.guidance[t.step] for t in active], active)
    embeds = [t.embeds for t in active]

    cfg_index = [i for i, t in enumerate(active) if t.uses_cfg]
    cfg = [active[i] for i in cfg_index]
    hidden = torch.cat([model_input(t, t.latents) for t in active])
    if cfg:
        hidden = torch.cat([hidden, *[model_input(t, t.latents) for t in cfg]])
        sigma_in = torch.cat([sigma, per_row([float(t.sigmas[t.step]) for t in cfg], cfg)])
        guidance_in = torch.cat([guidance, per_row([t.guidance[t.step] for t in cfg], cfg)])
        embeds = embeds + [t.negative for t in cfg]
    else:
        sigma_in, guidance_in = sigma, guidance
    cond = PromptEmbeds.cat(embeds)
    _select_loras(transformer, active, cfg)

    # FluxPipeline passes timestep t/1000 with t = sigma*1000 cast to the latents' dtype.
    timestep = (sigma_in * 1000).to(dtype).to(device) / 1000
    use_guidance = transformer.config.guidance_embeds
    inputs = dict(
        hidden_states=hidden,
        timestep=timestep,
        guidance=guidance_in.to(device) if use_guidance else None,
        pooled_projections=cond.pooled,
        encoder_hidden_states=cond.sequence,
        txt_ids=txt_ids,
        img_ids=img_ids,
    )
    if any(t.cache is not None for t in active):
        rows = _cached_rows(active, cfg)
        velocity = cached_forward(transformer, rows, **inputs, select_rows=_row_selector(transformer, active, cfg))
    else:
        velocity = transformer(**inputs, return_dict=False)[0]
    velocity = velocity[:, :seq]

    if cfg:
        positive, negative_rows = velocity[: latents.shape[0]], velocity[latents.shape[0] :]
        parts = list(positive.split(counts))
        for i, neg in zip(cfg_index, negative_rows.split([counts[i] for i in cfg_index])):
            parts[i] = neg + active[i].true_cfg_scale * (parts[i] - neg)
        velocity = torch.cat(parts)

    # Exactly the scheduler's arithmetic: its float32 0-dim dt times a bf16 velocity is computed
    # in bf16 (type promotion casts dt down first), then added to the float32 sample.
    dt = (sigma_next - sigma).to(device)[:, None, None]
    updated = (latents.to(torch.float32) + dt.to(velocity.dtype) * velocity).to(velocity.dtype)
    for t, new in zip(active, updated.split(counts)):
        t.step += 1
        if t.blend is not None:
            new = t.blend.apply(new, None if t.done else t.sigmas[t.step])
        t.latents = new


def _cached_rows(active: Sequence[DenoiseTask], cfg: Sequence[DenoiseTask]) -> CachedRows:
    """Each row's threshold and cache state, in the call's row order (every task's rows, then the true-CFG
    tasks' negative rows); None for the rows of tasks without a cache."""
    rows = CachedRows([], [])
    for branch, tasks in ((0, active), (1, cfg)):
        for task in tasks:
            for image in range(task.latents.shape[0]):
                if task.cache is None:
                    rows.thresholds.append(None)
                    rows.states.append(None)
                else:
                    rows.thresholds.append(task.cache.threshold)
                    rows.states.append(task.cache_states.setdefault((branch, image), RowCacheState()))
    return rows


def _row_selector(transformer, active: Sequence[DenoiseTask], cfg: Sequence[DenoiseTask]):
    """For a cached call's sub-batch: tells the LoRA bank (if any) which of the call's rows it holds."""
    bank = getattr(transformer, "fluxray_loras", None)
    if bank is None:
        return None
    rows = [t.loras for t in active for _ in range(t.latents.shape[0])]
    rows += [t.loras for t in cfg for _ in range(t.latents.shape[0])]

    def select(indices: Sequence[int] | None) -> None:
        bank.select(rows if indices is None else [rows[i] for i in indices])

    return select


def _select_loras(transformer, active: Sequence[DenoiseTask], cfg: Sequence[DenoiseTask]) -> None:
    """Tell the transformer's LoRA bank (fluxray.lora) each row's adapters, in the call's row order:
    every task's rows, then the true-CFG tasks' negative rows."""
    bank = getattr(transformer, "fluxray_loras", None)
    if bank is None:
        if any(t.loras for t in active):
            raise ValueError("this transformer has no LoRA adapters attached (fluxray.lora.attach_loras)")
        return
    rows = [t.loras for t in active for _ in range(t.latents.shape[0])]
    rows += [t.loras for t in cfg for _ in range(t.latents.shape[0])]
    bank.select(rows)


def denoise(
    transformer,
    tasks: Sequence[DenoiseTask],
    height: int,
    width: int,
    on_step: Callable[[], None] | None = None,
) -> None:
    """Run denoise_step until every task is done (tasks of different lengths finish apart)."""
    first = tasks[0]
    img = image_ids(height, width, first.latents.device, first.embeds.sequence.dtype)
    txt = text_ids(first.embeds.sequence.shape[1], first.latents.device, first.embeds.sequence.dtype)
    while not all(t.done for t in tasks):
        denoise_step(transformer, tasks, img, txt)
        if on_step is not None:
            on_step()


def step_cache(params: GenerationParams) -> StepCache | None:
    """The request's step cache (fluxray.step_cache), None when it asks for none."""
    return None if params.cache is None else StepCache(params.cache.method, params.cache.threshold)


def denoise_task(
    params: GenerationParams,
    embeds: PromptEmbeds,
    negative: PromptEmbeds | None,
    spec: ModelSpec,
    device: torch.device,
    dtype: torch.dtype,
) -> DenoiseTask:
    """The DenoiseTask of a resolved request: its n noises from seeds, its schedule and guidance.

    embeds and negative hold one row (the request's prompt); they are repeated for the n images.
    """
    noise = torch.cat(
        [initial_noise(s, params.height, params.width, dtype, spec.vae_scale_factor) for s in params.image_seeds()]
    )
    rows = [0] * params.n
    return DenoiseTask(
        latents=noise.to(device),
        embeds=embeds.select(rows).to(device, dtype),
        sigmas=flow_sigmas(params.num_inference_steps, noise.shape[1], spec.scheduler),
        guidance=params.guidance_per_step(),
        negative=negative.select(rows).to(device, dtype) if negative is not None and params.do_true_cfg else None,
        true_cfg_scale=params.true_cfg_scale,
        loras=tuple(LoraChoice(lora.name, lora.scale) for lora in params.loras),
        cache=step_cache(params),
    )
