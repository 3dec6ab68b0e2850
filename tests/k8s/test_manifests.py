"""The KubeRay manifests under k8s/: what the API server would accept (KubeRay's CRDs and Kubernetes'
own schemas, unknown fields rejected), rendered from the project's serve configs, and consistent with
the image, the Secrets and the offline job's own resource check."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import re
import shlex
import sys
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from kubernetes_validate import utils as kubernetes_validate
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from jobs.config import UsageError, load_config
from jobs.generate import check_resources, resource_needs

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CRDS = K8S / "crds"  # KubeRay's own CRDs, vendored (k8s/crds/README.md says from where and how to refresh)
CONFIGS = ROOT / "deployments" / "configs"
DOCKERFILE = ROOT / "cluster" / "Dockerfile"
LAUNCHER = ROOT / "cluster" / "gpu-cluster.yaml"
KUBERNETES_VERSION = "1.33"


def load_render():
    """k8s/render.py, a script rather than a package module."""
    spec = importlib.util.spec_from_file_location("k8s_render", K8S / "render.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
    spec.loader.exec_module(module)
    return module


render = load_render()
MANIFESTS = sorted(p for p in K8S.rglob("*.yaml") if CRDS not in p.parents)
DOCS = [(path, doc) for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]
RAY_DOCS = [(path, doc) for path, doc in DOCS if doc["apiVersion"] == "ray.io/v1"]
SECRETS = {doc["metadata"]["name"]: doc for doc in yaml.safe_load_all((K8S / "secrets.example.yaml").read_text())}


def name(item) -> str:
    path, doc = item
    return f"{path.relative_to(K8S)}:{doc['kind']}"


def cluster_spec(doc: dict) -> dict:
    return doc["spec"].get("rayClusterConfig") or doc["spec"]["rayClusterSpec"]


def pod_templates(doc: dict) -> list[dict]:
    spec = cluster_spec(doc)
    templates = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]
    return templates + ([doc["spec"]["submitterPodTemplate"]] if "submitterPodTemplate" in doc["spec"] else [])


def containers(doc: dict) -> list[dict]:
    return [c for t in pod_templates(doc) for c in t["spec"].get("initContainers", []) + t["spec"]["containers"]]


def is_gpu(path: Path) -> bool:
    return path.parent == K8S  # k8s/*.yaml; the CPU-only variant is k8s/cpu-tiny/


# --- validators ---------------------------------------------------------------------------------


def structural(schema: dict) -> dict:
    """A CRD schema as the API server applies it: an unknown field is an error (kubectl's strict field
    validation; a structural schema would otherwise drop it silently), an int-or-string takes either."""
    s = dict(schema)
    if s.pop("x-kubernetes-int-or-string", False):
        s.pop("type", None)
        s.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if "properties" in s:
        s["properties"] = {key: structural(value) for key, value in s["properties"].items()}
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = structural(s["additionalProperties"])
    if isinstance(s.get("items"), dict):
        s["items"] = structural(s["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in s:
            s[key] = [structural(sub) for sub in s[key]]
    return s


@cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    for path in CRDS.glob("*.yaml"):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        if crd["spec"]["names"]["kind"] == kind:
            (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
            return jsonschema.Draft7Validator(structural(v1["schema"]["openAPIV3Schema"]))
    raise AssertionError(f"no CRD for {kind} in {CRDS}")


def crd_errors(doc: dict) -> list[str]:
    errors = crd_validator(doc["kind"]).iter_errors(doc)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def core_objects(doc: dict) -> list[dict]:
    """The Kubernetes objects inside a manifest, as the API server (or the operator) will create them."""
    if doc["apiVersion"] != "ray.io/v1":
        return [doc]
    # The CRDs leave metadata free-form; the API server checks it as any object's.
    objects = [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}]
    for template in pod_templates(doc):
        meta = {"name": "pod", **template.get("metadata", {})}
        objects.append({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": template["spec"]})
    if "serveService" in doc["spec"]:
        objects.append({"apiVersion": "v1", "kind": "Service", **doc["spec"]["serveService"]})
    return objects


def core_errors(obj: dict) -> list[str]:
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{obj['kind']} {'.'.join(map(str, e.absolute_path))}: {e.message}"]
    return []


# --- the validators themselves ----------------------------------------------------------------


def test_the_validators_reject_an_unknown_field_and_a_wrong_type():
    (service,) = [d for p, d in RAY_DOCS if p == K8S / "rayservice.yaml"]
    assert crd_errors(service) == []

    unknown = copy.deepcopy(service)
    cluster_spec(unknown)["headGroupSpec"]["rayStartParam"] = {"num-cpus": "0"}  # a typo'd field
    assert any("rayStartParam" in e for e in crd_errors(unknown))

    wrong_type = copy.deepcopy(service)
    cluster_spec(wrong_type)["workerGroupSpecs"][0]["maxReplicas"] = "nine"
    assert any("maxReplicas" in e and "integer" in e for e in crd_errors(wrong_type))

    int_or_string = copy.deepcopy(service)  # a quantity may be a number or a string
    cluster_spec(int_or_string)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"] = {
        "limits": {"cpu": 8, "memory": "64Gi"}
    }
    assert crd_errors(int_or_string) == []

    pod = core_objects(service)[2]
    assert pod["kind"] == "Pod" and core_errors(pod) == []
    bad = copy.deepcopy(pod)
    bad["spec"]["containers"][0]["imagePullPolice"] = "Always"
    assert any("imagePullPolice" in e for e in core_errors(bad))
    bad = copy.deepcopy(pod)
    bad["spec"]["containers"][0]["readinessProbe"]["periodSeconds"] = "often"
    assert any("periodSeconds" in e for e in core_errors(bad))


# --- the manifests --------------------------------------------------------------------------------


def test_the_manifests_are_their_rendering():
    rendered = render.render()
    assert set(rendered) | {K8S / "secrets.example.yaml", K8S / "redis.yaml"} == set(MANIFESTS)  # two by hand
    for path, text in rendered.items():
        assert path.read_text() == text, f"{path.relative_to(ROOT)} is stale: run `python k8s/render.py`"


@pytest.mark.parametrize("item", RAY_DOCS, ids=name)
def test_ray_resources_validate_against_the_kuberay_crds(item):
    _, doc = item
    assert crd_errors(doc) == []


@pytest.mark.parametrize("item", DOCS, ids=name)
def test_kubernetes_objects_validate_against_the_kubernetes_schemas(item):
    _, doc = item
    objects = core_objects(doc)
    assert [e for obj in objects for e in core_errors(obj)] == []
    assert len(objects) >= (3 if doc["apiVersion"] == "ray.io/v1" else 1)


def serve_config(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


SERVICES = [(p, d) for p, d in RAY_DOCS if d["kind"] == "RayService"]
JOBS = [(p, d) for p, d in RAY_DOCS if d["kind"] == "RayJob"]


def test_service_serve_configs_are_the_project_configs():
    configs = {p.relative_to(K8S).as_posix(): serve_config(d) for p, d in SERVICES}
    # The differences: async jobs in the RayService's Redis, and (tiny) listening on the pod's address.
    gpu = yaml.safe_load((CONFIGS / "gpu-flux-dev.yaml").read_text())
    gpu["applications"][0]["args"]["job_store"] = render.JOB_STORE
    assert configs["rayservice.yaml"] == gpu
    local = yaml.safe_load((CONFIGS / "local.yaml").read_text())
    local["http_options"]["host"] = "0.0.0.0"
    local["applications"][0]["args"]["job_store"] = render.JOB_STORE
    assert configs["cpu-tiny/rayservice.yaml"] == local


@pytest.mark.parametrize("item", SERVICES, ids=name)
def test_serve_config_is_valid_for_serve_and_its_import_path_builds_the_app(item):
    _, doc = item
    schema = ServeDeploySchema.model_validate(serve_config(doc))
    assert schema.http_options.host == "0.0.0.0" and schema.http_options.port == 8000
    for app in schema.applications:
        assert not app.runtime_env, "pods must not install anything at start"
        module, attribute = app.import_path.split(":")
        builder = getattr(importlib.import_module(module), attribute)
        assert isinstance(builder(app.args), Application)


def serve_demand(config: dict, bound: str) -> tuple[float, float]:
    """CPUs and GPUs that every deployment at its min (or max) replicas asks for."""
    cpus = gpus = 0.0
    for d in config["applications"][0]["deployments"]:
        replicas = d["autoscaling_config"][f"{bound}_replicas"]
        cpus += replicas * d["ray_actor_options"].get("num_cpus", 1)
        gpus += replicas * d["ray_actor_options"].get("num_gpus", 0)
    return cpus, gpus


def worker_capacity(group: dict, replicas: int) -> tuple[float, float]:
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return replicas * float(limits["cpu"]), replicas * float(limits.get("nvidia.com/gpu", 0))


@pytest.mark.parametrize("item", RAY_DOCS, ids=name)
def test_head_runs_nothing_and_workers_carry_the_work(item):
    path, doc = item
    spec = cluster_spec(doc)
    assert spec["rayVersion"] == render.RAY_VERSION
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        resources = group["template"]["spec"]["containers"][0]["resources"]
        if is_gpu(path):  # a GPU group requests what it limits (extended resources must)
            assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] >= 1
        else:
            assert "nvidia.com/gpu" not in json.dumps(doc)
    (group,) = spec["workerGroupSpecs"]
    if doc["kind"] == "RayService":
        assert spec["enableInTreeAutoscaling"] is True and group["maxReplicas"] > group["minReplicas"]
        config = serve_demand(serve_config(doc), "min"), serve_demand(serve_config(doc), "max")
        for (cpus, gpus), replicas in zip(config, (group["minReplicas"], group["maxReplicas"])):
            capacity_cpus, capacity_gpus = worker_capacity(group, replicas)
            assert cpus <= capacity_cpus and gpus <= capacity_gpus
    else:  # a fixed cluster that the job's own start-up check accepts
        assert group["minReplicas"] == group["maxReplicas"]
        argv = shlex.split(doc["spec"]["entrypoint"])
        assert argv[:3] == ["python", "-m", "jobs.generate"]
        needs = resource_needs(load_config(argv[3:]))
        whole = dict(zip(("CPU", "GPU"), worker_capacity(group, group["replicas"])))
        check_resources(needs, whole, whole)
        with pytest.raises(UsageError):  # and would refuse a cluster one worker short
            short = dict(zip(("CPU", "GPU"), worker_capacity(group, group["replicas"] - 1)))
            check_resources(needs, short, short)


@pytest.mark.parametrize("item", SERVICES, ids=name)
def test_only_the_serve_port_is_exposed_and_pods_wait_for_the_app(item):
    _, doc = item
    service = doc["spec"]["serveService"]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "serve", "port": 8000, "targetPort": 8000}]
    # No other Service anywhere but Redis's, inside the cluster (ClusterIP) for the head's GCS.
    others = [d for p, d in DOCS if d["kind"] == "Service"]
    assert [(d["metadata"]["name"], d["spec"]["type"]) for d in others] == [("fluxray-redis", "ClusterIP")]
    head = cluster_spec(doc)["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")
    for template in pod_templates(doc):
        for c in template["spec"]["containers"]:
            assert all("hostPort" not in port for port in c.get("ports", []))
    for group in cluster_spec(doc)["workerGroupSpecs"]:
        probe = group["template"]["spec"]["containers"][0]["readinessProbe"]
        assert probe["httpGet"] == {"path": "/healthz", "port": 8000}


def secret_refs(value) -> list[tuple[str, str]]:
    """(secret, key) of every secretKeyRef and authOptions.secretName in a manifest."""
    if isinstance(value, list):
        return [ref for item in value for ref in secret_refs(item)]
    if not isinstance(value, dict):
        return []
    refs = [(value["secretKeyRef"]["name"], value["secretKeyRef"]["key"])] if "secretKeyRef" in value else []
    if "authOptions" in value:
        refs.append((value["authOptions"]["secretName"], render.RAY_AUTH_KEY))
    return refs + [ref for item in value.values() for ref in secret_refs(item)]


def env(container: dict) -> dict:
    return {e["name"]: e.get("value") or e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])}


@pytest.mark.parametrize("item", RAY_DOCS, ids=name)
def test_secrets_come_from_secrets_that_the_example_defines(item):
    _, doc = item
    refs = set(secret_refs(doc))
    assert refs and all(key in SECRETS[secret]["stringData"] for secret, key in refs), refs
    # Every Secret is used; a RayJob's cluster keeps its GCS in memory and needs no Redis password.
    needed = set(SECRETS) - ({render.REDIS_SECRET} if doc["kind"] == "RayJob" else set())
    assert {secret for secret, _ in refs} == needed
    assert {s for s, _ in secret_refs([d for _, d in RAY_DOCS])} == set(SECRETS)
    assert cluster_spec(doc)["authOptions"] == {"mode": "token", "secretName": render.RAY_AUTH_SECRET}
    for template in pod_templates(doc):
        for c in template["spec"]["containers"]:  # every Ray process (and the job submitter) needs the token
            assert env(c)["RAY_AUTH_MODE"] == "token" and env(c)["RAY_AUTH_TOKEN"] == render.RAY_AUTH_SECRET
            if c["name"] != "ray-job-submitter":
                assert env(c)["FLUXRAY_API_KEYS"] == render.API_KEYS_SECRET
                assert env(c)["AWS_SECRET_ACCESS_KEY"] == render.S3_SECRET
    secret_names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN", "FLUXRAY_API_KEYS")
    literal = [e["name"] for c in containers(doc) for e in c.get("env", []) if "value" in e]
    assert not set(literal) & set(secret_names)  # a credential only ever comes from a Secret


@pytest.mark.parametrize("item", SERVICES, ids=name)
def test_a_service_keeps_its_gcs_in_redis_with_the_password_from_a_secret(item):
    _, doc = item
    options = cluster_spec(doc)["gcsFaultToleranceOptions"]
    assert options["redisAddress"] == render.REDIS_ADDRESS
    ref = {"name": render.REDIS_SECRET, "key": render.REDIS_PASSWORD_KEY}
    assert options["redisPassword"] == {"valueFrom": {"secretKeyRef": ref}}
    assert "password" in SECRETS[render.REDIS_SECRET]["stringData"]
    # No namespace of our own: KubeRay's default, the RayCluster's UID, keeps an upgrade's two clusters apart.
    assert "externalStorageNamespace" not in options
    # KubeRay refuses a RayCluster that also sets Redis by hand beside gcsFaultToleranceOptions.
    head = cluster_spec(doc)["headGroupSpec"]
    assert not {"redis-password", "redis-username"} & set(head["rayStartParams"])
    for template in pod_templates(doc):
        for c in template["spec"]["containers"]:
            assert not {"RAY_REDIS_ADDRESS", "REDIS_PASSWORD", "REDIS_USERNAME"} & set(env(c))


def test_the_redis_manifest_is_the_one_the_services_name():
    docs = {d["kind"]: d for p, d in DOCS if p == K8S / "redis.yaml"}
    host, port = render.REDIS_ADDRESS.split(":")
    assert docs["Service"]["metadata"]["name"] == host
    assert [p["port"] for p in docs["Service"]["spec"]["ports"]] == [int(port)]
    assert docs["Service"]["spec"]["selector"] == docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    (redis,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    ref = {"name": render.REDIS_SECRET, "key": render.REDIS_PASSWORD_KEY}
    assert {"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": ref}} in redis["env"]
    assert '--requirepass "$REDIS_PASSWORD"' in redis["command"][-1]


@pytest.mark.parametrize("item", JOBS, ids=name)
def test_a_jobs_cluster_keeps_its_gcs_in_memory(item):
    # Its driver runs on the head: a head crash ends the job with or without Redis (k8s/render.py says more).
    _, doc = item
    assert "gcsFaultToleranceOptions" not in cluster_spec(doc)


def test_nothing_is_installed_at_start():
    install = re.compile(r"\b(pip3?|uv|conda|apt(-get)?)\b.*\binstall\b")
    for path, doc in RAY_DOCS:
        assert "runtimeEnvYAML" not in doc["spec"], path
        for c in containers(doc):
            assert not install.search(" ".join(c.get("command", []) + c.get("args", []))), (path, c["name"])
        assert not install.search(doc["spec"].get("entrypoint", ""))
    launcher = yaml.safe_load(LAUNCHER.read_text())
    commands = [c for key, v in launcher.items() if key.endswith("commands") for c in v]
    assert launcher["setup_commands"] == [] and not any(install.search(c) for c in commands)


def test_the_image_the_manifests_and_the_launcher_agree_on_ray_and_the_image():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE=rayproject/ray:(\d+\.\d+\.\d+)-py311-gpu$", text, re.M)
    pin = re.search(r'"ray\[serve,data\]==(\d+\.\d+\.\d+)"', text)
    assert base and pin and re.search(r"^FROM \$\{BASE\}$", text, re.M)
    assert base[1] == pin[1] == render.RAY_VERSION == ray.__version__  # the tests run the image's Ray
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert "pip install" not in "".join(re.findall(r"^(?:CMD|ENTRYPOINT).*$", text, re.M))
    for path, doc in RAY_DOCS:
        image = render.IMAGE if is_gpu(path) else render.TINY_IMAGE
        assert {c["image"] for c in containers(doc) if c["name"] != "fetch-model"} == {image}
    launcher = yaml.safe_load(LAUNCHER.read_text())
    assert launcher["docker"]["image"] == render.IMAGE


def test_the_vm_cluster_is_a_valid_launcher_config_with_the_same_shape():
    launcher = yaml.safe_load(LAUNCHER.read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(launcher, schema)
    head_start = " ".join(launcher["head_start_ray_commands"])
    assert "--num-cpus=0" in head_start and "ray stop --force" not in head_start
    assert "RAY_AUTH_MODE=token" in " ".join(launcher["docker"]["run_options"])
    gpu = launcher["available_node_types"]["gpu"]
    (service,) = [d for p, d in SERVICES if is_gpu(p)]
    (group,) = cluster_spec(service)["workerGroupSpecs"]
    assert (gpu["min_workers"], gpu["max_workers"]) == (group["minReplicas"], group["maxReplicas"])
    assert gpu["resources"]["GPU"] >= 1


@pytest.mark.parametrize("item", SERVICES, ids=name)
def test_a_cluster_change_upgrades_through_a_whole_new_cluster(item):
    # A new RayCluster takes the traffic only once its application runs: no request crosses an old stage
    # and a new one, which a rolling update of the stages inside one cluster cannot promise.
    _, doc = item
    assert doc["spec"]["upgradeStrategy"] == {"type": "NewCluster"}


@pytest.mark.parametrize("item", SERVICES, ids=name)
def test_a_service_keeps_its_async_jobs_in_its_redis(item):
    _, doc = item
    (app,) = serve_config(doc)["applications"]
    assert app["args"]["job_store"] == render.JOB_STORE and render.JOB_STORE.startswith(
        f"redis://{render.REDIS_ADDRESS}/"
    )
    for template in pod_templates(doc):
        for c in template["spec"]["containers"]:
            assert env(c)[render.JOB_STORE_PASSWORD_ENV] == render.REDIS_SECRET
