"""Property-based fuzzing of the HTTP API from its own OpenAPI document (schemathesis).

Schemathesis reads /openapi.json from the running "guarded" application and, for every operation
in it, generates requests that fit the schema (positive) and requests that break it (negative:
wrong types, missing fields, out-of-range values, odd strings); hypothesis drives them. With the
key, no answer may be a 5xx; without it, everything but /healthz must be 401. The service must be
healthy afterwards. The guarded app's pixel budget keeps every valid request cheap.

(Hypothesis is driven directly from each operation's strategy: schemathesis' pytest loader does
not run on pytest 9.2.)
"""

from __future__ import annotations

import base64
import io
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from local_cluster import GUARDED_AUTH
from PIL import Image
from schemathesis import GenerationMode

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # the same examples every run: a CI failure replays
    suppress_health_check=list(HealthCheck),
    database=None,
)


@pytest.fixture(scope="module")
def operations(cluster):
    schema = schemathesis.openapi.from_url(f"{cluster.guarded_url}/openapi.json", timeout=30)
    ops = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in ops} >= {
        "POST /v1/images/generations",
        "POST /generate",
        "GET /v1/models",
        "GET /healthz",
    }
    return ops


def fuzz(cluster, operations, mode: GenerationMode, headers: dict, examples: int) -> tuple[Counter, list[str]]:
    seen: Counter = Counter()
    failures: list[str] = []
    for op in operations:

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(FUZZ, max_examples=examples)
        def run(case):
            response = case.call(base_url=cluster.guarded_url, headers=headers, timeout=120)
            seen[(case.path, response.status_code)] += 1
            if response.status_code >= 500 or (not headers and case.path != "/healthz" and response.status_code != 401):
                failures.append(
                    f"{case.method} {case.path} {case.body!r:.300} -> {response.status_code} {response.text[:200]}"
                )

        try:
            run()
        except Unsatisfiable:
            # A GET without parameters has nothing to get wrong: only the negative mode's body-less
            # operations may end here.
            assert mode is GenerationMode.NEGATIVE and op.method.upper() == "GET", op.path
    return seen, failures


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_5xx_with_a_key(cluster, operations, mode):
    seen, failures = fuzz(cluster, operations, mode, GUARDED_AUTH, 40)
    assert failures == [], failures[:10]
    generations = {code: n for (path, code), n in seen.items() if path == "/v1/images/generations"}
    print(mode, dict(seen))
    if mode is GenerationMode.POSITIVE:  # schema-valid bodies get past parsing, to the server's own rules
        assert sum(generations.get(c, 0) for c in (200, 404, 422)) >= 5, generations
    else:
        assert sum(n for code, n in generations.items() if 400 <= code < 500) >= 20, generations


def test_without_a_key_everything_but_healthz_is_401(cluster, operations):
    seen, failures = fuzz(cluster, operations, GenerationMode.POSITIVE, {}, 10)
    assert failures == [], failures[:10]
    assert seen[("/healthz", 200)] >= 1 and seen[("/v1/images/generations", 401)] >= 5, dict(seen)


FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}

# Valid requests rarely come out of the schema alone (the pixel budget, the served model name, sizes
# in multiples of 16), so this property generates them directly: any text, any valid combination.
SIDES = st.sampled_from([64, 80, 128, 144, 192, 256])
VALID = st.fixed_dictionaries(
    {
        "prompt": st.text(min_size=1, max_size=300).filter(str.strip),
        "size": st.tuples(SIDES, SIDES),
        "num_inference_steps": st.integers(1, 2),  # the tiny model's default (28) is over the budget
    },
    optional={
        "n": st.integers(1, 2),
        "seed": st.integers(0, 2**63 - 2),  # n <= 2: seed + n - 1 stays a valid seed
        "guidance_scale": st.floats(0, 20),
        "guidance_scale_end": st.floats(0, 20),
        "prompt_2": st.text(min_size=1, max_size=300),
        "negative_prompt": st.text(max_size=300),
        "output_format": st.sampled_from(["png", "jpeg", "webp"]),
        "user": st.text(max_size=50),
    },
)


@given(body=VALID)
@settings(FUZZ, max_examples=25)
def test_any_valid_request_generates_its_images(cluster, body):
    width, height = body.pop("size")
    body["size"] = f"{width}x{height}"
    r = httpx.post(f"{cluster.guarded_url}/v1/images/generations", json=body, headers=GUARDED_AUTH, timeout=120)
    assert r.status_code == 200, (body, r.status_code, r.text[:300])
    data = r.json()["data"]
    assert len(data) == body.get("n", 1)
    if "seed" in body:
        assert [d["seed"] for d in data] == [body["seed"] + i for i in range(len(data))]
    # Each entry is an image of the asked size, in the asked format, not just some bytes.
    for entry in data:
        with Image.open(io.BytesIO(base64.b64decode(entry["b64_json"]))) as image:
            assert image.size == (width, height), (body, image.size)
            assert image.format == FORMATS[body.get("output_format", "png")], (body, image.format)


def test_the_service_is_healthy_after_fuzzing(cluster, operations):
    # A short fuzzing run first, so that the check means the same when this test runs alone.
    _, failures = fuzz(cluster, operations, GenerationMode.NEGATIVE, GUARDED_AUTH, 10)
    assert failures == [], failures[:10]
    assert httpx.get(f"{cluster.guarded_url}/healthz").status_code == 200
    status = cluster.serve_status()["applications"]["guarded"]
    assert status["status"] == "RUNNING"
    assert all(d["status"] == "HEALTHY" for d in status["deployments"].values())
