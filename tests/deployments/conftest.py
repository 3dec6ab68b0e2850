"""The Serve graph from deployments/configs/local.yaml (and its tight and guarded variants), deployed on
the session's Ray cluster when a test first uses `cluster`, and deleted after the last test that does
(in whatever order the tests run): its 16 replicas would otherwise hold ~8 GB and wake the CPUs through
the in-process and job tests after it."""

from __future__ import annotations

import pytest

_last_user = []  # the last collected item that uses `cluster`
_serving = []  # the session cluster, while its applications are up


@pytest.fixture(scope="session")
def cluster(ray_cluster):
    ray_cluster.deploy_serve()
    _serving.append(ray_cluster)
    return ray_cluster


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    users = [item for item in items if "cluster" in getattr(item, "fixturenames", ())]
    _last_user[:] = users[-1:]


@pytest.hookimpl(trylast=True)  # after the item's fixtures are finalized (a module's may still deploy)
def pytest_runtest_teardown(item, nextitem):
    if _serving and _last_user and item is _last_user[0]:
        cluster = _serving.pop()
        if nextitem is not None:  # at the session's end the cluster itself has just been stopped
            cluster.shutdown_serve()
