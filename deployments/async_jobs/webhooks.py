"""Webhooks for async jobs, per Standard Webhooks (standardwebhooks.com): a POST of
`{"type": "image.generation.job.<event>", "timestamp": ..., "data": <the job>}` with the headers
`webhook-id`, `webhook-timestamp` and `webhook-signature` (`v1,` + base64 HMAC-SHA256 of
`<id>.<timestamp>.<body>` with the secret: `whsec_` + base64, from the environment variable that
`webhook_secret_env` names, as a Secret puts it there).

Safe by default:
- `webhook_allowed_hosts` empty (the default) turns webhooks off: a request that sends one gets 400.
- Only those hosts are called; a URL whose host is not listed is refused (400, naming `webhook`).
- An address that is loopback, link-local (the cloud metadata service at 169.254.169.254 among them),
  or unspecified is refused even for a listed name, unless that address itself (or `localhost`, for
  loopback) is listed: a listed name cannot point the cluster at itself. Checked when the request is
  made and again before each delivery (the name is resolved anew).
- Redirects are not followed (a 3xx is a failed delivery, not retried).

Delivery: at least once while the ingress replica lives, never blocking the job: each delivery is a
task of its own, retried on a network error, a timeout, 408, 429 or 5xx, with exponential backoff
(`webhook_backoff_s` x 2^attempt) up to `webhook_max_attempts`; the same `webhook-id` on every attempt,
so a receiver can drop duplicates.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from deployments.http.errors import APIError

logger = logging.getLogger("ray.serve")
EVENTS = ("queued", "started", "progress", "succeeded", "failed", "cancelled")
DEFAULT_EVENTS = ("succeeded", "failed", "cancelled")
RETRY_STATUS = {408, 429} | set(range(500, 600))


def sign(secret: str, message_id: str, timestamp: int, body: str) -> str:
    """The `webhook-signature` value for a body: `v1,<base64 HMAC-SHA256>`."""
    key = base64.b64decode(secret.removeprefix("whsec_") + "==")
    digest = hmac.new(key, f"{message_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def _special(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Addresses a webhook must not reach unless listed: loopback, link-local (metadata), unspecified."""
    mapped = getattr(address, "ipv4_mapped", None)
    address = mapped or address
    return address.is_loopback or address.is_link_local or address.is_unspecified


class RefusedTarget(Exception):
    """A webhook URL that this server will not call; the message says why."""


@dataclass
class WebhookPolicy:
    allowed_hosts: tuple[str, ...]
    secret: str | None
    max_attempts: int = 5
    backoff_s: float = 1.0
    timeout_s: float = 10.0

    @property
    def enabled(self) -> bool:
        return bool(self.allowed_hosts) and bool(self.secret)

    def _resolve(self, host: str) -> list[str]:
        try:
            return [ipaddress.ip_address(host).compressed]
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except OSError as error:
            raise RefusedTarget(f"its host {host!r} does not resolve ({error.strerror or error})") from None
        return sorted({info[4][0] for info in infos})

    def check(self, url: str) -> None:
        """RefusedTarget unless the URL is http(s), its host listed, and each address it resolves to
        is an ordinary one or listed itself."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RefusedTarget("it must be an http:// or https:// URL with a host")
        if parts.username or parts.password:
            raise RefusedTarget("it must not hold credentials")
        host = parts.hostname.lower()
        allowed = {h.lower() for h in self.allowed_hosts}
        if host not in allowed:
            raise RefusedTarget(f"its host {host!r} is not in this server's webhook_allowed_hosts")
        for address in self._resolve(host):
            ip = ipaddress.ip_address(address)
            listed = address in allowed or (ip.is_loopback and "localhost" in allowed)
            if _special(ip) and not listed:
                raise RefusedTarget(
                    f"its host {host!r} resolves to {address}, a loopback, link-local or metadata address, "
                    "which is called only when listed itself in webhook_allowed_hosts"
                )


async def validate_webhook(policy: WebhookPolicy, url: str | None) -> None:
    """A request's webhook, checked when the job is made: 400 naming `webhook` when refused."""
    if url is None:
        return
    if not policy.enabled:
        raise APIError(400, "webhook: this server sends no webhooks (webhook_allowed_hosts is empty)", "webhook")
    try:
        await asyncio.get_running_loop().run_in_executor(None, policy.check, url)  # resolving may block
    except RefusedTarget as error:
        raise APIError(400, f"webhook: refused: {error}", "webhook", code="webhook_refused") from None


class WebhookSender:
    """Delivers events of jobs, each in a task of its own, in the background."""

    def __init__(self, policy: WebhookPolicy, on_result: Callable[[str], None] | None = None):
        self.policy = policy
        self.on_result = on_result or (lambda _: None)
        self.tasks: set[asyncio.Task] = set()
        self._client: httpx.AsyncClient | None = None
        self.delivered = 0
        self.failed = 0

    def send(self, url: str, job_id: str, event_id: int, event: str, record: dict) -> None:
        """Schedules the delivery of one event of a job; returns at once."""
        message_id = f"msg_{job_id}_{event_id}"
        body = json.dumps(
            {
                "type": f"image.generation.job.{event}",
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "data": record,
            }
        )
        task = asyncio.get_running_loop().create_task(self._deliver(url, message_id, body))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _deliver(self, url: str, message_id: str, body: str) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(follow_redirects=False, timeout=self.policy.timeout_s)
        for attempt in range(self.policy.max_attempts):
            if attempt:
                await asyncio.sleep(self.policy.backoff_s * 2 ** (attempt - 1))
            try:  # again: the name may resolve elsewhere by now
                await asyncio.get_running_loop().run_in_executor(None, self.policy.check, url)
            except RefusedTarget as error:
                logger.warning("webhook %s refused: %s", message_id, error)
                break
            timestamp = int(time.time())
            headers = {
                "content-type": "application/json",
                "webhook-id": message_id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(self.policy.secret, message_id, timestamp, body),
            }
            try:
                response = await self._client.post(url, content=body, headers=headers)
            except httpx.HTTPError as error:
                logger.info("webhook %s attempt %d: %s", message_id, attempt + 1, type(error).__name__)
                continue
            if 200 <= response.status_code < 300:
                self.delivered += 1
                self.on_result("delivered")
                return
            logger.info("webhook %s attempt %d: HTTP %d", message_id, attempt + 1, response.status_code)
            if response.status_code not in RETRY_STATUS:
                break  # a redirect or a client error: the same request would fail again
        self.failed += 1
        self.on_result("failed")

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()
