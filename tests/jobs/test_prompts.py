"""Reading prompt files into records: formats, stable ids, derived seeds, validation, bad files."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fluxray.specs import SPECS
from jobs.prompts import InputError, JobDefaults, derived_seed, records
from jobs.storage import LocalStorage, StorageError, split_input_uri

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
    assert [r["id"] for r in first] == ["p-0000001", "dog", "p-0000003"]
    assert first[0]["seed"] == derived_seed(7, "p-0000001") and first[1]["seed"] == 5
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
    assert [(r["id"], r["steps"]) for r in parquet_rows] == [("t-0000001", 2), ("t-0000002", 3)]
    text_rows = read(tmp_path, "plain.txt", "first prompt\n\nthird line\n")
    assert [(r["id"], r["prompt"]) for r in text_rows] == [
        ("plain-0000001", "first prompt"),
        ("plain-0000003", "third line"),
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
