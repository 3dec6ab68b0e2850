"""The application's own settings: the `args` of a serve config, validated in one place.

Per-deployment Serve options (replicas, autoscaling, queue bounds, CPUs/GPUs) are not here: they
are the serve config's `deployments:` entries, which Serve itself applies and validates.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deployments.http.guard import API_KEYS_ENV, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_UPLOAD_BYTES
from fluxray.editing import MAX_INPUT_PIXELS
from fluxray.params import MAX_LORAS, MAX_PROMPT_CHARS, parse_size
from fluxray.runtime import RuntimeOptions


class ObjectStoreConfig(BaseModel):
    """Where `response_format=url` images go: any S3-compatible store, through boto3."""

    model_config = ConfigDict(extra="forbid")

    bucket: str = Field(min_length=1, description="Bucket to write images to.")
    prefix: str = Field(default="images/", description="Key prefix of stored images.")
    endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint; AWS when unset.")
    region: str | None = Field(default=None, description="Region of the bucket.")
    url_expiry_s: int = Field(default=3600, ge=1, le=7 * 24 * 3600, description="Lifetime of presigned URLs.")


class AppConfig(RuntimeOptions):
    """Settings shared by the deployments of one fluxray application: what each replica runs
    (fluxray.runtime.RuntimeOptions: model, device, dtype, threads, LoRA registry, speed) and the rest."""

    model_config = ConfigDict(extra="forbid")

    served_model_name: str | None = Field(
        default=None, description="Name clients use in `model`; the spec's name (tiny, flux-dev, ...) when unset."
    )
    models: list[str] = Field(
        default_factory=list,
        max_length=8,
        description="More models served beside `model` (e.g. flux-kontext, flux-fill), each named by its spec and "
        "run by a Denoiser deployment of its own (Denoiser-<name>); they share `model`'s TextEncoder and VAE, so "
        "their text encoders and VAE must be the same weights. A request picks one with `model`.",
    )
    loras: dict[str, str] = Field(default_factory=dict, description="More LoRAs by name: {name: path or s3:// URI}.")
    max_loras_per_request: int = Field(
        default=MAX_LORAS, ge=1, le=MAX_LORAS, description="Adapters one request may combine."
    )
    lora_host_cache_bytes: int = Field(
        default=4 << 30,
        ge=0,
        description="Host memory per Denoiser replica for adapters evicted from the device (brought back by a copy).",
    )
    default_size: str = Field(default="1024x1024", description="Size used when a request sends none or 'auto'.")
    warm_up: bool = Field(
        default=True,
        description="Each stage replica runs its model at default_size, and the ingress makes one call through "
        "the graph, before it reports ready (deployments.warmup): the first request runs as fast as the next.",
    )
    prompt_cache_bytes: int = Field(
        default=256 * 2**20,
        ge=0,
        description="Bytes of prompt embeddings (their tensors) kept per encoder replica, least recently used "
        "evicted first; 0 turns the cache off. FLUX.1-dev's are ~4 MiB each (T5 512 x 4096 in bf16).",
    )
    encoder_max_batch_size: int = Field(default=16, ge=1, description="Prompts encoded together.")
    encoder_batch_wait_s: float = Field(default=0.005, ge=0, description="Wait for more prompts to batch.")
    denoiser_max_batch_images: int = Field(default=8, ge=1, description="Images advanced by one transformer call.")
    denoiser_max_batch_tokens: int = Field(
        default=20480,
        ge=1,
        description="Transformer rows x tokens in one call (a row: one image, two with true CFG; tokens: "
        "(H/16)*(W/16) + text). A larger request is split into whole images; a larger single image gets 422.",
    )
    scheduler: Literal["srpt", "fifo"] = Field(
        default="srpt",
        description="Denoiser order: srpt (least remaining work first, preempting at step boundaries) or fifo.",
    )
    max_slowdown: float = Field(
        default=4.0,
        gt=1,
        description="srpt ages a request once its time in the system passes this x its standalone time.",
    )
    max_queue_wait_s: float = Field(
        default=60.0,
        gt=0,
        description="A request the denoiser estimates would wait longer gets 429 (Retry-After: the estimate).",
    )
    stuck_after_s: float = Field(
        default=300.0, gt=0, description="The denoiser reports unhealthy when no step ends this long while work waits."
    )
    unhealthy_after_failed_steps: int = Field(
        default=3,
        ge=1,
        description="Consecutive failed steps (each request retried alone) that make the denoiser unhealthy.",
    )
    vae_max_batch_size: int = Field(default=8, ge=1, description="Requests decoded together.")
    vae_max_batch_pixels: int = Field(
        default=4 * 1024 * 1024,
        ge=64 * 64,
        description="Images x pixels in one VAE decode call; larger batches are decoded in parts.",
    )
    vae_batch_wait_s: float = Field(default=0.005, ge=0, description="Wait for more requests to decode together.")
    request_timeout_s: float = Field(default=300.0, gt=0, description="A request still running then gets 504.")
    max_pending_requests: int = Field(
        default=64, ge=1, description="Generations in flight per ingress replica; beyond it, 429 with Retry-After."
    )
    retry_after_s: int = Field(default=2, ge=1, description="Retry-After sent with 429 and 503.")
    api_keys_env: str = Field(
        default=API_KEYS_ENV,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable holding the comma-separated API keys; unset or empty means no keys. "
        "Keys belong in the replicas' environment (a Kubernetes Secret), never in a serve config.",
    )
    stage_retries: int = Field(
        default=2,
        ge=0,
        le=5,
        description="Times a generation is re-run when a stage replica dies under it (safe: the seed fixes the image).",
    )
    max_body_bytes: int = Field(
        default=DEFAULT_MAX_BODY_BYTES, ge=1024, description="Largest request body accepted; beyond it, 413."
    )
    max_upload_bytes: int = Field(
        default=DEFAULT_MAX_UPLOAD_BYTES,
        ge=1024,
        description="Largest body of a request that carries images (/v1/images/edits); beyond it, 413.",
    )
    max_prompt_chars: int = Field(
        default=MAX_PROMPT_CHARS,
        ge=1,
        le=MAX_PROMPT_CHARS,
        description="Longest prompt, prompt_2 or negative_prompt accepted, in characters; beyond it, 422.",
    )
    max_input_pixels: int = Field(
        default=MAX_INPUT_PIXELS,
        ge=64 * 64,
        description="Largest input image (or mask) of an edit, in pixels, read from its header before it is "
        "decoded; beyond it, 400 naming image or mask.",
    )
    max_pixel_steps: int = Field(
        default=4 * 1024 * 1024 * 50,
        ge=64 * 64,
        description="Per-request work budget: n x width x height x steps (x2 with true CFG); beyond it, 422.",
    )
    object_store: ObjectStoreConfig | None = Field(default=None, description="Enables response_format=url.")
    job_store: str = Field(
        default="memory",
        pattern=r"^(memory|rediss?://\S+)$",
        description="Where async jobs live: memory (this ingress replica only; enough with one replica) or a "
        "redis:// URL shared by every ingress replica (its password from job_store_password_env, never here).",
    )
    job_store_password_env: str = Field(
        default="FLUXRAY_JOB_STORE_PASSWORD",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable with the Redis password of job_store (unset: none).",
    )
    job_ttl_s: float = Field(
        default=3600.0, gt=0, description="An async job's record expires this long after its last change."
    )
    max_queued_jobs: int = Field(
        default=256, ge=1, description="Unfinished async jobs per ingress replica; beyond it, 429."
    )
    job_result_max_bytes: int = Field(
        default=32 * 2**20, ge=1024, description="Largest base64 result kept in the job store; larger jobs fail."
    )
    job_lost_after_s: float = Field(
        default=30.0,
        gt=5,
        description="An unfinished job whose replica has not written for this long is failed (retryable).",
    )
    preview_every_steps: int = Field(default=4, ge=1, description="Steps between an async job's previews.")
    webhook_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts async jobs may send webhooks to; empty: webhooks off. A loopback, link-local or "
        "metadata address is called only when listed itself (or localhost, for loopback).",
    )
    webhook_secret_env: str = Field(
        default="FLUXRAY_WEBHOOK_SECRET",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable with the signing secret (whsec_ + base64, Standard Webhooks).",
    )
    webhook_max_attempts: int = Field(default=5, ge=1, le=20, description="Attempts per webhook delivery.")
    webhook_backoff_s: float = Field(
        default=1.0, gt=0, description="Wait before the second attempt; doubled before each next one."
    )
    webhook_timeout_s: float = Field(default=10.0, gt=0, description="Seconds a webhook receiver has to answer.")

    @field_validator("default_size")
    @classmethod
    def _size(cls, value: str) -> str:
        try:
            parse_size(value)
        except ValueError:
            raise ValueError("default_size must look like 1024x1024") from None
        return value


# What a Denoiser's `user_config` may set: the app args that only its step loop reads. Serve hands a
# changed user_config to the running replicas (`reconfigure`), so these change in place, while a
# change of `args` starts new replicas of every deployment. denoiser_max_batch_tokens is not among
# them: the ingress refuses an image larger than it, so it must be the same in both.
DENOISER_TUNABLE = ("scheduler", "max_slowdown", "max_queue_wait_s", "denoiser_max_batch_images")


def tuned(config: AppConfig, user_config: dict | None) -> AppConfig:
    """The Denoiser's settings: the app's config with its user_config's values over it (validated
    as the args are; a key left out of user_config takes the arg's value again)."""
    user_config = user_config or {}
    unknown = sorted(set(user_config) - set(DENOISER_TUNABLE))
    if unknown:
        raise ValueError(
            f"the Denoiser's user_config takes {', '.join(DENOISER_TUNABLE)}; not {', '.join(map(str, unknown))}"
        )
    return AppConfig.model_validate({**config.model_dump(), **user_config})


def served_models(config: AppConfig) -> dict[str, str]:
    """The app's models by the name clients use: `model` first (under served_model_name when set), then
    `models`. ValueError when two share a name, or when one cannot share the first's text encoders and
    VAE (another architecture or T5 length, or other weights)."""
    from fluxray.models.sources import resolve_model

    first = resolve_model(config.model)
    served = {config.served_model_name or first.name: config.model}
    for model in config.models:
        source = resolve_model(model)
        if source.name in served:
            raise ValueError(f"models: {source.name!r} is served twice")
        a, b = first.spec, source.spec
        if (a.clip, a.t5, a.vae, a.max_sequence_length) != (b.clip, b.t5, b.vae, b.max_sequence_length):
            raise ValueError(
                f"models: {source.name} cannot share {first.name}'s text encoders and VAE (other architecture or "
                f"T5 length: {b.max_sequence_length} vs {a.max_sequence_length}); serve it in an app of its own"
            )
        if source.weights_digest(transformer=False) != first.weights_digest(transformer=False):
            raise ValueError(
                f"models: {source.name}'s text encoder or VAE weights differ from {first.name}'s; serve it in an "
                "app of its own"
            )
        served[source.name] = model
    return served
