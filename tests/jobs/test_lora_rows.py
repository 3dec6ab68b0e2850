"""Offline rows with a `loras` column: the cell's forms, names checked against --lora-root when read, the
fingerprint covering names and scales, and the stages making the engine's image for each row's adapters in
one batch (a file that cannot be used fails only the rows that name it)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch
from image_checks import max_pixel_diff
from PIL import Image
from safetensors.torch import save_file

from fluxray.images import read_metadata
from fluxray.lora import LoraRegistry, attach_loras, read_lora
from fluxray.models.specs import SPECS
from fluxray.params import GenerationParams
from fluxray.pipeline import Pipeline
from jobs.layout import fingerprint
from jobs.prompts import JobDefaults, make_record
from jobs.stages import RECORD_SCHEMA, ZERO_TIMES, DecodeStage, DenoiseStage, EncodeStage, WriteStage

PROMPT = "a red circle on the left, blue background"
IDENTITY = "tiny:test:quantize=none"


@pytest.fixture(scope="module")
def lora_root(tiny_loras, tmp_path_factory):
    root = tmp_path_factory.mktemp("job-loras")
    for name in ("style", "subject", "ink-kohya"):
        shutil.copy(tiny_loras / f"{name}.safetensors", root)
    shutil.copy(tiny_loras / "style.safetensors", root / "style2.safetensors")
    save_file({"transformer.no_such_block.lora_A.weight": torch.zeros(2, 3)}, str(root / "bad.safetensors"))
    return root


def defaults(names=None) -> JobDefaults:
    return JobDefaults(spec=SPECS["tiny"], width=64, height=64, steps=3, model_identity=IDENTITY, lora_names=names)


def record(number: int, names=frozenset({"style", "style2", "subject", "ink-kohya", "bad"}), **row) -> dict:
    return make_record({"prompt": PROMPT, "seed": 7, **row}, "loras.jsonl", number, defaults(names))


def test_the_cell_forms_and_their_mistakes():
    want = json.dumps([{"name": "style", "scale": 0.8}, {"name": "subject", "scale": 1.0}])
    forms = [
        [{"name": "style", "scale": 0.8}, {"name": "subject"}],  # JSONL / Parquet
        {"style": 0.8, "subject": 1.0},
        "style=0.8;subject",  # CSV / text
        "style=0.8, subject=1",
        json.dumps([{"name": "style", "scale": 0.8}, {"name": "subject", "scale": 1}]),
    ]
    for form in forms:
        got = record(1, loras=form)
        assert got["status"] == "pending" and got["loras"] == want, (form, got)
    bad = {
        "unknown": record(1, loras="style;nope"),
        "no root": record(2, names=None, loras="style"),
        "json": record(3, loras="[{oops"),
        "scale": record(4, loras="style=9"),
        "count": record(5, loras=";".join(f"style{i}" for i in range(5))),
        "twice": record(6, loras="style;style"),
        "shape": record(7, loras=3),
    }
    assert all(r["status"] == "invalid" and r["fingerprint"] is None for r in bad.values())
    assert bad["unknown"]["reason"] == "loras: unknown LoRA 'nope' (not in --lora-root)"
    assert bad["no root"]["reason"] == "loras: the job has no --lora-root to find LoRAs in"
    assert bad["json"]["reason"].startswith("loras: not valid JSON")
    assert bad["scale"]["reason"].startswith("loras.0.scale:")
    assert bad["count"]["reason"].startswith("loras:") and bad["twice"]["reason"].startswith("loras:")
    assert bad["shape"]["reason"] == "loras: expected a list of {name, scale}, got int"


def test_the_fingerprint_covers_names_and_scales_and_leaves_plain_rows_as_they_were():
    plain = record(1)
    assert plain["loras"] is None
    assert plain["fingerprint"] == fingerprint({k: v for k, v in plain.items() if k != "loras"}, IDENTITY, "png")
    prints = {record(1, loras=cell)["fingerprint"] for cell in ("style", "style=0.5", "subject", "style;subject")}
    assert len(prints) == 4 and plain["fingerprint"] not in prints


def run(stage: DenoiseStage, records: list[dict], output) -> list[dict]:
    rows = [{**r, **ZERO_TIMES, "file": 0, "row": i, "overwrite": False} for i, r in enumerate(records)]
    rows = [{**r, "image_sha256": None, "mask_sha256": None} for r in rows]
    table = EncodeStage("tiny", "cpu", None, 1)(pa.Table.from_pylist(rows, schema=RECORD_SCHEMA))
    table = DecodeStage("tiny", "cpu", None, 1, "png")(stage(table))
    return WriteStage(str(output), None, "tiny", IDENTITY, "png")(table).to_pylist()


def test_rows_with_different_loras_in_one_batch_make_the_engines_images(lora_root, tmp_path):
    cells = ["style=0.8", "subject=1.2;ink-kohya=0.5", None, "bad", "style=0.8;bad"]
    records = [record(i + 1, loras=cell) for i, cell in enumerate(cells)]
    stage = DenoiseStage("tiny", "cpu", None, 1, "png", lora_root=str(lora_root), max_resident_loras=2)
    out = run(stage, records, tmp_path)
    assert [r["status"] for r in out] == ["written", "written", "written", "failed", "failed"]
    assert "do not fit this model's transformer (first: transformer.no_such_block" in out[3]["reason"]
    engine = Pipeline.load("tiny", device="cpu")
    bank = attach_loras(engine.transformer, max_per_row=2, max_rank=8)
    registry = LoraRegistry(lora_root)
    for name in ("style", "subject", "ink-kohya"):
        bank.add(read_lora(registry.path(name), engine.transformer))
    for row, rec in zip(out[:3], records):
        loras = json.loads(rec["loras"] or "[]")
        params = GenerationParams(prompt=PROMPT, width=64, height=64, num_inference_steps=3, seed=7, loras=loras)
        got = np.asarray(Image.open(tmp_path / row["image"]).convert("RGB"))
        assert max_pixel_diff(got, engine.generate(params)[0].pixels) <= 2
        meta = json.loads((tmp_path / row["metadata"]).read_text())
        embedded = read_metadata((tmp_path / row["image"]).read_bytes())
        assert meta.get("loras", []) == loras and embedded.get("loras", []) == loras
    styled, plain = (np.asarray(Image.open(tmp_path / out[k]["image"]).convert("RGB")) for k in (0, 2))
    assert max_pixel_diff(styled, plain) > 4  # same seed and prompt: the adapter made the difference
    # A batch holds all it names (three, over max_resident_loras=2); a later batch's new adapter makes room
    # by evicting the least recently used down to the limit.
    assert set(stage.transformer.fluxray_loras.adapters) == {"style", "subject", "ink-kohya"}
    run(stage, [record(9, loras="style")], tmp_path / "again")
    (again,) = run(stage, [record(10, loras="style2")], tmp_path / "again")
    assert again["status"] == "written"
    assert set(stage.transformer.fluxray_loras.adapters) == {"style", "style2"}
    assert set(stage.loras.host.items) == {"subject", "ink-kohya"}  # evicted from the device, kept on the host
    (back,) = run(stage, [record(11, loras="subject=1.2;ink-kohya=0.5")], tmp_path / "back")
    assert "subject" in stage.transformer.fluxray_loras.adapters and "subject" not in stage.loras.host.items
    got = np.asarray(Image.open(tmp_path / "back" / back["image"]).convert("RGB"))
    # The same row as out[1], alone now and in a batch of three then: equal up to the batch's float order
    # (1/255; a lost or wrong adapter moves pixels by more than 4, as above).
    assert max_pixel_diff(got, np.asarray(Image.open(tmp_path / out[1]["image"]).convert("RGB"))) <= 1


def test_an_s3_lora_root_lists_by_stem_and_fetches_once(ray_cluster, tiny_loras, monkeypatch, tmp_path):
    from fluxray.lora import LoraError
    from fluxray.storage import S3Folder

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, ray_cluster.env[name])
    monkeypatch.setenv("AWS_ENDPOINT_URL", ray_cluster.s3_endpoint)
    s3, bucket = ray_cluster.s3(), ray_cluster.bucket
    for name in ("style", "subject"):
        s3.upload_file(str(tiny_loras / f"{name}.safetensors"), bucket, f"registry/{name}.safetensors")
    s3.put_object(Bucket=bucket, Key="registry/notes.txt", Body=b"not a LoRA")
    s3.put_object(Bucket=bucket, Key="registry/deeper/other.safetensors", Body=b"not directly under the root")
    registry = LoraRegistry(f"s3://{bucket}/registry")
    assert registry.names() == ["style", "subject"]
    fetched = registry.path("style")
    assert fetched.read_bytes() == (tiny_loras / "style.safetensors").read_bytes()
    stamp = fetched.stat().st_mtime_ns
    assert registry.path("style") == fetched and fetched.stat().st_mtime_ns == stamp  # the cached copy
    s3.upload_file(str(tiny_loras / "subject.safetensors"), bucket, "registry/style.safetensors")
    assert registry.path("style").read_bytes() == (tiny_loras / "subject.safetensors").read_bytes()  # new version
    with pytest.raises(LoraError, match="unknown LoRA 'nope'"):
        registry.path("nope")
    with pytest.raises(LoraError, match="lora_root s3://no-such-bucket/x/: cannot list"):
        LoraRegistry("s3://no-such-bucket/x/")
    s3.delete_object(Bucket=bucket, Key="registry/subject.safetensors")
    with pytest.raises(LoraError, match=f"s3://{bucket}/registry/subject.safetensors: cannot read"):
        registry.path("subject")
    assert S3Folder(f"s3://{bucket}/registry/", tmp_path).fetch("notes.txt").read_bytes() == b"not a LoRA"
