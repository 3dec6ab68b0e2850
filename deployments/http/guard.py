"""Who may call the HTTP API, and how big a request may be: checked before any route runs.

`FLUXRAY_API_KEYS` (comma-separated; in Kubernetes from a Secret) turns on API keys: every path
but the open ones then needs `Authorization: Bearer <key>`, answered 401 otherwise. Keys are
compared in constant time (hashed to one length, every key compared, no early exit) and never
logged. Bodies above the configured byte limit get 413 before any parsing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

API_KEYS_ENV = "FLUXRAY_API_KEYS"
# Open without a key: the health check (load balancers, KubeRay probes) and the API's own description.
# The page and its two files are open too: they hold no data, and the page asks for the key itself.
OPEN_PATHS = frozenset(
    {
        "/healthz",
        "/openapi.json",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
        "/",
        "/static/page.js",
        "/static/page.css",
    }
)


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class ApiKeys:
    """The accepted keys (as digests); empty means the API is open."""

    def __init__(self, keys: list[str]):
        self._digests = [_digest(k.encode()) for k in keys]

    @classmethod
    def from_env(cls, name: str = API_KEYS_ENV, environ: Mapping[str, str] = os.environ) -> ApiKeys:
        return cls([k.strip() for k in environ.get(name, "").split(",") if k.strip()])

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:  # never the keys themselves
        return f"ApiKeys({len(self)} keys)"

    def allows(self, authorization: bytes | None) -> bool:
        """Whether an Authorization header value carries one of the keys."""
        if not self.enabled:
            return True
        scheme, _, token = (authorization or b"").partition(b" ")
        given = _digest(token.strip())
        matched = False
        for digest in self._digests:  # every key, always: the time does not depend on which matched
            matched |= hmac.compare_digest(given, digest)
        return matched and scheme.lower() == b"bearer"


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> bytes:
    """The API's one error shape, OpenAI's: {"error": {"message", "type", "param", "code"}}."""
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


DEFAULT_MAX_BODY_BYTES = 256 * 1024
DEFAULT_MAX_UPLOAD_BYTES = 32 * 2**20
UPLOAD_PATHS = frozenset({"/v1/images/edits"})  # bodies that carry images: max_upload_bytes


@dataclass
class GuardPolicy:
    keys: ApiKeys = field(default_factory=ApiKeys.from_env)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    on_answer: Callable[[str, int, float], None] | None = None  # (path, status, seconds) of every answer
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES

    def body_limit(self, path: str) -> int:
        return self.max_upload_bytes if path in UPLOAD_PATHS else self.max_body_bytes


class RequestGuard:
    """ASGI middleware: API keys, then the body size limit (the body is read, bounded, and replayed).

    Serve runs a copy of the FastAPI app made when the ingress module is imported, so the replica
    cannot hand this middleware its settings directly: it sets the process-wide policy with
    `RequestGuard.configure` in its constructor (one ingress replica per process).
    """

    policy: GuardPolicy | None = None

    def __init__(self, app):
        self.app = app

    @classmethod
    def configure(cls, policy: GuardPolicy) -> None:
        cls.policy = policy

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if RequestGuard.policy is None:
            RequestGuard.policy = GuardPolicy()
        policy = RequestGuard.policy
        path = route_path(scope)
        if policy.on_answer is not None:
            send = _timed(send, path, policy.on_answer)
        headers = dict(scope.get("headers") or [])
        if path not in OPEN_PATHS and not policy.keys.allows(headers.get(b"authorization")):
            return await self._reject(
                send,
                401,
                error_body("missing or invalid API key; send Authorization: Bearer <key>", "authentication_error"),
                [(b"www-authenticate", b'Bearer realm="fluxray"')],
            )
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = policy.body_limit(path)
        too_large = error_body(
            f"request body is larger than the server's limit of {limit} bytes",
            "invalid_request_error",
            code="request_too_large",
        )
        declared = headers.get(b"content-length")
        if declared is not None and not declared.isdigit():
            return await self._reject(send, 400, error_body("invalid Content-Length header", "invalid_request_error"))
        if declared is not None and int(declared) > limit:
            return await self._reject(send, 413, too_large)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await self._reject(send, 413, too_large)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return await self.app(scope, replay, send)

    @staticmethod
    async def _reject(send, status: int, body: bytes, headers=()) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def route_path(scope) -> str:
    """The request's path within the application (without the route prefix Serve mounts it at)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return (path[len(root) :] or "/") if root and path.startswith(root) else path


def _timed(send, path: str, on_answer: Callable[[str, int, float], None]):
    """`send`, reporting the response's status and the time since the request arrived."""
    started = time.monotonic()

    async def timed_send(message):
        if message["type"] == "http.response.start":
            on_answer(path, message["status"], time.monotonic() - started)
        await send(message)

    return timed_send
