"""The offline job: prompts in, images + metadata + a manifest out, resumable and exactly once.

    python -m jobs.generate --input prompts.jsonl --output out/            # starts or joins Ray
    python -m jobs.generate --config job.yaml [--flags that override it]
    ray job submit --working-dir . -- python -m jobs.generate --input s3://b/p.jsonl --output s3://b/run/

First a plan (jobs.plan): one streamed pass over the input settles invalid, duplicate, skipped
and conflicting rows; then the pending rows run through the Ray Data stages (jobs.stages). Rows
whose batch was dropped because its worker died on every try run again in halved batches until,
at one row a batch, the row that kills its worker is found and marked failed.

Exit status: 0 when every row is written, skipped, invalid or a duplicate; 1 when a row failed;
2 for a usage or input error (nothing generated); 3 when rows conflict with earlier output (written
with other settings) and none failed.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import ray
import ray.data
from botocore.exceptions import BotoCoreError, ClientError

from fluxray.lora import LoraError, LoraRegistry
from fluxray.models.sources import ModelSource, ModelSourceError, resolve_model
from fluxray.storage import StorageError, endpoint_from_env, open_storage, split_input_uri
from jobs.config import STAGES, JobConfig, UsageError, load_config
from jobs.layout import model_identity
from jobs.manifest import ManifestWriter
from jobs.plan import SETTLED, FilePlan, OutputIndex, plan_rows
from jobs.progress import Progress
from jobs.prompts import InputError, JobDefaults, records
from jobs.stages import (
    FAULTS_ENV,
    DecodeStage,
    DenoiseStage,
    EncodeStage,
    PromptDatasource,
    WriteStage,
)

READ_CPUS = 0.1  # each read task's share; read tasks run beside the actor pools
RESOURCE_WAIT_S = 20.0  # resources busy with a finished job's actors come back within seconds


def resource_needs(config: JobConfig) -> dict[str, float]:
    cpus = READ_CPUS + sum(config.stage(s).cpus * config.stage(s).actors for s in STAGES)
    return {"CPU": cpus, "GPU": sum(config.stage(s).gpus * config.stage(s).actors for s in STAGES)}


def check_resources(needs: dict[str, float], cluster: dict, available: dict) -> None:
    """UsageError naming what is missing, and whether it is missing from the cluster or only busy
    (Ray would otherwise wait forever for actors that cannot be placed)."""
    for kind, need in needs.items():
        total, free = cluster.get(kind, 0.0), available.get(kind, 0.0)
        if need <= free + 1e-9:
            continue
        lower = f"lower --*-{kind.lower()}s or --*-actors"
        if need > total + 1e-9:
            raise UsageError(f"the stage actors need {need:g} {kind}s and the cluster has {total:g}; {lower}")
        raise UsageError(
            f"the stage actors need {need:g} {kind}s and the cluster has {total:g}, of which {total - free:g} "
            f"are busy ({free:g} free); wait for that work to finish, or {lower}"
        )


def wait_for_resources(needs: dict[str, float], timeout_s: float = RESOURCE_WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return check_resources(needs, ray.cluster_resources(), ray.available_resources())
        except UsageError as error:
            if time.monotonic() >= deadline or "are busy" not in str(error):
                raise
        time.sleep(0.5)


def build_dataset(
    config: JobConfig, source: ModelSource, defaults: JobDefaults, input_root: str, endpoint: str | None, plans, batch
):
    """The pipeline over the plan's pending rows; `batch` overrides every stage's batch size; `endpoint` is
    the S3 API's (read once by the driver: the workers do not inherit its environment)."""
    faults = os.environ.get(FAULTS_ENV)

    def pool(stage: str) -> dict:
        resources = config.stage(stage)
        options = {
            "batch_size": batch or resources.batch_size,
            "batch_format": "pyarrow",
            # In a pass that retries lost rows, an actor holds one batch at a time: a batch queued
            # behind another on a worker that dies would die with it, and a healthy row could use up
            # its tries beside a poisoned one even when each is alone in its batch.
            "compute": ray.data.ActorPoolStrategy(
                size=resources.actors, max_tasks_in_flight_per_actor=1 if batch else None
            ),
            "num_cpus": resources.cpus,
            # A dead actor is always replaced; what is bounded is how often one batch is tried, and
            # every death uses up a try, so restarts are bounded too. (A per-actor restart cap left
            # the pool with no actor and stalled the job for minutes in Ray 2.60.)
            "max_restarts": -1,
            "max_task_retries": config.max_retries,
        }
        if resources.gpus:
            options["num_gpus"] = resources.gpus
        if faults:
            options["runtime_env"] = {"env_vars": {FAULTS_ENV: faults}}
        return options

    block_rows = batch or min(config.stage(s).batch_size for s in STAGES)
    model_args = (config.model, config.device, config.dtype, config.torch_threads)
    speed = {"speed": config.speed}
    ds = ray.data.read_datasource(
        PromptDatasource(input_root, plans, defaults, endpoint, block_rows), num_cpus=READ_CPUS
    )
    with warnings.catch_warnings():
        # Ray 2.60 names no parameter for max_restarts/max_task_retries: they can only go through
        # the **ray_remote_args that it deprecates (for removal in 2.64).
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        inputs = {**speed, "input_root": input_root, "endpoint_url": endpoint}  # where edit rows' images are
        ds = ds.map_batches(EncodeStage, fn_constructor_args=model_args, fn_constructor_kwargs=inputs, **pool("encode"))
        loras = {
            "lora_root": config.lora_root,
            "max_lora_rank": config.max_lora_rank,
            "max_resident_loras": config.max_resident_loras,
            "endpoint_url": endpoint,  # an s3:// --lora-root's
        }
        for stage, cls, kwargs in (("denoise", DenoiseStage, {**speed, **loras}), ("decode", DecodeStage, speed)):
            ds = ds.map_batches(
                cls, fn_constructor_args=(*model_args, config.format), fn_constructor_kwargs=kwargs, **pool(stage)
            )
        write_args = (config.output, endpoint, source.name, defaults.model_identity, config.format)
        return ds.map_batches(WriteStage, fn_constructor_args=write_args, **pool("write"))


def generate(
    config: JobConfig, source, defaults, input_root: str, endpoint: str | None, plans: list[FilePlan], manifest
) -> Progress:
    """Run the plan's pending rows through the stages, again in halved batches for rows lost with a
    worker that died on every try, until one row a batch; rows lost then are failed."""
    ray.init(
        address=os.environ.get("RAY_ADDRESS") or None,
        ignore_reinit_error=True,
        log_to_driver=False,
        logging_level="ERROR",
    )
    wait_for_resources(resource_needs(config))
    context = ray.data.DataContext.get_current()
    context.max_errored_blocks = -1  # a dropped batch costs its rows for this pass only (see below)
    context.enable_progress_bars = False  # the driver prints its own progress line
    progress = Progress(sum(p.pending for p in plans), config.progress_interval_s)
    batch = None
    while True:
        ds = build_dataset(config, source, defaults, input_root, endpoint, plans, batch)
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            manifest.add_table(table)
            for file, row in zip(table.column("file").to_pylist(), table.column("row").to_pylist()):
                plans[file].codes[row] = SETTLED
            seconds = {s: sum(table.column(f"{s}_s").to_pylist()) for s in STAGES}
            progress.update(table.column("status").to_pylist(), seconds, table.num_rows)
        lost = sum(p.pending for p in plans)
        used = batch or min(config.stage(s).batch_size for s in STAGES)
        if not lost:
            return progress
        if used == 1:
            reason = f"its worker died on each of {config.max_retries + 1} tries, alone in its batch"
            _fail_lost(plans, defaults, input_root, endpoint, manifest, progress, reason)
            return progress
        batch = max(1, used // 2)
        print(f"{lost} rows were lost with a worker that died on every try; again in batches of {batch}", flush=True)


def _fail_lost(plans, defaults, input_root: str, endpoint: str | None, manifest, progress, reason: str) -> None:
    storage = open_storage(input_root, endpoint)
    for plan in plans:
        if not plan.pending:
            continue
        for row, record in enumerate(records(storage, plan.key, defaults, len(plan.codes))):
            if plan.codes[row]:
                manifest.add({**record, "status": "failed", "reason": reason})
                progress.update(["failed"], {}, 0)
                plan.codes[row] = SETTLED


def lora_names(lora_root: str | None, endpoint: str | None) -> frozenset[str] | None:
    """The LoRAs rows may name (None without --lora-root); UsageError for a root that is not a directory."""
    if lora_root is None:
        return None
    try:
        return frozenset(LoraRegistry(lora_root, endpoint_url=endpoint).names())
    except LoraError as error:
        raise UsageError(f"--lora-root: {error}") from None


def run(config: JobConfig) -> int:
    source = resolve_model(config.model)
    size = source.spec.default_size
    endpoint = endpoint_from_env()  # the one read of it: every stage is handed it
    defaults = JobDefaults(
        spec=source.spec,
        width=config.width or size,
        height=config.height or size,
        steps=config.steps,
        guidance=config.guidance,
        true_cfg_scale=config.true_cfg_scale,
        seed_base=config.seed_base,
        output_format=config.format,
        model_identity=model_identity(source, config.speed.quantize),
        lora_names=lora_names(config.lora_root, endpoint),
    )
    input_storage, keys = split_input_uri(config.input, endpoint)
    output = open_storage(config.output, endpoint)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = ManifestWriter(Path(tmp) / "manifest.parquet")
        index = OutputIndex(Path(tmp) / "index.sqlite")
        try:
            try:
                earlier = index.load(output.scan("metadata/"))
            except (BotoCoreError, ClientError) as error:
                raise StorageError(f"{config.output}: cannot list metadata/ ({error})") from None
            plans = plan_rows(
                input_storage, keys, defaults, index, manifest, config.limit, config.strict, config.overwrite
            )
        finally:
            index.close()
        rows, pending = sum(len(p.codes) for p in plans), sum(p.pending for p in plans)
        settled = ", ".join(f"{n} {status}" for status, n in sorted(manifest.counts.items()))
        print(
            f"input: {rows} rows in {len(plans)} file(s); {pending} to generate"
            + (f"; {settled}" if settled else "")
            + f"; {earlier} records under {config.output} before",
            flush=True,
        )
        progress = None
        if pending:
            progress = generate(config, source, defaults, input_storage.uri, endpoint, plans, manifest)
            print(progress.line(), flush=True)
        manifest_key = f"manifest/{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}.parquet"
        output.put(manifest_key, manifest.close(), "application/vnd.apache.parquet")
    wall = time.monotonic() - started
    counts = manifest.counts
    rate = counts["written"] / wall if wall > 0 else 0.0
    for line in progress.stage_lines() if progress else []:
        print(line, flush=True)
    print(
        " ".join(f"{status}={counts[status]}" for status in ("written", "skipped", "invalid", "duplicate"))
        + f" conflict={counts['conflict']} failed={counts['failed']} images/s={rate:.2f} wall={wall:.1f}s"
        + f" manifest={manifest_key}",
        flush=True,
    )
    if counts["failed"]:
        first = manifest.first["failed"]
        _error(f"{counts['failed']} rows failed (first: {first['source']}: {first['reason']})")
        return 1
    if counts["conflict"]:
        first = manifest.first["conflict"]
        _error(
            f"{counts['conflict']} rows were written before with other settings (first: {first['id']}); "
            "rerun with --overwrite to regenerate them, or write to another --output"
        )
        return 3
    return 0


def _error(message: str) -> None:
    print(f"jobs.generate: error: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    try:
        return run(load_config(argv))
    except (UsageError, InputError, StorageError, ModelSourceError) as error:
        message = str(error)
    except KeyboardInterrupt:
        message = "interrupted"
    _error(message)
    return 2


if __name__ == "__main__":
    sys.exit(main())
