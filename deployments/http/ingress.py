"""The HTTP ingress: OpenAI Images API routes over the TextEncoder -> Denoiser -> VAEDecoder graph, with
a VAEEncoder for edits and a Denoiser per served model (the request's `model` picks it).

The ingress validates, then chains the stages' DeploymentResponses, so embeddings and
latents travel from replica to replica through Ray's object store and never through here.
(No `from __future__ import annotations` here: FastAPI must see the real types of the routes'
parameters through Serve's method wrappers.)
"""

import asyncio
import base64
import html
import logging
import os
import re
import time
from pathlib import Path

from fastapi import FastAPI, Header, Request, Security
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from ray import serve
from ray.serve.handle import DeploymentHandle

import fluxray
from deployments.async_jobs.events import event_stream
from deployments.async_jobs.jobs import AsyncJobs, public
from deployments.async_jobs.store import JobStoreUnavailable, open_store
from deployments.async_jobs.webhooks import WebhookPolicy, WebhookSender, validate_webhook
from deployments.config import AppConfig, served_models
from deployments.http.admission import admit
from deployments.http.edit_body import read_edit_body
from deployments.http.errors import ERRORS, APIError, install_error_handlers
from deployments.http.graph import Graph
from deployments.http.graph_runner import GraphRunner
from deployments.http.guard import ApiKeys, GuardPolicy, RequestGuard
from deployments.http.headers import SEED_HEADER, TIMING_HEADER, TRUNCATED_HEADER, server_timing, timings_ms
from deployments.http.object_store import ObjectStore
from deployments.http.protocol import (
    EDIT_REQUEST_BODY,
    ErrorResponse,
    ImageData,
    ImageGenerationRequest,
    ImageJob,
    ImageJobRequest,
    ImagesResponse,
    LoraCard,
    LoraList,
    ModelCard,
    ModelList,
)
from deployments.metrics import IngressMetrics
from deployments.stages.messages import DecodedImages
from deployments.warmup import warm_graph
from fluxray.editing import (
    EditError,
    EditInputs,
    default_size,
    edit_method,
    fit_size,
    prepare_edit,
    read_edit_inputs,
    reference_size,
)
from fluxray.images import MEDIA_TYPES, InputImageError, image_sha256
from fluxray.lora import LoraRegistry
from fluxray.models.sources import resolve_model
from fluxray.params import GenerationParams, parse_size
from fluxray.text_encoding import PromptLength

# Metric labels: these routes, and "other" for any path a client makes up. (Not read off app.routes:
# in a replica, Serve mounts the app's routes under a router entry that has no single path.)
ROUTES = frozenset(
    {
        "/v1/images/generations",
        "/v1/images/edits",
        "/generate",
        "/v1/models",
        "/v1/loras",
        "/healthz",
        "/v1/images/jobs",
        "/",
    }
)
JOB_PATH = re.compile(r"^/v1/images/jobs/[^/]+(/events)?$")  # labelled by template, not by id
JOB_ID = re.compile(r"^imgjob_[0-9a-f]{24}$")
SSE_KEEPALIVE_S = 15.0  # a comment line on an idle event stream this often
STATIC = Path(__file__).resolve().parent / "static"  # the page: served as files, no build step
STATIC_TYPES = {"page.js": "text/javascript; charset=utf-8", "page.css": "text/css; charset=utf-8"}
REPLICA_HEADER = "X-Replica"  # on job answers: which ingress replica answered (jobs are shared through Redis)


def route_label(path: str) -> str:
    """A path's metric label: its route, a job route's template, or "other"."""
    if path in ROUTES:
        return path
    if match := JOB_PATH.match(path):
        return "/v1/images/jobs/{id}" + (match.group(1) or "")
    return "other"


logger = logging.getLogger("ray.serve")

app = FastAPI(
    title="fluxray",
    version=fluxray.__version__,
    description="FLUX.1 text-to-image generation with OpenAI Images API conventions.",
)
app.add_middleware(RequestGuard)
install_error_handlers(app)
# Documents the Bearer key in the OpenAPI document; RequestGuard is what enforces it.
API_KEY = [Security(HTTPBearer(auto_error=False, description="One of FLUXRAY_API_KEYS, when the server sets it."))]


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    async def __init__(
        self,
        config: dict,
        encoder: DeploymentHandle,
        denoisers: list[DeploymentHandle],
        vae: DeploymentHandle,
        vae_encoder: DeploymentHandle,
    ):
        self.config = AppConfig.model_validate(config)
        served = served_models(self.config)  # resolves the sources; loads no weights
        self.specs = {name: resolve_model(model).spec for name, model in served.items()}
        source = resolve_model(self.config.model)
        self.prompt_length = PromptLength.load(source)  # the tokenizers only: a few MB, no model
        self.model_name = next(iter(served))  # the default model
        self.lora_registry = LoraRegistry(self.config.lora_root, self.config.loras)
        denoisers = dict(zip(served, denoisers))  # the models' Denoisers, in the order build_app bound them
        self.encoder, self.denoisers, self.vae, self.vae_encoder = encoder, denoisers, vae, vae_encoder
        self.store = ObjectStore(self.config.object_store) if self.config.object_store else None
        self.started = int(time.time())
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.metrics = IngressMetrics()
        self.runner = GraphRunner(
            max_pending=self.config.max_pending_requests,
            timeout_s=self.config.request_timeout_s,
            retries=self.config.stage_retries,
            retry_after_s=self.config.retry_after_s,
            on_retry=lambda _: self.metrics.retries.inc(),
            on_in_flight=self.metrics.in_flight.set,
        )
        self.webhook_policy = WebhookPolicy(
            allowed_hosts=tuple(self.config.webhook_allowed_hosts),
            secret=os.environ.get(self.config.webhook_secret_env),
            max_attempts=self.config.webhook_max_attempts,
            backoff_s=self.config.webhook_backoff_s,
            timeout_s=self.config.webhook_timeout_s,
        )
        if self.config.webhook_allowed_hosts and not self.webhook_policy.secret:
            logger.warning("webhooks off: %s is not set in this replica's environment", self.config.webhook_secret_env)
        store = open_store(
            self.config.job_store, self.config.job_ttl_s, os.environ.get(self.config.job_store_password_env)
        )
        self.graph = Graph(encoder, denoisers, vae, vae_encoder)  # both the sync routes' and the jobs'
        self.jobs = AsyncJobs(
            store,
            self.graph,
            self.runner,
            model_name=self.model_name,
            retry_after_s=self.config.retry_after_s,
            max_queued_jobs=self.config.max_queued_jobs,
            preview_every=self.config.preview_every_steps,
            result_max_bytes=self.config.job_result_max_bytes,
            lost_after_s=self.config.job_lost_after_s,
            finish=self._image_data,
            webhooks=WebhookSender(self.webhook_policy, lambda r: self.metrics.webhooks.inc(tags={"result": r})),
            on_status=lambda status: self.metrics.jobs.inc(tags={"status": status}),
            on_queue_wait=self.metrics.job_queue_wait.observe,
        )
        keys = ApiKeys.from_env(self.config.api_keys_env)
        RequestGuard.configure(GuardPolicy(keys, self.config.max_body_bytes, self._answered))
        logger.info("API keys %s", f"required ({len(keys)} accepted)" if keys.enabled else "not required")
        # The graph's first call before this replica is ready, so the first user request runs warm.
        if self.config.warm_up:
            await warm_graph(
                self.runner, self.graph, self.specs, self.config.default_size, self.config.request_timeout_s
            )

    def _answered(self, path: str, status: int, seconds: float) -> None:
        self.metrics.answered(route_label(path), status, seconds)

    def _model(self, requested: str | None) -> str:
        """The served model a request names (the default when it names none); 404 for any other."""
        if requested is None:
            return self.model_name
        if requested not in self.specs:
            served = ", ".join(repr(name) for name in self.specs)
            raise APIError(
                404,
                f"model: unknown model {requested!r}; this server serves {served}",
                "model",
                "not_found_error",
                code="model_not_found",
            )
        return requested

    def _params(
        self,
        request: ImageGenerationRequest,
        model: str,
        size: str | None = None,
        edit: bool = False,
        reference: tuple[int, int] | None = None,
    ) -> GenerationParams:
        """The request's resolved params for `model`, through every admission check (deployments.http.admission);
        `size` in place of the request's own when given (an edit's default size comes from its image),
        `edit` for an edit (EditParams), `reference` a Kontext edit's reference size (height, width), whose
        tokens join every row."""
        spec, known, has_store = self.specs[model], self.lora_registry.files, self.store is not None
        return admit(request, model, spec, self.config, known, has_store, size, edit, reference)

    async def _generate(
        self, params: GenerationParams, model: str, edit: EditInputs | None = None, extra: dict | None = None
    ) -> DecodedImages:
        """Run the graph for one resolved request (rules: deployments.http.graph_runner); the image files
        and the request's timings. An edit's inputs go through the VAEEncoder; `extra` joins each image's
        metadata."""
        started = time.monotonic()
        result = await self.runner.run(self.graph.launch(params, model, edit, extra))  # deployments.http.graph
        self.metrics.images.inc(len(result.files))
        result.timings["total"] = time.monotonic() - started
        return result

    async def _images(self, params: GenerationParams, files: list[bytes], response_format: str) -> list[ImageData]:
        """The response's `data`: each image as base64 or as an object-store URL, with its seed."""
        cut = self.prompt_length.truncated(params.prompt, params.prompt_2)
        loras = list(params.loras)
        if response_format == "url":
            loop = asyncio.get_running_loop()
            urls = await asyncio.gather(
                *[loop.run_in_executor(None, self.store.put, f, params.output_format) for f in files]
            )
            return [ImageData(url=u, seed=s, truncated=cut, loras=loras) for u, s in zip(urls, params.image_seeds())]
        return [
            ImageData(b64_json=base64.b64encode(f).decode(), seed=s, truncated=cut, loras=loras)
            for f, s in zip(files, params.image_seeds())
        ]

    async def _image_data(self, params: GenerationParams, files: list[bytes], response_format: str) -> list[dict]:
        return [d.model_dump() for d in await self._images(params, files, response_format)]

    @app.post(
        "/v1/images/generations",
        response_model=ImagesResponse,
        responses={**ERRORS, 202: {"model": ImageJob, "description": "With `Prefer: respond-async`: the job."}},
        dependencies=API_KEY,
    )
    async def generations(
        self, request: ImageGenerationRequest, response: Response, prefer: str | None = Header(default=None)
    ) -> ImagesResponse:
        """Generate images (OpenAI Images API, plus fluxray's extension fields). With the header
        `Prefer: respond-async`, answers 202 with an async job instead (as POST /v1/images/jobs)."""
        model = self._model(request.model)
        params = self._params(request, model)
        if prefer and "respond-async" in [p.strip().split("=")[0].lower() for p in prefer.split(",")]:
            return await self._submit_job(params, request, model, preview=False)
        result = await self._generate(params, model)
        response.headers[TIMING_HEADER] = server_timing(result.timings)
        data = await self._images(params, result.files, request.response_format)
        return ImagesResponse(created=int(time.time()), data=data, timings=timings_ms(result.timings))

    # --- edits ------------------------------------------------------------------------------------

    def _read_inputs(self, image_bytes: bytes, mask_bytes: bytes | None, spec):
        """The edit's image (RGB) and mask (L, white = edit; None for none): fluxray.editing's reader, at
        this server's max_input_pixels."""
        return read_edit_inputs(spec, image_bytes, mask_bytes, self.config.max_input_pixels)

    @app.post(
        "/v1/images/edits",
        response_model=ImagesResponse,
        responses={**ERRORS, 415: {"model": ErrorResponse, "description": "Neither multipart nor JSON."}},
        dependencies=API_KEY,
        openapi_extra=EDIT_REQUEST_BODY,
    )
    async def edits(self, request: Request, response: Response) -> ImagesResponse:
        """Edit an image (OpenAI Images edits: multipart with `image` and `mask` files, or JSON with them as
        base64 or data: URLs). The model picks the method: base models do img2img, or inpainting with a mask;
        FLUX.1 Fill fills the mask; FLUX.1 Kontext edits by instruction."""
        fields, files, mask_bytes = await read_edit_body(request)
        model = self._model(fields.model)
        spec = self.specs[model]
        if not files:
            raise APIError(400, "image: required (a PNG, JPEG or WebP file, or base64 in JSON)", "image")
        if len(files) > 1:
            raise APIError(400, f"image: {model} edits one image at a time (got {len(files)})", "image")
        loop = asyncio.get_running_loop()
        try:
            image, mask = await loop.run_in_executor(None, self._read_inputs, files[0], mask_bytes, spec)
            method = edit_method(spec, mask is not None, fields.strength)
        except (InputImageError, EditError) as error:
            raise APIError(400, str(error), error.field) from None
        size = None
        if fields.size in (None, "auto"):
            default_w, default_h = parse_size(self.config.default_size)
            size = "{}x{}".format(*fit_size(*default_size(spec, image), default_w * default_h))
        reference = None
        if method == "kontext":  # the Denoiser's reference: prepare_edit's resize, through the VAE's 8x
            ref_w, ref_h = reference_size(spec, image.width, image.height)
            reference = (ref_h, ref_w)
        params = self._params(fields, model, size, edit=True, reference=reference)
        inputs = await loop.run_in_executor(None, prepare_edit, spec, method, image, mask, params.width, params.height)
        extra = {"edit": method, "strength": params.strength, "image_sha256": image_sha256(image)}
        if mask is not None:
            extra["mask_sha256"] = image_sha256(mask)
        del image, mask, files, mask_bytes  # nothing of the input outlives the request
        result = await self._generate(params, model, inputs, extra)
        response.headers[TIMING_HEADER] = server_timing(result.timings)
        data = await self._images(params, result.files, fields.response_format)
        return ImagesResponse(created=int(time.time()), data=data, timings=timings_ms(result.timings))

    # --- async jobs (deployments.async_jobs.jobs) -------------------------------------------------------

    async def _jobs_call(self, coroutine):
        try:
            return await coroutine
        except JobStoreUnavailable as error:
            headers = {"Retry-After": str(self.config.retry_after_s)}
            raise APIError(503, f"{error}; retry later", kind="overloaded_error", headers=headers) from None

    async def _submit_job(self, params: GenerationParams, request: ImageGenerationRequest, model: str, preview: bool):
        webhook = getattr(request, "webhook", None)
        await validate_webhook(self.webhook_policy, webhook)
        body = request.model_dump(exclude_none=True, exclude={"preview", "webhook", "webhook_events"})
        events = getattr(request, "webhook_events", None)
        record = await self._jobs_call(self.jobs.submit(params, body, preview, webhook, events, model))
        headers = {"Location": record["links"]["self"], REPLICA_HEADER: self.replica}
        return JSONResponse(record, status_code=202, headers=headers)

    def _job_id(self, job_id: str) -> str:
        if not JOB_ID.match(job_id):
            raise APIError(404, f"no job {job_id[:64]!r}", "id", "not_found_error", code="job_not_found")
        return job_id

    @app.post(
        "/v1/images/jobs",
        status_code=202,
        response_model=ImageJob,
        responses=ERRORS,
        dependencies=API_KEY,
    )
    async def create_job(self, request: ImageJobRequest):
        """Start an async generation (fluxray extension): 202 with the job, its id and its links."""
        model = self._model(request.model)
        params = self._params(request, model)
        return await self._submit_job(params, request, model, preview=request.preview)

    @app.get("/v1/images/jobs/{job_id}", response_model=ImageJob, responses=ERRORS, dependencies=API_KEY)
    async def get_job(self, job_id: str):
        """The job: status, progress, queue position, ETA, and its images once it succeeded."""
        record = public(await self._jobs_call(self.jobs.get(self._job_id(job_id))))
        return JSONResponse(record, headers={REPLICA_HEADER: self.replica})

    @app.delete("/v1/images/jobs/{job_id}", response_model=ImageJob, responses=ERRORS, dependencies=API_KEY)
    async def cancel_job(self, job_id: str):
        """Cancel the job: a queued job never runs, a running one stops at its next step."""
        record = await self._jobs_call(self.jobs.cancel(self._job_id(job_id)))
        return JSONResponse(record, headers={REPLICA_HEADER: self.replica})

    @app.get(
        "/v1/images/jobs/{job_id}/events",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}, **ERRORS},
        dependencies=API_KEY,
    )
    async def job_events(self, job_id: str, request: Request):
        """Server-Sent Events: queued, started, progress (with previews when asked for), then succeeded,
        failed or cancelled. Reconnecting with Last-Event-ID resumes after that event."""
        await self._jobs_call(self.jobs.get(self._job_id(job_id)))
        header = request.headers.get("last-event-id", "0").strip()
        after = int(header) if header.isdigit() and len(header) < 10 else 0
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        stream = event_stream(self.jobs, job_id, after, SSE_KEEPALIVE_S)
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)

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
        model = self._model(request.model)
        params = self._params(request, model)
        result = await self._generate(params, model)
        files = result.files
        headers = {SEED_HEADER: str(params.seed), TIMING_HEADER: server_timing(result.timings)}
        if cut := self.prompt_length.truncated(params.prompt, params.prompt_2):
            headers[TRUNCATED_HEADER] = ",".join(cut)
        return Response(files[0], media_type=MEDIA_TYPES[params.output_format], headers=headers)

    @app.get("/v1/models", response_model=ModelList, responses={401: ERRORS[401]}, dependencies=API_KEY)
    async def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=name, created=self.started) for name in self.specs])

    @app.get("/v1/loras", response_model=LoraList, responses={401: ERRORS[401]}, dependencies=API_KEY)
    async def loras(self) -> LoraList:
        """The LoRA adapters requests may name (fluxray extension)."""
        return LoraList(data=[LoraCard(id=name) for name in self.lora_registry.names()])

    def stats(self) -> dict:
        """For operators and tests, through a DeploymentHandle (not an HTTP route)."""
        return {"in_flight": self.runner.in_flight, "retries": self.runner.retried}

    @app.get("/", include_in_schema=False)
    async def page(self, request: Request) -> Response:
        """A page to try the service: a form, live progress over the job's events, a gallery. Its paths
        are relative to <base>, set here to the application's route prefix."""
        prefix = html.escape(request.scope.get("root_path", "").rstrip("/"), quote=True)
        text = (STATIC / "index.html").read_text().replace('<base href="/">', f'<base href="{prefix}/">')
        return Response(text, media_type="text/html; charset=utf-8")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(self, name: str) -> Response:
        if name not in STATIC_TYPES:
            raise APIError(404, f"no file {name[:64]!r}", kind="not_found_error")
        return Response((STATIC / name).read_bytes(), media_type=STATIC_TYPES[name])

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.model_name}
