"""Reading prompt files into records: formats, stable ids, derived seeds, validation, bad files."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fluxray.models.specs import SPECS
from fluxray.storage import LocalStorage, StorageError, split_input_uri
from jobs.prompts import InputError, JobDefaults, derived_seed, records

DEFAULTS = JobDefaults(spec=SPECS["tiny"], width=64, height=64, steps=3, seed_base=7)


def read(tmp_path, name: str, content: str | bytes) -> list[dict]:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return list(records(LocalStorage(tmp_path), name, DEFAULTS))


def test_jsonl_rows_get_stable_ids_and_derived_seeds(tmp_path):
    rows = [{"prompt": "a cat"}, {"prompt": "a dog", "id": "dog", "seed": 5, "width": 128}, {"prompt": "an owl"}]
    text = "\n".join(json.dumps(r) for r in rows) + "\n\n"
    first, again = read(tmp_path, "p.jsonl", text), read(tmp_path, "p.jsonl", text)
    assert first == again
    assert [r["id"] for r in first] == ["p.jsonl-0000001", "dog", "p.jsonl-0000003"]
    assert first[0]["seed"] == derived_seed(7, "p.jsonl-0000001") and first[1]["seed"] == 5
    assert first[0]["seed"] != first[2]["seed"]
    assert (first[1]["width"], first[1]["height"], first[1]["steps"], first[1]["guidance"]) == (128, 64, 3, 3.5)
    assert all(r["status"] == "pending" for r in first)


def test_csv_parquet_and_text(tmp_path):
    csv_rows = read(tmp_path, "c.csv", "prompt,seed,negative_prompt,true_cfg_scale\na cat,3,,\nan owl,,blurry,2.5\n")
    assert [(r["prompt"], r["seed"] == 3, r["negative_prompt"]) for r in csv_rows] == [
        ("a cat", True, None),
        ("an owl", False, "blurry"),
    ]
    assert csv_rows[1]["true_cfg_scale"] == 2.5 and csv_rows[1]["status"] == "pending"
    pq.write_table(pa.table({"prompt": ["x", "y"], "steps": [2, None]}), tmp_path / "t.parquet")
    parquet_rows = list(records(LocalStorage(tmp_path), "t.parquet", DEFAULTS))
    assert [(r["id"], r["steps"]) for r in parquet_rows] == [("t.parquet-0000001", 2), ("t.parquet-0000002", 3)]
    text_rows = read(tmp_path, "plain.txt", "first prompt\n\nthird line\n")
    assert [(r["id"], r["prompt"]) for r in text_rows] == [
        ("plain.txt-0000001", "first prompt"),
        ("plain.txt-0000003", "third line"),
    ]


def test_invalid_rows_are_kept_with_the_reason(tmp_path):
    rows = [
        {"prompt": ""},
        {"prompt": "a", "width": 100},
        {"prompt": "a", "id": "../etc/passwd"},
        {"prompt": "a", "steps": 0},
        {"prompt": "a", "true_cfg_scale": 3},
    ]
    out = read(tmp_path, "bad.jsonl", "\n".join(json.dumps(r) for r in rows))
    assert [r["status"] for r in out] == ["invalid"] * 5
    reasons = [r["reason"] for r in out]
    assert reasons[0].startswith("prompt:") and "width must be a multiple of 16" in reasons[1]
    assert reasons[2].startswith("id:") and reasons[3].startswith("steps:")
    assert "negative prompt" in reasons[4]


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": \n', "bad.jsonl line 2: not valid JSON"),
        ("list.jsonl", '["a"]\n', "list.jsonl line 1: expected a JSON object"),
        ("noprompt.csv", "text,seed\na,1\n", "noprompt.csv: CSV header must have a 'prompt' column"),
        ("binary.txt", b"\xff\xfe\x00bad", "binary.txt: not UTF-8 text"),
        ("broken.parquet", b"not parquet", "broken.parquet: not a readable Parquet file"),
        ("prompts.xlsx", b"", "unsupported input format"),
    ],
)
def test_malformed_files_fail_naming_the_file(tmp_path, name, content, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        read(tmp_path, name, content)


def test_input_uri_resolution(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "x"}\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("y\n")
    storage, keys = split_input_uri(str(tmp_path))
    assert keys == ["a.jsonl", "sub/b.txt"]
    storage, keys = split_input_uri(str(tmp_path / "a.jsonl"))
    assert keys == ["a.jsonl"] and storage.root == tmp_path
    with pytest.raises(StorageError, match="no such file"):
        split_input_uri(str(tmp_path / "missing.jsonl"))


def test_ids_keep_the_whole_file_key_so_two_formats_of_one_stem_never_collide(tmp_path):
    csv_ids = [r["id"] for r in read(tmp_path, "prompts.csv", "prompt\na\nb\n")]
    jsonl_ids = [r["id"] for r in read(tmp_path, "prompts.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n')]
    assert csv_ids == ["prompts.csv-0000002", "prompts.csv-0000003"]
    assert jsonl_ids == ["prompts.jsonl-0000001", "prompts.jsonl-0000002"]
    from jobs.prompts import ID_PATTERN, file_id

    long_a, long_b = "d/" + "x" * 150 + "a.jsonl", "d/" + "x" * 150 + "b.jsonl"
    assert file_id(long_a) != file_id(long_b) and all(
        ID_PATTERN.match(file_id(k) + "-0000001") for k in (long_a, long_b)
    )


def test_s3_prefix_and_single_file_inputs(ray_cluster, monkeypatch):
    s3 = ray_cluster.s3()
    for key, body in {"batch/x.jsonl": '{"prompt": "x"}\n', "batch/sub/y.txt": "y\n", "other.txt": "z\n"}.items():
        s3.put_object(Bucket=ray_cluster.bucket, Key=key, Body=body.encode())
    endpoint = ray_cluster.s3_endpoint
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, ray_cluster.env[name])
    storage, keys = split_input_uri(f"s3://{ray_cluster.bucket}/batch/", endpoint)
    assert keys == ["sub/y.txt", "x.jsonl"]
    assert [r["id"] for k in keys for r in records(storage, k, DEFAULTS)] == ["sub_y.txt-0000001", "x.jsonl-0000001"]
    storage, keys = split_input_uri(f"s3://{ray_cluster.bucket}/batch", endpoint)  # a prefix without the slash
    assert keys == ["sub/y.txt", "x.jsonl"]
    storage, keys = split_input_uri(f"s3://{ray_cluster.bucket}/other.txt", endpoint)
    assert keys == ["other.txt"] and [r["prompt"] for r in records(storage, "other.txt", DEFAULTS)] == ["z"]
    with pytest.raises(StorageError, match="no input files"):
        split_input_uri(f"s3://{ray_cluster.bucket}/nothing-here/", endpoint)


HOSTILE_IDS = [
    "../x",
    "..",
    ".",
    "a/b",
    "/etc/passwd",
    "a\\b",
    "..\\..\\x",
    "%2e%2e%2fx",
    "x\x00y",
    "a" * 129,
    "-x",
    "",
]


@pytest.mark.parametrize("row_id", HOSTILE_IDS)
def test_ids_that_could_leave_the_output_prefix_are_invalid_rows(tmp_path, row_id):
    (record,) = read(tmp_path, "p.jsonl", json.dumps({"prompt": "a", "id": row_id}) + "\n")
    if row_id == "":  # blank: the row gets the derived id instead
        assert record["id"] == "p.jsonl-0000001" and record["status"] == "pending"
        return
    assert record["status"] == "invalid" and record["reason"].startswith("id:"), record


@pytest.mark.parametrize(
    "key", ["../../etc/passwd.jsonl", "a/../../b.csv", "..\\..\\x.txt", "/abs/p.jsonl", "....jsonl", "x/.hidden.txt"]
)
def test_derived_ids_from_odd_file_names_stay_one_safe_path_segment(key):
    from jobs.layout import image_key, metadata_key
    from jobs.prompts import ID_PATTERN, file_id

    row_id = f"{file_id(key)}-0000001"
    assert ID_PATTERN.match(row_id), row_id
    for out_key in (image_key(row_id, "png"), metadata_key(row_id, "0123456789abcdef")):
        parts = out_key.split("/")
        assert len(parts) == 2 and parts[1] not in ("", ".", "..") and not parts[1].startswith("."), out_key
