"""A request's graph, built in one place for the synchronous routes and for async jobs: the stage calls
(TextEncoder -> the model's Denoiser, routed by its adapter set -> VAEDecoder, with the VAEEncoder first
for an edit), each image's metadata (fluxray.images.image_metadata) and the DecodeRequest. It only
builds the calls; deployments.http.graph_runner runs them, under its rules, as often as they need.
"""

from __future__ import annotations

from typing import Any

from ray.serve.handle import DeploymentHandle

from deployments.http.graph_runner import Launch, Streamed, StreamLaunch
from deployments.stages.messages import DecodeRequest, routed
from fluxray.editing import EditInputs
from fluxray.images import image_metadata
from fluxray.params import GenerationParams


class Graph:
    def __init__(
        self,
        encoder: DeploymentHandle,
        denoisers: dict[str, DeploymentHandle],
        vae: DeploymentHandle,
        vae_encoder: DeploymentHandle | None = None,
    ):
        self.encoder, self.denoisers, self.vae, self.vae_encoder = encoder, denoisers, vae, vae_encoder

    def decode_request(self, params: GenerationParams, model: str, extra: dict[str, Any] | None = None):
        """What the VAEDecoder makes of the latents: the files, each with its image's metadata (`extra`
        joins each image's: an edit's method and input hashes)."""
        metadata = [{**image_metadata(params, seed, model), **(extra or {})} for seed in params.image_seeds()]
        return DecodeRequest(params.height, params.width, params.output_format, metadata)

    def _encode(self, params: GenerationParams):
        negative = params.negative_prompt if params.do_true_cfg else None
        return self.encoder.encode.remote(params.prompt, params.prompt_2, negative)

    def launch(
        self, params: GenerationParams, model: str, edit: EditInputs | None = None, extra: dict | None = None
    ) -> Launch:
        """A synchronous request's attempts (GraphRunner.run): each stage's response goes straight into
        the next, so tensors move replica to replica. `edit`: an edit's inputs, for the VAEEncoder."""
        decode = self.decode_request(params, model, extra)
        denoiser = routed(self.denoisers[model], params)

        def launch():
            encoded = self._encode(params)
            if edit is None:
                latents = denoiser.denoise.remote(encoded, params)
                return encoded, latents, self.vae.decode.remote(latents, decode)
            image = self.vae_encoder.encode.remote(edit)
            latents = denoiser.denoise.remote(encoded, params, image)
            return encoded, image, latents, self.vae.decode.remote(latents, decode)

        return launch

    def launch_stream(
        self, params: GenerationParams, model: str, preview_every: int = 0, extra: dict | None = None
    ) -> StreamLaunch:
        """An async job's attempts (GraphRunner.stream): the Denoiser's streaming call (queue position,
        steps, previews every `preview_every` steps), which admits the job however long it will wait
        (jobs are bounded by max_queued_jobs instead), then the decode of its result."""
        decode = self.decode_request(params, model, extra)
        denoiser = routed(self.denoisers[model], params).options(stream=True)

        def launch() -> Streamed:
            encoded = self._encode(params)
            stream = denoiser.denoise_stream.remote(encoded, params, preview_every, True)
            return Streamed([encoded, stream], stream, lambda latents: self.vae.decode.remote(latents, decode))

        return launch
