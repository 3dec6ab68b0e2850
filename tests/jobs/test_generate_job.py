"""The offline job end to end: a real Ray cluster, a real S3 API server, real files."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from image_checks import max_pixel_diff
from job_runs import FAST, ROOT, SLOW, job, job_process, keys, prompt_rows, put_rows, summary
from PIL import Image

from fluxray.params import GenerationParams
from jobs.layout import parse_metadata_key

COUNT = 100  # rows of the shared input: each property below holds at any size, and 100 rows make many batches


def metadata_of(s3, bucket: str, run: str, row_id: str) -> dict:
    """The one metadata record of row_id under run/ (its key carries the fingerprint)."""
    (key,) = [
        k
        for k in keys(s3, bucket, f"{run}metadata/{row_id}.")
        if (parse_metadata_key(k.removeprefix(run)) or ("",))[0] == row_id
    ]
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


@pytest.fixture(scope="module")
def s3_input(ray_cluster):
    return put_rows(ray_cluster, "inputs/prompts.jsonl", prompt_rows(COUNT))


@pytest.fixture(scope="module")
def first_run(ray_cluster, s3_input):
    output = f"s3://{ray_cluster.bucket}/runs/full/"
    result = job(ray_cluster, "--input", s3_input, "--output", output, *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result


def test_s3_to_s3_writes_one_image_and_metadata_per_row(ray_cluster, first_run, tiny_pipeline):
    _, result = first_run
    assert summary(result.stdout)["written"] == str(COUNT) and summary(result.stdout)["failed"] == "0"
    s3, bucket = ray_cluster.s3(), ray_cluster.bucket
    images, metadata = keys(s3, bucket, "runs/full/images/"), keys(s3, bucket, "runs/full/metadata/")
    assert len(images) == COUNT and len(metadata) == COUNT
    rows = prompt_rows(COUNT)
    # Sampled rows, images equal to the engine's; their own seed (0, 99), id (0, 5, 35), width (0, 7, 35), none (1).
    for i in (0, 1, 5, 7, 35, 99):
        row_id = rows[i].get("id", f"prompts.jsonl-{i + 1:07d}")
        meta = metadata_of(s3, bucket, "runs/full/", row_id)
        if "seed" in rows[i]:
            assert meta["seed"] == rows[i]["seed"]
        assert meta["prompt"] == rows[i]["prompt"] and meta["model"] == "tiny"
        assert (meta["width"], meta["height"]) == (rows[i].get("width", 64), 64)
        data = s3.get_object(Bucket=bucket, Key="runs/full/" + meta["image"])["Body"].read()
        assert hashlib.sha256(data).hexdigest() == meta["sha256"]
        want = tiny_pipeline.generate(
            GenerationParams(
                prompt=meta["prompt"], seed=meta["seed"], width=meta["width"], height=64, num_inference_steps=2
            )
        )[0]
        assert max_pixel_diff(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), want.pixels) <= 2
    (manifest_key,) = keys(s3, bucket, "runs/full/manifest/")
    table = pq.read_table(io.BytesIO(s3.get_object(Bucket=bucket, Key=manifest_key)["Body"].read()))
    assert table.num_rows == COUNT and set(table.column("status").to_pylist()) == {"written"}


def test_rerun_writes_nothing_new(ray_cluster, first_run, s3_input):
    output, _ = first_run
    s3, bucket = ray_cluster.s3(), ray_cluster.bucket
    before = {k: v for k, v in keys(s3, bucket, "runs/full/").items() if "/manifest/" not in k}
    result = job(ray_cluster, "--input", s3_input, "--output", output, *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    assert summary(result.stdout)["written"] == "0" and summary(result.stdout)["skipped"] == str(COUNT)
    after = {k: v for k, v in keys(s3, bucket, "runs/full/").items() if "/manifest/" not in k}
    assert after == before


def test_killed_mid_way_then_rerun_is_complete_exactly_once(ray_cluster, first_run, s3_input):
    output = f"s3://{ray_cluster.bucket}/runs/killed/"
    s3, bucket = ray_cluster.s3(), ray_cluster.bucket
    process = job_process(  # a driver of its own, to be killed with its process group
        ray_cluster,
        *("--input", s3_input, "--output", output, *SLOW),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while len(keys(s3, bucket, "runs/killed/metadata/")) < 20 and time.monotonic() < deadline:
        assert process.poll() is None, "the job ended before it could be killed"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    done_before = len(keys(s3, bucket, "runs/killed/metadata/"))
    assert 20 <= done_before < COUNT

    result = job(ray_cluster, "--input", s3_input, "--output", output, *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = summary(result.stdout)
    assert int(counts["skipped"]) >= done_before and int(counts["written"]) + int(counts["skipped"]) == COUNT
    images, metadata = keys(s3, bucket, "runs/killed/images/"), keys(s3, bucket, "runs/killed/metadata/")
    assert len(images) == COUNT and len(metadata) == COUNT
    # Every image equals the uninterrupted run's. Rows met other rows in their batches this time,
    # which may move a pixel by one level (batch invariance is <= 1/255, not bitwise).
    full = keys(s3, bucket, "runs/full/images/")
    assert sorted(k.split("/")[-1] for k in images) == sorted(k.split("/")[-1] for k in full)

    def pixels(key: str) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read())).convert("RGB"))

    for key in images:
        assert max_pixel_diff(pixels(key), pixels(key.replace("/killed/", "/full/"))) <= 1, key


def test_strict_and_bad_input_fail_before_generating(ray_cluster, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": "x", "steps": 500}) + "\n")
    out = tmp_path / "out"
    strict = job(ray_cluster, "--input", str(bad), "--output", str(out), *FAST, "--strict")
    assert strict.returncode == 2
    assert strict.stderr.strip().splitlines() == [
        "jobs.generate: error: --strict: bad.jsonl:2 is invalid: steps: Input should be less than or equal to 100"
    ]
    assert not out.exists()
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "ok"}\n{oops\n')
    result = job_process(ray_cluster, "--input", str(broken), "--output", str(out), *FAST)  # as a shell sees it
    assert result.returncode == 2 and "broken.jsonl line 2: not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr
    missing = job(ray_cluster, "--input", str(tmp_path / "nope.jsonl"), "--output", str(out))
    assert missing.returncode == 2 and "nope.jsonl: no such file or directory" in missing.stderr
    greedy = job(ray_cluster, "--input", str(bad), "--output", str(out), "--denoise-actors", "40")
    assert greedy.returncode == 2 and "CPUs" in greedy.stderr


def test_ray_job_submit_runs_the_example(ray_cluster):
    output = f"s3://{ray_cluster.bucket}/runs/submitted/"
    env = {**ray_cluster.env, "AWS_ENDPOINT_URL": ray_cluster.s3_endpoint}
    for _ in range(3):
        result = subprocess.run(
            [
                str(Path(sys.executable).parent / "ray"),
                "job",
                "submit",
                "--address",
                ray_cluster.dashboard,
                "--working-dir",
                ".",
                "--runtime-env-json",
                json.dumps({"env_vars": {"AWS_ENDPOINT_URL": ray_cluster.s3_endpoint}}),
                "--",
                "python",
                "-m",
                "jobs.generate",
                "--input",
                "examples/prompts.jsonl",
                "--output",
                output,
                *FAST,
            ],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        # Ray's job head answers this 500 when the node's agent was slow to answer it (seen once, on 2
        # busy cores): nothing was submitted, and its message says to try again, as a user would.
        if "No available agent to submit job, please try again later" not in result.stderr:
            break
    output = result.stdout + result.stderr
    # On failure, show the job's own error lines rather than the tail of its progress log.
    errors = [line for line in output.splitlines() if "Error" in line or "error:" in line]
    assert result.returncode == 0, "\n".join(errors[-20:]) or output[-3000:]
    assert "succeeded" in output
    s3 = ray_cluster.s3()
    metadata = keys(s3, ray_cluster.bucket, "runs/submitted/metadata/")
    assert len(metadata) == 6
    sizes = []
    for key in metadata:  # each record's image is there: a PNG of the record's size, with its sha256
        meta = json.loads(s3.get_object(Bucket=ray_cluster.bucket, Key=key)["Body"].read())
        image = s3.get_object(Bucket=ray_cluster.bucket, Key=f"runs/submitted/{meta['image']}")["Body"].read()
        assert hashlib.sha256(image).hexdigest() == meta["sha256"], key
        with Image.open(io.BytesIO(image)) as decoded:
            assert (decoded.format, decoded.size) == ("PNG", (meta["width"], meta["height"])), key
            sizes.append(decoded.size)
    assert (320, 192) in sizes and (64, 64) in sizes  # a row's own size, and the flags' for the rest


def test_edit_rows_read_their_images_from_s3(ray_cluster, tiny_pipeline):
    """Rows with an `image` (a key beside the input, or an s3:// URI) and a `mask`: the job edits them,
    exactly as the engine does, and records the inputs' sha256; a row whose image is missing fails alone
    (exit 1, the reason in the manifest) and a re-run after the image appears completes the job."""
    from fluxray.editing import EditParams
    from fluxray.images import image_sha256
    from fluxray.tiny.scenes import Scene, render

    s3, bucket = ray_cluster.s3(), ray_cluster.bucket
    image = render(Scene("yellow", "square", "right", "green"), 64, 64)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))

    def png(picture: Image.Image) -> bytes:
        out = io.BytesIO()
        picture.save(out, format="PNG")
        return out.getvalue()

    s3.put_object(Bucket=bucket, Key="edits/in/pics/scene.png", Body=png(image))
    s3.put_object(Bucket=bucket, Key="elsewhere/mask.png", Body=png(mask))
    rows = [
        {
            "id": "img2img",
            "prompt": "a red circle on the left, blue background",
            "image": "pics/scene.png",
            "strength": 0.8,
        },
        {
            "id": "inpaint",
            "prompt": "a red circle on the left, blue background",
            "image": "pics/scene.png",
            "mask": f"s3://{bucket}/elsewhere/mask.png",
            "strength": 1.0,
        },
        {"id": "late", "prompt": "a red circle", "image": "pics/later.png"},
    ]
    body = "\n".join(json.dumps({**r, "seed": 3}) for r in rows) + "\n"
    s3.put_object(Bucket=bucket, Key="edits/in/rows.jsonl", Body=body.encode())
    args = ["--input", f"s3://{bucket}/edits/in/rows.jsonl", "--output", f"s3://{bucket}/edits/out/", *FAST]
    first = job(ray_cluster, *args)
    assert first.returncode == 1 and summary(first.stdout)["written"] == "2", first.stdout + first.stderr[-2000:]
    assert "rows.jsonl:3" in first.stderr and "image: cannot read pics/later.png" in first.stderr
    for row_id, with_mask in (("img2img", None), ("inpaint", mask)):
        meta = metadata_of(s3, bucket, "edits/out/", row_id)
        strength = 0.8 if row_id == "img2img" else 1.0
        want = tiny_pipeline.edit(
            EditParams(prompt=meta["prompt"], width=64, height=64, seed=3, strength=strength, num_inference_steps=2),
            image,
            with_mask,
        )[0]
        data = s3.get_object(Bucket=bucket, Key="edits/out/" + meta["image"])["Body"].read()
        assert max_pixel_diff(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), want.pixels) <= 2
        assert meta["image_sha256"] == image_sha256(image) and meta["strength"] == strength
    assert metadata_of(s3, bucket, "edits/out/", "inpaint")["mask_sha256"] == image_sha256(mask)
    s3.put_object(Bucket=bucket, Key="edits/in/pics/later.png", Body=png(image))
    second = job(ray_cluster, *args)
    assert second.returncode == 0, second.stderr[-2000:]
    assert (summary(second.stdout)["written"], summary(second.stdout)["skipped"]) == ("1", "2")
    assert len(keys(s3, bucket, "edits/out/images/")) == 3


def test_a_loras_column_applies_each_rows_adapters(ray_cluster, tiny_loras):
    """A CSV on S3 whose `loras` column names adapters under --lora-root (an s3:// prefix, then a directory):
    each row's image equals the engine's
    with its adapters (rows with different adapters share the denoise batches), an unknown name makes its
    row invalid, and changing a scale changes what the row is (a re-run reports a conflict, exit 3)."""
    from fluxray.lora import attach_loras, read_lora
    from fluxray.pipeline import Pipeline

    s3, bucket = ray_cluster.s3(), ray_cluster.bucket
    prompt = "a red circle on the left, blue background"
    cells = {"styled": "style=0.8", "both": "subject=1.2;style=0.5", "plain": "", "unknown": "nope"}

    def put(cells: dict) -> None:
        body = "id,prompt,seed,loras\n" + "".join(f'{k},"{prompt}",5,{v}\n' for k, v in cells.items())
        s3.put_object(Bucket=bucket, Key="loras/in/rows.csv", Body=body.encode())

    put(cells)
    for name in ("style", "subject"):  # the LoRAs on S3 too: each actor fetches what its rows name
        s3.upload_file(str(tiny_loras / f"{name}.safetensors"), bucket, f"loras/root/{name}.safetensors")
    args = ["--input", f"s3://{bucket}/loras/in/rows.csv", "--output", f"s3://{bucket}/loras/out/", *FAST]
    first = job(ray_cluster, *args, "--lora-root", f"s3://{bucket}/loras/root/")
    counts = summary(first.stdout)
    assert first.returncode == 0 and (counts["written"], counts["invalid"]) == ("3", "1"), first.stderr[-2000:]
    engine = Pipeline.load("tiny", device="cpu")
    bank = attach_loras(engine.transformer, max_per_row=2, max_rank=8)
    for name in ("style", "subject"):
        bank.add(read_lora(tiny_loras / f"{name}.safetensors", engine.transformer))
    pictures = {}
    for row_id, loras in (("styled", [("style", 0.8)]), ("both", [("subject", 1.2), ("style", 0.5)]), ("plain", [])):
        meta = metadata_of(s3, bucket, "loras/out/", row_id)
        chosen = [{"name": n, "scale": s} for n, s in loras]
        assert meta.get("loras", []) == chosen
        params = GenerationParams(prompt=prompt, width=64, height=64, num_inference_steps=2, seed=5, loras=chosen)
        data = s3.get_object(Bucket=bucket, Key="loras/out/" + meta["image"])["Body"].read()
        pictures[row_id] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert max_pixel_diff(pictures[row_id], engine.generate(params)[0].pixels) <= 2
    assert max_pixel_diff(pictures["styled"], pictures["plain"]) > 4
    put({**cells, "styled": "style=0.3"})
    second = job(ray_cluster, *args, "--lora-root", str(tiny_loras))
    assert second.returncode == 3 and summary(second.stdout)["conflict"] == "1", second.stdout + second.stderr[-2000:]
    missing = job(ray_cluster, *args, "--lora-root", str(tiny_loras / "nowhere"))
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1] == (
        f"jobs.generate: error: --lora-root: lora_root {tiny_loras / 'nowhere'}: no such directory"
    )
