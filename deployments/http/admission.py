"""The ingress's request checks, as plain functions: what a request must satisfy before the graph runs
(the route its model takes, the prompt lengths, the params' own validation, the LoRA names and count, the
pixel budget, the transformer-token budget). Each raises an APIError whose `param` names the field it is
about, so a refused request is a 4xx naming it and never reaches a stage. No Serve, no Ray: unit-tested
in tests/deployments/test_admission.py; the ingress calls them in `Ingress._params`."""

from __future__ import annotations

from collections.abc import Collection

from pydantic import ValidationError

from deployments.config import AppConfig
from deployments.http.errors import APIError
from deployments.http.protocol import PARAM_OF_FIELD, ImageGenerationRequest, to_generation_params
from deployments.stages.request_scheduler import OverTokenBudget, request_shape
from fluxray.editing import EditParams
from fluxray.models.specs import ModelSpec
from fluxray.params import GenerationParams, describe_validation_error

PROMPT_FIELDS = ("prompt", "prompt_2", "negative_prompt")


def check_route(spec: ModelSpec, model: str, edit: bool) -> None:
    """FLUX.1 Fill only fills a masked image: a generation asking for it is a 400 naming `model`."""
    if spec.edit == "fill" and not edit:
        message = f"model: {model} (FLUX.1 Fill) only fills a masked image; send it to /v1/images/edits"
        raise APIError(400, message, "model")


def check_response_format(response_format: str | None, has_store: bool) -> None:
    """`url` needs the object store the images are uploaded to."""
    if response_format == "url" and not has_store:
        raise APIError(
            400, "response_format: url needs an object store, and none is configured; use b64_json", "response_format"
        )


def check_prompt_lengths(request: ImageGenerationRequest, limit: int) -> None:
    """Each prompt field at most `limit` characters (422 naming the field, code too_long)."""
    for name in PROMPT_FIELDS:
        text = getattr(request, name)
        if text is not None and len(text) > limit:
            raise APIError(
                422, f"{name}: {len(text)} characters; this server takes at most {limit}", name, code="too_long"
            )


def resolve_params(
    request: ImageGenerationRequest,
    spec: ModelSpec,
    default_size: str,
    size: str | None = None,
    edit: bool = False,
) -> GenerationParams:
    """The request's params, validated and resolved against the model's defaults (EditParams with the
    request's strength for an edit; `size` in place of the request's own when given). A value the params
    refuse is a 400 naming its request field (width and height are `size`)."""
    try:
        fields = to_generation_params(request, default_size, size).model_dump(exclude_unset=True)
        if edit:
            return EditParams(**fields, strength=request.strength).resolve(spec)
        return GenerationParams(**fields).resolve(spec)
    except ValidationError as error:
        param = str(error.errors()[0]["loc"][0]) if error.errors()[0]["loc"] else None
        message = describe_validation_error(error, PARAM_OF_FIELD)
        raise APIError(400, message, PARAM_OF_FIELD.get(param, param)) from None
    except ValueError as error:
        raise APIError(400, f"size: {error}", "size") from None


def check_loras(params: GenerationParams, known: Collection[str], max_per_request: int) -> None:
    """Every LoRA the request names is one of the server's (404 naming `loras`), and at most
    `max_per_request` of them (400)."""
    for lora in params.loras:
        if lora.name not in known:
            raise APIError(
                404,
                f"loras: unknown LoRA {lora.name[:200]!r}; GET /v1/loras lists this server's",
                "loras",
                "not_found_error",
                code="lora_not_found",
            )
    if len(params.loras) > max_per_request:
        raise APIError(400, f"loras: at most {max_per_request} per request on this server", "loras")


def pixel_work(params: GenerationParams) -> int:
    """n x width x height x steps, x 2 with true CFG (its negative pass doubles every step)."""
    passes = 2 if params.do_true_cfg else 1
    return params.n * params.width * params.height * params.num_inference_steps * passes


def budget_param(params: GenerationParams, default_steps: int) -> str:
    """The field a request over the pixel budget is named by: the budget is a product, so the error names
    the first factor the client chose to raise - `n` when it asked for several images, else
    `num_inference_steps` when it asked for more than the model's default, else `size`."""
    if params.n > 1:
        return "n"
    if params.num_inference_steps > default_steps:
        return "num_inference_steps"
    return "size"


def check_pixel_budget(params: GenerationParams, budget: int, default_steps: int) -> None:
    """The request's pixel work (pixel_work) within the server's max_pixel_steps (422,
    code pixel_budget_exceeded, the product and the budget in the message)."""
    work = pixel_work(params)
    if work > budget:
        cfg = " x 2 (true CFG)" if params.do_true_cfg else ""
        raise APIError(
            422,
            f"n x width x height x num_inference_steps{cfg} = {work} is over this server's budget of {budget}; "
            "ask for fewer, smaller or shorter-running images",
            budget_param(params, default_steps),
            code="pixel_budget_exceeded",
        )


def check_token_budget(
    params: GenerationParams,
    spec: ModelSpec,
    reference: tuple[int, int] | None,
    max_tokens: int,
    max_images: int,
) -> None:
    """One image's transformer rows (image, text, true-CFG and Kontext reference tokens: the shape the
    Denoiser computes, deployments.stages.request_scheduler.request_shape) fit the Denoiser's batch budget (422 naming
    `size`, code batch_token_budget_exceeded)."""
    shape = request_shape(params, spec.max_sequence_length, reference)
    try:
        shape.parts(params.n, max_tokens, max_images)
    except OverTokenBudget as over:
        raise APIError(
            422,
            f"size: one {params.width}x{params.height} image is {over.tokens} transformer tokens "
            f"({shape.describe()}), over this server's denoiser_max_batch_tokens of {over.budget}; "
            "ask for a smaller image",
            "size",
            code="batch_token_budget_exceeded",
        ) from None


def admit(
    request: ImageGenerationRequest,
    model: str,
    spec: ModelSpec,
    config: AppConfig,
    known_loras: Collection[str] = (),
    has_store: bool = False,
    size: str | None = None,
    edit: bool = False,
    reference: tuple[int, int] | None = None,
) -> GenerationParams:
    """Every check above, in the order the ingress applies them, and the request's resolved params for
    `model`: `size` in place of the request's own when given (an edit's default size comes from its image),
    `edit` for an edit, `reference` a Kontext edit's reference size (height, width), whose tokens join
    every row. `known_loras` are the server's adapter names, `has_store` whether it has an object store."""
    check_route(spec, model, edit)
    check_response_format(request.response_format, has_store)
    check_prompt_lengths(request, config.max_prompt_chars)
    params = resolve_params(request, spec, config.default_size, size, edit)
    check_loras(params, known_loras, config.max_loras_per_request)
    check_pixel_budget(params, config.max_pixel_steps, spec.default_steps)
    check_token_budget(params, spec, reference, config.denoiser_max_batch_tokens, config.denoiser_max_batch_images)
    return params
