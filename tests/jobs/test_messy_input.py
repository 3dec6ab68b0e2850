"""The offline job on input as it comes: bad rows among good ones, repeated ids, a re-run with other
settings. A real Ray cluster and a real S3 server on loopback."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from job_runs import FAST, job, keys, summary

from fluxray.models.sources import resolve_model
from fluxray.models.specs import SPECS
from fluxray.storage import open_storage
from jobs.layout import metadata_key, model_identity, parse_metadata_key
from jobs.prompts import JobDefaults, make_record
from jobs.stages import FAULTS_ENV


def manifest_rows(storage) -> list[dict]:
    rows = []
    for key in storage.list("manifest/"):
        rows += pq.read_table(io.BytesIO(storage.get(key))).to_pylist()
    return rows


def check_records(storage, expect_written: set[str]) -> None:
    """Exactly these ids have an image and one metadata record, whose sha256 is the image's."""
    metadata = [k for k in storage.scan("metadata/")]
    ids = [parse_metadata_key(k)[0] for k in metadata]
    assert sorted(ids) == sorted(expect_written), (sorted(ids), sorted(expect_written))
    for key in metadata:
        meta = json.loads(storage.get(key))
        assert hashlib.sha256(storage.get(meta["image"])).hexdigest() == meta["sha256"], key
    images = sorted(k.removeprefix("images/").rsplit(".", 1)[0] for k in storage.scan("images/"))
    assert images == sorted(expect_written)


def test_a_jsonl_with_bad_rows_among_good_ones_on_s3(ray_cluster):
    """The reported failure: 24 good prompts and 2 bad rows in one file made the job exit 1."""
    rows = [{"prompt": f"a small house, number {i}"} for i in range(24)]
    rows.insert(5, {"prompt": "too narrow", "width": 250})
    rows.insert(17, {"prompt": ""})
    s3, bucket = ray_cluster.s3(), ray_cluster.bucket
    s3.put_object(Bucket=bucket, Key="messy/prompts.jsonl", Body="\n".join(json.dumps(r) for r in rows).encode())
    output = f"s3://{bucket}/runs/messy/"
    source = f"s3://{bucket}/messy/prompts.jsonl"
    result = job(ray_cluster, "--input", source, "--output", output, "--model", "tiny", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = summary(result.stdout)
    assert (counts["written"], counts["invalid"], counts["failed"]) == ("24", "2", "0"), counts
    assert len(keys(s3, bucket, "runs/messy/images/")) == 24
    storage = open_storage(output, ray_cluster.s3_endpoint)
    invalid = {r["source"]: r["reason"] for r in manifest_rows(storage) if r["status"] == "invalid"}
    assert set(invalid) == {"prompts.jsonl:6", "prompts.jsonl:18"}
    assert invalid["prompts.jsonl:6"].startswith("width:") and invalid["prompts.jsonl:18"].startswith("prompt:")
    assert "progress:" in result.stdout and "stage denoise:" in result.stdout


def test_a_local_folder_of_every_format_with_invalid_rows_and_a_repeated_id(ray_cluster, tmp_path):
    """One folder: CSV, Parquet, text and JSONL files, invalid rows among them, ids unique across the
    files (a repeated id is made once, from its first row), written as WebP to a local directory."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "a.csv").write_text("prompt,seed\na red fox,1\nan owl,2\n,3\n")
    pq.write_table(pa.table({"prompt": ["a robot", "a house"], "id": ["robot", "bad/id"]}), inputs / "b.parquet")
    (inputs / "c.txt").write_text("a lighthouse\na bowl of fruit\n")
    (inputs / "d.jsonl").write_text(json.dumps({"prompt": "a cat", "width": 100}) + "\n")
    (inputs / "prompts.csv").write_text("prompt,id\na red fox,\nan owl,hero\n")
    (inputs / "prompts.jsonl").write_text(
        json.dumps({"prompt": "a blue car"}) + "\n" + json.dumps({"prompt": "another hero", "id": "hero"}) + "\n"
    )
    out = tmp_path / "out"
    result = job(ray_cluster, "--input", str(inputs), "--output", str(out), *FAST, "--format", "webp")
    assert result.returncode == 0, result.stderr[-3000:]
    counts = summary(result.stdout)
    assert (counts["written"], counts["invalid"], counts["duplicate"]) == ("8", "3", "1"), counts
    written = ["a.csv-0000002", "a.csv-0000003", "c.txt-0000001", "c.txt-0000002", "robot"]
    written += ["prompts.csv-0000002", "hero", "prompts.jsonl-0000001"]
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"{name}.webp" for name in written)
    assert not list(out.rglob("*.tmp"))
    storage = open_storage(str(out))
    check_records(storage, set(written))
    manifest = manifest_rows(storage)
    invalid = {r["source"]: r["reason"] for r in manifest if r["status"] == "invalid"}
    assert set(invalid) == {"a.csv:4", "b.parquet:2", "d.jsonl:1"}
    assert invalid["a.csv:4"].startswith("prompt:") and invalid["b.parquet:2"].startswith("id:")
    assert "width" in invalid["d.jsonl:1"]
    (dup,) = [r for r in manifest if r["status"] == "duplicate"]
    assert dup["source"] == "prompts.jsonl:2" and dup["reason"] == "id 'hero' is taken by prompts.csv:3"
    hero = json.loads(storage.get(next(storage.scan("metadata/hero."))))
    assert hero["prompt"] == "an owl"  # the first row's, never the later one's


def test_a_rerun_with_other_settings_conflicts_until_overwrite(ray_cluster):
    s3, bucket = ray_cluster.s3(), ray_cluster.bucket
    s3.put_object(Bucket=bucket, Key="conflict/p.txt", Body=b"a lighthouse\nan owl\na robot\n")
    source, output = f"s3://{bucket}/conflict/p.txt", f"s3://{bucket}/runs/conflict/"
    storage = open_storage(output, ray_cluster.s3_endpoint)
    first = job(ray_cluster, "--input", source, "--output", output, *FAST)
    assert first.returncode == 0 and summary(first.stdout)["written"] == "3", first.stderr[-3000:]
    before = {k: v for k, v in keys(s3, bucket, "runs/conflict/").items() if "/manifest/" not in k}

    # Another format alone makes the rows other images (the plan's tests cover the rest of the fingerprint).
    changed = job(ray_cluster, "--input", source, "--output", output, *FAST, "--format", "webp")
    assert changed.returncode == 3
    assert changed.stderr.strip().splitlines() == [
        "jobs.generate: error: 3 rows were written before with other settings (first: p.txt-0000001); "
        "rerun with --overwrite to regenerate them, or write to another --output"
    ]
    assert summary(changed.stdout)["conflict"] == "3" and summary(changed.stdout)["written"] == "0"
    after = {k: v for k, v in keys(s3, bucket, "runs/conflict/").items() if "/manifest/" not in k}
    assert after == before  # nothing regenerated, nothing skipped silently

    as_webp = ["--steps", "3", "--format", "webp"]
    again = job(ray_cluster, "--input", source, "--output", output, *FAST, *as_webp, "--overwrite")
    assert again.returncode == 0 and summary(again.stdout)["written"] == "3", again.stderr[-3000:]
    check_records(storage, {"p.txt-0000001", "p.txt-0000002", "p.txt-0000003"})
    assert all(json.loads(storage.get(k))["steps"] == 3 for k in storage.scan("metadata/"))
    assert not set(before) & set(keys(s3, bucket, "runs/conflict/metadata/"))  # old records are gone
    images = sorted(keys(s3, bucket, "runs/conflict/images/"))
    assert images == [f"runs/conflict/images/p.txt-000000{i}.webp" for i in (1, 2, 3)]  # the PNGs are gone
    same = job(ray_cluster, "--input", source, "--output", output, *FAST, *as_webp)
    assert same.returncode == 0 and summary(same.stdout)["skipped"] == "3", same.stderr[-3000:]


# --- every layout of row kinds, through Ray Data on the cluster ---------------------------------

KINDS = ["good", "good", "invalid", "duplicate", "done", "fails"]
EXAMPLES = itertools.count()


@pytest.fixture(scope="module", autouse=True)
def s3_client(ray_cluster):
    """This process as a client of the cluster's S3 server (fluxray.storage reads the usual variables)."""
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({name: ray_cluster.env[name] for name in names[:3]}, AWS_ENDPOINT_URL=ray_cluster.s3_endpoint)
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=12),
    batch_sizes=st.lists(st.integers(1, 5), min_size=4, max_size=4),
    on_s3=st.booleans(),
)
def test_every_layout_of_rows_comes_out_once_with_its_status(ray_cluster, tmp_path_factory, kinds, batch_sizes, on_s3):
    example, cluster = next(EXAMPLES), ray_cluster
    identity = model_identity(resolve_model("tiny"), "none")
    defaults = JobDefaults(spec=SPECS["tiny"], width=64, height=64, steps=2, model_identity=identity)
    if on_s3:
        base = f"s3://{cluster.bucket}/layouts/{example}/"
    else:
        base = str(tmp_path_factory.mktemp(f"layout-{example}")) + "/"
    input_storage = open_storage(base + "in/", cluster.s3_endpoint)
    output = open_storage(base + "out/", cluster.s3_endpoint)

    rows, expected, taken = [], {}, set()
    for i, kind in enumerate(kinds):
        row = {"id": f"r{i}", "prompt": f"picture {i}", "seed": i}
        if kind == "invalid":
            row["width"] = 250
        elif kind == "duplicate":
            row["id"] = "r0"
        elif kind == "fails":
            row["prompt"] += " BOOMDEN"
        rows.append(row)
        source = f"p.jsonl:{i + 1}"
        if kind == "invalid":
            expected[source] = "invalid"
        elif row["id"] in taken:
            expected[source] = "duplicate"
        else:
            taken.add(row["id"])
            expected[source] = {"fails": "failed", "done": "skipped"}.get(kind, "written")
            if kind == "done":  # finished by an earlier run with the same settings
                record = make_record(row, "p.jsonl", i + 1, defaults)
                output.put(metadata_key(record["id"], record["fingerprint"]), b"{}")
    input_storage.put("p.jsonl", "\n".join(json.dumps(r) for r in rows).encode())

    flags = ["--input", base + "in/p.jsonl", "--output", base + "out/", "--width", "64", "--height", "64"]
    flags += ["--steps", "2", "--progress-interval-s", "1"]
    for stage, size in zip(("encode", "denoise", "decode", "write"), batch_sizes):
        flags += [f"--{stage}-batch-size", str(size)]
    cluster.env[FAULTS_ENV] = "denoise:raise:BOOMDEN"  # the driver hands it to the stage workers
    try:
        result = job(cluster, *flags)
    finally:
        del cluster.env[FAULTS_ENV]

    manifest = manifest_rows(output)
    assert sorted(r["source"] for r in manifest) == sorted(expected)  # every row exactly once
    assert {r["source"]: r["status"] for r in manifest} == expected
    assert result.returncode == (1 if "failed" in expected.values() else 0), result.stderr[-3000:]
    written = {r["id"] for r in manifest if r["status"] == "written"}
    for key in output.scan("metadata/"):
        row_id = parse_metadata_key(key)[0]
        if row_id in written:
            meta = json.loads(output.get(key))
            assert hashlib.sha256(output.get(meta["image"])).hexdigest() == meta["sha256"]
    assert sorted(Path(k).stem for k in output.scan("images/")) == sorted(written)
