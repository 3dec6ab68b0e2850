"""POST /v1/images/edits on the local config's app (tiny, tiny-kontext and tiny-fill in one app): the
official client and raw multipart and JSON, each method's image equal to the engine's, and hostile inputs
answered 400 naming the field."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import httpx
import numpy as np
import openai
import pytest
from image_checks import max_pixel_diff
from PIL import Image, ImageDraw

from fluxray.editing import EditParams
from fluxray.images import read_metadata
from fluxray.pipeline import Pipeline
from fluxray.tiny.scenes import Scene, render

PROMPT = "a red circle on the left, blue background"
STEPS = 4


def client(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0, timeout=120)


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def scene(width: int = 64, height: int = 64) -> Image.Image:
    return render(Scene("yellow", "square", "right", "green"), width, height)


def alpha_mask(width: int = 64, height: int = 64) -> Image.Image:
    """OpenAI's mask: opaque everywhere but a transparent box (the area to edit) on the left."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    ImageDraw.Draw(mask).rectangle([4, 8, width // 2, height - 8], fill=(0, 0, 0, 0))
    return mask


def white_mask(alpha: Image.Image) -> Image.Image:
    """The same area in diffusers' convention (white = repaint)."""
    return Image.fromarray(np.where(np.asarray(alpha)[..., 3] == 0, 255, 0).astype(np.uint8), mode="L")


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def engines():
    return {name: Pipeline.load(name, device="cpu") for name in ("tiny-kontext", "tiny-fill")}


def test_openai_client_img2img_equals_the_engine(cluster, tiny_pipeline):
    image = scene()
    result = client(cluster).images.edit(
        model="tiny",
        image=("scene.png", png(image), "image/png"),
        prompt=PROMPT,
        n=2,
        size="64x64",
        extra_body={"seed": 5, "strength": 0.7, "num_inference_steps": STEPS},
    )
    files = [base64.b64decode(d.b64_json) for d in result.data]
    assert [d.model_extra["seed"] for d in result.data] == [5, 6]
    expected = tiny_pipeline.edit(
        EditParams(prompt=PROMPT, width=64, height=64, n=2, seed=5, strength=0.7, num_inference_steps=STEPS), image
    )
    for got, want in zip(files, expected):
        assert max_pixel_diff(pixels(got), want.pixels) <= 2
    metadata = read_metadata(files[0])
    assert metadata["edit"] == "img2img" and metadata["strength"] == 0.7 and metadata["seed"] == 5
    assert metadata["image_sha256"] == expected[0].metadata()["image_sha256"]
    assert max_pixel_diff(pixels(files[0]), np.asarray(image)) > 20  # it did edit


def test_openai_client_inpaints_with_a_transparent_mask(cluster, tiny_pipeline):
    image, mask = scene(), alpha_mask()
    result = client(cluster).images.edit(
        model="tiny",
        image=("scene.png", png(image), "image/png"),
        mask=("mask.png", png(mask), "image/png"),
        prompt=PROMPT,
        extra_body={"seed": 9, "strength": 1.0, "num_inference_steps": STEPS},
    )
    got = base64.b64decode(result.data[0].b64_json)
    assert Image.open(io.BytesIO(got)).size == (64, 64)  # no size: the input's
    want = tiny_pipeline.edit(
        EditParams(prompt=PROMPT, width=64, height=64, seed=9, strength=1.0, num_inference_steps=STEPS),
        image,
        white_mask(mask),
    )[0]
    assert max_pixel_diff(pixels(got), want.pixels) <= 2
    assert read_metadata(got)["edit"] == "inpaint"


def test_kontext_by_raw_multipart_picks_its_model_and_reference_size(cluster, engines):
    image = scene(96, 64)
    response = httpx.post(
        f"{cluster.url}/v1/images/edits",
        files={"image": ("scene.webp", _webp(image), "image/webp")},
        data={"model": "tiny-kontext", "prompt": PROMPT, "seed": "3", "num_inference_steps": str(STEPS)},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    got = base64.b64decode(response.json()["data"][0]["b64_json"])
    decoded = Image.open(io.BytesIO(_webp(image)))  # what the server read: the WebP's pixels
    want = engines["tiny-kontext"].edit(
        EditParams(prompt=PROMPT, width=304, height=208, seed=3, num_inference_steps=STEPS), decoded.convert("RGB")
    )[0]
    # 96x64 (3:2) -> Kontext's preferred 1216x832, each side / 4 for the tiny model
    assert Image.open(io.BytesIO(got)).size == (304, 208)
    assert max_pixel_diff(pixels(got), want.pixels) <= 2
    assert read_metadata(got)["model"] == "tiny-kontext" and read_metadata(got)["edit"] == "kontext"


def _webp(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="WEBP", lossless=True)
    return out.getvalue()


def test_fill_by_json_with_data_urls(cluster, engines):
    image, mask = scene(), alpha_mask()
    body = {
        "model": "tiny-fill",
        "prompt": PROMPT,
        "image": "data:image/png;base64," + base64.b64encode(png(image)).decode(),
        "mask": base64.b64encode(png(mask)).decode(),
        "seed": 4,
        "num_inference_steps": STEPS,
        "guidance_scale": 3.5,
        "output_format": "png",
    }
    response = httpx.post(f"{cluster.url}/v1/images/edits", json=body, timeout=120)
    assert response.status_code == 200, response.text
    got = base64.b64decode(response.json()["data"][0]["b64_json"])
    want = engines["tiny-fill"].edit(
        EditParams(prompt=PROMPT, width=64, height=64, seed=4, num_inference_steps=STEPS, guidance_scale=3.5),
        image,
        white_mask(mask),
    )[0]
    assert max_pixel_diff(pixels(got), want.pixels) <= 2
    assert read_metadata(got)["edit"] == "fill" and read_metadata(got)["strength"] == 1.0


def test_one_text_encoder_and_one_vae_serve_every_model(cluster):
    deployments = cluster.serve_status()["applications"]["fluxray"]["deployments"]
    assert {"Denoiser", "Denoiser-tiny-kontext", "Denoiser-tiny-fill"} <= set(deployments)
    encoders = [name for name in deployments if name.startswith(("TextEncoder", "VAEEncoder", "VAEDecoder"))]
    assert sorted(encoders) == ["TextEncoder", "VAEDecoder", "VAEEncoder"]
    assert all(d["status"] == "HEALTHY" for d in deployments.values())


def bomb(side: int = 30000) -> bytes:
    """A valid PNG header declaring side x side pixels, with a few bytes of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def gif() -> bytes:
    out = io.BytesIO()
    scene().save(out, format="GIF")
    return out.getvalue()


GOOD = png(scene())


@pytest.mark.parametrize(
    "files,data,param,words",
    [
        ({"image": ("x.png", b"not an image at all", "image/png")}, {}, "image", "supported format"),
        ({"image": ("x.png", GOOD[: len(GOOD) // 2], "image/png")}, {}, "image", "truncated"),
        ({"image": ("x.gif", gif(), "image/gif")}, {}, "image", "supported format"),
        ({"image": ("x.png", bomb(), "image/png")}, {}, "image", "over this server's limit"),
        ({"image": ("x.png", bomb(5000), "image/png")}, {}, "image", "25000000 pixels, over this server's limit"),
        ({"image": ("x.png", b"", "image/png")}, {}, "image", "empty"),
        (
            {"image": ("x.png", GOOD, "image/png"), "mask": ("m.png", png(alpha_mask(32, 32)), "image/png")},
            {},
            "mask",
            "differs from the image",
        ),
        (
            {"image": ("x.png", GOOD, "image/png"), "mask": ("m.png", png(alpha_mask()), "image/png")},
            {"model": "tiny-kontext"},
            "mask",
            "takes no mask",
        ),
        ({"image": ("x.png", GOOD, "image/png")}, {"model": "tiny-fill"}, "mask", "needs a mask"),
        ({"image": ("x.png", GOOD, "image/png")}, {"strength": "0"}, "strength", "greater than 0"),
        ({"image": ("x.png", GOOD, "image/png")}, {"strength": "1.5"}, "strength", "less than or equal to 1"),
        (
            {"image": ("x.png", GOOD, "image/png")},
            {"model": "tiny-kontext", "strength": "0.5"},
            "strength",
            "no strength",
        ),
        (
            [("image[]", ("a.png", GOOD, "image/png")), ("image[]", ("b.png", GOOD, "image/png"))],
            {},
            "image",
            "one image",
        ),
        ({"mask": ("m.png", png(alpha_mask()), "image/png")}, {}, "image", "required"),
        ({"image": ("x.png", GOOD, "image/png")}, {"size": "100x64"}, "size", "multiple of 16"),
    ],
)
def test_hostile_inputs_get_400_naming_the_field(cluster, files, data, param, words):
    response = httpx.post(f"{cluster.url}/v1/images/edits", files=files, data={"prompt": PROMPT, **data}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_unknown_model_is_404_and_a_wrong_content_type_415(cluster):
    response = httpx.post(
        f"{cluster.url}/v1/images/edits",
        files={"image": ("x.png", GOOD, "image/png")},
        data={"prompt": PROMPT, "model": "flux-pro"},
        timeout=60,
    )
    assert response.status_code == 404 and response.json()["error"]["param"] == "model"
    response = httpx.post(
        f"{cluster.url}/v1/images/edits", content=b"prompt=x", timeout=60, headers={"content-type": "text/plain"}
    )
    assert response.status_code == 415
    bad_b64 = httpx.post(f"{cluster.url}/v1/images/edits", json={"prompt": PROMPT, "image": "%%%"}, timeout=60)
    assert bad_b64.status_code == 400 and bad_b64.json()["error"]["param"] == "image"


def test_the_client_sees_a_bad_image_as_bad_request(cluster):
    with pytest.raises(openai.BadRequestError, match="supported format"):
        client(cluster).images.edit(model="tiny", image=("x.png", b"GIF89a nonsense", "image/png"), prompt=PROMPT)


@pytest.mark.parametrize(
    "model,image,size",
    [
        ("tiny", Image.new("RGB", (1, 1), (200, 10, 10)), (64, 64)),  # sides under 16 count as 16, then 64
        ("tiny", Image.new("L", (300, 20), 128), (288, 64)),
        ("tiny-kontext", Image.new("RGBA", (40, 40), (0, 0, 0, 0)), (256, 256)),  # Kontext drops the alpha
        ("tiny-fill", Image.new("LA", (48, 32), (90, 0)), (64, 64)),  # all transparent: all of it is the mask
    ],
)
def test_odd_but_valid_images_are_edited(cluster, model, image, size):
    response = httpx.post(
        f"{cluster.url}/v1/images/edits",
        files={"image": ("x.png", png(image), "image/png")},
        data={"prompt": PROMPT, "model": model, "num_inference_steps": "2", "seed": "1"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))).size == size


def test_generations_take_kontext_but_not_fill(cluster):
    """Kontext generates from text alone (as FluxKontextPipeline does without an image); Fill only fills."""
    body = {"prompt": PROMPT, "size": "64x64", "num_inference_steps": 2, "seed": 1}
    kontext = httpx.post(f"{cluster.url}/v1/images/generations", json={**body, "model": "tiny-kontext"}, timeout=120)
    assert kontext.status_code == 200, kontext.text
    fill = httpx.post(f"{cluster.url}/v1/images/generations", json={**body, "model": "tiny-fill"}, timeout=60)
    assert fill.status_code == 400 and fill.json()["error"]["param"] == "model"
    assert "/v1/images/edits" in fill.json()["error"]["message"]
