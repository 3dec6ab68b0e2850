"""Every limit the server enforces on a request, probed over HTTP on the local config's app (tiny, tiny-kontext
and tiny-fill; denoiser_max_batch_tokens 6144, denoiser_max_batch_images 8): whatever the model, size, n,
true CFG and kind of request (a generation, img2img, inpainting, Fill, Kontext), the answer is 200 with
the images asked for, or a 4xx whose error names the field it is about, never a 5xx.

The sizes sit at the edges: the sides' bounds (64-2048) and multiple (16), and the token budget's edge
for each shape (a row is (W/16)x(H/16) image tokens + 64 text tokens, + 256 reference tokens for a Kontext
edit of a square input, x2 rows with true CFG). Admitted requests run one or two steps; the large sizes
near the budget (~5 s each on a CPU core) only with n=1, so the property runs in about a minute.
"""

from __future__ import annotations

import base64
import io
from functools import cache

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

LIMITS = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,  # the same examples every run: a CI failure replays
    database=None,
    suppress_health_check=list(HealthCheck),
)
PROMPT = "a red circle on the left, blue background"
SEED_LIMIT = 2**63

# Sizes near every edge; the first ones are cheap and valid (Hypothesis starts from them).
SMALL_SIZES = [
    "64x64",
    "128x96",
    "2048x64",  # the longest side, still cheap: 128 x 4 + 64 tokens
    "64x2048",
    "512x512",  # 8 images: 8 x 1088 tokens, over the budget: run as two parts (5 + 3)
    "auto",
]
BAD_SIZES = [
    "48x64",  # under the smallest side
    "64x2064",  # over the longest
    "100x64",  # not a multiple of 16
    "0x0",
    "1024",  # not WIDTHxHEIGHT
    "2048x2048",  # 16384 + 64 tokens: far over the budget
    "99999x99999",
]
BUDGET_SIZES = [
    "1520x1024",  # tiny: 95 x 64 + 64 = 6144, exactly the budget
    "1536x1024",  # tiny: 6208, one patch column over
    "752x1024",  # tiny, true CFG: 2 x (47 x 64 + 64) = 6144
    "768x1024",  # tiny, true CFG: 6272
    "1456x1024",  # Kontext (a square input's 256 reference tokens): 91 x 64 + 64 + 256 = 6144
    "1472x1024",  # Kontext: 6208 (the issue's case)
    "1024x688",  # Kontext, true CFG: 2 x (64 x 43 + 64 + 256) = 6144
    "1024x704",  # Kontext, true CFG: 6272
]
KINDS = ["generation", "img2img", "inpaint", "fill", "kontext"]
MODEL_OF_KIND = {
    "generation": "tiny",
    "img2img": "tiny",
    "inpaint": "tiny",
    "fill": "tiny-fill",
    "kontext": "tiny-kontext",
}
# At most one of these per request, so most requests are otherwise valid and reach the budgets.
FAULTS = [
    "n-0",
    "n-9",  # over 8 (the images one request may ask for, and denoiser_max_batch_images)
    "steps-0",
    "steps-101",
    "prompt-long",  # over max_prompt_chars (4000)
    "prompt-blank",
    "guidance-high",
    "guidance-low",
    "cfg-high",
    "cfg-no-negative",  # true CFG needs a negative prompt
    "seed-last",  # image i takes seed + i: seed 2**63 - 1 is valid with n=1 only
    "model-unknown",
    "model-other",  # a generation on tiny-fill, a mask to Kontext, Fill without one
    "strength-0",
    "strength-high",
    "strength-kontext",  # Kontext takes none
    "image-huge",  # over max_input_pixels
    "image-junk",
    "mask-mismatch",
]


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@cache
def input_image(kind: str) -> bytes:
    """An edit's input: RGB of a few sizes, RGBA with a transparent hole (its own mask), or one whose
    header declares more pixels than the server reads (max_input_pixels, 4096 x 4096)."""
    if kind == "huge":
        return png(Image.new("1", (4100, 4100)))
    if kind == "junk":
        return b"\x89PNG\r\n\x1a\n" + b"not really" * 10
    size = {"64": (64, 64), "256": (256, 256), "odd": (100, 60), "thin": (1, 300), "hole": (64, 64)}[kind]
    image = Image.new("RGBA" if kind == "hole" else "RGB", size, (200, 40, 40, 255))
    if kind == "hole":
        ImageDraw.Draw(image).rectangle([4, 8, 30, 50], fill=(0, 0, 0, 0))
    return png(image)


def mask_for(image_kind: str, mask: str) -> bytes | None:
    """White = repaint, the image's size (or another's, which the server refuses)."""
    if mask == "none" or image_kind in ("huge", "junk"):
        return None
    size = Image.open(io.BytesIO(input_image(image_kind))).size
    if mask == "mismatch":
        size = (size[0] + 16, size[1])
    out = Image.new("L", size, 0)
    ImageDraw.Draw(out).rectangle([0, 0, size[0] // 2, size[1] - 1], fill=255)
    return png(out)


@st.composite
def requests(draw):
    """One request: (route, fields, files), near the size and token budgets, with at most one fault."""
    kind = draw(st.sampled_from(["generation", *KINDS]))  # generations twice as often as each edit
    fault = draw(st.sampled_from([None] * 12 + FAULTS))
    sizes = draw(st.sampled_from(["small", "small", "budget", "bad"]))
    size = draw(st.sampled_from({"small": SMALL_SIZES, "budget": BUDGET_SIZES, "bad": BAD_SIZES}[sizes]))
    # A large admitted image comes alone (n x tokens over the budget is split into whole images, which
    # the 512x512 x 8 case covers), so the property stays cheap.
    n = 1 if sizes == "budget" else draw(st.sampled_from([1, 2, 8]))
    cfg = draw(st.sampled_from(["off", "on", "scale-1"]))
    model = MODEL_OF_KIND[kind]
    fields: dict = {"prompt": PROMPT, "model": model, "size": size, "n": n, "seed": 7}
    fields["num_inference_steps"] = draw(st.sampled_from([1, 2]))
    if cfg == "on":
        fields.update(negative_prompt="blurry", true_cfg_scale=2.0)
    elif cfg == "scale-1":
        fields.update(negative_prompt="blurry", true_cfg_scale=1.0)  # a negative prompt alone: one row
    image, mask, strength = "none", "none", None
    if kind != "generation":
        image = draw(st.sampled_from(["64", "256", "odd", "thin", "hole"] if kind != "kontext" else ["256", "64"]))
        mask = "match" if kind in ("inpaint", "fill") else "none"
        if kind in ("img2img", "inpaint", "fill"):
            strength = draw(st.sampled_from([None, 0.6, 1.0]))
    faults = {
        "n-0": {"n": 0},
        "n-9": {"n": 9},
        "steps-0": {"num_inference_steps": 0},
        "steps-101": {"num_inference_steps": 101},
        "prompt-long": {"prompt": "x" * 4001},
        "prompt-blank": {"prompt": "   "},
        "guidance-high": {"guidance_scale": 20.5},
        "guidance-low": {"guidance_scale": -0.5},
        "cfg-high": {"negative_prompt": "blurry", "true_cfg_scale": 20.5},
        "cfg-no-negative": {"true_cfg_scale": 2.0, "negative_prompt": None},
        "seed-last": {"seed": SEED_LIMIT - 1, "n": max(n, 2)},
        "model-unknown": {"model": "flux-nope"},
    }
    fields.update(faults.get(fault, {}))
    if fault == "model-other":
        if kind == "generation":
            fields["model"] = "tiny-fill"
        elif kind == "fill":
            mask, image = "none", "64"
        else:
            fields["model"], mask = "tiny-kontext", "match"
    elif fault == "strength-0":
        strength = 0.0
    elif fault == "strength-high":
        strength = 1.5
    elif fault == "strength-kontext":
        fields["model"], mask, strength = "tiny-kontext", "none", 0.6
    elif fault in ("image-huge", "image-junk", "mask-mismatch") and kind != "generation":
        image = {"image-huge": "huge", "image-junk": "junk"}.get(fault, image)
        mask = "mismatch" if fault == "mask-mismatch" and mask == "match" else mask
    fields = {k: v for k, v in fields.items() if v is not None}
    files = None
    if kind != "generation":
        if strength is not None:
            fields["strength"] = strength
        files = {"image": ("in.png", input_image(image), "image/png")}
        if (mask_bytes := mask_for(image, mask)) is not None:
            files["mask"] = ("mask.png", mask_bytes, "image/png")
    return ("generations" if kind == "generation" else "edits"), fields, files


def call(cluster, route: str, fields: dict, files: dict | None) -> httpx.Response:
    url = f"{cluster.url}/v1/images/{route}"
    if files is None:
        return httpx.post(url, json=fields, timeout=150)
    return httpx.post(url, data={k: str(v) for k, v in fields.items()}, files=files, timeout=150)


def check(response: httpx.Response, fields: dict) -> tuple[int, str | None]:
    """200 with n images of the size asked for, or a 4xx naming its field; (status, param)."""
    status = response.status_code
    assert status < 500, f"{status} {response.text[:400]} for {_brief(fields)}"
    if status == 200:
        data = response.json()["data"]
        assert len(data) == fields["n"], _brief(fields)
        if fields["size"] != "auto":
            width, height = (int(side) for side in fields["size"].split("x"))
            for item in data:
                assert Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).size == (width, height)
        return status, None
    assert 400 <= status < 500
    error = response.json()["error"]
    assert error["param"], f"{status} names no field: {error} for {_brief(fields)}"
    assert error["message"], error
    return status, error["param"]


def _brief(fields: dict) -> dict:
    return {k: (v if not isinstance(v, str) or len(v) < 40 else v[:20] + "...") for k, v in fields.items()}


def test_every_request_near_a_limit_is_answered_200_or_4xx_naming_its_field(cluster):
    seen: dict[tuple[int, str | None], int] = {}

    @given(request=requests())
    @LIMITS
    def run(request):
        route, fields, files = request
        answer = check(call(cluster, route, fields, files), fields)
        seen[answer] = seen.get(answer, 0) + 1

    run()
    # The property reached both sides: admitted requests and refusals of several fields.
    print("answers (status, param): count", dict(sorted(seen.items(), key=str)))
    assert seen.get((200, None), 0) >= 10, seen
    assert len({param for status, param in seen if status != 200}) >= 5, seen


def kontext_edit(cluster, size: str) -> httpx.Response:
    fields = {"prompt": "make it blue", "model": "tiny-kontext", "size": size, "num_inference_steps": 1, "seed": 3}
    files = {"image": ("in.png", input_image("256"), "image/png")}
    return call(cluster, "edits", fields, files)


def test_the_issue_kontext_case_is_422_naming_size_the_tokens_and_the_budget(cluster):
    """A 256x256 input's reference is 256 tokens: 1472x1024 is 5888 + 64 + 256 = 6208 > 6144 (was a 500)."""
    response = kontext_edit(cluster, "1472x1024")
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("size", "batch_token_budget_exceeded")
    assert "6208" in error["message"] and "6144" in error["message"], error


@pytest.mark.parametrize("size", ["1456x1024"])
def test_the_kontext_edit_just_under_the_budget_makes_its_image(cluster, size):
    """91 x 64 + 64 + 256 = 6144 tokens: exactly the budget, admitted, an image of the size asked for."""
    response = kontext_edit(cluster, size)
    assert response.status_code == 200, response.text
    (item,) = response.json()["data"]
    assert Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).size == (1456, 1024)
