"""The job's plan: duplicate ids, resume by fingerprint, conflicts, --limit and --strict; and what
a fingerprint covers. Real files and a real SQLite index; no cluster needed."""

from __future__ import annotations

import json
import shutil

import pytest

from fluxray.models.sources import TINY_MODEL_DIR, resolve_model
from fluxray.models.specs import SPECS
from fluxray.storage import LocalStorage, split_input_uri
from jobs.config import UsageError
from jobs.layout import fingerprint, metadata_key, model_identity, parse_metadata_key
from jobs.manifest import ManifestWriter
from jobs.plan import OVERWRITE, PENDING, SETTLED, OutputIndex, plan_rows
from jobs.prompts import JobDefaults, records

DEFAULTS = JobDefaults(spec=SPECS["tiny"], width=64, height=64, steps=2, model_identity="tiny:test:quantize=none")


def plan(tmp_path, input_dir, output_dir, **options):
    """(plans, manifest rows, counts) of a plan over input_dir against output_dir."""
    storage, keys = split_input_uri(str(input_dir))
    manifest = ManifestWriter(tmp_path / "manifest.parquet")
    index = OutputIndex(tmp_path / "index.sqlite")
    try:
        index.load(LocalStorage(output_dir).scan("metadata/"))
        plans = plan_rows(storage, keys, DEFAULTS, index, manifest, **options)
    finally:
        index.close()
    import pyarrow.parquet as pq

    manifest.close()
    rows = pq.read_table(tmp_path / "manifest.parquet").to_pylist()
    (tmp_path / "manifest.parquet").unlink()
    (tmp_path / "index.sqlite").unlink()
    return plans, rows, manifest.counts


def write_input(folder, files: dict[str, str]):
    folder.mkdir(exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def test_a_repeated_id_is_generated_once_and_later_rows_name_the_first(tmp_path):
    inputs = write_input(
        tmp_path / "in",
        {
            "a.csv": "id,prompt\nx,first x\ny,first y\nx,second x in the same file\n",
            "b.jsonl": json.dumps({"id": "y", "prompt": "y again"}) + "\n" + json.dumps({"prompt": "free"}) + "\n",
        },
    )
    plans, rows, counts = plan(tmp_path, inputs, tmp_path / "out")
    assert [p.key for p in plans] == ["a.csv", "b.jsonl"]
    assert plans[0].codes.tolist() == [PENDING, PENDING, SETTLED] and plans[1].codes.tolist() == [SETTLED, PENDING]
    duplicates = {r["source"]: r["reason"] for r in rows if r["status"] == "duplicate"}
    assert duplicates == {"a.csv:4": "id 'x' is taken by a.csv:2", "b.jsonl:1": "id 'y' is taken by a.csv:3"}
    assert counts == {"duplicate": 2}
    with pytest.raises(UsageError, match=r"--strict: a.csv:4 repeats the id 'x' of a.csv:2"):
        plan(tmp_path, inputs, tmp_path / "out", strict=True)


def test_an_invalid_row_does_not_take_its_id(tmp_path):
    rows_in = [{"id": "x", "prompt": "", "seed": 1}, {"id": "x", "prompt": "valid"}]
    inputs = write_input(tmp_path / "in", {"p.jsonl": "\n".join(json.dumps(r) for r in rows_in)})
    plans, rows, counts = plan(tmp_path, inputs, tmp_path / "out")
    assert plans[0].codes.tolist() == [SETTLED, PENDING] and counts == {"invalid": 1}


def test_limit_counts_rows_across_files_in_order(tmp_path):
    inputs = write_input(tmp_path / "in", {"a.txt": "one\ntwo\nthree\n", "b.txt": "four\nfive\n", "c.txt": "six\n"})
    plans, _, _ = plan(tmp_path, inputs, tmp_path / "out", limit=4)
    assert [(p.key, len(p.codes)) for p in plans] == [("a.txt", 3), ("b.txt", 1)]


def finish(output, record: dict, fp: str | None = None) -> None:
    """What the write stage leaves for a finished row (the metadata is all the plan reads)."""
    LocalStorage(output).put(metadata_key(record["id"], fp or record["fingerprint"]), b"{}")


def test_resume_skips_only_rows_done_with_the_same_fingerprint(tmp_path):
    inputs = write_input(tmp_path / "in", {"p.txt": "done\nchanged\nnew\nchanged too\n"})
    output = tmp_path / "out"
    done, changed, _, changed_too = list(records(LocalStorage(inputs), "p.txt", DEFAULTS))
    finish(output, done)
    finish(output, changed, fp="0" * 16)  # written before with other settings
    finish(output, changed_too, fp="1" * 16)
    LocalStorage(output).put("metadata/stray-file.json", b"{}")  # not a record: ignored

    plans, rows, counts = plan(tmp_path, inputs, output)
    assert plans[0].codes.tolist() == [SETTLED, SETTLED, PENDING, SETTLED]
    assert counts == {"skipped": 1, "conflict": 2}
    by_status = {r["status"]: r for r in rows}
    assert by_status["skipped"]["metadata"] == metadata_key(done["id"], done["fingerprint"])
    assert by_status["skipped"]["image"] == f"images/{done['id']}.png"
    assert "other settings" in by_status["conflict"]["reason"] and "--overwrite" in by_status["conflict"]["reason"]

    plans, rows, counts = plan(tmp_path, inputs, output, overwrite=True)
    assert plans[0].codes.tolist() == [SETTLED, OVERWRITE, PENDING, OVERWRITE] and counts == {"skipped": 1}


def test_metadata_keys_parse_back_even_for_ids_with_dots():
    key = metadata_key("prompts.jsonl-0000001", "0123456789abcdef")
    assert key == "metadata/prompts.jsonl-0000001.0123456789abcdef.json"
    assert parse_metadata_key(key) == ("prompts.jsonl-0000001", "0123456789abcdef")
    for other in ("metadata/x.json", "metadata/x.0123.json", "images/x.0123456789abcdef.json"):
        assert parse_metadata_key(other) is None


def test_the_fingerprint_covers_what_makes_the_image_and_nothing_else():
    (record,) = records_of({"prompt": "a fox", "seed": 3})
    base = fingerprint(record, "tiny:abc:quantize=none", "png")
    changes = [
        ("prompt", "a cat"),
        ("prompt_2", "t5 text"),
        ("negative_prompt", "blur"),
        ("seed", 4),
        ("width", 128),
        ("height", 128),
        ("steps", 3),
        ("guidance", 2.0),
        ("true_cfg_scale", 2.0),
    ]
    for field, value in changes:
        assert fingerprint({**record, field: value}, "tiny:abc:quantize=none", "png") != base, field
    assert fingerprint(record, "tiny:abd:quantize=none", "png") != base
    assert fingerprint(record, "tiny:abc:quantize=int8", "png") != base
    assert fingerprint(record, "tiny:abc:quantize=none", "webp") != base
    assert fingerprint({**record, "id": "other", "source": "x:9"}, "tiny:abc:quantize=none", "png") == base


def records_of(*rows):
    from jobs.prompts import make_record

    return [make_record(row, "p.jsonl", n + 1, DEFAULTS) for n, row in enumerate(rows)]


def test_model_identity_reads_the_weights_not_just_their_shapes(tmp_path):
    copy = tmp_path / "tiny"
    shutil.copytree(TINY_MODEL_DIR, copy)
    same = model_identity(resolve_model(str(copy)), "none")
    assert same == model_identity(resolve_model("tiny"), "none")
    assert model_identity(resolve_model("random:tiny"), "none") != same
    assert model_identity(resolve_model("tiny"), "int8") != same
    weights = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # one byte of one tensor: a retrain with the same shapes
    weights.write_bytes(bytes(data))
    assert model_identity(resolve_model(str(copy)), "none") != same
