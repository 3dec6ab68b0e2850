"""Render the KubeRay manifests under k8s/ from the serve configs, so that they never drift apart.

    python k8s/render.py           # rewrite k8s/rayservice.yaml, rayjob.yaml and k8s/cpu-tiny/*.yaml
    python k8s/render.py --check   # exit 1 if a committed manifest differs from its rendering

A RayService's `serveConfigV2` is the text of a serve config, comments included:
`deployments/configs/gpu-flux-dev.yaml` for the GPU manifests, `local.yaml` with its http host
set to 0.0.0.0 for the CPU-only `cpu-tiny` variant (kind, minikube). Everything else is below, with
the reasons (GCS fault tolerance on Redis included); `k8s/secrets.example.yaml` (written by hand) holds
the Secrets the manifests name.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CONFIGS = ROOT / "deployments" / "configs"

RAY_VERSION = "2.60.0"  # = the Dockerfile's base image and ray pin (a test checks)
IMAGE = "registry.example.com/fluxray:0.1.0"  # PARAMETER: where you push cluster/Dockerfile's image
TINY_IMAGE = "fluxray:0.1.0"  # the same Dockerfile built for the CPU, loaded into kind/minikube
MODEL_URI = "s3://YOUR-BUCKET/models/FLUX.1-dev/"  # PARAMETER: FLUX.1-dev in diffusers layout
JOB_INPUT = "s3://YOUR-BUCKET/prompts/"  # PARAMETER: the offline job's prompt file or prefix
JOB_OUTPUT = "s3://YOUR-BUCKET/runs/run-001/"  # PARAMETER: where its images, metadata and manifest go

# The Secrets (see secrets.example.yaml). The Ray token's key is `auth_token` because KubeRay's
# authOptions.secretName expects that key.
RAY_AUTH_SECRET, RAY_AUTH_KEY = "fluxray-ray-auth", "auth_token"
API_KEYS_SECRET, API_KEYS_KEY = "fluxray-api-keys", "api-keys"
S3_SECRET = "fluxray-s3"

# GCS fault tolerance, on the RayService. The head's GCS holds the cluster's tables (nodes, actors and
# their names, placement groups, jobs, the internal key-value store where Serve's controller keeps its
# applications); by default in the head's memory, so a head crash (the pod OOM-killed or evicted, its
# node lost) loses them: KubeRay's new head starts an empty cluster, the workers are restarted and every
# replica loads its weights again. With the tables in Redis, the workers outlive the head: replicas and
# actors keep running and the proxies keep serving while KubeRay starts a new head, whose GCS reloads the
# tables and takes the workers and actors back; Serve's controller is restarted then. While the head is
# down nothing needs the GCS that can be done: no actor creation, no autoscaling, no new node.
# What it costs: a Redis to run and keep highly available (one shard: KubeRay supports a standalone Redis,
# with persistence, or losing Redis is losing the head), its password in a Secret, and, on every RayCluster
# deletion (an upgrade's old cluster too), a cleanup Job that KubeRay runs to delete the cluster's keys.
# KubeRay sets the rest itself: RAY_REDIS_ADDRESS and the password on the head, a 600 s wait for a lost GCS
# on the workers (RAY_gcs_rpc_server_reconnect_timeout_s), and, as externalStorageNamespace is left out, the
# RayCluster's UID as the namespace of its keys, so that the two clusters of a zero-downtime upgrade, which
# run side by side, never share keys.
# The RayJob has none: its driver runs on the head (Ray pins a job's entrypoint there when it asks for no
# resources), so a head crash ends the job with or without it, and Ray supports GCS fault tolerance for
# Serve only. A failed job is retried on a fresh cluster instead (backoffLimit), skipping what it wrote.
REDIS_ADDRESS = "fluxray-redis:6379"  # PARAMETER: your Redis's host:port (the CRD takes it as a value only)
REDIS_SECRET, REDIS_PASSWORD_KEY = "fluxray-redis", "password"
GCS_FAULT_TOLERANCE = {
    "redisAddress": REDIS_ADDRESS,
    "redisPassword": {"valueFrom": {"secretKeyRef": {"name": REDIS_SECRET, "key": REDIS_PASSWORD_KEY}}},
}
# The RayService's async jobs live in the same Redis, database 1 (the GCS keeps its tables in database 0):
# shared by every ingress replica and kept when one dies. The password comes from the same Secret, into
# the variable the app's job_store_password_env names (its default).
JOB_STORE = f"redis://{REDIS_ADDRESS}/1"
JOB_STORE_PASSWORD_ENV = "FLUXRAY_JOB_STORE_PASSWORD"


def secret_env(name: str, secret: str, key: str, optional: bool = False) -> dict:
    ref = {"name": secret, "key": key, **({"optional": True} if optional else {})}
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


# Token auth is set twice on purpose: authOptions lets the operator authenticate its own calls to
# the dashboard (deploying serveConfigV2, submitting the job), and the explicit env on every
# container keeps the pods right with an operator that does not inject it (it skips a set var).
AUTH_ENV = [
    {"name": "RAY_AUTH_MODE", "value": "token"},
    secret_env("RAY_AUTH_TOKEN", RAY_AUTH_SECRET, RAY_AUTH_KEY),
]
S3_ENV = [
    secret_env("AWS_ACCESS_KEY_ID", S3_SECRET, "AWS_ACCESS_KEY_ID"),
    secret_env("AWS_SECRET_ACCESS_KEY", S3_SECRET, "AWS_SECRET_ACCESS_KEY"),
    # Optional: region and an S3-compatible endpoint (MinIO, R2, ...); unset means AWS defaults.
    secret_env("AWS_DEFAULT_REGION", S3_SECRET, "AWS_DEFAULT_REGION", optional=True),
    secret_env("AWS_ENDPOINT_URL", S3_SECRET, "AWS_ENDPOINT_URL", optional=True),
]
RAY_ENV = [*AUTH_ENV, secret_env("FLUXRAY_API_KEYS", API_KEYS_SECRET, API_KEYS_KEY), *S3_ENV]

# The official Ray images run as `ray` (uid 1000, group users = 100); fsGroup makes volumes writable.
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 100, "fsGroup": 100}
# Ray's object store lives in /dev/shm, which container runtimes cap at 64 MB unless a volume is mounted.
SHM_VOLUME = {"name": "dshm", "emptyDir": {"medium": "Memory"}}
SHM_MOUNT = {"name": "dshm", "mountPath": "/dev/shm"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


@dataclass(frozen=True)
class Variant:
    """What differs between the GPU manifests and the CPU-only tiny ones."""

    directory: Path
    serve_config: str  # serveConfigV2's text
    image: str
    head: dict  # resources
    group: str  # worker group name
    worker: dict  # resources
    replicas: tuple[int, int]  # the RayService worker group's min and max replicas
    job_workers: int  # the RayJob's fixed number of workers
    entrypoint: str
    job_deadline_s: int
    gpu: bool


def resources(cpu: str, memory: str, gpus: int = 0) -> dict:
    # Requests = limits (Guaranteed QoS); KubeRay passes the limits to `ray start` as --num-cpus/--num-gpus.
    amounts = {"cpu": cpu, "memory": memory, **({"nvidia.com/gpu": gpus} if gpus else {})}
    return {"requests": dict(amounts), "limits": dict(amounts)}


def gpu_serve_config() -> str:
    return (CONFIGS / "gpu-flux-dev.yaml").read_text()


def with_job_store(text: str) -> str:
    """A serve config's text with its application's async jobs in the RayService's Redis."""
    assert text.count("\n    args:\n") == 1, "a serve config's args moved: update k8s/render.py"
    line = f"      job_store: {JOB_STORE}  # added by k8s/render.py: async jobs in the RayService's Redis\n"
    return text.replace("\n    args:\n", "\n    args:\n" + line)


def tiny_serve_config() -> str:
    # In a pod the proxy must listen on the pod's address, not loopback; nothing else changes.
    text = (CONFIGS / "local.yaml").read_text()
    assert text.count("host: 127.0.0.1") == 1, "local.yaml's http host moved: update k8s/render.py"
    return text.replace("host: 127.0.0.1", "host: 0.0.0.0")


GPU = Variant(
    directory=K8S,
    serve_config=gpu_serve_config(),
    image=IMAGE,
    head=resources("4", "16Gi"),
    group="gpu",
    # One GPU per pod: a Denoiser replica (4 CPUs) owns one; TextEncoder + VAEDecoder + Ingress share one.
    worker=resources("8", "64Gi", gpus=1),
    # min 2: one Denoiser, and the shared stages; max 10: the config's 8 Denoisers, and its 4 TextEncoders
    # and 4 VAEDecoders (1.6 GPUs) on two more.
    replicas=(2, 10),
    job_workers=5,  # the entrypoint's 4 x 1 + 0.3 + 0.1 GPUs
    entrypoint=(
        f"python -m jobs.generate --input {JOB_INPUT} --output {JOB_OUTPUT} --model /models/FLUX.1-dev"
        " --dtype bfloat16 --encode-actors 1 --encode-gpus 0.3 --encode-cpus 2"
        " --denoise-actors 4 --denoise-gpus 1 --denoise-cpus 4 --denoise-batch-size 4"
        " --decode-actors 1 --decode-gpus 0.1 --decode-cpus 2 --write-actors 2 --write-cpus 1"
    ),
    job_deadline_s=24 * 3600,
    gpu=True,
)
TINY = Variant(
    directory=K8S / "cpu-tiny",
    serve_config=tiny_serve_config(),
    image=TINY_IMAGE,
    head=resources("1", "3Gi"),
    group="cpu",
    worker=resources("2", "4Gi"),  # the tiny config's stages take 1.5 CPUs, the job's 1.8
    replicas=(1, 2),
    job_workers=1,
    # The job reads the example prompts baked into the image and writes to the node's /tmp (below).
    entrypoint=(
        "python -m jobs.generate --input /home/ray/fluxray/examples/prompts.jsonl"
        " --output /node-tmp/fluxray-output/run-001 --model tiny --device cpu --torch-threads 1"
    ),
    job_deadline_s=1800,
    gpu=False,
)


def model_sync(head: bool) -> dict:
    """An initContainer that copies the weights from S3 to the `models` volume before Ray starts.

    Workers get everything but the single-file checkpoints (a diffusers directory never reads them);
    the job's head gets only the small files: its driver resolves the model (model_index.json, configs).
    """
    excludes = ["*.safetensors"] if head else ["flux1-*.safetensors", "ae.safetensors"]
    exclude_args = " ".join(f"--exclude '{pattern}'" for pattern in excludes)
    return {
        "name": "fetch-model",
        "image": "amazon/aws-cli:2.22.0",
        "command": ["sh", "-c", f'aws s3 sync "$MODEL_URI" /models/FLUX.1-dev --only-show-errors {exclude_args}'],
        "env": [{"name": "MODEL_URI", "value": MODEL_URI}, {"name": "HOME", "value": "/tmp"}, *S3_ENV],
        "volumeMounts": [{"name": "models", "mountPath": "/models"}],
        "resources": resources("2", "2Gi"),
    }


# The model weights live on a node-local emptyDir filled by model_sync at pod start. Alternative:
# a ReadOnlyMany PersistentVolumeClaim filled once, `persistentVolumeClaim: {claimName: flux-dev,
# readOnly: true}` in place of this emptyDir, and no fetch-model initContainer.
MODELS_VOLUME = {"name": "models", "emptyDir": {"sizeLimit": "100Gi"}}
MODELS_MOUNT = {"name": "models", "mountPath": "/models", "readOnly": True}
# kind/minikube: the tiny job writes to the node's /tmp, which every pod of a one-node cluster shares
# and the non-root Ray user can write (a multi-node cluster writes to s3:// instead).
NODE_TMP_VOLUME = {"name": "node-tmp", "hostPath": {"path": "/tmp", "type": "Directory"}}
NODE_TMP_MOUNT = {"name": "node-tmp", "mountPath": "/node-tmp"}

# Ready once this pod's Serve proxy routes /healthz to a live Ingress. KubeRay itself puts pods in the
# serve Service only after every deployment of the application, weights loaded, is RUNNING.
SERVE_READINESS = {
    "httpGet": {"path": "/healthz", "port": 8000},
    "initialDelaySeconds": 10,
    "periodSeconds": 10,
    "timeoutSeconds": 5,
    "failureThreshold": 6,
}


def pod(variant: Variant, container: dict, head: bool, job: bool) -> dict:
    volumes, mounts, init = [SHM_VOLUME], [SHM_MOUNT], []
    if variant.gpu and (job or not head):  # the service's head runs no replica and needs no weights
        volumes.append(MODELS_VOLUME)
        mounts.append(MODELS_MOUNT)
        init.append(model_sync(head))
    if job and not variant.gpu:
        volumes.append(NODE_TMP_VOLUME)
        mounts.append(NODE_TMP_MOUNT)
    spec = {
        **({"initContainers": init} if init else {}),
        "containers": [{**container, "volumeMounts": mounts}],
        "volumes": volumes,
        "securityContext": POD_SECURITY,
    }
    if variant.gpu and not head:
        spec["tolerations"] = [GPU_TOLERATION]
    return {"spec": spec}


def container(variant: Variant, name: str, res: dict, readiness: dict | None = None, job: bool = False) -> dict:
    # The service's pods also hold the job store's password (the RayJob runs no ingress).
    env = RAY_ENV if job else [*RAY_ENV, secret_env(JOB_STORE_PASSWORD_ENV, REDIS_SECRET, REDIS_PASSWORD_KEY)]
    return {
        "name": name,
        "image": variant.image,
        "imagePullPolicy": "IfNotPresent",
        "env": env,
        "resources": res,
        **({"readinessProbe": readiness} if readiness else {}),
    }


def cluster(variant: Variant, job: bool) -> dict:
    """The rayClusterConfig (RayService) or rayClusterSpec (RayJob)."""
    # The head runs the GCS, the dashboard, the Serve controller and the job's driver, never a replica
    # or a Ray Data actor: with num-cpus 0 nothing that asks for a CPU is scheduled there.
    head = {
        "rayStartParams": {"num-cpus": "0"},
        "template": pod(variant, container(variant, "ray-head", variant.head, job=job), head=True, job=job),
    }
    low, high = (variant.job_workers, variant.job_workers) if job else variant.replicas
    readiness = None if job else SERVE_READINESS
    worker = {
        "groupName": variant.group,
        "replicas": low,
        "minReplicas": low,
        "maxReplicas": high,
        "rayStartParams": {},
        "template": pod(
            variant, container(variant, "ray-worker", variant.worker, readiness, job=job), head=False, job=job
        ),
    }
    spec = {
        "rayVersion": RAY_VERSION,
        "authOptions": {"mode": "token", "secretName": RAY_AUTH_SECRET},
        # The job's cluster is fixed-size: it checks at start that all its actors fit, and it is
        # deleted when the job ends. The service scales workers between min and max replicas for
        # the replicas that Serve's autoscaling asks for.
        "enableInTreeAutoscaling": not job,
    }
    if not job:
        spec["autoscalerOptions"] = {"upscalingMode": "Default", "idleTimeoutSeconds": 600, "env": AUTH_ENV}
        spec["gcsFaultToleranceOptions"] = GCS_FAULT_TOLERANCE
    return {**spec, "headGroupSpec": head, "workerGroupSpecs": [worker]}


def metadata(name: str) -> dict:
    return {"name": name, "labels": {"app.kubernetes.io/name": "fluxray"}}


def ray_resource(kind: str, name: str, spec: dict) -> dict:
    return {"apiVersion": "ray.io/v1", "kind": kind, "metadata": metadata(name), "spec": spec}


def rayservice(variant: Variant) -> dict:
    return ray_resource(
        "RayService",
        "fluxray",
        {
            "serveConfigV2": with_job_store(variant.serve_config),
            # The head has no replica; its proxy would only add a hop.
            "excludeHeadPodFromServeSvc": True,
            # The one Service for clients: Serve's port only. The operator sets its selector to the pods
            # whose proxy is ready; the head Service (dashboard, GCS, client) stays ClusterIP-internal.
            "serveService": {
                "metadata": metadata("fluxray-serve"),
                "spec": {"type": "ClusterIP", "ports": [{"name": "serve", "port": 8000, "targetPort": 8000}]},
            },
            # A change of rayClusterConfig (image, resources, env) gets a whole new cluster, which takes
            # the traffic only once its application is RUNNING, then the old one is deleted: no request
            # ever crosses an old stage and a new one. A change of serveConfigV2 alone is deployed onto
            # the running cluster (Serve's own rolling update; docs/reliability.md, "Rollouts").
            "upgradeStrategy": {"type": "NewCluster"},
            "rayClusterConfig": cluster(variant, job=False),
        },
    )


def rayjob(variant: Variant) -> dict:
    submitter = {
        "name": "ray-job-submitter",
        "image": variant.image,
        "imagePullPolicy": "IfNotPresent",
        "env": AUTH_ENV,
        "resources": resources("500m", "1Gi"),
    }
    return ray_resource(
        "RayJob",
        "fluxray-generate",
        {
            "entrypoint": variant.entrypoint,
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,  # delete the Ray cluster when the job ends ...
            "ttlSecondsAfterFinished": 3600,  # ... an hour later, time to read its logs
            "activeDeadlineSeconds": variant.job_deadline_s,
            # A retry runs on a fresh cluster and skips every image already written, so it is safe.
            "backoffLimit": 2,
            # KubeRay fills in the `ray job submit` command; the template only adds the token.
            "submitterPodTemplate": {
                "spec": {"restartPolicy": "Never", "containers": [submitter], "securityContext": POD_SECURITY}
            },
            "rayClusterSpec": cluster(variant, job=True),
        },
    )


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (the embedded serve config) and indented lists."""

    def increase_indent(self, flow: bool = False, indentless: bool = False):
        return super().increase_indent(flow, False)

    def ignore_aliases(self, data) -> bool:  # shared dicts (env, volumes) are written out, not as &anchors
        return True


def _str(dumper: yaml.SafeDumper, value: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def dump(config: str | None, *documents: dict) -> str:
    source = f" (from deployments/configs/{config})" if config else ""
    header = (
        f"# Generated by k8s/render.py{source}: edit the source, then run\n"
        "# `python k8s/render.py`; a test fails while this file differs from its rendering. The parameters\n"
        "# to set (image, s3:// URIs), the Secrets and the reasons behind each setting are in k8s/render.py.\n"
    )
    # A wide line keeps the job's entrypoint on one line rather than folded.
    body = "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=1000) for d in documents)
    return header + body


def render() -> dict[Path, str]:
    """Every generated manifest, by path."""
    files = {}
    for variant, config in ((GPU, "gpu-flux-dev.yaml"), (TINY, "local.yaml")):
        files[variant.directory / "rayservice.yaml"] = dump(config, rayservice(variant))
        files[variant.directory / "rayjob.yaml"] = dump(None, rayjob(variant))
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    args = parser.parse_args()
    stale = []
    for path, text in render().items():
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path.relative_to(ROOT))
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    verb = "differ from their rendering" if args.check else "written"
    print(f"{verb}: {', '.join(map(str, stale))}" if stale else "k8s manifests are up to date")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
