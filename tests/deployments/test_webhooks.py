"""Webhooks of async jobs: the policy that decides which URLs are called (no cluster), and delivery to a
real receiver on loopback that verifies each signature with the `standardwebhooks` library, fails its
first attempts with 500, and redirects."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from standardwebhooks import Webhook

from deployments.async_jobs.webhooks import RefusedTarget, WebhookPolicy, WebhookSender, sign, validate_webhook
from deployments.http.errors import APIError

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


class Receiver:
    """An HTTP server on loopback that records each POST; `script` gives the status of each answer in turn
    (then 204), and a path of /redirect answers 307."""

    def __init__(self, script: list[int] | None = None):
        self.received: list[dict] = []
        self.script = list(script or [])
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"])).decode()
                receiver.received.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if self.path == "/redirect":
                    self.send_response(307)
                    self.send_header("Location", "http://127.0.0.1:1/elsewhere")
                else:
                    self.send_response(receiver.script.pop(0) if receiver.script else 204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def policy(*hosts: str, **kwargs) -> WebhookPolicy:
    return WebhookPolicy(allowed_hosts=hosts, secret=SECRET, **{"backoff_s": 0.05, **kwargs})


@pytest.mark.parametrize(
    ("hosts", "url", "why"),
    [
        ((), "http://127.0.0.1/hook", "sends no webhooks"),
        (("hooks.example.com",), "http://other.example.com/hook", "not in this server's webhook_allowed_hosts"),
        (("hooks.example.com",), "ftp://hooks.example.com/hook", "http:// or https://"),
        (("hooks.example.com",), "http://user:pw@hooks.example.com/hook", "credentials"),
        (("0.0.0.0",), "http://[::ffff:169.254.169.254]/latest", "not in this server's webhook_allowed_hosts"),
        (("hooks.invalid",), "http://hooks.invalid/hook", "does not resolve"),
    ],
)
def test_refused_targets_are_a_400_naming_the_webhook(hosts, url, why):
    with pytest.raises(APIError) as refused:
        asyncio.run(validate_webhook(policy(*hosts), url))
    assert refused.value.status == 400 and refused.value.param == "webhook" and why in refused.value.message


def test_loopback_and_metadata_addresses_need_listing_themselves():
    policy("127.0.0.1").check("http://127.0.0.1:8080/hook")  # listed: called
    policy("localhost").check("http://localhost/hook")  # localhost stands for loopback
    with pytest.raises(RefusedTarget, match="not in this server"):
        policy("localhost").check("http://127.0.0.2/hook")
    policy("169.254.169.254").check("http://169.254.169.254/latest")  # listed explicitly: called
    unlisted = policy("169.254.169.254.example")
    unlisted._resolve = lambda host: ["169.254.169.254"]  # a name that resolves to the metadata address
    with pytest.raises(RefusedTarget, match="metadata"):
        unlisted.check("http://169.254.169.254.example/latest")
    rebinding = policy("hooks.example.com")
    rebinding._resolve = lambda host: ["93.184.216.34", "::1"]  # one of its addresses is loopback
    with pytest.raises(RefusedTarget, match="::1"):
        rebinding.check("https://hooks.example.com/hook")
    ordinary = policy("hooks.example.com")
    ordinary._resolve = lambda host: ["93.184.216.34"]
    ordinary.check("https://hooks.example.com/hook")


def deliver(sender: WebhookSender, url: str, job_id: str = "imgjob_" + "a" * 24) -> None:
    async def scenario():
        sender.send(url, job_id, 7, "succeeded", {"id": job_id, "status": "succeeded"})
        await asyncio.gather(*sender.tasks)
        await sender.close()

    asyncio.run(scenario())


def test_a_delivery_is_signed_as_standard_webhooks_verifies_and_retried_after_500s():
    receiver = Receiver(script=[500, 503])
    results = []
    try:
        deliver(WebhookSender(policy("127.0.0.1"), results.append), receiver.url + "/hook")
    finally:
        receiver.close()
    assert len(receiver.received) == 3 and results == ["delivered"]
    ids = {r["headers"]["webhook-id"] for r in receiver.received}
    assert ids == {"msg_imgjob_" + "a" * 24 + "_7"}  # the same id on every attempt: receivers drop duplicates
    for request in receiver.received:
        payload = Webhook(SECRET).verify(request["body"], request["headers"])
        assert payload["type"] == "image.generation.job.succeeded" and payload["data"]["status"] == "succeeded"
    forged = dict(receiver.received[-1]["headers"])
    forged["webhook-signature"] = sign("whsec_" + base64.b64encode(b"another secret").decode(), "x", 1, "{}")
    with pytest.raises(Exception, match="signature"):
        Webhook(SECRET).verify(receiver.received[-1]["body"], forged)
    assert json.loads(receiver.received[0]["body"])["data"]["id"].startswith("imgjob_")


def test_retries_are_bounded_and_redirects_are_not_followed():
    receiver = Receiver(script=[500] * 10)
    results = []
    try:
        deliver(WebhookSender(policy("127.0.0.1", max_attempts=3), results.append), receiver.url + "/hook")
        deliver(WebhookSender(policy("127.0.0.1"), results.append), receiver.url + "/redirect")
        # A client error is the receiver's answer: not retried.
        receiver.script = [404]
        deliver(WebhookSender(policy("127.0.0.1"), results.append), receiver.url + "/gone")
    finally:
        receiver.close()
    paths = [r["path"] for r in receiver.received]
    assert paths == ["/hook"] * 3 + ["/redirect", "/gone"], paths  # nothing reached /elsewhere
    assert results == ["failed", "failed", "failed"]


def test_a_refused_target_is_never_called_even_when_it_resolves_there_later(monkeypatch):
    receiver = Receiver()
    results = []
    port = receiver.server.server_address[1]
    real = socket.getaddrinfo

    def rebound(host, *args, **kwargs):  # the allowed name now resolves to loopback, for everyone
        name = host.decode() if isinstance(host, bytes) else host  # anyio passes the name IDNA-encoded
        return real("127.0.0.1" if name == "hooks.example.com" else host, *args, **kwargs)

    # For the policy's check and for the HTTP client alike: without the delivery-time check, the POST
    # would reach the receiver (the control below shows it does).
    monkeypatch.setattr(socket, "getaddrinfo", rebound)
    try:
        deliver(WebhookSender(policy("hooks.example.com"), results.append), f"http://hooks.example.com:{port}/hook")
        control = policy("hooks.example.com", "127.0.0.1")  # loopback listed: the same URL is called
        deliver(WebhookSender(control, results.append), f"http://hooks.example.com:{port}/hook")
    finally:
        receiver.close()
    assert results == ["failed", "delivered"] and len(receiver.received) == 1
