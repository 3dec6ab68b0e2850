"""GenerationParams: the one place where every bound on a generation request lives.

The CLI, the HTTP API and the offline job all validate through this model, so a bound changes
in one place and every error message names the field it is about.
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from fluxray.models.specs import ModelSpec

MIN_SIDE = 64
MAX_SIDE = 2048
SIDE_MULTIPLE = 16  # the VAE downsamples 8x and the transformer packs 2x2 latent patches
MAX_PROMPT_CHARS = 4000
MAX_IMAGES = 8
MAX_STEPS = 100
MAX_GUIDANCE = 20.0
SEED_LIMIT = 2**63
MAX_LORAS = 4  # adapters on one request (fluxray.lora pads every row to this many)
MAX_LORA_SCALE = 4.0

ImageFormat = Literal["png", "jpeg", "webp"]

_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_size(size: str) -> tuple[int, int]:
    """'WxH' -> (width, height); ValueError otherwise. Only the form: the bounds are GenerationParams'."""
    match = _SIZE.match(size)
    if not match:
        raise ValueError(f"size must be WIDTHxHEIGHT, e.g. 1024x768 (got {size!r})")
    return int(match[1]), int(match[2])


def _check_side(name: str, value: int) -> int:
    if value % SIDE_MULTIPLE:
        raise ValueError(f"{name} must be a multiple of {SIDE_MULTIPLE} (got {value})")
    return value


class LoraRequest(BaseModel):
    """One LoRA adapter a request applies, by its name in the server's registry, and its scale."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=200, description="The adapter's name (its file's stem).")
    scale: float = Field(
        default=1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE, description="Weight of its low-rank delta; 0 = off."
    )

    @field_validator("scale")
    @classmethod
    def _finite_scale(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


class CacheRequest(BaseModel):
    """A request's step cache (fluxray.step_cache): at a step whose first transformer block changed little
    since the last full step, the image reuses the remaining blocks' output of that step."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["first_block"] = Field(default="first_block", description="first_block: FBCache's rule.")
    threshold: float = Field(
        default=0.08,
        gt=0,
        le=1,
        description="Largest relative change of the first block's residual at which a step reuses the rest; "
        "higher skips more steps and strays further from the uncached image.",
    )


class GenerationParams(BaseModel):
    """One text-to-image request: n images of one prompt at one size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What to draw.")
    prompt_2: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        description="Prompt for the T5 encoder; defaults to `prompt`.",
    )
    negative_prompt: str | None = Field(
        default=None,
        max_length=MAX_PROMPT_CHARS,
        description="What to steer away from; used by true CFG (true_cfg_scale > 1).",
    )
    width: int = Field(default=1024, ge=MIN_SIDE, le=MAX_SIDE, description="Image width in pixels.")
    height: int = Field(default=1024, ge=MIN_SIDE, le=MAX_SIDE, description="Image height in pixels.")
    num_inference_steps: int | None = Field(
        default=None, ge=1, le=MAX_STEPS, description="Denoising steps; the model's default when unset."
    )
    guidance_scale: float | None = Field(
        default=None,
        ge=0.0,
        le=MAX_GUIDANCE,
        description="Distilled guidance (FLUX.1-dev's guidance embedding); the model's default when unset.",
    )
    guidance_scale_end: float | None = Field(
        default=None,
        ge=0.0,
        le=MAX_GUIDANCE,
        description="If set, guidance ramps linearly from guidance_scale at the first step to this at the last.",
    )
    true_cfg_scale: float = Field(
        default=1.0,
        ge=1.0,
        le=MAX_GUIDANCE,
        description="True classifier-free guidance with negative_prompt when > 1 (two passes per step).",
    )
    n: int = Field(default=1, ge=1, le=MAX_IMAGES, description="Number of images; image i uses seed + i.")
    seed: int | None = Field(
        default=None, ge=0, lt=SEED_LIMIT, description="Seed of the first image; random when unset."
    )
    output_format: ImageFormat = Field(default="png", description="Image file format.")
    loras: tuple[LoraRequest, ...] = Field(
        default=(), max_length=MAX_LORAS, description=f"LoRA adapters and their scales (at most {MAX_LORAS})."
    )
    cache: CacheRequest | None = Field(default=None, description="Step caching (off when unset).")

    @field_validator("loras")
    @classmethod
    def _distinct_loras(cls, value: tuple[LoraRequest, ...]) -> tuple[LoraRequest, ...]:
        names = [lora.name for lora in value]
        if len(set(names)) != len(names):
            raise ValueError("each LoRA may be named once")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be blank")
        return value

    @field_validator("width")
    @classmethod
    def _width_multiple(cls, value: int) -> int:
        return _check_side("width", value)

    @field_validator("height")
    @classmethod
    def _height_multiple(cls, value: int) -> int:
        return _check_side("height", value)

    @field_validator("guidance_scale", "guidance_scale_end", "true_cfg_scale")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("seed")
    @classmethod
    def _seeds_in_range(cls, value: int | None, info: ValidationInfo) -> int | None:
        # Image i uses seed + i, and every seed handed out must be a valid seed itself.
        n = info.data.get("n", 1)
        if value is not None and value + n - 1 >= SEED_LIMIT:
            raise ValueError(f"seed + n - 1 must be below 2**63 (image i uses seed + i); got seed {value} with n={n}")
        return value

    @field_validator("true_cfg_scale")
    @classmethod
    def _cfg_needs_negative(cls, value: float, info: ValidationInfo) -> float:
        # negative_prompt is declared before true_cfg_scale, so it is validated and in info.data.
        if value > 1.0 and not info.data.get("negative_prompt"):
            raise ValueError("true CFG (> 1) needs a negative prompt")
        return value

    def resolve(self, spec: ModelSpec) -> GenerationParams:
        """A copy with the model's defaults filled in and a seed drawn if none was given."""
        return self.model_copy(
            update={
                "num_inference_steps": self.num_inference_steps or spec.default_steps,
                "guidance_scale": spec.default_guidance if self.guidance_scale is None else self.guidance_scale,
                "seed": secrets.randbelow(SEED_LIMIT - self.n + 1) if self.seed is None else self.seed,
            }
        )

    @property
    def do_true_cfg(self) -> bool:
        return self.true_cfg_scale > 1.0 and bool(self.negative_prompt)

    def guidance_per_step(self) -> list[float]:
        """The guidance value of each step: constant, or a linear ramp to guidance_scale_end."""
        steps, start = self.num_inference_steps, self.guidance_scale
        if steps is None or start is None:
            raise ValueError("resolve() the params before asking for the guidance schedule")
        end = start if self.guidance_scale_end is None else self.guidance_scale_end
        if steps == 1:
            return [start]
        return [start + (end - start) * i / (steps - 1) for i in range(steps)]

    def image_seeds(self) -> list[int]:
        if self.seed is None:
            raise ValueError("resolve() the params before asking for seeds")
        return [self.seed + i for i in range(self.n)]


def describe_validation_error(error: ValidationError, names: Mapping[str, str] | None = None) -> str:
    """One line naming each invalid field and why, e.g. 'width: must be a multiple of 16 (got 100)'.

    `names` renames fields for the caller's vocabulary (the CLI says --steps, not num_inference_steps).
    """
    parts = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "request"
        field = (names or {}).get(field, field)
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        parts.append(f"{field}: {message}")
    return "; ".join(parts)
