"""A request's transformer shape and tokens (deployments.stages.request_scheduler.request_shape), in-process
(no cluster): each component counted, the Kontext reference's tokens equal to what the VAE encoder and the
Denoiser build, and the ingress's 422 (deployments.http.admission) and the Denoiser's split agreeing at the
token budget's edge (admitted at exactly the budget, refused one patch row over)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from PIL import Image

from deployments.config import AppConfig
from deployments.http import admission
from deployments.http.errors import APIError
from deployments.http.protocol import ImageEditRequest, ImageGenerationRequest
from deployments.stages.denoiser import DenoiserDeployment
from deployments.stages.messages import EncodedPrompt
from deployments.stages.request_scheduler import OverTokenBudget, request_shape, tokens
from fluxray.editing import EditParams, prepare_edit, reference_size
from fluxray.models.sources import resolve_model
from fluxray.models.specs import SPECS
from fluxray.params import GenerationParams
from fluxray.text_encoding import TextEncoder
from fluxray.vae import VAEEncoder

BUDGET = 6144  # deployments/configs/local.yaml's denoiser_max_batch_tokens
TEXT = SPECS["tiny"].max_sequence_length  # 64
KONTEXT = SPECS["tiny-kontext"]


def params(width: int, height: int, cfg: bool = False, n: int = 1, kind=GenerationParams, spec=SPECS["tiny"]):
    extra = {"negative_prompt": "blur", "true_cfg_scale": 2.0} if cfg else {}
    return kind(prompt="a red cube", width=width, height=height, n=n, num_inference_steps=2, seed=1, **extra).resolve(
        spec
    )


def test_each_component_is_counted():
    plain = request_shape(params(1024, 512), TEXT)
    assert (plain.image_tokens, plain.text_tokens, plain.reference_tokens, plain.rows_per_image) == (2048, 64, 0, 1)
    assert plain.shape == (512, 1024, 64) and plain.row_tokens == plain.image_units == 2048 + 64
    assert plain.describe() == "2048 image + 64 text tokens"
    # True CFG needs both a negative prompt and a scale over 1: two rows an image.
    cfg = request_shape(params(1024, 512, cfg=True), TEXT)
    assert cfg.rows_per_image == 2 and cfg.image_units == 2 * (2048 + 64) and "x2 rows" in cfg.describe()
    negative_only = GenerationParams(prompt="x", negative_prompt="blur", width=64, height=64)
    assert request_shape(negative_only, TEXT).rows_per_image == 1
    assert request_shape(params(64, 64, cfg=True), TEXT, true_cfg=False).rows_per_image == 1  # the Denoiser's view
    # Kontext: the reference's tokens join every row (and its size is part of the batch shape).
    kontext = request_shape(params(1472, 1024), TEXT, (256, 256))
    assert kontext.shape == (1024, 1472, 64, 256, 256)
    assert (kontext.image_tokens, kontext.reference_tokens, kontext.row_tokens) == (92 * 64, 256, 5888 + 64 + 256)
    assert kontext.row_tokens == tokens(kontext.shape) == 6208
    assert kontext.describe() == "5888 image + 64 text + 256 reference tokens"
    # Splitting: whole images within both budgets; one image over the token budget is refused.
    assert request_shape(params(512, 512, n=8), TEXT).parts(8, BUDGET, 8) == [5, 3]  # 1088 tokens an image
    assert request_shape(params(256, 256, n=8), TEXT).parts(8, BUDGET, 4) == [4, 4]
    with pytest.raises(OverTokenBudget) as over:
        kontext.parts(1, BUDGET, 8)
    assert (over.value.tokens, over.value.budget) == (6208, BUDGET) and isinstance(over.value, ValueError)


def test_over_token_budget_survives_pickling():
    """It crosses from the Denoiser's replica to the ingress's inside Ray's errors."""
    import pickle

    copy = pickle.loads(pickle.dumps(OverTokenBudget(6208, BUDGET)))
    assert (copy.tokens, copy.budget, str(copy)) == (
        6208,
        BUDGET,
        "one image is 6208 tokens, over the batch budget of 6144",
    )


@pytest.fixture(scope="module")
def text_encoder():
    return TextEncoder.load(resolve_model("tiny"), "cpu", torch.float32)


@pytest.fixture(scope="module")
def vae_encoder():
    return VAEEncoder.load(resolve_model("tiny-kontext"), "cpu", torch.float32)


@pytest.mark.parametrize("size", [(256, 256), (64, 64), (640, 480), (1, 2000), (3000, 200)])
def test_the_reference_tokens_are_those_the_vae_encoder_makes(vae_encoder, size):
    """What the ingress counts (fluxray.editing.reference_size) is what prepare_edit resizes to and what the
    Denoiser reads off the encoded latents (EncodedEdit.reference_shape)."""
    image = Image.new("RGB", size, (200, 30, 30))
    ref_w, ref_h = reference_size(KONTEXT, *size)
    inputs = prepare_edit(KONTEXT, "kontext", image, None, 256, 256)
    assert tuple(inputs.image.shape[-2:]) == (ref_h, ref_w)
    assert vae_encoder.encode(inputs).reference_shape == (ref_h, ref_w)


def admit(request, model: str, edit: bool = False, reference=None, budget: int = BUDGET):
    """The ingress's checks (deployments.http.admission.admit) under the local config's budgets."""
    config = AppConfig(model="tiny", models=["tiny-kontext"], denoiser_max_batch_tokens=budget)
    return admission.admit(request, model, SPECS[model], config, edit=edit, reference=reference)


def denoiser(model: str, budget: int = BUDGET) -> DenoiserDeployment:
    config = {"model": model, "device": "cpu", "torch_threads": 1, "denoiser_max_batch_tokens": budget}
    return DenoiserDeployment.func_or_class(config)


def submit(deployment: DenoiserDeployment, encoded: EncodedPrompt, resolved, edit=None):
    """The Denoiser's admission of a request (its jobs); nothing steps."""

    async def run():
        return deployment._submit(encoded, resolved, edit=edit)

    return asyncio.run(run())


def test_the_issue_kontext_case_is_refused_at_the_ingress_naming_size_tokens_and_budget():
    reference = reference_size(KONTEXT, 256, 256)[::-1]
    request = ImageEditRequest(prompt="make it blue", model="tiny-kontext", size="1472x1024")
    with pytest.raises(APIError) as refused:
        admit(request, "tiny-kontext", edit=True, reference=reference)
    error = refused.value
    assert (error.status, error.param, error.code) == (422, "size", "batch_token_budget_exceeded")
    assert "6208" in error.message and "6144" in error.message and "256 reference" in error.message
    # Without the reference (the old check) it fitted: 5888 + 64 tokens.
    assert admit(request, "tiny-kontext", edit=True).width == 1472


@pytest.mark.parametrize(
    "model, cfg, fits, over",
    [
        ("tiny", False, (1520, 1024), (1536, 1024)),  # 95 x 64 + 64 = 6144; 96 x 64 + 64 = 6208
        ("tiny", True, (752, 1024), (768, 1024)),  # 2 x (47 x 64 + 64) = 6144; 2 x (48 x 64 + 64) = 6272
        ("tiny-kontext", False, (1456, 1024), (1472, 1024)),  # 91 x 64 + 64 + 256 = 6144; 6208
        ("tiny-kontext", True, (1024, 688), (1024, 704)),  # 2 x (64 x 43 + 64 + 256) = 6144; 6272
    ],
)
def test_the_ingress_and_the_denoiser_agree_at_the_budget_edge(text_encoder, vae_encoder, model, cfg, fits, over):
    spec = SPECS[model]
    edit = None
    reference = None
    kind = GenerationParams
    if spec.edit == "kontext":
        inputs = prepare_edit(spec, "kontext", Image.new("RGB", (256, 256), (20, 90, 200)), None, 256, 256)
        edit = vae_encoder.encode(inputs)
        reference = edit.reference_shape
        kind = EditParams
    negative = text_encoder.encode(["blur"]) if cfg else None
    encoded = EncodedPrompt(text_encoder.encode(["a red cube"]), negative, 0.0)
    assert encoded.embeds.sequence.shape[1] == spec.max_sequence_length  # the text tokens the ingress counts
    deployment = denoiser(model)
    for (width, height), admitted in ((fits, True), (over, False)):
        extra = {"negative_prompt": "blur", "true_cfg_scale": 2.0} if cfg else {}
        request = (ImageEditRequest if kind is EditParams else ImageGenerationRequest)(
            prompt="a red cube", model=model, size=f"{width}x{height}", num_inference_steps=2, seed=3, **extra
        )
        shape = request_shape(params(width, height, cfg, kind=kind, spec=spec), TEXT, reference)
        if admitted:
            resolved = admit(request, model, kind is EditParams, reference)
            jobs = submit(deployment, encoded, resolved, edit)
            assert [job.units for job in jobs] == [shape.image_units] and jobs[0].shape == shape.shape
            for job in jobs:
                deployment.scheduler.remove(job)
        else:
            with pytest.raises(APIError) as refused:
                admit(request, model, kind is EditParams, reference)
            assert refused.value.param == "size" and str(shape.image_units) in refused.value.message
            with pytest.raises(OverTokenBudget):
                submit(deployment, encoded, params(width, height, cfg, kind=kind, spec=spec), edit)
        assert shape.image_units == BUDGET if admitted else shape.image_units > BUDGET
