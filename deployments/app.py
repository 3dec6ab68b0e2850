"""The application builder: `import_path: deployments.app:build_app` in a serve config.

    serve run deployments/configs/local.yaml

`args` become AppConfig (models, device, batching, timeouts, object store). Each deployment's
replicas, autoscaling, queue bounds and resources are the serve config's `deployments:` entries,
named Ingress, TextEncoder, Denoiser (Denoiser-<name> for each model of `models`), VAEDecoder and
VAEEncoder.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.config import AppConfig
from deployments.http.ingress import Ingress
from deployments.stages.denoiser import DenoiserDeployment
from deployments.stages.text_encoder import TextEncoderDeployment
from deployments.stages.vae_decoder import VAEDecoderDeployment
from deployments.stages.vae_encoder import VAEEncoderDeployment
from fluxray.models.sources import resolve_model


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The Serve graph: Ingress -> TextEncoder -> Denoiser (one per model) -> VAEDecoder, and the
    VAEEncoder for edits. Every model shares the one TextEncoder and the one VAE. The first model's
    Denoiser is named Denoiser (a one-model app's serve config names it as ever), each of `models`'
    Denoiser-<its name>; `model` itself is resolved by the replicas, not here."""
    config = AppConfig.model_validate(args or {})
    shared = config.model_dump()
    denoisers = [DenoiserDeployment.bind({**shared, "models": []})]
    for model in config.models:
        name = resolve_model(model).name
        own = {**shared, "model": model, "models": [], "served_model_name": None}
        denoisers.append(DenoiserDeployment.options(name=f"Denoiser-{name}").bind(own))
    return Ingress.bind(
        shared,
        TextEncoderDeployment.bind(shared),
        denoisers,
        VAEDecoderDeployment.bind(shared),
        VAEEncoderDeployment.bind(shared),
    )
