"""Shared fixtures: the embedded tiny model, loaded once per test session, and its diffusers peer."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings

from fluxray.models.sources import TINY_MODEL_DIR
from fluxray.pipeline import Pipeline

# Property tests draw the same examples every run (a failure reproduces) and keep no database in the tree.
settings.register_profile("fluxray", derandomize=True, database=None, deadline=None)
settings.load_profile("fluxray")


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A Ray head and an S3 API server on loopback, started once for the whole session."""
    from local_cluster import Cluster

    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def tiny_loras(tmp_path_factory):
    """The tiny model's LoRAs in every layout the tests use (scripts/make_tiny_loras.py --formats)."""
    from scripts.make_tiny_loras import make_tiny_loras

    folder = tmp_path_factory.mktemp("loras")
    make_tiny_loras(folder, formats=True)
    return folder


@pytest.fixture(scope="session")
def tiny_pipeline() -> Pipeline:
    return Pipeline.load("tiny", device="cpu")


@pytest.fixture(scope="session")
def diffusers_pipe():
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(TINY_MODEL_DIR, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Tests that run a Ray cluster, a Serve application or the shipped service: what `make test-fast` leaves
# out, but for the `smoke` ones (the run command's own checks, tests/as_shipped/).
LIVE_FIXTURES = {"ray_cluster", "cluster", "shipped_service", "service", "ft_cluster"}
LIVE_MODULES = {"test_local_cluster_stop.py"}  # starts a cluster of its own, without a fixture


def pytest_collection_modifyitems(items):
    for item in items:
        path = getattr(item, "path", None)
        if path is not None and "as_shipped" in path.parts:
            item.add_marker(pytest.mark.smoke)
        in_module = path is not None and (path.name in LIVE_MODULES or path.parent.name == "cluster")
        if in_module or LIVE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.live)


_THREADS_AT_START = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _torch_threads_unchanged():
    """Tests that build a deployment's class in-process (in a test or a module fixture) apply its
    `torch_threads` to the whole process; after each test the count goes back to the session's,
    so later tests run as they would alone (a float reduction split over another number of threads
    rounds differently: the single-file parity check differed by 1/255 at one thread)."""
    yield
    torch.set_num_threads(_THREADS_AT_START)
