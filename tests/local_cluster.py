"""A real local Ray cluster and a real S3 API server (moto) on loopback, for the tests.

A RayHead (cluster/ray_head.py) started once per test session; the Serve applications (the shipped local
config and two variants) are deployed on it through the dashboard's REST API when a test first needs
them and deleted after the last one; the offline job joins it through RAY_ADDRESS. Both reach the S3
server over HTTP with boto3.
"""

from __future__ import annotations

import base64
import copy
import secrets
import subprocess
import sys
from pathlib import Path

import boto3
import httpx
import yaml

from cluster.ray_head import RayHead, free_port, wait_until

__all__ = ["Cluster", "free_port", "wait_until"]  # the tests import the two helpers from here

ROOT = Path(__file__).resolve().parents[1]
LOCAL_CONFIG = ROOT / "deployments" / "configs" / "local.yaml"
BIN = Path(sys.executable).parent
GUARDED_KEYS = ("key-one-" + secrets.token_hex(8), "key-two-" + secrets.token_hex(8))
GUARDED_AUTH = {"Authorization": f"Bearer {GUARDED_KEYS[0]}"}  # a client of the guarded app, with its key
GUARDED_PIXEL_STEPS = 256 * 256 * 8  # one 256x256 image at 8 steps
JOB_STORE_PASSWORD = secrets.token_hex(16)  # the "shared" app's Redis (tests/deployments/test_jobs_shared.py)
WEBHOOK_SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


class Cluster(RayHead):
    """The session's head (8 logical CPUs), an S3 server beside it, and the Serve applications the
    deployment tests share."""

    def __init__(self, tmp: Path):
        super().__init__(tmp, num_cpus=8, metrics_report_ms=2000)  # metrics show up in seconds, not 10
        self.http_port, self.s3_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.tight_url = f"{self.url}/tight"
        self.guarded_url = f"{self.url}/guarded"
        self.s3_endpoint = f"http://127.0.0.1:{self.s3_port}"
        self.bucket = "fluxray-images"
        self.env.update(
            {
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
                # The guarded application's keys: in every process' environment, as a Secret puts them
                # in a pod's; never in a serve config or runtime_env, which Ray logs.
                "FLUXRAY_GUARDED_KEYS": ",".join(GUARDED_KEYS),
                "FLUXRAY_JOB_STORE_PASSWORD": JOB_STORE_PASSWORD,
                "FLUXRAY_WEBHOOK_SECRET": WEBHOOK_SECRET,
            }
        )
        self.s3_process: subprocess.Popen | None = None
        self.serving = False

    def config(self) -> dict:
        config = yaml.safe_load(LOCAL_CONFIG.read_text())
        config["http_options"]["port"] = self.http_port
        main = config["applications"][0]
        main["args"]["lora_root"] = str(self.loras())
        main["args"]["object_store"] = {
            "bucket": self.bucket,
            "endpoint_url": self.s3_endpoint,
            "region": "us-east-1",
            "prefix": "generated/",
        }
        tight = copy.deepcopy(config["applications"][0])
        tight.update(name="tight", route_prefix="/tight")
        tight["args"] = {
            **tight["args"],
            "request_timeout_s": 4,
            "max_pending_requests": 5,
            "retry_after_s": 7,
            "job_ttl_s": 3,
            "max_queued_jobs": 2,  # tests/deployments/test_async_errors.py fills it
        }
        tight["args"].pop("object_store")
        # One model in the other applications (the main one serves the edit variants beside tiny), and
        # their VAEEncoders scaled to zero: none of their tests edits.
        tight["args"].pop("models")
        tight["args"].pop("lora_root")
        tight["deployments"] = [d for d in tight["deployments"] if not d["name"].startswith("Denoiser-")]
        for deployment in tight["deployments"]:
            deployment["ray_actor_options"] = {"num_cpus": 0.1}
            if deployment["name"] == "Denoiser":
                deployment.update(max_ongoing_requests=2, max_queued_requests=1)
            if deployment["name"] == "Ingress":
                deployment["backpressure_config"] = {"status_code": 503, "retry_after_s": 7}
            if deployment["name"] == "VAEEncoder":
                deployment["autoscaling_config"] = {"min_replicas": 0, "max_replicas": 1}
        config["applications"].append(tight)
        # "guarded": API keys, small limits, and two Denoiser replicas (one gets killed under load).
        guarded = copy.deepcopy(tight)
        guarded.update(name="guarded", route_prefix="/guarded")
        guarded["args"] = {
            **config["applications"][0]["args"],
            "request_timeout_s": 60,
            "max_pending_requests": 24,
            "stage_retries": 3,
            "api_keys_env": "FLUXRAY_GUARDED_KEYS",  # set in the cluster's environment (see start)
            "max_body_bytes": 8192,
            "max_prompt_chars": 300,
            "max_pixel_steps": GUARDED_PIXEL_STEPS,
        }
        guarded["args"].pop("object_store")
        guarded["args"].pop("models")
        guarded["args"].pop("lora_root")
        for deployment in guarded["deployments"]:
            if deployment["name"] == "Denoiser":
                deployment.update(max_ongoing_requests=8, max_queued_requests=16)
                deployment["autoscaling_config"] = {"min_replicas": 2, "max_replicas": 2}
                deployment["ray_actor_options"] = {"num_cpus": 0.5}
        config["applications"].append(guarded)
        return config

    def shared_app(self, redis_port: int) -> dict:
        """The "shared" application: two ingress replicas with their async jobs in one Redis, and
        webhooks to loopback allowed (its Redis password and webhook secret are in the environment)."""
        shared = copy.deepcopy(self.config()["applications"][1])  # tight's small replicas
        shared.update(name="shared", route_prefix="/shared")
        shared["args"] = {
            **self.config()["applications"][0]["args"],
            "job_store": f"redis://127.0.0.1:{redis_port}/0",
            "webhook_allowed_hosts": ["127.0.0.1"],
            "webhook_backoff_s": 0.2,
            "job_lost_after_s": 10,
        }
        shared["args"].pop("object_store")
        shared["args"].pop("models")
        shared["args"].pop("lora_root")
        for deployment in shared["deployments"]:
            if deployment["name"] == "Ingress":
                deployment["autoscaling_config"] = {"min_replicas": 2, "max_replicas": 2}
            if deployment["name"] == "Denoiser":
                deployment.update(max_ongoing_requests=16, max_queued_requests=32)
        return shared

    def loras(self) -> Path:
        """The main application's LoRA directory: the tiny LoRAs (scripts/make_tiny_loras.py), made once."""
        folder = self.tmp / "loras"
        if not folder.exists():
            from scripts.make_tiny_loras import make_tiny_loras

            make_tiny_loras(folder)
            # A LoRA whose keys fit no module of the tiny transformer: requests naming it get a 422.
            import torch
            from safetensors.torch import save_file

            save_file(
                {"transformer.no_such_block.lora_A.weight": torch.zeros(2, 3)}, str(folder / "misfit.safetensors")
            )
        return folder

    def start(self) -> Cluster:
        """The S3 server and the Ray head (no applications yet)."""
        self.s3_process = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.s3_port)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: httpx.get(self.s3_endpoint, timeout=2).status_code < 500, 60, "S3 server", 0.5)
        self.s3().create_bucket(Bucket=self.bucket)
        return super().start()

    def deploy_serve(self) -> None:
        """Deploy the local config (plus the tight and guarded apps) if it is not running."""
        if self.serving:
            return
        self.deploy(self.config())
        self.serving = True

    def shutdown_serve(self) -> None:
        """Delete the applications (after the last test that needs them: their replicas would hold the
        CPUs and memory the later tests need)."""
        super().shutdown_serve()
        self.serving = False

    def s3(self):
        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def session_dir(self) -> str:
        """This cluster's session directory (its logs), as its GCS tells a driver."""
        return self.driver("print(json.dumps(ray._private.worker._global_node.get_session_dir_path()))\n")

    def replica_actors(self, app: str, deployment: str) -> list[str]:
        """Names of the live replica actors of a deployment."""
        prefix = f"SERVE_REPLICA::{app}#{deployment}#"
        return sorted(a["name"] for a in self.live_actors() if (a["name"] or "").startswith(prefix))

    def kill_busiest(self, replicas: list[str], within_s: float = 60) -> str:
        """ray.kill whichever of these replica actors holds the most requests (a crash under load,
        not an idle replica's), once one holds two, asking each its ongoing-request count as
        Serve's router does. Returns the killed actor's name."""
        return self.driver(
            "import time\n"
            f"names, deadline = {replicas!r}, time.monotonic() + {within_s}\n"
            "replicas = [ray.get_actor(name, namespace='serve') for name in names]\n"
            "while time.monotonic() < deadline:\n"
            "    ongoing = ray.get([r.get_num_ongoing_requests.remote() for r in replicas], timeout=30)\n"
            "    busiest = max(range(len(replicas)), key=ongoing.__getitem__)\n"
            "    if ongoing[busiest] >= 2:\n"
            "        ray.kill(replicas[busiest], no_restart=True)\n"
            "        print(json.dumps(names[busiest]))\n"
            "        break\n"
            "    time.sleep(0.1)\n"
            "else:\n"
            "    raise SystemExit(f'none of {names} was busy')\n"
        )

    def stop(self) -> None:
        super().stop()
        if self.s3_process:
            self.s3_process.terminate()
            self.s3_process.wait(timeout=30)
