"""The offline job's options: one pydantic model, from a YAML file (`--config job.yaml`, what a
RayJob can carry) and command-line flags, the flags winning. Every bound is checked here, and an
error names the flag (or the YAML key) it is about.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fluxray.params import MAX_GUIDANCE, MAX_SIDE, MAX_STEPS, MIN_SIDE, SEED_LIMIT, SIDE_MULTIPLE
from fluxray.runtime import RuntimeOptions
from fluxray.speed import SpeedOptionError, SpeedOptions, resolve
from fluxray.speed.flags import add_speed_arguments, speed_options_from_args
from fluxray.usage import ArgumentParser, UsageError

STAGES = ("encode", "denoise", "decode", "write")


class StageResources(BaseModel):
    """One stage's Ray Data actor pool."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(ge=1, description="Rows per batch.")
    actors: int = Field(default=1, ge=1, description="Actors in the pool.")
    cpus: float = Field(ge=0, description="CPUs per actor.")
    gpus: float = Field(default=0.0, ge=0, description="GPUs per actor (not for write).")


def _stage(batch_size: int, cpus: float) -> Any:
    return Field(
        default_factory=lambda: StageResources(batch_size=batch_size, cpus=cpus),
        description=f"Actor pool (default: batches of {batch_size}, 1 actor, {cpus:g} CPU).",
    )


class JobConfig(RuntimeOptions):
    """Everything `python -m jobs.generate` takes: what each stage actor runs (fluxray.runtime.RuntimeOptions:
    model, device, dtype, threads, LoRA registry, speed) and the job's own options."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="File or prefix (local or s3://) of .jsonl/.csv/.parquet/.txt prompts.")
    output: str = Field(description="Directory or s3:// prefix for images/, metadata/ and manifest/.")
    width: int | None = Field(
        default=None, ge=MIN_SIDE, le=MAX_SIDE, description="Width of rows without one (the model's default size)."
    )
    height: int | None = Field(
        default=None, ge=MIN_SIDE, le=MAX_SIDE, description="Height of rows without one (the model's default size)."
    )
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS, description="Steps of rows without (model default).")
    guidance: float | None = Field(
        default=None, ge=0, le=MAX_GUIDANCE, description="Guidance of rows without one (model default)."
    )
    true_cfg_scale: float = Field(
        default=1.0, ge=1.0, le=MAX_GUIDANCE, description="True CFG of rows with a negative prompt and none."
    )
    format: Literal["png", "jpeg", "webp"] = Field(default="png", description="Image file format.")
    seed_base: int = Field(
        default=0, ge=0, lt=SEED_LIMIT, description="Seeds of rows without one derive from this and the row's id."
    )
    limit: int | None = Field(default=None, ge=1, description="Only the first N rows.")
    strict: bool = Field(default=False, description="Fail before generating if any row is invalid or a duplicate.")
    overwrite: bool = Field(
        default=False, description="Regenerate rows written before with other settings (else: status conflict)."
    )
    max_retries: int = Field(
        default=3,
        ge=0,
        le=20,
        description="Tries after the first for a batch whose worker died; then the batch is split to find the row.",
    )
    progress_interval_s: float = Field(default=10.0, gt=0, description="Seconds between progress lines.")
    # Defaults fit a 2-core laptop: the denoiser gets a whole CPU, the rest share what is left.
    encode: StageResources = _stage(32, 0.25)
    denoise: StageResources = _stage(8, 1.0)
    decode: StageResources = _stage(8, 0.25)
    write: StageResources = _stage(32, 0.1)

    @model_validator(mode="before")
    @classmethod
    def _stage_defaults(cls, values: Any) -> Any:
        # `denoise: {batch_size: 4}` (or --denoise-batch-size 4) changes that field only.
        if isinstance(values, dict):
            for stage in STAGES:
                if isinstance(values.get(stage), dict):
                    default = cls.model_fields[stage].default_factory().model_dump()
                    values = {**values, stage: {**default, **values[stage]}}
        return values

    @field_validator("width", "height")
    @classmethod
    def _side(cls, value: int | None) -> int | None:
        if value is not None and value % SIDE_MULTIPLE:
            raise ValueError(f"must be a multiple of {SIDE_MULTIPLE} (got {value})")
        return value

    @field_validator("write")
    @classmethod
    def _write_has_no_gpu(cls, value: StageResources) -> StageResources:
        if value.gpus:
            raise ValueError("the write stage takes no GPU")
        return value

    def stage(self, name: str) -> StageResources:
        return getattr(self, name)


# Flags whose name is not the field's (`--width` is `width`; these differ).
_FLAG_OF_FIELD = {"true_cfg_scale": "--true-cfg-scale", "seed_base": "--seed-base"}
_BOOLEAN = {"strict", "overwrite"}
_OWN_FLAGS = [name for name in JobConfig.model_fields if name not in ("speed", *STAGES)]


def flag(field: str) -> str:
    return _FLAG_OF_FIELD.get(field, "--" + field.replace("_", "-"))


def build_parser() -> argparse.ArgumentParser:
    """Flags for every JobConfig field. None default everywhere: a flag overrides the config file
    only when given."""
    parser = ArgumentParser(
        prog="python -m jobs.generate", description="Prompts in, images + metadata + a manifest out."
    )
    parser.add_argument("--config", help="YAML file of JobConfig fields; flags given here override it")
    for name in _OWN_FLAGS:
        info = JobConfig.model_fields[name]
        if name in _BOOLEAN:
            parser.add_argument(flag(name), dest=name, action="store_const", const=True, help=info.description)
            continue
        kind = {int: int, float: float}.get(_scalar(info.annotation), str)
        parser.add_argument(flag(name), dest=name, type=kind, help=info.description)
    add_speed_arguments(parser)
    for stage in STAGES:
        group = parser.add_argument_group(f"{stage} stage")
        for field, kind in (("batch_size", int), ("actors", int), ("cpus", float), ("gpus", float)):
            if stage == "write" and field == "gpus":
                continue
            option, help_text = f"--{stage}-{field.replace('_', '-')}", StageResources.model_fields[field].description
            group.add_argument(option, dest=f"{stage}_{field}", type=kind, help=help_text)
    return parser


def _scalar(annotation) -> type | None:
    for kind in (int, float):
        if annotation is kind or kind in getattr(annotation, "__args__", ()):
            return kind
    return None


def load_config(argv: list[str] | None) -> JobConfig:
    """JobConfig from --config (if given) with the command line's flags over it; UsageError naming
    the flag or key of the first problem."""
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        try:
            loaded = yaml.safe_load(path.read_text())
        except OSError as error:
            raise UsageError(f"--config: cannot read {path} ({error.strerror})") from None
        except yaml.YAMLError as error:
            raise UsageError(f"--config: {path} is not valid YAML ({str(error).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise UsageError(f"--config: {path} must hold a mapping of options")
        values = loaded
    values.update({name: getattr(args, name) for name in _OWN_FLAGS if getattr(args, name) is not None})
    for stage in STAGES:
        given = {
            field: getattr(args, f"{stage}_{field}")
            for field in StageResources.model_fields
            if getattr(args, f"{stage}_{field}", None) is not None
        }
        if given:
            values[stage] = {**dict(values.get(stage) or {}), **given}
    given_speed = {f for f in SpeedOptions.model_fields if getattr(args, f"speed_{f}", None) is not None}
    try:
        speed_flags = speed_options_from_args(args).model_dump(include=given_speed)
    except SpeedOptionError as error:
        raise UsageError(str(error)) from None
    if speed_flags:
        values["speed"] = {**dict(values.get("speed") or {}), **speed_flags}
    for required in ("input", "output"):
        if not values.get(required):
            raise UsageError(f"{flag(required)} is required (on the command line or in --config)")
    try:
        config = JobConfig(**values)
    except ValidationError as error:
        raise UsageError(_describe(error)) from None
    check_speed(config)
    return config


def check_speed(config: JobConfig) -> None:
    """A stage with no GPU runs on the CPU: check its switches now, not in a failing actor. (A GPU
    stage's switches are checked where it loads: the driver may have no GPU.)"""
    try:
        for stage, part in (("encode", "text"), ("denoise", "transformer"), ("decode", "vae")):
            if config.device == "cpu" or (config.device == "auto" and not config.stage(stage).gpus):
                resolve(config.speed, "cpu", part)
    except SpeedOptionError as error:
        raise UsageError(str(error)) from None


def _describe(error: ValidationError) -> str:
    """The first problem, named as the flag that sets it: '--width: must be a multiple of 16 (got 100)'."""
    item = error.errors()[0]
    loc = [str(part) for part in item["loc"]]
    if loc and loc[0] in STAGES and len(loc) > 1:
        name = f"--{loc[0]}-{loc[1].replace('_', '-')}"
    elif loc and loc[0] == "speed" and len(loc) > 1:
        name = f"speed.{loc[1]}"
    else:
        name = flag(loc[0]) if loc else "config"
    message = "unknown option" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, ")
    return f"{name}: {message}"
