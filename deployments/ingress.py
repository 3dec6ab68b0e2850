"""The HTTP ingress: OpenAI Images API routes over the TextEncoder -> Denoiser -> VAEDecoder graph.

The ingress validates, then chains the three stages' DeploymentResponses, so embeddings and
latents travel from replica to replica through Ray's object store and never through here.
(No `from __future__ import annotations` here: FastAPI must see the real types of the routes'
parameters through Serve's method wrappers.)
"""

import asyncio
import base64
import logging
import time

from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.security import HTTPBearer
from pydantic import ValidationError
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

import fluxray
from deployments.config import AppConfig
from deployments.guard import ApiKeys, GuardPolicy, RequestGuard, error_body
from deployments.metrics import IngressMetrics
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
from fluxray.images import MEDIA_TYPES, image_metadata
from fluxray.params import GenerationParams, describe_validation_error
from fluxray.sources import resolve_model

SEED_HEADER = "X-Seed"
# Metric labels: these routes, and "other" for any path a client makes up. (Not read off app.routes:
# in a replica, Serve mounts the app's routes under a router entry that has no single path.)
ROUTES = frozenset({"/v1/images/generations", "/generate", "/v1/models", "/healthz"})
# A stage replica that died (or is being replaced) under a request: the request is safe to run again.
REPLICA_LOST = (RayActorError, ActorUnavailableError)


def replica_lost(error: BaseException) -> bool:
    """Whether a stage failed because a replica died: directly, or as the failed input of the next
    stage (Ray raises RayTaskError whose cause is the ActorDiedError; Serve's router may wrap that
    in a RayServeException whose __cause__ it is)."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, REPLICA_LOST):
            return True
        error = error.cause if isinstance(error, RayTaskError) else error.__cause__
        seen += 1
    return False


logger = logging.getLogger("ray.serve")


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: "dict[str, str] | None" = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers
        self.code = code


def _error_response(error: APIError) -> Response:
    body = error_body(error.message, error.kind, error.param, error.code)
    return Response(body, status_code=error.status, headers=error.headers, media_type="application/json")


ERRORS = {
    400: {"model": ErrorResponse, "description": "Invalid request; the message names the field."},
    401: {"model": ErrorResponse, "description": "Missing or invalid API key (when the server has keys)."},
    404: {"model": ErrorResponse, "description": "Unknown model."},
    413: {"model": ErrorResponse, "description": "Request body larger than the server's limit."},
    422: {"model": ErrorResponse, "description": "Over a server limit: prompt length or pixel budget."},
    429: {"model": ErrorResponse, "description": "Too many requests in flight; see Retry-After."},
    503: {"model": ErrorResponse, "description": "A stage's queue is full; see Retry-After."},
    504: {"model": ErrorResponse, "description": "The request ran past the server's timeout."},
}

app = FastAPI(
    title="fluxray",
    version=fluxray.__version__,
    description="FLUX.1 text-to-image generation with OpenAI Images API conventions.",
)
app.add_middleware(RequestGuard)
# Documents the Bearer key in the OpenAPI document; RequestGuard is what enforces it.
API_KEY = [Security(HTTPBearer(auto_error=False, description="One of FLUXRAY_API_KEYS, when the server sets it."))]


@app.exception_handler(APIError)
async def _api_error(_: Request, error: APIError) -> Response:
    return _error_response(error)


@app.exception_handler(HTTPException)
async def _http_error(_: Request, error: HTTPException) -> Response:
    """Unknown paths, wrong methods, unparseable bodies: the same error shape as everything else."""
    kinds = {404: "not_found_error", 405: "invalid_request_error"}
    message = error.detail if isinstance(error.detail, str) else "invalid request"
    return _error_response(
        APIError(error.status_code, message, kind=kinds.get(error.status_code, "invalid_request_error"))
    )


@app.exception_handler(Exception)
async def _unexpected(_: Request, error: Exception) -> Response:
    """A bug or an unforeseen failure: logged here, answered without internals."""
    logger.exception("unexpected error", exc_info=error)
    return _error_response(APIError(500, "internal error; it has been logged", kind="server_error"))


@app.exception_handler(RequestValidationError)
async def _invalid_body(_: Request, error: RequestValidationError) -> Response:
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
        self.metrics = IngressMetrics()
        self.retries = 0
        keys = ApiKeys.from_env(self.config.api_keys_env)
        RequestGuard.configure(GuardPolicy(keys, self.config.max_body_bytes, self._answered))
        logger.info("API keys %s", f"required ({len(keys)} accepted)" if keys.enabled else "not required")

    def _answered(self, path: str, status: int, seconds: float) -> None:
        self.metrics.answered(path if path in ROUTES else "other", status, seconds)

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
        limit = self.config.max_prompt_chars
        for name in ("prompt", "prompt_2", "negative_prompt"):
            text = getattr(request, name)
            if text is not None and len(text) > limit:
                raise APIError(
                    422, f"{name}: {len(text)} characters; this server takes at most {limit}", name, code="too_long"
                )
        try:
            params = to_generation_params(request, self.config.default_size).resolve(self.spec)
        except ValidationError as error:
            param = str(error.errors()[0]["loc"][0]) if error.errors()[0]["loc"] else None
            message = describe_validation_error(error, PARAM_OF_FIELD)
            raise APIError(400, message, PARAM_OF_FIELD.get(param, param)) from None
        except ValueError as error:
            raise APIError(400, f"size: {error}", "size") from None
        passes = 2 if params.do_true_cfg else 1
        work = params.n * params.width * params.height * params.num_inference_steps * passes
        if work > self.config.max_pixel_steps:
            raise APIError(
                422,
                f"n x width x height x num_inference_steps{' x 2 (true CFG)' if passes == 2 else ''} = {work} "
                f"is over this server's budget of {self.config.max_pixel_steps}; ask for fewer, smaller or "
                "shorter-running images",
                None,
                code="pixel_budget_exceeded",
            )
        return params

    async def _generate(self, params: GenerationParams) -> list[bytes]:
        """Run the graph for one resolved request; the encoded image files."""
        retry = {"Retry-After": str(self.config.retry_after_s)}
        if self.in_flight >= self.config.max_pending_requests:
            raise APIError(429, "too many requests in flight; retry later", kind="rate_limit_error", headers=retry)
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        try:
            files = await asyncio.wait_for(self._run_graph(params), timeout=self.config.request_timeout_s)
            self.metrics.images.inc(len(files))
            return files
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
            self.metrics.in_flight.set(self.in_flight)

    async def _run_graph(self, params: GenerationParams) -> list[bytes]:
        """encode -> denoise -> decode; run again when a stage replica dies under it (the seed
        fixes the image, so a re-run gives the same bytes), up to `stage_retries` times."""
        negative = params.negative_prompt if params.do_true_cfg else None
        metadata = [image_metadata(params, seed, self.model_name) for seed in params.image_seeds()]
        decode = DecodeRequest(params.height, params.width, params.output_format, metadata)
        for attempt in range(self.config.stage_retries + 1):
            encoded = self.encoder.encode.remote(params.prompt, params.prompt_2, negative)
            latents = self.denoiser.denoise.remote(encoded, params)
            files = self.vae.decode.remote(latents, decode)
            try:
                return await files
            except Exception as error:  # Ray and Serve wrap a lost replica in several ways
                if not replica_lost(error):
                    raise
                if attempt == self.config.stage_retries:
                    raise APIError(
                        503,
                        "a stage replica failed; retry later",
                        kind="overloaded_error",
                        headers={"Retry-After": str(self.config.retry_after_s)},
                    ) from None
                self.metrics.retries.inc()
                self.retries += 1
                logger.warning("stage replica lost (%s); running the request again", type(error).__name__)
            finally:
                # Whether we finished, failed, timed out or the client went away, nothing upstream
                # may keep working for this attempt: cancelling a finished response is a no-op.
                for response in (files, latents, encoded):
                    try:
                        response.cancel()
                    except Exception:  # noqa: BLE001 - cancel() re-raises a response's own failure
                        pass
        raise AssertionError("unreachable")

    @app.post("/v1/images/generations", response_model=ImagesResponse, responses=ERRORS, dependencies=API_KEY)
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
        dependencies=API_KEY,
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

    @app.get("/v1/models", response_model=ModelList, responses={401: ERRORS[401]}, dependencies=API_KEY)
    async def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, created=self.started)])

    def stats(self) -> dict:
        """For operators and tests, through a DeploymentHandle (not an HTTP route)."""
        return {"in_flight": self.in_flight, "retries": self.retries}

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.model_name}
