"""The offline job: prompts in, images + metadata + a manifest out, resumable and exactly once.

    python -m jobs.generate --input prompts.jsonl --output out/            # starts or joins Ray
    ray job submit --working-dir . -- python -m jobs.generate --input s3://b/p.jsonl --output s3://b/run/

Output under --output: images/{id}.{ext}, metadata/{id}.json (written after its image, so it marks a
complete record) and manifest/{run}.parquet (every input row with its status and reason). A re-run
skips every id whose metadata exists, so a killed job, re-run, ends with each row written once.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from fluxray.acceleration import (  # noqa: E402
    SpeedOptionError,
    add_speed_arguments,
    resolve,
    speed_options_from_args,
)
from fluxray.params import MAX_SIDE, MIN_SIDE  # noqa: E402
from fluxray.sources import ModelSourceError, resolve_model  # noqa: E402
from jobs.prompts import InputError, JobDefaults, records  # noqa: E402
from jobs.storage import StorageError, open_storage, split_input_uri  # noqa: E402


class UsageError(Exception):
    """A mistake in the job's command line or input; printed as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="python -m jobs.generate", description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="file or prefix (local or s3://) of .jsonl/.csv/.parquet/.txt")
    p.add_argument("--output", required=True, help="directory or s3:// prefix")
    p.add_argument("--model", default="tiny", help="tiny, flux-dev, flux-schnell, a path, random:<spec>")
    p.add_argument("--width", type=int, default=None, help="default width (model's natural size when unset)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="default steps (the model's default when unset)")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--true-cfg-scale", type=float, default=1.0, help="default true CFG for rows with a negative")
    p.add_argument("--format", choices=("png", "jpeg", "webp"), default="png")
    p.add_argument("--seed-base", type=int, default=0, help="seeds of rows without one derive from this and the id")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows")
    p.add_argument("--strict", action="store_true", help="fail before generating if any row is invalid")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--torch-threads", type=int, default=None, help="torch CPU threads per stage actor")
    add_speed_arguments(p)
    for stage, batch, actors, cpus, gpus in (
        # Defaults fit a 2-core laptop: the denoiser gets a whole CPU, the rest share what is left.
        ("encode", 32, 1, 0.25, 0.0),
        ("denoise", 8, 1, 1.0, 0.0),
        ("decode", 8, 1, 0.25, 0.0),
        ("write", 32, 1, 0.1, None),
    ):
        p.add_argument(f"--{stage}-batch-size", type=int, default=batch, help=f"rows per {stage} batch")
        p.add_argument(f"--{stage}-actors", type=int, default=actors, help=f"{stage} actor pool size")
        p.add_argument(f"--{stage}-cpus", type=float, default=cpus, help=f"CPUs per {stage} actor")
        if gpus is not None:
            p.add_argument(f"--{stage}-gpus", type=float, default=gpus, help=f"GPUs per {stage} actor")
    args = p.parse_args(argv)
    for name in ("width", "height"):
        value = getattr(args, name)
        if value is not None and not (MIN_SIDE <= value <= MAX_SIDE and value % 16 == 0):
            raise UsageError(f"--{name} must be a multiple of 16 in {MIN_SIDE}-{MAX_SIDE} (got {value})")
    for name in (
        "limit",
        "encode_batch_size",
        "denoise_batch_size",
        "decode_batch_size",
        "write_batch_size",
        "encode_actors",
        "denoise_actors",
        "decode_actors",
        "write_actors",
    ):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    try:
        args.speed = speed_options_from_args(args)
        # A stage with no GPU runs on the CPU: check its switches now, not in a failing actor.
        for stage, part in (("encode", "text"), ("denoise", "transformer"), ("decode", "vae")):
            if args.device == "cpu" or (args.device == "auto" and not getattr(args, f"{stage}_gpus")):
                resolve(args.speed, "cpu", part)
    except SpeedOptionError as error:
        raise UsageError(str(error)) from None
    return args


def scan(input_root, keys: list[str], defaults: JobDefaults, limit: int | None, strict: bool):
    """A streamed first pass: parse every file (a malformed one fails now, by name), count rows,
    apply --limit per file, and with --strict stop at the first invalid row."""
    files, counts, remaining = [], Counter(), limit
    for key in keys:
        if remaining is not None and remaining <= 0:
            break
        n = 0
        for record in records(input_root, key, defaults, remaining):
            n += 1
            counts[record["status"]] += 1
            if strict and record["status"] == "invalid":
                raise UsageError(f"--strict: {record['source']} is invalid: {record['reason']}")
        files.append((key, n))
        if remaining is not None:
            remaining -= n
    return files, counts


def check_resources(available: dict, args: argparse.Namespace) -> None:
    """Fail now, naming the options, if the stage actors cannot all be placed (Ray would wait forever)."""
    stages = ("encode", "denoise", "decode", "write")
    # The existence check runs as a second pool of write-sized actors, and reads take 0.1 CPU.
    cpus = sum(getattr(args, f"{s}_cpus") * getattr(args, f"{s}_actors") for s in stages)
    cpus += args.write_cpus * args.write_actors + 0.1
    gpus = sum(getattr(args, f"{s}_gpus") * getattr(args, f"{s}_actors") for s in stages[:3])
    if cpus > available.get("CPU", 0) + 1e-9:
        raise UsageError(
            f"the stage actors need {cpus:g} CPUs and the cluster has {available.get('CPU', 0):g}; "
            "lower --*-cpus or --*-actors"
        )
    if gpus > available.get("GPU", 0) + 1e-9:
        raise UsageError(
            f"the stage actors need {gpus:g} GPUs and the cluster has {available.get('GPU', 0):g}; "
            "lower --*-gpus or --*-actors"
        )


def run(args: argparse.Namespace) -> int:
    import ray
    import ray.data

    from jobs.stages import (
        DecodeStage,
        DenoiseStage,
        EncodeStage,
        PromptDatasource,
        SkipWritten,
        WriteStage,
    )

    source = resolve_model(args.model)
    natural = 256 if source.spec.name == "tiny" else 1024
    defaults = JobDefaults(
        spec=source.spec,
        width=args.width or natural,
        height=args.height or natural,
        steps=args.steps,
        guidance=args.guidance,
        true_cfg_scale=args.true_cfg_scale,
        seed_base=args.seed_base,
        output_format=args.format,
    )
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
    input_storage, keys = split_input_uri(args.input, endpoint)
    output = open_storage(args.output, endpoint)
    files, scanned = scan(input_storage, keys, defaults, args.limit, args.strict)
    input_root = input_storage.uri
    print(f"input: {sum(n for _, n in files)} rows in {len(files)} file(s); {scanned['invalid']} invalid", flush=True)

    ray.init(
        address=os.environ.get("RAY_ADDRESS") or None,
        ignore_reinit_error=True,
        log_to_driver=False,
        logging_level="ERROR",
    )
    started = time.monotonic()

    def pool(stage: str) -> dict:
        options = {
            "batch_size": getattr(args, f"{stage}_batch_size"),
            "compute": ray.data.ActorPoolStrategy(size=getattr(args, f"{stage}_actors")),
            "num_cpus": getattr(args, f"{stage}_cpus"),
            "max_restarts": -1,  # a dead actor is replaced and its batch retried
            "max_task_retries": -1,
        }
        gpus = getattr(args, f"{stage}_gpus", 0)
        if gpus:
            options["num_gpus"] = gpus
        return options

    model_args = (args.model, args.device, args.dtype, args.torch_threads)
    check_resources(ray.cluster_resources(), args)
    ds = ray.data.read_datasource(PromptDatasource(input_root, files, defaults, endpoint), num_cpus=0.1)
    ds = ds.map_batches(
        SkipWritten,
        fn_constructor_args=(args.output, endpoint),
        batch_format="numpy",
        **{**pool("write"), "batch_size": args.write_batch_size},
    )
    speed = {"speed": args.speed}
    ds = ds.map_batches(
        EncodeStage, fn_constructor_args=model_args, fn_constructor_kwargs=speed, batch_format="numpy", **pool("encode")
    )
    ds = ds.map_batches(
        DenoiseStage,
        fn_constructor_args=(*model_args, args.format),
        fn_constructor_kwargs=speed,
        batch_format="numpy",
        **pool("denoise"),
    )
    ds = ds.map_batches(
        DecodeStage,
        fn_constructor_args=(*model_args, args.format),
        fn_constructor_kwargs=speed,
        batch_format="numpy",
        **pool("decode"),
    )
    ds = ds.map_batches(
        WriteStage,
        fn_constructor_args=(args.output, endpoint, source.name, args.format),
        batch_format="numpy",
        **pool("write"),
    )

    counts = Counter()
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    manifest_key = f"manifest/{run_id}-{os.getpid()}.parquet"
    with tempfile.TemporaryDirectory() as tmp:
        import pyarrow.parquet as pq

        from jobs.stages import MANIFEST_SCHEMA

        local = Path(tmp) / "manifest.parquet"
        # The manifest streams to a local file as rows finish, so the driver holds one batch at a time.
        with pq.ParquetWriter(local, MANIFEST_SCHEMA) as writer:
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                writer.write_table(batch.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA))
                counts.update(batch.column("status").to_pylist())
        output.put(manifest_key, local.read_bytes(), "application/vnd.apache.parquet")
    wall = time.monotonic() - started
    rate = counts["written"] / wall if wall > 0 else 0.0
    print(
        f"written={counts['written']} skipped={counts['skipped']} invalid={counts['invalid']} "
        f"failed={counts['failed']} images/s={rate:.2f} wall={wall:.1f}s manifest={manifest_key}",
        flush=True,
    )
    return 0 if counts["failed"] == 0 else 1


def main(argv: list[str] | None = None) -> int:
    try:
        return run(parse_args(argv))
    except (UsageError, InputError, StorageError, ModelSourceError) as error:
        message = str(error)
    except KeyboardInterrupt:
        message = "interrupted"
    print(f"jobs.generate: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
