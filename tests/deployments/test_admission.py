"""The ingress's request checks (deployments.http.admission), with no cluster: each check refuses with the
status, code and field its docs promise, and admits at its limit. The token budget's edge against the
Denoiser's own split is in test_request_shape.py; the same checks over HTTP in test_security.py and
test_request_limits.py."""

from __future__ import annotations

import pytest

from deployments.config import AppConfig
from deployments.http.admission import admit, budget_param, pixel_work
from deployments.http.errors import APIError
from deployments.http.protocol import ImageEditRequest, ImageGenerationRequest
from fluxray.editing import EditParams
from fluxray.models.specs import SPECS

BUDGET = 256 * 256 * 8  # the test cluster's guarded app: one 256x256 image at 8 steps
CONFIG = AppConfig(
    model="tiny",
    models=["tiny-fill", "tiny-kontext"],
    default_size="256x256",
    max_pixel_steps=BUDGET,
    max_prompt_chars=300,
    max_loras_per_request=2,
)
LORAS = {"ink": "ink.safetensors", "cat": "cat.safetensors", "fog": "fog.safetensors"}


def request(**body) -> ImageGenerationRequest:
    return ImageGenerationRequest(**{"prompt": "a cat", **body})


def refused(body: dict, model: str = "tiny", **where) -> APIError:
    with pytest.raises(APIError) as error:
        admit(request(**body), model, SPECS[model], CONFIG, LORAS, **where)
    return error.value


def test_a_request_within_every_limit_is_admitted_with_its_defaults_resolved():
    roomy = CONFIG.model_copy(update={"max_pixel_steps": 10**9})
    params = admit(request(size="auto", loras=[{"name": "ink", "scale": 0.5}]), "tiny", SPECS["tiny"], roomy, LORAS)
    assert (params.width, params.height, params.num_inference_steps) == (256, 256, SPECS["tiny"].default_steps)
    assert [(lora.name, lora.scale) for lora in params.loras] == [("ink", 0.5)]
    edit = admit(ImageEditRequest(prompt="a cat", strength=0.4), "tiny", SPECS["tiny"], roomy, size="128x64", edit=True)
    assert isinstance(edit, EditParams) and (edit.width, edit.height, edit.strength) == (128, 64, 0.4)


def test_fill_is_refused_for_a_generation_naming_model():
    error = refused({}, "tiny-fill")
    assert (error.status, error.param) == (400, "model") and "/v1/images/edits" in error.message
    fill = admit(
        ImageEditRequest(prompt="a cat", num_inference_steps=8), "tiny-fill", SPECS["tiny-fill"], CONFIG, edit=True
    )
    assert fill.width == 256


def test_url_responses_need_an_object_store():
    error = refused({"response_format": "url"})
    assert (error.status, error.param) == (400, "response_format")
    url = request(response_format="url", num_inference_steps=8)
    assert admit(url, "tiny", SPECS["tiny"], CONFIG, has_store=True).n == 1


@pytest.mark.parametrize("field", ["prompt", "prompt_2", "negative_prompt"])
def test_each_prompt_field_is_bounded_naming_it(field):
    error = refused({field: "a" * 301})
    assert (error.status, error.param, error.code) == (422, field, "too_long") and "300" in error.message
    assert admit(request(**{field: "a" * 300}, num_inference_steps=8), "tiny", SPECS["tiny"], CONFIG).n == 1


@pytest.mark.parametrize("size", ["100x64", "48x64", "64x2064", "0x0"])
def test_a_size_the_params_refuse_is_a_400_naming_size(size):
    """The request model (deployments.http.protocol) checks each field's range and the size's pattern; the
    params check the sides (multiples of 16, 64 to 2048)."""
    error = refused({"size": size, "num_inference_steps": 1})
    assert (error.status, error.param) == (400, "size") and error.message.startswith("size: "), error.message


def test_loras_must_be_known_and_within_the_count():
    error = refused({"loras": [{"name": "ink"}, {"name": "ghost"}]})
    assert (error.status, error.param, error.code) == (404, "loras", "lora_not_found") and "'ghost'" in error.message
    error = refused({"loras": [{"name": "ink"}, {"name": "cat"}, {"name": "fog"}]})
    assert (error.status, error.param) == (400, "loras") and "at most 2" in error.message


@pytest.mark.parametrize(
    "body, param",
    [
        ({"size": "256x256", "num_inference_steps": 8, "n": 2}, "n"),
        ({"size": "2048x2048", "num_inference_steps": 100, "n": 8}, "n"),
        ({"size": "272x256", "num_inference_steps": 8}, "size"),
        ({"size": "256x256", "num_inference_steps": 8, "negative_prompt": "fog", "true_cfg_scale": 3}, "size"),
        ({"size": "128x128", "num_inference_steps": 40}, "num_inference_steps"),  # over the default 28 steps
    ],
)
def test_the_pixel_budget_is_a_422_naming_the_factor_raised(body, param):
    error = refused(body)
    assert (error.status, error.param, error.code) == (422, param, "pixel_budget_exceeded")
    assert str(BUDGET) in error.message


@pytest.mark.parametrize(
    "body",
    [
        {"size": "256x256", "num_inference_steps": 8},  # exactly the budget
        {"size": "128x128", "num_inference_steps": 8, "negative_prompt": "fog", "true_cfg_scale": 3},  # x 2
        {"size": "64x64", "num_inference_steps": 8, "n": 8},
    ],
)
def test_the_pixel_budget_admits_up_to_it(body):
    params = admit(request(**body), "tiny", SPECS["tiny"], CONFIG)
    assert pixel_work(params) <= BUDGET and budget_param(params, 28) in ("n", "size")


def test_true_cfg_doubles_the_work_only_with_a_scale_over_one():
    plain = admit(request(size="128x128", num_inference_steps=8, negative_prompt="fog"), "tiny", SPECS["tiny"], CONFIG)
    cfg = admit(
        request(size="128x128", num_inference_steps=8, negative_prompt="fog", true_cfg_scale=3),
        "tiny",
        SPECS["tiny"],
        CONFIG,
    )
    assert pixel_work(cfg) == 2 * pixel_work(plain) == 2 * 128 * 128 * 8


def test_an_image_over_the_token_budget_is_a_422_naming_size():
    config = CONFIG.model_copy(update={"max_pixel_steps": 2048 * 2048, "denoiser_max_batch_tokens": 6144})
    ok = admit(request(size="1520x1024", num_inference_steps=1), "tiny", SPECS["tiny"], config)  # 6144 tokens
    assert ok.width == 1520
    with pytest.raises(APIError) as refused:  # 16384 + 64 tokens
        admit(request(size="2048x2048", num_inference_steps=1), "tiny", SPECS["tiny"], config)
    error = refused.value
    assert (error.status, error.param, error.code) == (422, "size", "batch_token_budget_exceeded")
    assert "16448" in error.message and "6144" in error.message
