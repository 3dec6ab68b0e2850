"""The application builder: `import_path: deployments.app:build_app` in a serve config.

    serve run deployments/configs/local.yaml

`args` become AppConfig (model, device, batching, timeouts, object store). Each deployment's
replicas, autoscaling, queue bounds and resources are the serve config's `deployments:` entries,
named Ingress, TextEncoder, Denoiser and VAEDecoder.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.config import AppConfig
from deployments.denoiser import DenoiserDeployment
from deployments.ingress import Ingress
from deployments.text_encoder import TextEncoderDeployment
from deployments.vae_decoder import VAEDecoderDeployment


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The Serve graph for one model: Ingress -> TextEncoder -> Denoiser -> VAEDecoder."""
    config = AppConfig.model_validate(args or {}).model_dump()
    return Ingress.bind(
        config,
        TextEncoderDeployment.bind(config),
        DenoiserDeployment.bind(config),
        VAEDecoderDeployment.bind(config),
    )
