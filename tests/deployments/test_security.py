"""Who may call it, and how much: API keys, body/prompt/pixel limits, and hostile input.

The "guarded" application (tests/local_cluster.py) reads its keys from FLUXRAY_GUARDED_KEYS
(`api_keys_env`), set in the cluster's environment as a Secret sets a pod's, and has small
limits; the main "fluxray" application has no keys.
"""

from __future__ import annotations

import base64
import io
import json
import socket
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from local_cluster import GUARDED_AUTH, GUARDED_KEYS
from PIL import Image

GEN = "/v1/images/generations"
SMALL = {"prompt": "a lighthouse", "size": "64x64", "num_inference_steps": 2, "seed": 7}


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def assert_error(response: httpx.Response, status: int, param: str | None = None, kind: str | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:500])
    error = response.json()["error"]
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    if kind is not None:
        assert error["type"] == kind, error
    return error


def image_of(response: httpx.Response) -> Image.Image:
    assert response.status_code == 200, response.text[:500]
    return Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))


# --- API keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer("wrong-key"),
        {"Authorization": "Bearer"},
        {"Authorization": f"Basic {GUARDED_KEYS[0]}"},
        {"Authorization": GUARDED_KEYS[0]},
        bearer(GUARDED_KEYS[0][:-1]),
        bearer(GUARDED_KEYS[0] + "x"),
        bearer(f"{GUARDED_KEYS[0]},{GUARDED_KEYS[1]}"),
    ],
    ids=["none", "wrong", "empty", "basic", "no-scheme", "prefix", "longer", "both-joined"],
)
def test_without_a_valid_key_every_generation_route_is_401(cluster, headers):
    for method, path, body in [("POST", GEN, SMALL), ("POST", "/generate", SMALL), ("GET", "/v1/models", None)]:
        r = httpx.request(method, cluster.guarded_url + path, json=body, headers=headers, timeout=60)
        assert_error(r, 401, kind="authentication_error")
        assert r.headers["www-authenticate"].startswith("Bearer")


def test_with_either_key_it_generates_and_healthz_stays_open(cluster):
    for key in GUARDED_KEYS:
        assert image_of(httpx.post(cluster.guarded_url + GEN, json=SMALL, headers=bearer(key), timeout=120)).size == (
            64,
            64,
        )
    r = httpx.post(cluster.guarded_url + "/generate", json=SMALL, headers=bearer(GUARDED_KEYS[1]), timeout=120)
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
    assert httpx.get(cluster.guarded_url + "/v1/models", headers=GUARDED_AUTH).json()["data"]
    assert httpx.get(cluster.guarded_url + "/healthz").status_code == 200  # no key
    schema = httpx.get(cluster.guarded_url + "/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    # The app without keys is open.
    assert image_of(httpx.post(cluster.url + GEN, json=SMALL, timeout=120)).size == (64, 64)


def test_unknown_paths_need_a_key_too(cluster):
    assert_error(httpx.get(cluster.guarded_url + "/v1/secret-admin"), 401)
    assert_error(httpx.get(cluster.guarded_url + "/v1/secret-admin", headers=GUARDED_AUTH), 404)


def test_keys_never_reach_the_logs(cluster):
    # Calls that carry keys, good and bad, have been made by now (this test runs after the ones above).
    httpx.post(cluster.guarded_url + GEN, json=SMALL, headers=GUARDED_AUTH, timeout=120)
    logs = Path(cluster.session_dir()) / "logs"  # this cluster's own, not whichever started last
    assert logs.is_dir()
    checked = 0
    for path in logs.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            checked += 1
            for key in GUARDED_KEYS:
                assert key.encode() not in data, f"an API key is in {path}"
    assert checked > 10


# --- limits -----------------------------------------------------------------------------------


def test_body_over_the_limit_is_413_declared_or_streamed(cluster):
    big = {**SMALL, "user": "x" * 9000}  # guarded max_body_bytes is 8192
    r = httpx.post(cluster.guarded_url + GEN, json=big, headers=GUARDED_AUTH)
    assert assert_error(r, 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit holds while the body streams in
        payload = json.dumps(big).encode()
        for i in range(0, len(payload), 1000):
            yield payload[i : i + 1000]

    r = httpx.post(
        cluster.guarded_url + GEN,
        content=chunks(),
        headers={**GUARDED_AUTH, "Content-Type": "application/json"},
    )
    assert_error(r, 413)
    # Just under the limit is fine.
    r = httpx.post(cluster.guarded_url + GEN, json={**SMALL, "user": "x" * 7000}, headers=GUARDED_AUTH)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("field", ["prompt", "prompt_2", "negative_prompt"])
def test_prompt_over_the_configured_length_is_422_naming_it(cluster, field):
    body = {**SMALL, field: "a" * 301}  # guarded max_prompt_chars is 300
    error = assert_error(httpx.post(cluster.guarded_url + GEN, json=body, headers=GUARDED_AUTH), 422, param=field)
    assert "300" in error["message"] and error["code"] == "too_long"
    ok = {**SMALL, field: "a" * 300}
    assert httpx.post(cluster.guarded_url + GEN, json=ok, headers=GUARDED_AUTH, timeout=120).status_code == 200


@pytest.mark.parametrize(
    "body,refused_as",
    [
        ({"size": "256x256", "num_inference_steps": 8, "n": 1}, None),  # exactly the budget
        ({"size": "256x256", "num_inference_steps": 8, "n": 2}, "n"),
        ({"size": "256x256", "num_inference_steps": 9, "n": 1}, "size"),  # 9 steps: under the default 28
        ({"size": "272x256", "num_inference_steps": 8, "n": 1}, "size"),
        ({"size": "128x128", "num_inference_steps": 8, "negative_prompt": "fog", "true_cfg_scale": 3}, None),
        ({"size": "256x256", "num_inference_steps": 8, "negative_prompt": "fog", "true_cfg_scale": 3}, "size"),
        ({"size": "2048x2048", "num_inference_steps": 100, "n": 8}, "n"),
    ],
)
def test_pixel_budget(cluster, body, refused_as):
    """Admitted up to the budget; over it a 422 naming the factor the client raised (deployments.http.admission)."""
    r = httpx.post(cluster.guarded_url + GEN, json={"prompt": "a cat", **body}, headers=GUARDED_AUTH, timeout=120)
    if refused_as is None:
        assert r.status_code == 200, r.text
        assert len(r.json()["data"]) == body.get("n", 1)
    else:
        error = assert_error(r, 422, param=refused_as)
        assert error["code"] == "pixel_budget_exceeded" and "524288" in error["message"]


# --- hostile input ------------------------------------------------------------------------------

HOSTILE_BODIES = {
    "nan": b'{"prompt": "a", "guidance_scale": NaN}',
    "infinity": b'{"prompt": "a", "guidance_scale": Infinity}',
    "neg-infinity-seed": b'{"prompt": "a", "seed": -Infinity}',
    "huge-float": b'{"prompt": "a", "guidance_scale": 1e400}',
    "huge-int-seed": b'{"prompt": "a", "seed": ' + b"9" * 4000 + b"}",
    "huge-int-n": b'{"prompt": "a", "n": 100000000000000000000000}',
    "float-n": b'{"prompt": "a", "n": 1.5}',
    "negative-steps": b'{"prompt": "a", "num_inference_steps": -1}',
    "zero-steps": b'{"prompt": "a", "num_inference_steps": 0}',
    "prompt-number": b'{"prompt": 123}',
    "prompt-list": b'{"prompt": ["a", "b"]}',
    "prompt-object": b'{"prompt": {"$gt": ""}}',
    "prompt-null": b'{"prompt": null}',
    "prompt-blank": b'{"prompt": "   "}',
    "size-number": b'{"prompt": "a", "size": 64}',
    "size-sci": b'{"prompt": "a", "size": "1e9x1e9"}',
    "size-negative": b'{"prompt": "a", "size": "-64x64"}',
    "size-3d": b'{"prompt": "a", "size": "64x64x64"}',
    "size-huge": b'{"prompt": "a", "size": "99999999999999999999x64"}',
    "size-odd": b'{"prompt": "a", "size": "100x64"}',
    "format-evil": b'{"prompt": "a", "output_format": "../../etc/passwd"}',
    "response-format": b'{"prompt": "a", "response_format": "file:///etc/passwd"}',
    "model-traversal": b'{"prompt": "a", "model": "../../../../etc/passwd"}',
    "unknown-field": b'{"prompt": "a", "__proto__": {"admin": true}}',
    "duplicate-keys": b'{"prompt": "a", "n": 1, "n": 999}',
    "deep-array": b"[" * 50_000 + b"]" * 50_000,
    "deep-object": b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
    "deep-in-field": b'{"prompt": "a", "user": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
    "lone-surrogate": b'{"prompt": "a \\ud800 b"}',
    "invalid-utf8": b'{"prompt": "a \xff\xfe b"}',
    "empty": b"",
    "null": b"null",
    "array": b"[]",
    "string": b'"a cat"',
    "truncated": b'{"prompt": "a',
    "trailing-garbage": b'{"prompt": "a"} xyz',
}

# Odd but valid text: each must generate.
ODD_PROMPTS = [
    "a \u202eright-to-left\u202c override",
    "zero\u200bwidth\u200djoiners\ufeff",
    "🦊🏔️👩‍👩‍👧 emoji sequences",
    "\u0000 NUL and \u0007 bell",
    "noncharacters \ufffe \uffff \U0010ffff",
    "combining a\u0301\u0301\u0301\u0301\u0301\u0301 marks",
    "﷽" * 100,
    "<script>alert(1)</script> ' OR 1=1 -- {{7*7}} ${jndi:ldap://x}",
]


@pytest.mark.parametrize("name", sorted(HOSTILE_BODIES))
def test_hostile_bodies_get_a_4xx_with_an_error(cluster, name):
    r = httpx.post(
        cluster.url + GEN, content=HOSTILE_BODIES[name], headers={"Content-Type": "application/json"}, timeout=60
    )
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert r.json()["error"]["message"]


@pytest.mark.parametrize("prompt", ODD_PROMPTS)
def test_odd_unicode_prompts_generate_and_round_trip_in_metadata(cluster, prompt):
    r = httpx.post(cluster.url + "/generate", json={**SMALL, "prompt": prompt}, timeout=120)
    assert r.status_code == 200, r.text[:300]
    from fluxray.images import read_metadata

    assert read_metadata(r.content)["prompt"] == prompt


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "text/plain"},
        {"Content-Type": "application/x-www-form-urlencoded"},
        {"Content-Type": "multipart/form-data; boundary=x"},
        {"Content-Type": "application/json; charset=latin-1"},
        {"X-Forwarded-For": "1.2.3.4," * 500},
        {"Authorization": "Bearer " + "k" * 6000},
        {"Accept": "image/*;q=2", "Accept-Encoding": "zstd;q=-1"},
    ],
)
def test_odd_headers_get_no_5xx(cluster, headers):
    for url in (cluster.url, cluster.guarded_url):
        r = httpx.post(url + GEN, content=json.dumps(SMALL).encode(), headers=headers, timeout=120)
        assert r.status_code < 500, (url, headers, r.status_code, r.text[:300])


def raw_http(url: str, request: bytes) -> bytes:
    parsed = urlparse(url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=30) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


MALFORMED_HTTP = {
    "cl-not-a-number": b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
    "cl-short": b'POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{"prompt": "a"}',
    "cl-long": b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{}",
    "cl-huge": b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n{}",
    "bad-chunk": b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "garbage": b"GARBAGE\r\n\r\n",
    "latin1-header": b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nX-Odd: \xff\xfe\x80\r\n"
    b"Content-Length: 2\r\n\r\n{}",
    "latin1-key": b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n"
    b"Content-Length: 2\r\n\r\n{}",
    "long-query": b"POST /v1/images/generations?"
    + b"a=1&" * 4000
    + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
}


def send_malformed(cluster, name: str) -> list[bytes]:
    """The malformed request to both apps (without keys, and through the guarded app's key check): the answers."""
    request = MALFORMED_HTTP[name]
    return [
        raw_http(cluster.url, request.replace(b" /v1/", b" " + prefix + b"/v1/", 1)) for prefix in (b"", b"/guarded")
    ]


@pytest.mark.parametrize("name", sorted(MALFORMED_HTTP))
def test_malformed_http_gets_no_5xx(cluster, name):
    for answer in send_malformed(cluster, name):
        status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else None
        # A 4xx, or the connection closed without an answer (the body never came); a reset raises in raw_http.
        assert status is None or 400 <= status < 500, answer[:300]
        assert status is not None or answer == b"", answer[:300]
    # Whatever the proxy did with it, it serves the next connection.
    assert httpx.get(cluster.url + "/healthz", timeout=30).status_code == 200


def test_service_is_healthy_after_the_hostile_input(cluster):
    # The hostile input first (every malformed request and hostile body of this module), so that the check
    # means the same when this test runs alone.
    for name in MALFORMED_HTTP:
        send_malformed(cluster, name)
    for body in HOSTILE_BODIES.values():
        httpx.post(cluster.url + GEN, content=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert httpx.get(cluster.url + "/healthz").status_code == 200
    assert image_of(httpx.post(cluster.url + GEN, json=SMALL, timeout=120)).size == (64, 64)
    deployments = cluster.serve_status()["applications"]["fluxray"]["deployments"]
    assert all(d["status"] == "HEALTHY" for d in deployments.values())
