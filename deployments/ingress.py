"""The HTTP ingress: OpenAI Images API routes over the TextEncoder -> Denoiser -> VAEDecoder graph.

The ingress validates, then chains the three stages' DeploymentResponses, so embeddings and
latents travel from replica to replica through Ray's object store and never through here.
(No `from __future__ import annotations` here: FastAPI must see the real types of the routes'
parameters through Serve's method wrappers.)
"""

import asyncio
import base64
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

import fluxray
from deployments.config import AppConfig
from deployments.object_store import ObjectStore
from deployments.protocol import (
    PARAM_OF_FIELD,
    ErrorResponse,
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    to_generation_params,
)
from deployments.vae_decoder import DecodeRequest
from fluxray.images import MEDIA_TYPES
from fluxray.params import GenerationParams, describe_validation_error
from fluxray.pipeline import image_metadata
from fluxray.sources import resolve_model

SEED_HEADER = "X-Seed"


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: "dict[str, str] | None" = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def _error_response(error: APIError) -> JSONResponse:
    body = {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": None}}
    return JSONResponse(body, status_code=error.status, headers=error.headers)


ERRORS = {
    400: {"model": ErrorResponse, "description": "Invalid request; the message names the field."},
    404: {"model": ErrorResponse, "description": "Unknown model."},
    429: {"model": ErrorResponse, "description": "Too many requests in flight; see Retry-After."},
    503: {"model": ErrorResponse, "description": "A stage's queue is full; see Retry-After."},
    504: {"model": ErrorResponse, "description": "The request ran past the server's timeout."},
}

app = FastAPI(
    title="fluxray",
    version=fluxray.__version__,
    description="FLUX.1 text-to-image generation with OpenAI Images API conventions.",
)


@app.exception_handler(APIError)
async def _api_error(_: Request, error: APIError) -> JSONResponse:
    return _error_response(error)


@app.exception_handler(RequestValidationError)
async def _invalid_body(_: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return _error_response(APIError(400, "request body is not valid JSON"))
    if first.get("type") == "missing" and not loc:
        return _error_response(APIError(400, "request body is required"))
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    if first.get("type") == "extra_forbidden":
        message = "unknown field"
    return _error_response(APIError(400, f"{param}: {message}" if param else message, param))


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, config: dict, encoder: DeploymentHandle, denoiser: DeploymentHandle, vae: DeploymentHandle):
        self.config = AppConfig.model_validate(config)
        source = resolve_model(self.config.model)  # resolves the source; loads no weights
        self.spec = source.spec
        self.model_name = self.config.served_model_name or source.name
        self.encoder, self.denoiser, self.vae = encoder, denoiser, vae
        self.store = ObjectStore(self.config.object_store) if self.config.object_store else None
        self.started = int(time.time())
        self.in_flight = 0

    def _params(self, request: ImageGenerationRequest) -> GenerationParams:
        if request.model not in (None, self.model_name):
            raise APIError(
                404,
                f"model: unknown model {request.model!r}; this server serves {self.model_name!r}",
                "model",
                "model_not_found",
            )
        if request.response_format == "url" and self.store is None:
            raise APIError(
                400,
                "response_format: url needs an object store, and none is configured; use b64_json",
                "response_format",
            )
        try:
            return to_generation_params(request, self.config.default_size).resolve(self.spec)
        except ValidationError as error:
            param = str(error.errors()[0]["loc"][0]) if error.errors()[0]["loc"] else None
            message = describe_validation_error(error, PARAM_OF_FIELD)
            raise APIError(400, message, PARAM_OF_FIELD.get(param, param)) from None
        except ValueError as error:
            raise APIError(400, f"size: {error}", "size") from None

    async def _generate(self, params: GenerationParams) -> list[bytes]:
        """Run the graph for one resolved request; the encoded image files."""
        retry = {"Retry-After": str(self.config.retry_after_s)}
        if self.in_flight >= self.config.max_pending_requests:
            raise APIError(429, "too many requests in flight; retry later", kind="rate_limit_error", headers=retry)
        self.in_flight += 1
        negative = params.negative_prompt if params.do_true_cfg else None
        encoded = self.encoder.encode.remote(params.prompt, params.prompt_2, negative)
        latents = self.denoiser.denoise.remote(encoded, params)
        metadata = [image_metadata(params, seed, self.model_name) for seed in params.image_seeds()]
        files = self.vae.decode.remote(
            latents, DecodeRequest(params.height, params.width, params.output_format, metadata)
        )

        async def result() -> list[bytes]:
            return await files

        try:
            return await asyncio.wait_for(result(), timeout=self.config.request_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(
                504, f"request ran past the {self.config.request_timeout_s:g} s timeout", kind="timeout_error"
            ) from None
        except (BackPressureError, DeploymentUnavailableError):
            raise APIError(
                503, "the service is at capacity; retry later", kind="overloaded_error", headers=retry
            ) from None
        finally:
            self.in_flight -= 1
            # Whether we finished, timed out or the client went away, nothing upstream may keep
            # working for this request: cancelling a finished response is a no-op.
            for response in (files, latents, encoded):
                response.cancel()

    @app.post("/v1/images/generations", response_model=ImagesResponse, responses=ERRORS)
    async def generations(self, request: ImageGenerationRequest) -> ImagesResponse:
        """Generate images (OpenAI Images API, plus fluxray's extension fields)."""
        params = self._params(request)
        files = await self._generate(params)
        if request.response_format == "url":
            loop = asyncio.get_running_loop()
            urls = await asyncio.gather(
                *[loop.run_in_executor(None, self.store.put, f, params.output_format) for f in files]
            )
            data = [ImageData(url=u, seed=s) for u, s in zip(urls, params.image_seeds())]
        else:
            data = [
                ImageData(b64_json=base64.b64encode(f).decode(), seed=s) for f, s in zip(files, params.image_seeds())
            ]
        return ImagesResponse(created=int(time.time()), data=data)

    @app.post(
        "/generate",
        response_class=Response,
        responses={
            200: {
                "content": {t: {} for t in MEDIA_TYPES.values()},
                "description": f"The image file; its seed in the {SEED_HEADER} header.",
            },
            **ERRORS,
        },
    )
    async def generate(self, request: ImageGenerationRequest) -> Response:
        """One image as a raw file (for curl); the seed is in the X-Seed header."""
        if request.n != 1:
            raise APIError(400, "n: /generate returns one image; use /v1/images/generations for more", "n")
        if request.response_format != "b64_json":
            raise APIError(400, "response_format: /generate always returns the raw image", "response_format")
        params = self._params(request)
        files = await self._generate(params)
        return Response(files[0], media_type=MEDIA_TYPES[params.output_format], headers={SEED_HEADER: str(params.seed)})

    @app.get("/v1/models", response_model=ModelList)
    async def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, created=self.started)])

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.model_name}
