"""The sigma schedule and the noise equal diffusers' for every spec and several resolutions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift
from diffusers.utils.torch_utils import randn_tensor

from fluxray.models.specs import SPECS
from fluxray.sampling import flow_sigmas, image_ids, initial_noise, latent_size, pack_latents, unpack_latents


@pytest.mark.parametrize("spec_name", ["flux-dev", "flux-schnell"])
@pytest.mark.parametrize("steps,width,height", [(28, 1024, 1024), (4, 512, 512), (20, 1360, 768), (1, 64, 64)])
def test_sigmas_match_diffusers_scheduler(spec_name, steps, width, height):
    config = SPECS[spec_name].scheduler
    h, w = latent_size(height, width)
    seq_len = (h // 2) * (w // 2)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = flow_sigmas(steps, seq_len, config)
    assert torch.equal(ours, scheduler.sigmas)
    assert ours[0] == 1.0 and ours[-1] == 0.0 and len(ours) == steps + 1


def test_dev_shift_depends_on_resolution_and_schnell_does_not():
    dev, schnell = SPECS["flux-dev"].scheduler, SPECS["flux-schnell"].scheduler
    assert flow_sigmas(4, 256, dev)[1] < flow_sigmas(4, 4096, dev)[1]
    assert torch.allclose(flow_sigmas(4, 256, schnell), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert torch.equal(flow_sigmas(4, 256, schnell), flow_sigmas(4, 4096, schnell))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noise_is_diffusers_noise_for_that_seed(dtype):
    generator = torch.Generator("cpu").manual_seed(2024)
    expected = randn_tensor((1, 16, 12, 20), generator=generator, device=torch.device("cpu"), dtype=dtype)
    expected = FluxPipeline._pack_latents(expected, 1, 16, 12, 20)
    assert torch.equal(initial_noise(2024, height=96, width=160, dtype=dtype), expected)
    assert not torch.equal(initial_noise(2025, 96, 160, dtype), expected)


def test_pack_unpack_round_trip_and_ids():
    latents = torch.randn(2, 16, 12, 20)
    packed = pack_latents(latents)
    assert packed.shape == (2, 6 * 10, 64)
    assert torch.equal(unpack_latents(packed, 96, 160), latents)
    ids = image_ids(96, 160)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(1, 6, 10, "cpu", torch.float32))
