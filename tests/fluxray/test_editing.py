"""Edits equal their diffusers pipelines on the same weights: img2img, inpainting, FLUX.1 Fill, FLUX.1 Kontext."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from image_checks import max_pixel_diff
from PIL import Image, ImageDraw

from fluxray.editing import EditError, EditParams, edit_method, edit_task, prepare_edit, reference_size
from fluxray.models.sources import EMBEDDED_MODELS
from fluxray.models.specs import SPECS
from fluxray.pipeline import Pipeline
from fluxray.tiny.scenes import Scene, render

PROMPT = "a red circle on the left, blue background"
T5_LEN = SPECS["tiny"].max_sequence_length


def scene(width: int, height: int) -> Image.Image:
    return render(Scene("yellow", "square", "right", "green"), width, height)


def box_mask(width: int, height: int, box=(0.1, 0.2, 0.6, 0.8)) -> Image.Image:
    """White (repaint) inside box (fractions x0, y0, x1, y1), black elsewhere."""
    mask = Image.new("L", (width, height), 0)
    x0, y0, x1, y1 = box
    ImageDraw.Draw(mask).rectangle([x0 * width, y0 * height, x1 * width - 1, y1 * height - 1], fill=255)
    return mask


def theirs(pipe, seed: int, **kwargs) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(seed)
    kwargs.setdefault("guidance_scale", 3.5)  # the img2img and inpaint pipelines default to 7
    return np.asarray(pipe(prompt=PROMPT, generator=generator, max_sequence_length=T5_LEN, **kwargs).images[0])


@pytest.fixture(scope="module")
def img2img_pipe(diffusers_pipe):
    from diffusers import FluxImg2ImgPipeline

    return FluxImg2ImgPipeline.from_pipe(diffusers_pipe)


@pytest.fixture(scope="module")
def inpaint_pipe(diffusers_pipe):
    from diffusers import FluxInpaintPipeline

    return FluxInpaintPipeline.from_pipe(diffusers_pipe)


@pytest.fixture(scope="module")
def fill():
    from diffusers import FluxFillPipeline

    pipe = FluxFillPipeline.from_pretrained(EMBEDDED_MODELS["tiny-fill"], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return Pipeline.load("tiny-fill", device="cpu"), pipe


@pytest.fixture(scope="module")
def kontext():
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(EMBEDDED_MODELS["tiny-kontext"], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return Pipeline.load("tiny-kontext", device="cpu"), pipe


@pytest.mark.parametrize("width,height,strength,steps", [(64, 64, 0.6, 5), (96, 64, 0.35, 8), (128, 96, 1.0, 4)])
def test_img2img_matches_diffusers(tiny_pipeline, img2img_pipe, width, height, strength, steps):
    image = scene(width, height)
    params = EditParams(
        prompt=PROMPT, width=width, height=height, strength=strength, num_inference_steps=steps, seed=3, n=2
    )
    ours = tiny_pipeline.edit(params, image)
    assert [o.seed for o in ours] == [3, 4]
    for out in ours:
        peer = theirs(
            img2img_pipe,
            out.seed,
            image=image,
            width=width,
            height=height,
            strength=strength,
            num_inference_steps=steps,
        )
        assert max_pixel_diff(out.pixels, peer) <= 2
        assert out.metadata()["edit"] == "img2img" and out.metadata()["strength"] == strength
    # Not vacuous: the edit changed the input, and the two seeds drew two different images.
    assert max_pixel_diff(ours[0].pixels, np.asarray(image)) > 20
    assert max_pixel_diff(ours[0].pixels, ours[1].pixels) > 4


def test_img2img_strength_keeps_more_of_the_input_when_low(tiny_pipeline):
    """diffusers' rule (int(steps - strength x steps) steps skipped) always leaves one step to run."""
    image = scene(64, 64)
    distance = {}
    for strength in (0.2, 0.9):
        params = EditParams(prompt=PROMPT, width=64, height=64, strength=strength, num_inference_steps=10, seed=1)
        out = tiny_pipeline.edit(params, image)[0].pixels
        distance[strength] = np.abs(out.astype(int) - np.asarray(image).astype(int)).mean()
    assert distance[0.2] < distance[0.9]


@pytest.mark.parametrize("width,height,strength", [(64, 64, 0.8), (128, 64, 1.0)])
def test_inpaint_matches_diffusers(tiny_pipeline, inpaint_pipe, width, height, strength):
    image, mask = scene(width, height), box_mask(width, height)
    params = EditParams(
        prompt=PROMPT, width=width, height=height, strength=strength, num_inference_steps=6, seed=11, n=2
    )
    ours = tiny_pipeline.edit(params, image, mask)
    for out in ours:
        peer = theirs(
            inpaint_pipe,
            out.seed,
            image=image,
            mask_image=mask,
            width=width,
            height=height,
            strength=strength,
            num_inference_steps=6,
        )
        assert max_pixel_diff(out.pixels, peer) <= 2
        assert out.metadata()["edit"] == "inpaint" and len(out.metadata()["mask_sha256"]) == 64


def test_inpaint_keeps_the_input_latents_outside_the_mask(tiny_pipeline):
    """Compared in latent space: the VAE does not round-trip pixels exactly."""
    spec = SPECS["tiny"]
    image, mask = scene(64, 64), box_mask(64, 64, (0.0, 0.0, 0.5, 1.0))  # repaint the left half
    params = EditParams(prompt=PROMPT, width=64, height=64, strength=1.0, num_inference_steps=5, seed=2).resolve(spec)
    encoder = tiny_pipeline.encoder
    encoded = encoder.encode(prepare_edit(spec, "inpaint", image, mask, 64, 64))
    embeds = tiny_pipeline.text_encoder.encode([PROMPT])
    task = edit_task(params, embeds, None, encoded, spec, torch.device("cpu"), torch.float32)
    from fluxray.sampling import denoise, unpack_latents

    blend = task.blend
    denoise(tiny_pipeline.transformer, [task], 64, 64)
    out, original = unpack_latents(task.latents, 64, 64), unpack_latents(blend.image_latents, 64, 64)
    left, right = (out - original)[..., :4].abs().max(), (out - original)[..., 4:].abs().max()
    assert right == 0  # outside the mask: exactly the input's latents
    assert left > 0.1  # inside: repainted


@pytest.mark.parametrize("width,height,strength,n", [(64, 64, 1.0, 2), (96, 128, 0.7, 1)])
def test_fill_matches_diffusers(fill, width, height, strength, n):
    ours_pipe, pipe = fill
    image, mask = scene(width, height), box_mask(width, height)
    params = EditParams(
        prompt=PROMPT, width=width, height=height, strength=strength, num_inference_steps=5, seed=21, n=n
    )
    ours = ours_pipe.edit(params, image, mask)
    peer = None
    for out in ours:
        peer = theirs(
            pipe,
            out.seed,
            image=image,
            mask_image=mask,
            width=width,
            height=height,
            strength=strength,
            num_inference_steps=5,
            guidance_scale=3.5,
        )
        assert max_pixel_diff(out.pixels, peer) <= 2
    # The conditioning is read: another mask gives another image.
    other = ours_pipe.edit(params, image, box_mask(width, height, (0.5, 0.0, 1.0, 0.5)))
    assert max_pixel_diff(other[-1].pixels, peer) > 4


def test_fill_defaults_are_the_fill_pipelines(fill):
    spec = fill[0].source.spec
    resolved = EditParams(prompt="x").resolve(SPECS["flux-fill"])
    assert (resolved.num_inference_steps, resolved.guidance_scale, resolved.strength) == (50, 30.0, 1.0)
    assert spec.edit == "fill" and spec.transformer["in_channels"] == 384


@pytest.mark.parametrize("image_size,size,n", [((64, 64), (64, 64), 2), ((200, 120), (96, 64), 1)])
def test_kontext_matches_diffusers(kontext, image_size, size, n):
    ours_pipe, pipe = kontext
    image = scene(*image_size)
    width, height = size
    params = EditParams(prompt=PROMPT, width=width, height=height, num_inference_steps=4, seed=8, n=n)
    ours = ours_pipe.edit(params, image)
    spec = ours_pipe.source.spec
    rw, rh = reference_size(spec, *image.size)
    resized = pipe.image_processor.resize(image, rh, rw)
    for out in ours:
        peer = theirs(
            pipe,
            out.seed,
            image=resized,
            width=width,
            height=height,
            max_area=width * height,
            _auto_resize=False,
            num_inference_steps=4,
            guidance_scale=3.5,
        )
        assert max_pixel_diff(out.pixels, peer) <= 2
    # The reference is read: another input image gives another output for the same seed.
    other = ours_pipe.edit(params, render(Scene("black", "circle", "top", "white"), *image_size))
    assert max_pixel_diff(other[0].pixels, ours[0].pixels) > 4


def test_kontext_reference_size_is_diffusers_preferred_resolution():
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    spec = SPECS["flux-kontext"]
    for width, height in [(1024, 1024), (1920, 1080), (600, 900), (333, 1000)]:
        ratio = width / height
        expected = min(PREFERRED_KONTEXT_RESOLUTIONS, key=lambda wh: abs(ratio - wh[0] / wh[1]))
        assert reference_size(spec, width, height) == expected
    assert reference_size(SPECS["tiny-kontext"], 1024, 1024) == (256, 256)


def test_methods_and_their_errors():
    assert edit_method(SPECS["tiny"], False) == "img2img"
    assert edit_method(SPECS["tiny"], True) == "inpaint"
    assert edit_method(SPECS["tiny-fill"], True) == "fill"
    assert edit_method(SPECS["tiny-kontext"], False) == "kontext"
    with pytest.raises(EditError, match="needs a mask") as e:
        edit_method(SPECS["flux-fill"], False)
    assert e.value.field == "mask"
    with pytest.raises(EditError) as e:
        edit_method(SPECS["flux-kontext"], True)
    assert e.value.field == "mask"
    with pytest.raises(EditError) as e:
        edit_method(SPECS["flux-kontext"], False, strength=0.5)
    assert e.value.field == "strength"


def test_strength_out_of_range_names_strength():
    from pydantic import ValidationError

    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValidationError, match="strength"):
            EditParams(prompt="x", strength=bad)


def test_fill_does_not_generate_from_text_alone(fill):
    from fluxray.params import GenerationParams

    with pytest.raises(EditError) as e:
        fill[0].generate(GenerationParams(prompt=PROMPT, width=64, height=64, num_inference_steps=1))
    assert e.value.field == "model"


def png_bytes(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_one_reader_of_edit_inputs_for_the_cli_the_route_and_the_job():
    from fluxray.editing import read_edit_inputs
    from fluxray.images import InputImageError

    rgba = Image.new("RGBA", (64, 48), (200, 10, 10, 255))
    rgba.paste((0, 0, 0, 0), (16, 8, 32, 24))  # a transparent hole: the area to edit
    image, mask = read_edit_inputs(SPECS["tiny"], png_bytes(rgba), None)
    assert image.mode == "RGB" and image.size == (64, 48)
    assert mask.mode == "L" and np.asarray(mask)[16, 20] == 255 and np.asarray(mask)[0, 0] == 0
    assert int((np.asarray(mask) == 255).sum()) == 16 * 16
    # Kontext takes no mask: the alpha is dropped, nothing is masked.
    assert read_edit_inputs(SPECS["tiny-kontext"], png_bytes(rgba), None)[1] is None
    # An explicit black-and-white mask is diffusers' (white = repaint) and must match the image's size.
    bw = Image.new("L", (64, 48), 0)
    bw.paste(255, (0, 0, 8, 8))
    _, mask = read_edit_inputs(SPECS["tiny"], png_bytes(rgba), png_bytes(bw))
    assert int((np.asarray(mask) == 255).sum()) == 64
    with pytest.raises(InputImageError, match="^mask: 32x32 differs") as error:
        read_edit_inputs(SPECS["tiny"], png_bytes(rgba), png_bytes(Image.new("L", (32, 32))))
    assert error.value.field == "mask"
    with pytest.raises(InputImageError, match="^image: ") as error:
        read_edit_inputs(SPECS["tiny"], png_bytes(rgba), None, max_pixels=64 * 47)
    assert error.value.field == "image"
