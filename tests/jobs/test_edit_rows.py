"""Offline edit rows (an `image`, maybe a `mask` and a `strength`): validated when read, their inputs read
and encoded in the encode stage, their images equal to the engine's edits, their metadata naming the
inputs and their sha256; a row whose input is missing or broken fails alone."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
from image_checks import max_pixel_diff
from PIL import Image, ImageDraw

from fluxray.editing import EditParams
from fluxray.images import image_sha256
from fluxray.models.specs import SPECS
from fluxray.pipeline import Pipeline
from fluxray.tiny.scenes import Scene, render
from jobs.prompts import JobDefaults, make_record
from jobs.stages import RECORD_SCHEMA, ZERO_TIMES, DecodeStage, DenoiseStage, EncodeStage, WriteStage

PROMPT = "a red circle on the left, blue background"


def defaults(model: str) -> JobDefaults:
    return JobDefaults(spec=SPECS[model], width=64, height=64, steps=3, model_identity=f"{model}:test:quantize=none")


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit-inputs")
    (root / "pics").mkdir()
    image = render(Scene("yellow", "square", "right", "green"), 64, 64)
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle([0, 0, 31, 63], fill=255)
    (root / "pics" / "scene.png").write_bytes(png(image))
    (root / "pics" / "mask.png").write_bytes(png(mask))
    (root / "pics" / "broken.png").write_bytes(png(image)[:100])
    return root, image, mask


def run(model: str, records: list[dict], root, output) -> list[dict]:
    rows = [{**r, **ZERO_TIMES, "file": 0, "row": i, "overwrite": False} for i, r in enumerate(records)]
    rows = [{**r, "image_sha256": None, "mask_sha256": None} for r in rows]
    table = pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)
    table = EncodeStage(model, "cpu", None, 1, input_root=str(root))(table)
    table = DenoiseStage(model, "cpu", None, 1, "png")(table)
    table = DecodeStage(model, "cpu", None, 1, "png")(table)
    return WriteStage(str(output), None, model, defaults(model).model_identity, "png")(table).to_pylist()


def record(model: str, number: int, **row) -> dict:
    return make_record({"prompt": PROMPT, "seed": 7, **row}, "edits.jsonl", number, defaults(model))


def test_rows_are_checked_against_the_model_when_read():
    assert record("tiny", 1, image="a.png")["status"] == "pending"
    assert record("tiny", 1, image="a.png", strength=0.4)["strength"] == 0.4
    assert record("tiny", 1, image="a.png")["strength"] == 0.6  # the model's default, resolved
    bad = {
        "mask": record("tiny", 1, mask="m.png"),
        "strength": record("tiny", 2, strength=0.5),
        "strength ": record("tiny", 3, image="a.png", strength=1.5),
        "fill": record("tiny-fill", 4, image="a.png"),
        "kontext": record("tiny-kontext", 5, image="a.png", mask="m.png"),
        "fill without image": record("tiny-fill", 6),
    }
    assert all(r["status"] == "invalid" for r in bad.values())
    assert bad["mask"]["reason"].startswith("mask: needs an image")
    assert bad["strength"]["reason"].startswith("strength: needs an image")
    assert bad["strength "]["reason"].startswith("strength:")
    assert "needs a mask" in bad["fill"]["reason"] and "takes no mask" in bad["kontext"]["reason"]
    assert bad["fill without image"]["reason"].startswith("image: tiny-fill (FLUX.1 Fill) needs an image")
    # The inputs are part of what makes the image, so part of its fingerprint; a plain row's is unchanged.
    assert record("tiny", 1, image="a.png")["fingerprint"] != record("tiny", 1, image="b.png")["fingerprint"]
    assert record("tiny", 1)["fingerprint"] == record("tiny", 1)["fingerprint"]


def test_edit_rows_make_the_engines_images_and_a_broken_input_fails_alone(inputs, tmp_path, tiny_pipeline):
    root, image, mask = inputs
    records = [
        record("tiny", 1, image="pics/scene.png", strength=0.7),
        record("tiny", 2, image="pics/scene.png", mask="pics/mask.png", strength=1.0),
        record("tiny", 3, image="pics/missing.png"),
        record("tiny", 4, image="pics/broken.png"),
        record("tiny", 5),  # a plain row in the same batch
    ]
    out = run("tiny", records, root, tmp_path)
    assert [r["status"] for r in out] == ["written", "written", "failed", "failed", "written"]
    assert "image: cannot read pics/missing.png" in out[2]["reason"]
    assert "image:" in out[3]["reason"]
    want = [
        tiny_pipeline.edit(
            EditParams(prompt=PROMPT, width=64, height=64, seed=7, strength=0.7, num_inference_steps=3), image
        ),
        tiny_pipeline.edit(
            EditParams(prompt=PROMPT, width=64, height=64, seed=7, strength=1.0, num_inference_steps=3), image, mask
        ),
    ]
    for row, expected in zip(out[:2], want):
        meta = json.loads((tmp_path / row["metadata"]).read_text())
        got = np.asarray(Image.open(tmp_path / row["image"]).convert("RGB"))
        assert max_pixel_diff(got, expected[0].pixels) <= 2
        assert meta["input_image"] == "pics/scene.png" and meta["image_sha256"] == image_sha256(image)
    second = json.loads((tmp_path / out[1]["metadata"]).read_text())
    assert second["input_mask"] == "pics/mask.png" and second["mask_sha256"] == image_sha256(mask)
    assert "input_image" not in json.loads((tmp_path / out[4]["metadata"]).read_text())


def test_kontext_rows_of_two_reference_sizes_share_a_batch(inputs, tmp_path):
    root, image, _ = inputs
    wide = render(Scene("black", "circle", "top", "white"), 96, 48)
    (root / "pics" / "wide.png").write_bytes(png(wide))
    records = [record("tiny-kontext", 1, image="pics/scene.png"), record("tiny-kontext", 2, image="pics/wide.png")]
    out = run("tiny-kontext", records, root, tmp_path)
    assert [r["status"] for r in out] == ["written", "written"], [r["reason"] for r in out]
    kontext = Pipeline.load("tiny-kontext", device="cpu")
    for row, source in zip(out, (image, wide)):
        want = kontext.edit(EditParams(prompt=PROMPT, width=64, height=64, seed=7, num_inference_steps=3), source)[0]
        got = np.asarray(Image.open(tmp_path / row["image"]).convert("RGB"))
        assert max_pixel_diff(got, want.pixels) <= 2
