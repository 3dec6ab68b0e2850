"""The service under load through the events every production RayService meets, on a real multi-node
cluster (cluster/local_cluster.sh: a head with no CPUs and its GCS in a real redis-server, one worker
that runs the replicas and a Serve proxy of its own port): the head crashed and restarted, the serve
config rolled out in place and by replacing every replica, and the Denoiser scaled down. Clients stream
requests through the worker's proxy all along; every request gets its image, equal to the engine's
for its seed. The scenarios are benchmarks/failover.py's, shorter; that script writes the figures."""

from __future__ import annotations

import pytest

from benchmarks.failover import (
    Service,
    differing_images,
    downscale,
    free_port,
    head_failure,
    in_place_change,
    replacing_change,
    rollout,
    serve_config,
    start_cluster,
    with_denoiser,
)

CLIENTS = 3


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("failover")
    cluster = start_cluster(tmp / "cluster")
    try:
        service = Service(cluster, tmp)
        service.deploy(serve_config(free_port()))
        service.url = cluster.serve_url(1)
        yield service
    finally:
        cluster.script("stop")


def no_failure_and_engine_images(result: dict, pipeline, size: str = "64x64", steps: int = 4) -> None:
    assert result["failed"] == 0, result["failures"]
    assert result["sent"] >= 10 and result["in_flight_during"] >= CLIENTS, result
    assert differing_images(result["_answers"], pipeline, size, steps) == []


def test_the_head_killed_under_load_fails_no_request_and_serve_recovers_without_redeploying(service, tiny_pipeline):
    base = service.replicas()
    assert (
        sorted(base) == ["Denoiser", "Ingress", "TextEncoder", "VAEDecoder", "VAEEncoder"]
        and len(base["Denoiser"]) == 2
    )
    result = head_failure(service, service.url, CLIENTS, outage_s=8, after_s=3)
    print({k: v for k, v in result.items() if k != "_answers"})
    no_failure_and_engine_images(result, tiny_pipeline)
    # Requests kept being answered while the head (the GCS, Serve's controller, the head's proxy) was gone.
    assert result["requests_sent_while_head_down"] >= CLIENTS
    # The same replica processes serve on (Serve's restarted controller took them back), and the CLI works.
    assert result["replicas_kept"] and result["serve_status_ok"]


def test_an_in_place_rollout_under_load_keeps_every_replica_and_fails_no_request(service, tiny_pipeline):
    config = in_place_change(service.config)
    result = rollout(service, service.url, CLIENTS, config, after_s=2)
    print({k: v for k, v in result.items() if k != "_answers"})
    no_failure_and_engine_images(result, tiny_pipeline)
    assert all(result["replicas_kept"].values()), result["replicas_kept"]
    # The running Denoiser replicas took the new user_config.
    code = (
        "h = serve.get_deployment_handle('Denoiser', app_name='fluxray')\n"
        "print(json.dumps([h.stats.remote().result()['settings'] for _ in range(6)]))\n"
    )
    for settings in service.driver(code):
        assert settings["denoiser_max_batch_images"] == 2 and settings["scheduler"] == "fifo", settings


def test_a_rollout_that_replaces_every_replica_under_load_fails_no_request(service, tiny_pipeline):
    result = rollout(service, service.url, CLIENTS, replacing_change(service.config), after_s=2)
    print({k: v for k, v in result.items() if k != "_answers"})
    no_failure_and_engine_images(result, tiny_pipeline)
    assert all(result["replicas_replaced"].values()), result["replicas_replaced"]


def test_a_denoiser_replica_removed_under_load_finishes_what_it_holds(service, tiny_pipeline):
    config = with_denoiser(service.config, autoscaling_config={"min_replicas": 1, "max_replicas": 1})
    result = downscale(service, service.url, 2 * CLIENTS, config, after_s=1)
    print({k: v for k, v in result.items() if k != "_answers"})
    # Both replicas held requests when the scale-down was deployed; one was removed, and none failed.
    assert min(result["ongoing_at_downscale"]) >= 1 and len(result["removed"]) == 1 and len(result["kept"]) == 1
    no_failure_and_engine_images(result, tiny_pipeline, "128x128", 16)
    # The removed replica finished its requests itself: the ingress re-ran none.
    assert result["requests_re_run"] == 0
