"""The job's stages in one process, over every layout of good and failing rows a batch can hold:
each stage's output has one schema whatever its batch holds, only the rows that fail are failed,
and every written row's metadata describes its own image. (tests/jobs/test_messy_input.py runs
the same property through Ray Data on a cluster.)"""

from __future__ import annotations

import hashlib
import json
import os

import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fluxray.models.specs import SPECS
from jobs.layout import metadata_key
from jobs.prompts import JobDefaults, make_record
from jobs.stages import (
    DECODED_SCHEMA,
    DENOISED_SCHEMA,
    ENCODED_SCHEMA,
    FAULTS_ENV,
    RECORD_SCHEMA,
    WRITTEN_SCHEMA,
    ZERO_TIMES,
    DecodeStage,
    DenoiseStage,
    EncodeStage,
    WriteStage,
)

DEFAULTS = JobDefaults(spec=SPECS["tiny"], width=64, height=64, steps=2, model_identity="tiny:test:quantize=none")
# A row whose prompt holds a marker raises in that stage (the test-only fault hook).
MARKERS = {"encode": "BOOMENC", "denoise": "BOOMDEN", "decode": "BOOMDEC", "write": "BOOMWRI"}
FAULTS = ",".join(f"{stage}:raise:{marker}" for stage, marker in MARKERS.items())
KINDS = ["good", "good", "wide", *MARKERS]  # good rows twice as likely; "wide" is another size


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    output = tmp_path_factory.mktemp("stage-output")
    return (
        [
            ("encode", EncodeStage("tiny", "cpu", None, 1), ENCODED_SCHEMA),
            ("denoise", DenoiseStage("tiny", "cpu", None, 1, "png"), DENOISED_SCHEMA),
            ("decode", DecodeStage("tiny", "cpu", None, 1, "png"), DECODED_SCHEMA),
            ("write", WriteStage(str(output), None, "tiny", DEFAULTS.model_identity, "png"), WRITTEN_SCHEMA),
        ],
        output,
    )


def table_of(records: list[dict]) -> pa.Table:
    """Records as the datasource hands them to the first stage."""
    rows = [{**r, **ZERO_TIMES, "file": 0, "row": i, "overwrite": False} for i, r in enumerate(records)]
    return pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)


def batches(table: pa.Table, sizes: list[int]) -> list[pa.Table]:
    """Cut table into consecutive batches of the given sizes (cycled)."""
    out, start, k = [], 0, 0
    while start < table.num_rows:
        out.append(table.slice(start, sizes[k % len(sizes)]))
        start, k = start + sizes[k % len(sizes)], k + 1
    return out


EXAMPLES = iter(range(10**6))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=10),
    sizes=st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=3), min_size=4, max_size=4),
)
def test_any_layout_of_failing_rows_keeps_one_schema_and_costs_only_those_rows(stages, kinds, sizes):
    pipeline, output = stages
    example = next(EXAMPLES)
    records = []
    for i, kind in enumerate(kinds):
        raw = {"id": f"e{example}-r{i}", "prompt": f"picture {i} {MARKERS.get(kind, '')}".strip(), "seed": i}
        if kind == "wide":
            raw["width"] = 96
        records.append(make_record(raw, "p.jsonl", i + 1, DEFAULTS))
    table = table_of(records)
    os.environ[FAULTS_ENV] = FAULTS
    try:
        for (stage_name, stage, schema), stage_sizes in zip(pipeline, sizes):
            outputs = [stage(batch) for batch in batches(table, stage_sizes)]
            for out in outputs:
                assert out.schema == schema, stage_name
            table = pa.concat_tables(outputs)  # fails if two batches' schemas differ
    finally:
        del os.environ[FAULTS_ENV]

    assert table.num_rows == len(kinds)
    for row, kind in zip(sorted(table.to_pylist(), key=lambda r: r["row"]), kinds):
        if kind in MARKERS:
            assert row["status"] == "failed" and row["reason"].startswith(f"{kind}: RuntimeError"), row
            assert not (output / "images" / f"{row['id']}.png").exists()
            continue
        assert row["status"] == "written" and row["reason"] == "", row
        assert row["metadata"] == metadata_key(row["id"], row["fingerprint"])
        meta = json.loads((output / row["metadata"]).read_text())
        image = (output / row["image"]).read_bytes()
        assert meta["id"] == row["id"] and meta["sha256"] == row["sha256"] == hashlib.sha256(image).hexdigest()
        assert meta["width"] == (96 if kind == "wide" else 64) and meta["fingerprint"] == row["fingerprint"]
        for stage_name in ("encode", "denoise", "decode", "write"):
            assert row[f"{stage_name}_s"] > 0


def test_a_prompt_longer_than_an_encoder_reads_is_recorded(stages):
    pipeline, output = stages
    long_prompt = " ".join(["triangle"] * 30)  # past CLIP's 77 tokens, within the tiny T5's 64
    records = [
        make_record({"id": f"long-{n}", "prompt": p}, "p.jsonl", n + 1, DEFAULTS)
        for n, p in enumerate(["a cat", long_prompt])
    ]
    table = table_of(records)
    for _, stage, _ in pipeline:
        table = stage(table)
    short, long = sorted(table.to_pylist(), key=lambda r: r["row"])
    assert (short["status"], long["status"]) == ("written", "written")
    assert json.loads((output / short["metadata"]).read_text())["truncated"] == []
    assert json.loads((output / long["metadata"]).read_text())["truncated"] == ["clip"]


def test_embeddings_and_latents_travel_in_the_model_dtype():
    from safetensors.torch import load

    record = make_record({"prompt": "a fox", "negative_prompt": "blur", "true_cfg_scale": 2}, "p.jsonl", 1, DEFAULTS)
    encoded = EncodeStage("tiny", "cpu", "bfloat16", 1)(table_of([record]))
    tensors = load(encoded.column("embeds")[0].as_py())
    assert set(tensors) == {"pooled", "sequence", "neg_pooled", "neg_sequence"}
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    denoised = DenoiseStage("tiny", "cpu", "bfloat16", 1, "png")(encoded)
    assert load(denoised.column("latents")[0].as_py())["latents"].dtype == torch.bfloat16
    assert denoised.column("status").to_pylist() == ["pending"]
