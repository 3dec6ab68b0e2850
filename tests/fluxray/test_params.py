"""GenerationParams: every bound, with messages that name the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fluxray.models.specs import SPECS
from fluxray.params import SEED_LIMIT, GenerationParams, describe_validation_error, parse_size


def error_of(**fields) -> str:
    with pytest.raises(ValidationError) as info:
        GenerationParams(**{"prompt": "a cat", **fields})
    return describe_validation_error(info.value)


@pytest.mark.parametrize(
    "fields,expected",
    [
        ({"prompt": ""}, "prompt:"),
        ({"prompt": "   "}, "prompt: prompt must not be blank"),
        ({"prompt": "x" * 4001}, "prompt:"),
        ({"width": 100}, "width: width must be a multiple of 16 (got 100)"),
        ({"height": 1000}, "height: height must be a multiple of 16 (got 1000)"),
        ({"width": 48}, "width:"),
        ({"height": 2064}, "height:"),
        ({"num_inference_steps": 0}, "num_inference_steps:"),
        ({"num_inference_steps": 101}, "num_inference_steps:"),
        ({"guidance_scale": -0.5}, "guidance_scale:"),
        ({"guidance_scale": 20.5}, "guidance_scale:"),
        ({"guidance_scale": float("nan")}, "guidance_scale:"),
        ({"n": 0}, "n:"),
        ({"n": 9}, "n:"),
        ({"seed": -1}, "seed:"),
        ({"seed": 2**63}, "seed:"),
        ({"true_cfg_scale": 2.0}, "true_cfg_scale: true CFG (> 1) needs a negative prompt"),
        ({"output_format": "gif"}, "output_format:"),
        ({"width": "wide"}, "width:"),
        ({"colour": "red"}, "colour: unknown field"),
    ],
)
def test_invalid_fields_are_named(fields, expected):
    assert expected in error_of(**fields)


def test_bounds_that_are_allowed():
    p = GenerationParams(
        prompt="a cat", width=64, height=2048, num_inference_steps=100, guidance_scale=20, n=8, seed=2**63 - 8
    )
    assert (p.width, p.height, p.n) == (64, 2048, 8)
    assert GenerationParams(prompt="a", width=1360, height=768).width == 1360  # any multiple of 16


def test_resolve_fills_model_defaults_and_draws_a_seed():
    dev = GenerationParams(prompt="a cat").resolve(SPECS["flux-dev"])
    schnell = GenerationParams(prompt="a cat").resolve(SPECS["flux-schnell"])
    assert (dev.num_inference_steps, dev.guidance_scale) == (28, 3.5)
    assert (schnell.num_inference_steps, schnell.guidance_scale) == (4, 0.0)
    assert dev.seed is not None and 0 <= dev.seed < 2**63
    assert GenerationParams(prompt="a", seed=7, n=3).resolve(SPECS["tiny"]).image_seeds() == [7, 8, 9]
    explicit = GenerationParams(prompt="a", num_inference_steps=9, guidance_scale=0.0).resolve(SPECS["flux-dev"])
    assert (explicit.num_inference_steps, explicit.guidance_scale) == (9, 0.0)


def test_guidance_schedule_constant_and_linear_ramp():
    spec = SPECS["tiny"]
    constant = GenerationParams(prompt="a", num_inference_steps=4, guidance_scale=3.5).resolve(spec)
    assert constant.guidance_per_step() == [3.5, 3.5, 3.5, 3.5]
    ramp = GenerationParams(prompt="a", num_inference_steps=5, guidance_scale=1.0, guidance_scale_end=5.0).resolve(spec)
    assert ramp.guidance_per_step() == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_parse_size():
    assert parse_size("1360x768") == (1360, 768)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_size("1360*768")


def test_seeds_of_every_image_stay_in_range():
    last = SEED_LIMIT - 1
    assert GenerationParams(prompt="x", seed=last, n=1).image_seeds() == [last]
    assert GenerationParams(prompt="x", seed=last - 7, n=8).image_seeds()[-1] == last
    with pytest.raises(ValidationError, match=r"seed\n.*seed \+ n - 1 must be below 2\*\*63"):
        GenerationParams(prompt="x", seed=last, n=2)
    drawn = GenerationParams(prompt="x", n=8).resolve(SPECS["tiny"])
    assert all(0 <= s < SEED_LIMIT for s in drawn.image_seeds())
