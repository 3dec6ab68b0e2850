"""The VAE stages' batches, in-process (no cluster): a batch of one size goes through the model in parts of
at most vae_max_batch_pixels (one image at least), and the parts give what one call gives."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from deployments.stages.batching import in_parts
from deployments.stages.messages import DecodeRequest
from deployments.stages.vae_decoder import VAEDecoderDeployment
from deployments.stages.vae_encoder import VAEEncoderDeployment
from fluxray.editing import EditInputs
from fluxray.models.specs import SPECS
from fluxray.sampling import initial_noise

SIDE = 64


def test_parts_hold_at_most_the_pixel_budget_and_at_least_one_image():
    rows = torch.arange(5).reshape(5, 1)
    seen = []
    parts = in_parts(rows, SIDE, SIDE, 2 * SIDE * SIDE, lambda part: part[:, 0].tolist(), seen.append)
    assert parts == [[0, 1], [2, 3], [4]] and seen == [2, 2, 1]
    assert in_parts(rows, SIDE, SIDE, SIDE * SIDE - 1, len) == [1] * 5  # a budget under one image: one a call
    assert in_parts(rows, SIDE, SIDE, 10 * SIDE * SIDE, len) == [5]


def config(max_pixels: int) -> dict:
    return {"model": "tiny", "device": "cpu", "torch_threads": 1, "warm_up": False, "vae_max_batch_pixels": max_pixels}


def test_the_decoder_decodes_in_parts_what_one_call_decodes():
    spec = SPECS["tiny"]
    latents = [initial_noise(seed, SIDE, SIDE, torch.float32, spec.vae_scale_factor) * 0.5 for seed in (1, 2, 3)]
    items = [
        (latents[0], DecodeRequest(SIDE, SIDE, "png", [{"seed": 1}])),
        (torch.cat(latents[1:]), DecodeRequest(SIDE, SIDE, "png", [{"seed": 2}, {"seed": 3}])),
    ]
    split = VAEDecoderDeployment.func_or_class(config(2 * SIDE * SIDE))
    whole = VAEDecoderDeployment.func_or_class(config(64 * SIDE * SIDE))
    parts, one = split._decode(items), whole._decode(items)
    assert split.largest_call == 2 and whole.largest_call == 3 and [len(f) for f in parts] == [1, 2]
    for a, b in zip(sum(parts, []), sum(one, [])):
        pa, pb = (np.asarray(Image.open(io.BytesIO(x))) for x in (a, b))
        assert pa.shape == (SIDE, SIDE, 3) and np.abs(pa.astype(int) - pb).max() <= 1


def test_the_encoder_encodes_in_parts_what_one_call_encodes():
    generator = torch.Generator().manual_seed(0)

    def image() -> torch.Tensor:
        return torch.rand(1, 3, SIDE, SIDE, generator=generator) * 2 - 1

    mask = torch.ones(1, 1, SIDE, SIDE)
    items = [
        EditInputs("img2img", image()),
        EditInputs("fill", image(), mask, image()),  # its masked input is encoded too: two rows
        EditInputs("img2img", image()),
    ]
    split = VAEEncoderDeployment.func_or_class(config(SIDE * SIDE))
    whole = VAEEncoderDeployment.func_or_class(config(64 * SIDE * SIDE))
    parts, one = split._encode(items), whole._encode(items)
    assert split.largest_call == 1 and whole.largest_call == 4
    assert [e.method for e in parts] == ["img2img", "fill", "img2img"] and parts[1].masked_moments is not None
    for a, b in zip(parts, one):
        assert torch.allclose(a.image_moments, b.image_moments, atol=1e-4)
        assert (a.masked_moments is None) == (b.masked_moments is None)
