"""The Serve graph from deployments/configs/local.yaml, deployed on the session's Ray cluster."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def cluster(ray_cluster):
    ray_cluster.deploy_serve()
    return ray_cluster
