"""The shipped serve configs are valid for Ray and for fluxray, and put every Serve knob in config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from deployments.app import build_app
from deployments.config import AppConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "deployments" / "configs").glob("*.yaml"))
STAGES = {"Ingress", "TextEncoder", "Denoiser", "VAEDecoder", "VAEEncoder"}


def deployment_names(args: dict) -> set[str]:
    """The deployments build_app makes of these args: the stages, and a Denoiser per extra model."""
    ingress = build_app(args)._bound_deployment
    encoder, denoisers, *rest = ingress.init_args[1:]
    bound = [encoder._bound_deployment, *(d._bound_deployment for d in denoisers)]
    return {ingress.name, *(d.name for d in bound), *(r._bound_deployment.name for r in rest)}


def test_both_configs_are_shipped():
    assert {p.name for p in CONFIGS} >= {"local.yaml", "gpu-flux-dev.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_a_valid_serve_config_with_every_knob(path):
    raw = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") else None
    schema = schema or ServeDeploySchema.parse_obj(raw)
    (app,) = schema.applications
    assert app.import_path == "deployments.app:build_app"
    AppConfig.model_validate(app.args)
    deployments = {d["name"]: d for d in raw["applications"][0]["deployments"]}
    if path.name == "local.yaml":  # the GPU config's models are paths this machine lacks
        assert set(deployments) == deployment_names(app.args)
    assert set(deployments) >= STAGES
    for name, d in deployments.items():
        for key in ("autoscaling_config", "max_ongoing_requests", "max_queued_requests", "ray_actor_options"):
            assert key in d, f"{path.name}: {name} lacks {key}"


def test_gpu_config_puts_the_denoiser_on_a_whole_gpu_and_packs_the_rest():
    raw = yaml.safe_load((CONFIGS[0].parent / "gpu-flux-dev.yaml").read_text())
    gpus = {d["name"]: d["ray_actor_options"].get("num_gpus", 0) for d in raw["applications"][0]["deployments"]}
    assert gpus["Denoiser"] == 1 and gpus["Ingress"] == 0
    assert 0 < gpus["TextEncoder"] < 1 and 0 < gpus["VAEDecoder"] < 1 and 0 < gpus["VAEEncoder"] < 1
    assert gpus["TextEncoder"] + gpus["VAEDecoder"] + gpus["VAEEncoder"] <= 1
    assert raw["applications"][0]["args"]["served_model_name"] == "flux-dev"


def test_local_config_is_cpu_only_on_port_8000_with_the_tiny_model():
    raw = yaml.safe_load((CONFIGS[0].parent / "local.yaml").read_text())
    assert raw["http_options"]["port"] == 8000
    app = raw["applications"][0]
    assert app["args"]["model"] == "tiny" and app["args"]["device"] == "cpu"
    assert all("num_gpus" not in d["ray_actor_options"] for d in app["deployments"])


def test_builder_takes_a_dict_and_names_the_five_stages():
    assert deployment_names({"model": "tiny", "device": "cpu"}) == STAGES
    ingress = build_app({"model": "tiny", "device": "cpu"})._bound_deployment
    encoder, denoisers, *rest = ingress.init_args[1:]
    assert len(denoisers) == 1
    stages = [encoder, *denoisers, *rest]
    assert all(a._bound_deployment.init_args[0]["model"] == "tiny" for a in stages)


def test_builder_makes_a_denoiser_per_model_and_one_of_every_other_stage():
    args = {"model": "tiny", "models": ["tiny-kontext", "tiny-fill"], "device": "cpu"}
    assert deployment_names(args) == STAGES | {"Denoiser-tiny-kontext", "Denoiser-tiny-fill"}
    ingress = build_app(args)._bound_deployment
    denoisers = ingress.init_args[2]
    assert [d._bound_deployment.init_args[0]["model"] for d in denoisers] == ["tiny", "tiny-kontext", "tiny-fill"]


@pytest.mark.parametrize(
    "models,message",
    [
        (["tiny"], "served twice"),
        (["random:flux-dev"], "cannot share"),
        (["random:tiny"], "weights differ"),
    ],
)
def test_models_that_cannot_share_the_encoders_are_refused(models, message):
    """What the ingress checks at start (a deploy with such models fails there, naming them)."""
    from deployments.config import served_models

    with pytest.raises(ValueError, match=message):
        served_models(AppConfig(model="tiny", models=models, device="cpu"))


@pytest.mark.parametrize(
    "args,field",
    [
        ({"default_size": "huge"}, "default_size"),
        ({"dtype": "int8"}, "dtype"),
        ({"colour": 1}, "colour"),
        ({"object_store": {"bucket": ""}}, "bucket"),
        ({"max_pending_requests": 0}, "max_pending_requests"),
    ],
)
def test_bad_app_args_are_refused_naming_the_field(args, field):
    with pytest.raises(ValidationError, match=field):
        AppConfig.model_validate(args)
