"""The registry of FLUX.1 model variants: architectures, scheduler configs and defaults.

Values come from the published diffusers configs of black-forest-labs/FLUX.1-dev and
FLUX.1-schnell (transformer/, vae/, text_encoder/, text_encoder_2/, scheduler/ config.json files).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

# How a model edits an image (fluxray.editing): base models do img2img (inpainting with a mask), FLUX.1
# Fill conditions on the masked image and the mask, FLUX.1 Kontext reads the image as reference tokens.
EditKind = Literal["img2img", "fill", "kontext"]

# FLUX.1-dev scheduler/scheduler_config.json: resolution-dependent ("dynamic") shift.
_DEV_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
# FLUX.1-schnell: no shift at all (BFL's reference sampler calls get_schedule(..., shift=False)).
_SCHNELL_SCHEDULER = {**_DEV_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}

_FLUX_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}

_FLUX_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
    "mid_block_add_attention": True,
}

# openai/clip-vit-large-patch14 text tower, as shipped in FLUX.1-*/text_encoder.
_CLIP_L = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

# google/t5-v1_1-xxl encoder, as shipped in FLUX.1-*/text_encoder_2.
_T5_XXL = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.1,
    "is_encoder_decoder": True,
    "tie_word_embeddings": False,
}


@dataclass(frozen=True)
class ModelSpec:
    """One FLUX.1 variant: what it is built from and how it samples by default."""

    name: str
    repo_id: str | None
    default_steps: int
    default_guidance: float
    max_sequence_length: int
    transformer: dict[str, Any]
    vae: dict[str, Any]
    clip: dict[str, Any]
    t5: dict[str, Any]
    scheduler: dict[str, Any] = field(default_factory=dict)
    # The side (pixels) a request gets when it names no size: FLUX.1's 1024, less for the CPU tiny model.
    default_size: int = 1024
    edit: EditKind = "img2img"
    # img2img/inpaint/Fill: how far toward noise the input goes (diffusers' pipeline defaults).
    default_strength: float = 0.6
    # Kontext: its reference image is resized to the preferred resolution (diffusers'
    # PREFERRED_KONTEXT_RESOLUTIONS, ~1 MP) nearest its aspect ratio, each side divided by this.
    reference_downscale: int = 1

    @property
    def guidance_embeds(self) -> bool:
        """Whether the transformer takes the distilled guidance embedding (dev) or not (schnell)."""
        return bool(self.transformer["guidance_embeds"])

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)


# The embedded model: the FLUX.1-dev structure at tiny widths (see SPECS["tiny"]).
_TINY_TRANSFORMER = {
    **_FLUX_TRANSFORMER,
    "num_layers": 2,
    "num_single_layers": 2,
    # 96 wide: the image tokens are 64 wide (16 latent channels x 2 x 2), and a transformer
    # narrower than its input cannot carry the noise through at low sigma (measured: at
    # width 32 the flow loss stayed at ~1 for sigma 0.1 and the samples stayed noise).
    "attention_head_dim": 32,
    "num_attention_heads": 3,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "axes_dims_rope": [8, 12, 12],
}
_TINY_VAE = {
    **_FLUX_VAE,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    # Two groups, not one per channel: with 8 channels in 8 groups each GroupNorm is a
    # per-channel instance norm, which erases the colour of a flat region (measured: a VAE
    # trained on flat-colour scenes reached 14 dB with 8 groups, 28.6 dB with 2).
    "norm_num_groups": 2,
    "sample_size": 64,
    # Measured from the trained VAE's latents (scripts/train_tiny_model.py sets them), as
    # FLUX's own are; BFL-style single files carry no config, so the spec must hold them.
    "scaling_factor": 1.0084,
    "shift_factor": 0.0102,
}
_TINY_CLIP = {
    **_CLIP_L,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "projection_dim": 32,
    "vocab_size": 814,
}
_TINY_T5 = {
    **_T5_XXL,
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 32,
    "vocab_size": 703,
}
# FLUX.1 Fill: 64 latent channels + 64 of the masked image's latents + 256 of the mask (8x8 pixels per
# latent, 2x2 packed) per token.
_FILL_IN_CHANNELS = 384

# FLUX.1 [dev]: the base every other spec is made from (dataclasses.replace: each variant states only what
# differs).
_DEV = ModelSpec(
    name="flux-dev",
    repo_id="black-forest-labs/FLUX.1-dev",
    default_steps=28,
    default_guidance=3.5,
    max_sequence_length=512,
    transformer=_FLUX_TRANSFORMER,
    vae=_FLUX_VAE,
    clip=_CLIP_L,
    t5=_T5_XXL,
    scheduler=_DEV_SCHEDULER,
)
# The embedded model: the FLUX.1-dev structure at tiny widths, trained on a synthetic world
# (scripts/train_tiny_model.py). Its sampling defaults are diffusers' FluxPipeline defaults (28
# steps, guidance 3.5); its T5 length is 64, not 512: the world's prompts are ~10 tokens, and 512
# padding tokens made training 3x slower for nothing (diffusers' peer is called with 64). It samples with
# FLUX.1-dev's own schedule (shift e^0.5 at 256x256): the model trained at every noise level samples with
# it as well as with any other tried (README, "The tiny model and its world").
_TINY = replace(
    _DEV,
    name="tiny",
    repo_id=None,
    default_size=256,
    max_sequence_length=64,
    transformer=_TINY_TRANSFORMER,
    vae=_TINY_VAE,
    clip=_TINY_CLIP,
    t5=_TINY_T5,
)
# FLUX.1 Fill [dev]: inpainting and outpainting with the masked image and mask as extra channels;
# FluxFillPipeline's defaults (50 steps, guidance 30, strength 1).
_FILL = {"edit": "fill", "default_strength": 1.0}
_FILL_CHANNELS = {"in_channels": _FILL_IN_CHANNELS, "out_channels": 64}

SPECS: dict[str, ModelSpec] = {
    "flux-dev": _DEV,
    "flux-schnell": replace(
        _DEV,
        name="flux-schnell",
        repo_id="black-forest-labs/FLUX.1-schnell",
        default_steps=4,
        default_guidance=0.0,
        max_sequence_length=256,
        transformer={**_FLUX_TRANSFORMER, "guidance_embeds": False},
        scheduler=_SCHNELL_SCHEDULER,
    ),
    "tiny": _TINY,
    "flux-fill": replace(
        _DEV,
        name="flux-fill",
        repo_id="black-forest-labs/FLUX.1-Fill-dev",
        default_steps=50,
        default_guidance=30.0,
        transformer={**_FLUX_TRANSFORMER, **_FILL_CHANNELS},
        **_FILL,
    ),
    # FLUX.1 Kontext [dev]: instruction edits, the input image as reference tokens; FluxKontextPipeline's
    # defaults (28 steps, guidance 2.5).
    "flux-kontext": replace(
        _DEV, name="flux-kontext", repo_id="black-forest-labs/FLUX.1-Kontext-dev", default_guidance=2.5, edit="kontext"
    ),
    # The embedded Fill and Kontext variants: the tiny model's text encoders and VAE (byte-equal files, so
    # one app serves all three with one TextEncoder and one VAE), their own transformers
    # (scripts/make_tiny_model.py --edit-variants), the tiny model's sampling defaults. Kontext's references
    # at 1/16 of FLUX's area.
    "tiny-fill": replace(_TINY, name="tiny-fill", transformer={**_TINY_TRANSFORMER, **_FILL_CHANNELS}, **_FILL),
    "tiny-kontext": replace(_TINY, name="tiny-kontext", edit="kontext", reference_downscale=4),
}


def get_spec(name: str) -> ModelSpec:
    """The spec called `name`; a ValueError listing the known names otherwise."""
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown model spec {name!r}; known: {', '.join(SPECS)}") from None
