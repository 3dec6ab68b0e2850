"""Downscaling drains work instead of cutting it: the shipped configs give every replica time to finish.

When Serve stops a replica (downscaling, a redeploy) the replica takes no new calls and waits for
the ones it holds, up to the deployment's `graceful_shutdown_timeout_s` (Serve's default: 20 s);
then it is killed with them. No call outlives its request, which the ingress cancels at the app's
`request_timeout_s`. The rule checked here: every deployment of every shipped serve config,
including those KubeRay gets as `serveConfigV2`, waits at least `request_timeout_s`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.config import AppConfig

ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIGS = sorted((ROOT / "deployments" / "configs").glob("*.yaml"))
MANIFESTS = [ROOT / "k8s" / "rayservice.yaml", ROOT / "k8s" / "cpu-tiny" / "rayservice.yaml"]


def shipped() -> list[tuple[str, dict]]:
    configs = [(p.relative_to(ROOT).as_posix(), yaml.safe_load(p.read_text())) for p in SERVE_CONFIGS]
    for path in MANIFESTS:
        service = yaml.safe_load(path.read_text())
        configs.append((path.relative_to(ROOT).as_posix(), yaml.safe_load(service["spec"]["serveConfigV2"])))
    return configs


def test_the_rule_covers_both_serve_configs_and_both_manifests():
    names = [name for name, _ in shipped()]
    assert len(names) == 4 and len(SERVE_CONFIGS) == 2


@pytest.mark.parametrize("name,config", shipped(), ids=[name for name, _ in shipped()])
def test_every_deployment_waits_at_least_the_request_timeout_before_it_is_cut(name, config):
    ServeDeploySchema.model_validate(config)  # Serve accepts the field where it is written
    for app in config["applications"]:
        timeout = AppConfig.model_validate(app["args"]).request_timeout_s
        for deployment in app["deployments"]:
            grace = deployment.get("graceful_shutdown_timeout_s")
            assert grace is not None, f"{name}: {deployment['name']} keeps Serve's 20 s default"
            assert grace >= timeout, (
                f"{name}: {deployment['name']} is cut after {grace} s, its requests may run {timeout} s"
            )
