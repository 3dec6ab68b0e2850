"""LoRA per request through HTTP: the main application's `lora_root` holds the tiny LoRAs
(scripts/make_tiny_loras.py); requests name them, the image equals the engine's with the same adapters,
requests with different adapters run side by side, and an unknown name is a 404 naming it."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from image_checks import max_pixel_diff
from PIL import Image

from fluxray.images import read_metadata
from fluxray.lora import attach_loras, read_lora
from fluxray.params import GenerationParams
from fluxray.pipeline import Pipeline

PROMPT = "a red circle on the left, blue background"
KW = {"size": "64x64", "num_inference_steps": 4}


@pytest.fixture(scope="module")
def engine(cluster):
    pipeline = Pipeline.load("tiny", device="cpu")
    bank = attach_loras(pipeline.transformer, max_per_row=4, max_rank=64)
    for name in ("style", "subject"):
        bank.add(read_lora(cluster.loras() / f"{name}.safetensors", pipeline.transformer))
    return pipeline


def want(engine, seed: int, loras: list[dict]) -> np.ndarray:
    params = GenerationParams(prompt=PROMPT, width=64, height=64, num_inference_steps=4, seed=seed, loras=loras)
    return engine.generate(params)[0].pixels


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_the_server_lists_its_loras(cluster):
    listed = httpx.get(f"{cluster.url}/v1/loras", timeout=30).json()
    assert [d["id"] for d in listed["data"]] == ["misfit", "style", "subject"]


def test_openai_client_names_loras_and_gets_the_engines_image(cluster, engine):
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0, timeout=120)
    loras = [{"name": "style", "scale": 0.8}, {"name": "subject", "scale": 1.2}]
    result = client.images.generate(
        prompt=PROMPT, size="64x64", extra_body={"seed": 3, "loras": loras, **{"num_inference_steps": 4}}
    )
    got = result.data[0].b64_json
    assert max_pixel_diff(pixels(got), want(engine, 3, loras)) <= 2
    assert max_pixel_diff(pixels(got), want(engine, 3, [])) > 4  # the adapters mattered
    assert read_metadata(base64.b64decode(got))["loras"] == loras


def test_requests_with_different_adapters_side_by_side(cluster, engine):
    mixes = [
        [],
        [{"name": "style", "scale": 1.0}],
        [{"name": "subject", "scale": 0.5}],
        [{"name": "style", "scale": 0.0}],
    ]

    def post(i: int):
        body = {"prompt": PROMPT, "seed": 10 + i, "loras": mixes[i % len(mixes)], **KW}
        return httpx.post(f"{cluster.url}/v1/images/generations", json=body, timeout=120)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, range(8)))
    for i, answer in enumerate(answers):
        assert answer.status_code == 200, answer.text
        (data,) = answer.json()["data"]
        assert max_pixel_diff(pixels(data["b64_json"]), want(engine, 10 + i, mixes[i % 4])) <= 2
        assert data["loras"] == mixes[i % 4]  # the response says what made the image


@pytest.mark.parametrize(
    "loras,status,words",
    [
        ([{"name": "nope", "scale": 1.0}], 404, "unknown LoRA 'nope'"),
        ([{"name": f"x{i}"} for i in range(5)], 400, "loras"),
        ([{"name": "style", "scale": 9}], 400, "scale"),
        ([{"name": "style"}, {"name": "style"}], 400, "once"),
        ([{"name": "../../etc/passwd"}], 404, "unknown LoRA"),
    ],
)
def test_bad_lora_requests_name_the_field(cluster, loras, status, words):
    answer = httpx.post(
        f"{cluster.url}/v1/images/generations", json={"prompt": PROMPT, "loras": loras, **KW}, timeout=60
    )
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"].startswith("loras") and words in error["message"], error


def test_an_edit_takes_loras_as_a_json_form_field(cluster, engine):
    from fluxray.editing import EditParams
    from fluxray.tiny.scenes import Scene, render

    image = render(Scene("yellow", "square", "right", "green"), 64, 64)
    data = io.BytesIO()
    image.save(data, format="PNG")
    loras = [{"name": "subject", "scale": 0.9}]
    answer = httpx.post(
        f"{cluster.url}/v1/images/edits",
        files={"image": ("scene.png", data.getvalue(), "image/png")},
        data={"prompt": PROMPT, "seed": "2", "strength": "0.8", "num_inference_steps": "4", "loras": json.dumps(loras)},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    expected = engine.edit(
        EditParams(prompt=PROMPT, width=64, height=64, seed=2, strength=0.8, num_inference_steps=4, loras=loras), image
    )[0]
    assert max_pixel_diff(pixels(answer.json()["data"][0]["b64_json"]), expected.pixels) <= 2
    bad = httpx.post(
        f"{cluster.url}/v1/images/edits",
        files={"image": ("scene.png", data.getvalue(), "image/png")},
        data={"prompt": PROMPT, "loras": "not json"},
        timeout=60,
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "loras"


def test_a_lora_whose_keys_do_not_fit_is_a_422_naming_them(cluster):
    body = {"prompt": PROMPT, "loras": [{"name": "misfit", "scale": 1.0}], **KW}
    answer = httpx.post(f"{cluster.url}/v1/images/generations", json=body, timeout=60)
    assert answer.status_code == 422, answer.text
    assert "transformer.no_such_block.lora_A.weight" in answer.json()["error"]["message"]
    ok = httpx.post(f"{cluster.url}/v1/images/generations", json={**body, "loras": []}, timeout=60)
    assert ok.status_code == 200  # the replica goes on serving
