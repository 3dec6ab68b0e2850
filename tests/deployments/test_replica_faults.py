"""A Denoiser replica killed under load: accepted requests still complete, Serve replaces it.

The "guarded" application runs two Denoiser replicas. Clients keep it busy; the replica holding
the most requests is `ray.kill`ed mid-load (killing an idle one would prove nothing). Requests it
held fail inside the graph with RayActorError and the ingress runs them again (the seed fixes the
image, so the re-run is the same image); clients only see 200s.
Serve's controller notices the dead actor and starts a new replica; `serve status` reports it.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from local_cluster import GUARDED_AUTH, wait_until
from PIL import Image

from fluxray.params import GenerationParams

STEPS = 16  # enough denoising that requests spend most of their time on a Denoiser replica


def test_killing_a_denoiser_replica_under_load_loses_no_request(cluster, tiny_pipeline):
    before = cluster.replica_actors("guarded", "Denoiser")
    assert len(before) == 2, before
    retries_before = cluster.handle_call("guarded", "Ingress", "stats")["retries"]
    stop = threading.Event()
    codes: Counter = Counter()
    bad: list[str] = []
    images: dict[int, bytes] = {}
    lock = threading.Lock()
    seq = iter(range(10**6))

    def client(_: int) -> None:
        with httpx.Client(timeout=180, headers=GUARDED_AUTH) as http:
            while not stop.is_set():
                with lock:
                    seed = 70_000 + next(seq)
                body = {"prompt": "a harbour at night", "size": "128x128", "num_inference_steps": STEPS, "seed": seed}
                r = http.post(f"{cluster.guarded_url}/v1/images/generations", json=body)
                with lock:
                    codes[r.status_code] += 1
                    if r.status_code == 200:
                        images[seed] = base64.b64decode(r.json()["data"][0]["b64_json"])
                    else:
                        bad.append(f"{r.status_code}: {r.text[:200]}")

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client, i) for i in range(8)]
        try:
            time.sleep(6)  # both replicas busy
            killed = cluster.kill_busiest(before)
            killed_at = time.monotonic()
            seen_states = []

            def replaced():
                status = cluster.serve_status()["applications"]["guarded"]["deployments"]["Denoiser"]
                seen_states.append((status["status"], dict(status.get("replica_states", {}))))
                now = cluster.replica_actors("guarded", "Denoiser")
                return now if len(now) == 2 and killed not in now and status["status"] == "HEALTHY" else None

            after = wait_until(replaced, 180, "a replacement Denoiser replica", 1)
            replaced_in = time.monotonic() - killed_at
            time.sleep(4)  # load on the new replica too
        finally:  # a failure above must not leave the clients running forever
            stop.set()
        for f in futures:
            f.result()

    assert bad == [], bad[:5]
    assert codes[200] >= 16, codes
    assert [r for r in before if r != killed][0] in after  # the other replica was untouched
    # Serve reported the loss while it replaced the replica.
    assert any(rs.get("RUNNING", 0) < 2 or st != "HEALTHY" for st, rs in seen_states), seen_states
    stats = cluster.handle_call("guarded", "Ingress", "stats")
    assert stats["retries"] > retries_before, stats  # requests were caught on the killed replica and re-run
    # A re-run request is the same image as a first run: spot-check against the engine.
    for seed in sorted(images)[:: max(1, len(images) // 4)]:
        want = tiny_pipeline.generate(
            GenerationParams(prompt="a harbour at night", width=128, height=128, num_inference_steps=STEPS, seed=seed)
        )[0].pixels
        got = np.asarray(Image.open(io.BytesIO(images[seed])).convert("RGB"))
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 2
    print(f"replica replaced in {replaced_in:.1f}s; answers {dict(codes)}; retries {stats['retries'] - retries_before}")
