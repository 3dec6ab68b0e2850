"""HTTP request and response models: OpenAI Images fields plus fluxray's top-level extensions."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fluxray.params import (
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_LORAS,
    MAX_PROMPT_CHARS,
    MAX_STEPS,
    SEED_LIMIT,
    GenerationParams,
    LoraRequest,
    parse_size,
)


class ImageGenerationRequest(BaseModel):
    """POST /v1/images/generations (and /generate, which returns one raw image)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description=f"What to draw; at most {MAX_PROMPT_CHARS} characters (the server may set less).")
    model: str | None = Field(default=None, description="Served model name; the served model when unset.")
    n: int = Field(
        default=1, ge=1, le=MAX_IMAGES, description=f"Number of images, 1-{MAX_IMAGES}; image i uses seed + i."
    )
    size: str | None = Field(
        default=None,
        pattern=r"^(auto|[0-9]{1,5}x[0-9]{1,5})$",
        description="WIDTHxHEIGHT, multiples of 16 in 64-2048, or 'auto'.",
    )
    response_format: Literal["b64_json", "url"] = Field(
        default="b64_json", description="url needs an object store in the server's config."
    )
    output_format: Literal["png", "jpeg", "webp"] = Field(default="png", description="Image file format.")
    user: str | None = Field(default=None, description="End-user id, for abuse monitoring; not used otherwise.")
    quality: str | None = Field(default=None, description="Accepted for OpenAI compatibility; ignored.")
    style: str | None = Field(default=None, description="Accepted for OpenAI compatibility; ignored.")
    # fluxray extensions (top-level fields; the openai client sends them with extra_body=)
    seed: int | None = Field(
        default=None, ge=0, lt=SEED_LIMIT, description=f"Seed of the first image, 0 <= seed < {SEED_LIMIT}."
    )
    num_inference_steps: int | None = Field(
        default=None, ge=1, le=MAX_STEPS, description=f"Denoising steps, 1-{MAX_STEPS}."
    )
    guidance_scale: float | None = Field(
        default=None, ge=0, le=MAX_GUIDANCE, description=f"Distilled guidance, 0-{MAX_GUIDANCE}."
    )
    guidance_scale_end: float | None = Field(
        default=None, ge=0, le=MAX_GUIDANCE, description="Ramp guidance linearly to this value."
    )
    negative_prompt: str | None = Field(default=None, description="Negative prompt for true CFG.")
    true_cfg_scale: float | None = Field(
        default=None, ge=1, le=MAX_GUIDANCE, description="True CFG scale (> 1 with negative_prompt)."
    )
    prompt_2: str | None = Field(default=None, description="Separate prompt for the T5 encoder.")
    loras: list[LoraRequest] | None = Field(
        default=None,
        max_length=MAX_LORAS,
        description='LoRA adapters by name (GET /v1/loras) and their scales, e.g. [{"name": "ink", "scale": 0.8}].',
    )


class ImageEditRequest(ImageGenerationRequest):
    """POST /v1/images/edits, besides its files: a generation's fields plus the edit's strength. Multipart
    (OpenAI's form) sends the image and mask as files; JSON sends them as base64 or data URLs."""

    image: str | list[str] | None = Field(
        default=None, description="JSON bodies: the input image as base64 or a data: URL (multipart: a file)."
    )
    mask: str | None = Field(
        default=None,
        description="JSON bodies: the mask as base64 or a data: URL (multipart: a file). Transparent pixels mark "
        "the area to edit (OpenAI); a mask without alpha is read white = edit (diffusers).",
    )
    strength: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="img2img, inpainting, Fill: how far toward noise the input goes; the model's default when unset.",
    )
    background: str | None = Field(default=None, description="Accepted for OpenAI compatibility; ignored.")
    input_fidelity: str | None = Field(default=None, description="Accepted for OpenAI compatibility; ignored.")
    output_compression: int | None = Field(default=None, description="Accepted for OpenAI compatibility; ignored.")


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    seed: int = Field(description="The seed that made this image.")
    truncated: list[str] = Field(
        default_factory=list,
        description="Text encoders that read only the start of the prompt: 'clip' (77 tokens), 't5' "
        "(512 for flux-dev, 256 for schnell); empty when both read all of it.",
    )
    loras: list[LoraRequest] = Field(
        default_factory=list, description="The LoRA adapters and scales this image was made with (fluxray extension)."
    )


class ImageJobRequest(ImageGenerationRequest):
    """POST /v1/images/jobs: a generation's body, run as an async job."""

    preview: bool = Field(
        default=False, description="Small JPEG previews of the first image in the job's progress events."
    )
    webhook: str | None = Field(
        default=None,
        max_length=2048,
        description="URL to POST the job's events to (Standard Webhooks, signed); its host must be allowed.",
    )
    webhook_events: list[Literal["queued", "started", "progress", "succeeded", "failed", "cancelled"]] | None = Field(
        default=None,
        max_length=6,
        description="Events sent to the webhook; succeeded, failed and cancelled when unset.",
    )


class JobProgress(BaseModel):
    step: int
    steps: int


class ImageJob(BaseModel):
    """An async generation job (fluxray extension)."""

    id: str
    object: Literal["image.generation.job"] = "image.generation.job"
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    model: str
    created_at: float = Field(description="Unix seconds.")
    started_at: float | None = Field(default=None, description="Unix seconds of the first denoising step.")
    finished_at: float | None = None
    queue_position: int | None = Field(
        default=None, description="Requests the denoiser now runs first; 0 once running; null before it is queued."
    )
    eta_s: float | None = Field(default=None, description="Estimated seconds until done, from the denoiser.")
    progress: JobProgress
    request: dict
    preview: bool
    webhook: str | None = None
    webhook_events: list[str] | None = None
    links: dict[str, str]
    data: list[ImageData] | None = Field(default=None, description="When succeeded: as /v1/images/generations.")
    timings: dict[str, float] | None = None
    error: dict | None = Field(
        default=None,
        description="When failed: message, type, code and param, as the synchronous route's error body; status, "
        "the HTTP status it would have answered; retryable, whether submitting the job again may succeed.",
    )


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    timings: dict[str, float] | None = Field(
        default=None,
        description="fluxray extension: milliseconds this request spent in each stage (queue, encode, denoise, "
        "decode) and in all (total); the same figures as the Server-Timing header.",
    )


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fluxray"


class LoraCard(BaseModel):
    id: str
    object: Literal["lora"] = "lora"


class LoraList(BaseModel):
    object: Literal["list"] = "list"
    data: list[LoraCard]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# GenerationParams' field names, as this API calls them.
PARAM_OF_FIELD = {"width": "size", "height": "size"}


def to_generation_params(
    request: ImageGenerationRequest, default_size: str, size: str | None = None
) -> GenerationParams:
    """The engine's params for a request; pydantic.ValidationError (or ValueError for size) if invalid.
    `size` overrides the request's (an edit's output size, settled from its image)."""
    size = size or (request.size if request.size not in (None, "auto") else default_size)
    width, height = parse_size(size)
    fields = {
        "prompt": request.prompt,
        "prompt_2": request.prompt_2,
        "negative_prompt": request.negative_prompt,
        "width": width,
        "height": height,
        "num_inference_steps": request.num_inference_steps,
        "guidance_scale": request.guidance_scale,
        "guidance_scale_end": request.guidance_scale_end,
        "n": request.n,
        "seed": request.seed,
        "output_format": request.output_format,
    }
    if request.true_cfg_scale is not None:
        fields["true_cfg_scale"] = request.true_cfg_scale
    if request.loras:
        fields["loras"] = tuple(request.loras)
    return GenerationParams(**fields)


# /v1/images/edits reads its body itself (multipart or JSON: deployments.http.edit_body); its schema for the
# OpenAPI document, as OpenAI documents the route.
_EDIT_FORM = {
    "type": "object",
    "required": ["image", "prompt"],
    "properties": {
        "image": {"type": "string", "format": "binary", "description": "The image to edit: PNG, JPEG or WebP."},
        "mask": {
            "type": "string",
            "format": "binary",
            "description": "PNG whose transparent pixels mark the area to edit (without alpha: white = edit).",
        },
        **{
            name: schema
            for name, schema in ImageEditRequest.model_json_schema()["properties"].items()
            if name not in ("image", "mask")
        },
    },
}
EDIT_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": _EDIT_FORM},
            "application/json": {"schema": ImageEditRequest.model_json_schema()},
        },
    }
}
